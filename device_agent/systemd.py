"""systemd's notify protocol: READY, WATCHDOG and STATUS, when run by it."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state to systemd when ``$NOTIFY_SOCKET`` is set, else nothing."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = (
            int(usec) / 2_000_000 if usec.isdigit() and int(usec) else None
        )

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        address = self.address
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(text.encode(), address)
        except OSError as exc:
            logger.debug("systemd notify failed: %s", exc)
