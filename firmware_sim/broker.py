"""A mosquitto broker for devices: mutual TLS, CN as username, device ACL."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from firmware_sim.errors import BrokerError
from firmware_sim.process import stop_process
from tpm_simulator.errors import PortInUseError
from tpm_simulator.ports import port_is_free

logger = logging.getLogger(__name__)

# Started as root, mosquitto switches to this user before it loads
# certificates, keys and CRLs, and again reads the CRL as this user when it
# reloads: every file it needs must be readable by it.
RUN_AS = "mosquitto"

TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")

# A device reaches only the topics under its own certificate CN, which
# use_identity_as_username makes its username.
DEVICE_PATTERN = "devices/%u/#"

CONF = "mosquitto.conf"
ACL = "acl"
CA_BUNDLE = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CRL = "crl.pem"
LOG = "mosquitto.log"
PID = "mosquitto.pid"

_READY_LINE = " running"
_RELOAD_LINE = "Reloading config."
_POLL_INTERVAL = 0.005


class Broker:
    """mosquitto on loopback, configured and run from ``workdir``.

    The CA bundle, server certificate and key, and CRL are copied into
    ``workdir`` so that mosquitto can read them after dropping its
    privileges; :meth:`reload` copies them again and makes mosquitto
    re-read them.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        ca_file: Path,
        server_cert_file: Path,
        server_key_file: Path,
        crl_file: Path | None = None,
        acl: bool = True,
        tls_version: str = "tlsv1.2",
        service_users: Mapping[str, Sequence[str]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if tls_version not in TLS_VERSIONS:
            raise BrokerError(
                f"tls_version {tls_version!r} is not one of {TLS_VERSIONS}"
            )

        self.workdir = Path(workdir)
        self.port = port
        self.host = host
        self.ca_file = Path(ca_file)
        self.server_cert_file = Path(server_cert_file)
        self.server_key_file = Path(server_key_file)
        self.crl_file = None if crl_file is None else Path(crl_file)
        self.acl = acl
        self.tls_version = tls_version
        self.service_users = dict(service_users or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / CONF

    @property
    def acl_path(self) -> Path:
        return self.workdir / ACL

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG

    @property
    def pid_path(self) -> Path:
        return self.workdir / PID

    @property
    def pid(self) -> int | None:
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 5.0) -> None:
        """Start mosquitto and return once it listens on its port."""
        if self.running:
            raise BrokerError(f"broker on port {self.port} already runs")
        if not port_is_free(self.port, self.host):
            raise PortInUseError(self.port, "mosquitto")

        self._install()
        self._process = self._spawn()
        self._wait_ready(self._process, timeout)
        logger.info(
            "broker started: pid %d, port %d, dir %s",
            self._process.pid,
            self.port,
            self.workdir,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop mosquitto: SIGTERM, then SIGKILL once ``timeout`` passed."""
        process = self._process
        if process is None:
            return

        self._process = None
        if process.poll() is not None:
            return

        if not stop_process(process, timeout):
            logger.warning("broker pid %d ignored SIGTERM", process.pid)
        logger.info("broker stopped: pid %d, port %d", process.pid, self.port)

    def reload(self, timeout: float = 5.0) -> None:
        """Copy the inputs again and have mosquitto re-read them (SIGHUP).

        Returns once mosquitto has logged the reload; connections made
        from then on are checked against the new CRL, while connections
        already open stay open.
        """
        pid = self.pid
        if pid is None:
            raise BrokerError(f"broker on port {self.port} is not running")

        reloads = self.log_text().count(_RELOAD_LINE)
        self._copy_inputs()
        os.kill(pid, signal.SIGHUP)
        self.wait_for_log(_RELOAD_LINE, timeout, count=reloads + 1)
        logger.info("broker on port %d reloaded", self.port)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(
        self, text: str, timeout: float = 5.0, count: int = 1
    ) -> None:
        """Wait until ``text`` appears ``count`` times in the broker log."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"broker on port {self.port}: no {text!r} in its log "
                    f"after {timeout:g} s"
                )
            time.sleep(_POLL_INTERVAL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        return render_config(
            port=self.port,
            host=self.host,
            ca_file=self.workdir / CA_BUNDLE,
            cert_file=self.workdir / SERVER_CERT,
            key_file=self.workdir / SERVER_KEY,
            crl_file=None if self.crl_file is None else self.workdir / CRL,
            acl_file=self.acl_path if self.acl else None,
            tls_version=self.tls_version,
            pid_file=self.pid_path,
        )

    def acl_text(self) -> str:
        """The ACL: devices under their own CN, service users as given."""
        return render_acl(self.service_users)

    def _install(self) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_reachable()

        self.conf_path.write_text(self.config_text())
        self.acl_path.write_text(self.acl_text())
        self.pid_path.unlink(missing_ok=True)
        self._copy_inputs()

    def _copy_inputs(self) -> None:
        inputs = [
            (self.ca_file, CA_BUNDLE, 0o644),
            (self.server_cert_file, SERVER_CERT, 0o644),
            (self.server_key_file, SERVER_KEY, 0o600),
        ]
        if self.crl_file is not None:
            inputs.append((self.crl_file, CRL, 0o644))

        for source, name, mode in inputs:
            _copy(source, self.workdir / name, mode)
        _hand_over(self.workdir)

    def _check_reachable(self) -> None:
        if os.geteuid() != 0:
            return

        blocking = _first_blocking_dir(self.workdir.resolve().parent)
        if blocking is not None:
            raise BrokerError(
                f"mosquitto runs as user {RUN_AS} and cannot enter "
                f"{blocking}; use a work directory it can reach"
            )

    def _spawn(self) -> subprocess.Popen[bytes]:
        # A new session keeps a terminal's Ctrl-C aimed at whoever started
        # the broker from reaching it.
        with self.log_path.open("wb") as log:
            return subprocess.Popen(
                ["mosquitto", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _wait_ready(
        self, process: subprocess.Popen[bytes], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening():
            if process.poll() is not None:
                self._process = None
                raise self._start_failure(f"exited with {process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise self._start_failure(f"not ready after {timeout:g} s")
            time.sleep(_POLL_INTERVAL)

    def _listening(self) -> bool:
        # mosquitto logs that it runs once its listeners are open; the
        # port check makes sure the listener is ours.
        return _READY_LINE in self.log_text() and not port_is_free(
            self.port, self.host
        )

    def _start_failure(self, what: str) -> BrokerError | PortInUseError:
        if not port_is_free(self.port, self.host):
            return PortInUseError(self.port, "mosquitto")

        tail = " | ".join(self.log_text().strip().splitlines()[-4:])
        return BrokerError(f"broker on port {self.port} {what}: {tail}")


def render_config(
    *,
    port: int,
    host: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    crl_file: Path | None,
    acl_file: Path | None,
    tls_version: str = "tlsv1.2",
    pid_file: Path | None = None,
) -> str:
    """A mosquitto.conf for devices: mutual TLS, the CN as username.

    One listener on ``host`` and ``port`` requires a client certificate
    that chains to ``ca_file`` and, if ``crl_file`` is given, is not
    revoked by it; ``acl_file`` limits what each user reaches.
    """
    lines = [
        f"user {RUN_AS}",
        "per_listener_settings false",
        "allow_anonymous false",
        "persistence false",
        # The log goes to stderr, which whoever starts mosquitto points
        # at a file or a journal, so it needs no file mosquitto's user
        # can write, and startup errors land in it too. mosquitto writes
        # each line at once there, where stdout would be buffered.
        "log_dest stderr",
        "log_type all",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]
    if pid_file is not None:
        lines.append(f"pid_file {pid_file}")
    # Without it every connect stalls on Nagle's algorithm.
    lines.append("set_tcp_nodelay true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    lines += [
        "",
        f"listener {port} {host}",
        f"cafile {ca_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
        f"tls_version {tls_version}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if crl_file is not None:
        lines.append(f"crlfile {crl_file}")
    return "\n".join(lines) + "\n"


def render_acl(service_users: Mapping[str, Sequence[str]]) -> str:
    """An ACL: devices under their own CN, service users as given."""
    lines = [f"pattern readwrite {DEVICE_PATTERN}"]
    for user, topics in service_users.items():
        lines += ["", f"user {user}"]
        lines += [f"topic readwrite {topic}" for topic in topics]
    return "\n".join(lines) + "\n"


def unreachable_dir(directory: Path) -> Path | None:
    """Where mosquitto, started by us as root, could not enter on its way.

    That is the first directory down to ``directory`` (which exists)
    that user RUN_AS may not enter; None when we are not root, since
    mosquitto then keeps our user.
    """
    if os.geteuid() != 0:
        return None
    return _first_blocking_dir(directory.resolve())


def run_as_group() -> int:
    """The group id of RUN_AS, which mosquitto reads files as."""
    return _run_as().pw_gid


def _copy(source: Path, target: Path, mode: int) -> None:
    # Replacing the file whole means mosquitto never reads half of one.
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
    except OSError as exc:
        raise BrokerError(f"{source}: {exc.strerror}") from None
    os.chmod(partial, mode)
    os.replace(partial, target)


def _hand_over(workdir: Path) -> None:
    """Give the work directory and its files to mosquitto's user."""
    if os.geteuid() != 0:
        return

    user = _run_as()
    for path in [workdir, *workdir.iterdir()]:
        os.chown(path, user.pw_uid, user.pw_gid)


def _first_blocking_dir(directory: Path) -> Path | None:
    """The first directory on the way to ``directory`` the user can't enter."""
    user = _run_as()
    groups = set(os.getgrouplist(RUN_AS, user.pw_gid))

    for path in [*reversed(directory.parents), directory]:
        info = path.stat()
        if info.st_uid == user.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return path
    return None


def _run_as() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        raise BrokerError(
            f"mosquitto drops to user {RUN_AS} when started as root, "
            "and there is no such user"
        ) from None
