"""Free TCP ports on loopback, picked below the ephemeral range."""

from __future__ import annotations

import errno
import logging
import random
import socket

logger = logging.getLogger(__name__)

# A client socket polling a port in the ephemeral range (32768 and up on
# Linux) can be given that very port as its own and connect to itself,
# which looks like a server that is ready. Ports below the range cannot.
LOWEST = 20000
HIGHEST = 32767
ATTEMPTS = 200

# Ports this process has handed out are not handed out again, so that two
# servers set up before either binds do not get the same port.
_handed_out: set[int] = set()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` of ``host`` right now.

    Like the servers we start, the probe sets SO_REUSEADDR, so connections
    of an earlier server left in TIME_WAIT do not count as taking the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing holds, below the ephemeral range."""
    return _free_run(1, host)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """The first of two consecutive free ports (swtpm's server and ctrl)."""
    return _free_run(2, host)


def _free_run(count: int, host: str) -> int:
    # Random picks keep concurrent processes, such as test workers, from
    # walking the same sequence of ports.
    for _ in range(ATTEMPTS):
        first = random.randint(LOWEST, HIGHEST - count + 1)  # noqa: S311
        run = range(first, first + count)
        if any(port in _handed_out for port in run):
            continue
        if all(port_is_free(port, host) for port in run):
            _handed_out.update(run)
            logger.debug("picked port %d (+%d)", first, count - 1)
            return first
    raise OSError(errno.EADDRINUSE, f"no {count} free ports on {host}")
