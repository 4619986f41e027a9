"""Start, probe, flush and stop a swtpm serving TPM 2.0 on loopback."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import TPM2_CAP, TPM2_RC

from tpm_simulator.errors import PortInUseError, SimulatorError
from tpm_simulator.ports import port_is_free

logger = logging.getLogger(__name__)

PID_FILE = "swtpm.pid"
PORT_FILE = "swtpm.port"
LOG_FILE = "swtpm.log"

# From log level 2 on, swtpm writes every TPM command and response it
# handles to its log, which lets tests count TPM round trips; at 5 and
# above libtpms adds its own debug output.
DEFAULT_LOG_LEVEL = 2

# TPM2_GetRandom for 8 bytes: tag, size, command code, bytesRequested.
_GET_RANDOM = struct.pack(">HIIH", 0x8001, 12, 0x17B, 8)

# The control channel's CMD_GET_CAPABILITY, answered with a result code.
_CTRL_GET_CAPABILITY = struct.pack(">I", 1)

# swtpm takes a TCP port and its control channel the next one.
LOWEST_PORT = 1
HIGHEST_PORT = 65534

_TPM2_HT_TRANSIENT = 0x80
_PROBE_TIMEOUT = 0.5
_POLL_INTERVAL = 0.005
_LOG_TAIL_LINES = 5

# A pid or a port takes a few bytes; more is not one.
_NOTE_BYTES = 64

# How long a swtpm that outran the start timeout gets to finish
# daemonizing, so that the daemon it leaves can be found and stopped.
_DAEMONIZE_GRACE = 5.0


class Swtpm:
    """A swtpm process whose state lives in ``state_dir``.

    The process is found through the pid file that swtpm writes into the
    state directory, so one process can start it and another can ask for
    its status, flush it, or stop it.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        log_level: int = DEFAULT_LOG_LEVEL,
    ) -> None:
        # swtpm changes to / when it daemonizes, so a relative state dir
        # would name another directory once it runs.
        self.state_dir = Path(state_dir).absolute()
        self.port = port
        self.host = host
        self.log_level = log_level

    @classmethod
    def from_state_dir(cls, state_dir: Path, host: str = "127.0.0.1") -> Swtpm:
        """The swtpm last started in ``state_dir``, on its remembered port."""
        port = remembered_port(state_dir)
        if port is None:
            raise SimulatorError(f"no swtpm was started in {state_dir}")
        return cls(state_dir, port, host)

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def port_path(self) -> Path:
        return self.state_dir / PORT_FILE

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        """The pid of the running swtpm of this state dir, if there is one."""
        try:
            pid = int(_read_note(self.pid_path))
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and _is_swtpm(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 5.0) -> None:
        """Start swtpm and return once it has answered a TPM command."""
        pid = self.pid
        if pid is not None:
            raise SimulatorError(
                f"swtpm already runs for {self.state_dir} (pid {pid})"
            )
        if "," in str(self.state_dir):
            # swtpm splits its options at commas and has no way to quote.
            raise SimulatorError(
                f"{self.state_dir}: swtpm cannot use a path with a comma"
            )
        if not self._ports_free():
            raise PortInUseError(self.port, "swtpm")

        self._prepare_state_dir()
        self._daemonize(timeout)
        try:
            self._wait_ready(timeout)
        except BaseException:
            # Also on Ctrl-C or SIGTERM: a daemon nobody waits for would
            # hold its ports until someone finds and kills it.
            self.stop()
            raise
        logger.info(
            "swtpm started: pid %s, port %d, state %s",
            self.pid,
            self.port,
            self.state_dir,
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop swtpm: SIGTERM, then SIGKILL once ``timeout`` has passed.

        Returns the pid stopped; None if no swtpm was running.
        """
        pid = self.pid
        if pid is None:
            return None

        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            logger.warning("swtpm pid %d ignored SIGTERM, killing", pid)
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, timeout)

        # swtpm removes its pid file on a clean exit, not after SIGKILL.
        self.pid_path.unlink(missing_ok=True)
        logger.info("swtpm stopped: pid %d, port %d", pid, self.port)
        return pid

    def answers(self, timeout: float = _PROBE_TIMEOUT) -> bool:
        """Whether the TPM and its control channel answer right now."""
        try:
            tpm_rc = _tpm_exchange(self.host, self.port, timeout)
            ctrl_rc = _ctrl_exchange(self.host, self.ctrl_port, timeout)
        except OSError:
            return False
        return tpm_rc == 0 and ctrl_rc == 0

    def status(self) -> dict[str, Any]:
        """What a person or a script needs to know about this swtpm."""
        pid = self.pid
        return {
            "state_dir": str(self.state_dir),
            "port": self.port,
            "ctrl_port": self.ctrl_port,
            "tcti": self.tcti,
            "pid": pid,
            "running": pid is not None,
            "answers": pid is not None and self.answers(),
            "log": str(self.log_path),
        }

    def transient_handles(self) -> list[int]:
        """The handles of every transient object loaded in the TPM."""
        with self._esapi() as ectx:
            return _transient_handles(ectx)

    def flush(self) -> int:
        """Flush every transient object and return how many there were.

        A client killed while it held a key leaves that key loaded, and
        swtpm has no resource manager to clean up after it: three such keys
        fill its object slots.
        """
        with self._esapi() as ectx:
            flushed = sum(
                _flush_handle(ectx, handle)
                for handle in _transient_handles(ectx)
            )

        logger.info("swtpm port %d: flushed %d objects", self.port, flushed)
        return flushed

    def commands_logged(self) -> int:
        """How many TPM commands swtpm has logged (log level 2 and up)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("SWTPM_IO_Read:")

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

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

    def _command(self) -> list[str]:
        return [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--server",
            f"type=tcp,port={self.port},bindaddr={self.host}",
            "--ctrl",
            f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
            "--flags",
            "not-need-init,startup-clear",
            "--daemon",
            "--pid",
            f"file={self.pid_path}",
            "--log",
            f"file={self.log_path},level={self.log_level}",
        ]

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

            # A pid file left by a killed swtpm names a pid that may be
            # reused.
            self.pid_path.unlink(missing_ok=True)
            _write_replacing(self.port_path, f"{self.port}\n")
        except OSError as exc:
            where = exc.filename or self.state_dir
            raise SimulatorError(f"{where}: {exc.strerror or exc}") from None

    def _daemonize(self, timeout: float) -> None:
        # With --daemon swtpm binds its sockets and writes its pid file
        # before the parent exits, so a port in use shows as a failed
        # start, and no process of ours is left to reap. The daemon runs
        # in its own session, out of reach of the starting terminal.
        process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._abandon(process)
            raise self._start_failure(
                f"did not daemonize in {timeout:g} s"
            ) from None
        except BaseException:
            self._abandon(process)
            raise

        if process.returncode != 0:
            text = stderr.decode(errors="replace").strip()
            raise self._start_failure(
                f"exited with {process.returncode} {text}".rstrip()
            )

    def _abandon(self, process: subprocess.Popen[bytes]) -> None:
        """Reap a swtpm that did not daemonize in time, and its daemon."""
        # The parent exits only once the daemon has written its pid file,
        # so after the wait a daemon that exists can be found and stopped.
        try:
            process.communicate(timeout=_DAEMONIZE_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.pid is None:
                raise self._start_failure("exited after daemonizing")
            if time.monotonic() > deadline:
                self.stop()
                raise self._start_failure(f"not ready after {timeout:g} s")
            time.sleep(_POLL_INTERVAL)

    def _start_failure(self, what: str) -> SimulatorError:
        if not self._ports_free():
            return PortInUseError(self.port, "swtpm")

        message = f"swtpm on port {self.port} {what}"
        tail = self.log_tail().replace("\n", " | ")
        return SimulatorError(f"{message}: {tail}" if tail else message)

    def _ports_free(self) -> bool:
        return port_is_free(self.port, self.host) and port_is_free(
            self.ctrl_port, self.host
        )

    @contextlib.contextmanager
    def _esapi(self) -> Iterator[Any]:
        try:
            with ESAPI(self.tcti) as ectx:
                yield ectx
        except TSS2_Exception as exc:
            raise SimulatorError(f"swtpm on port {self.port}: {exc}") from exc


def remembered_port(state_dir: Path) -> int | None:
    """The port swtpm last used in ``state_dir``; None if it never ran.

    A port file that cannot be read or holds no usable port is an error
    that names the file, not a reason to pick another port.
    """
    path = Path(state_dir) / PORT_FILE
    if not os.path.lexists(path):
        return None

    try:
        text = _read_note(path).strip()
    except OSError as exc:
        raise SimulatorError(f"{path}: {exc.strerror or exc}") from None

    if not (text.isascii() and text.isdigit()):
        raise SimulatorError(f"{path} holds no port")
    port = int(text)
    if not LOWEST_PORT <= port <= HIGHEST_PORT:
        raise SimulatorError(
            f"{path} holds port {port}, outside {LOWEST_PORT}-{HIGHEST_PORT}"
        )
    return port


def _read_note(path: Path) -> str:
    """The start of a small file such as the pid or the port file."""
    # Non-blocking, so that a FIFO in its place is refused, not waited on.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return file.read(_NOTE_BYTES).decode(errors="replace")


def _write_replacing(path: Path, text: str) -> None:
    # A new file renamed over the old one replaces a symlink rather than
    # writing through it.
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        # A failed rename names the partial file; the user knows the other.
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _tpm_exchange(host: str, port: int, timeout: float) -> int:
    """Send TPM2_GetRandom and return the response code of its reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_GET_RANDOM)
        _tag, size, rc = struct.unpack(">HII", _receive(sock, 10))
        _receive(sock, size - 10)
    return int(rc)


def _ctrl_exchange(host: str, port: int, timeout: float) -> int:
    """Ask the control channel for its capabilities; return the result."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_CTRL_GET_CAPABILITY)
        (rc,) = struct.unpack(">I", _receive(sock, 4))
        _receive(sock, 4)
    return int(rc)


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return data


def _transient_handles(ectx: Any) -> list[int]:
    handles: list[int] = []
    first = _TPM2_HT_TRANSIENT << 24
    more = True
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 32)
        page = [int(handle) for handle in data.data.handles]
        handles.extend(page)
        if not page:
            break
        first = page[-1] + 1
    return [h for h in handles if h >> 24 == _TPM2_HT_TRANSIENT]


def _flush_handle(ectx: Any, handle: int) -> int:
    """Flush one transient object; 0 if another client flushed it first."""
    try:
        ectx.flush_context(ectx.tr_from_tpmpublic(handle))
    except TSS2_Exception as exc:
        if exc.error == TPM2_RC.HANDLE:
            return 0
        raise
    return 1


def _signal(pid: int, signum: signal.Signals) -> None:
    # The process may end on its own between the check and the signal.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_state(pid) not in ("", "Z", "X"):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _is_swtpm(pid: int) -> bool:
    """Whether ``pid`` is a live swtpm, not a zombie or a reused pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False

    alive = _process_state(pid) not in ("", "Z", "X")
    return alive and cmdline.split(b"\0")[0].endswith(b"swtpm")


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` (R, S, Z...), or "" if there is none.

    An exiting process loses its command line before it closes its
    sockets, so only the state tells when it has really finished.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]
