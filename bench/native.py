"""openssl's own clients, with a TPM key: the native baselines for connects.

``SClient`` runs ``openssl s_client`` as a native MQTT client. It loads
the same tpm2 provider the agent loads, the same way (``default`` first,
then ``tpm2``), reads the same TSS2 key and chain, then connects. With
``-state`` it reports each handshake step on stderr, unbuffered, so the
time from its first ClientHello to the broker's CONNACK on stdout can be
taken from outside, without the process start, the provider load and the
key load that come before. Each run is the first handshake of a fresh
process, though, which OpenSSL 3 makes slower than later ones (it
fetches and caches its algorithms on first use).

``CClient`` is the warm native client with MQTT: a small C program on
the same OpenSSL, which loads the key once and then connects again and
again, each time a new TLS 1.3 session and a new MQTT connection.

``STime`` runs ``openssl s_time -new``: one process, one key load, then
as many full handshakes as fit in a second or two, with no MQTT on top:
the warm native handshake.
"""

from __future__ import annotations

import dataclasses
import os
import re
import selectors
import subprocess
import time
from pathlib import Path

from firmware_sim.process import reap_process

STARTED = b"SSL_connect:before SSL initialization"
HANDSHAKE_DONE = b"SSL negotiation finished successfully"
CONNACK = 0x20
DISCONNECT = b"\xe0\x00"
TIMEOUT = 15.0
_CONNECTIONS = re.compile(rb"(\d+) connections in [0-9.]+s;")


@dataclasses.dataclass(frozen=True)
class Connect:
    """One s_client run, in seconds from its first ClientHello."""

    handshake: float
    connack: float
    process: float


def mqtt5_connect(client_id: str, keepalive: int = 60) -> bytes:
    """An MQTT 5 CONNECT with a clean start and no properties."""
    ident = client_id.encode()
    variable = (
        b"\x00\x04MQTT\x05\x02"
        + keepalive.to_bytes(2, "big")
        + b"\x00"
        + len(ident).to_bytes(2, "big")
        + ident
    )
    if len(variable) > 127:
        raise ValueError("client id too long for a one-byte length")
    return bytes([0x10, len(variable)]) + variable


def _tpm_options(
    tcti: str, modules_dir: Path
) -> tuple[dict[str, str], list[str]]:
    # The search path must come before the providers it is for; default
    # first keeps hashing and chain checks out of the TPM, as in the agent.
    env = dict(os.environ, TPM2OPENSSL_TCTI=tcti)
    options = [
        "-provider-path", str(modules_dir),
        "-provider", "default", "-provider", "tpm2",
    ]  # fmt: skip
    return env, options


class SClient:
    """Runs s_client against a broker with a credential held in a TPM."""

    def __init__(
        self,
        port: int,
        ca_file: Path,
        chain_file: Path,
        key_file: Path,
        tcti: str,
        modules_dir: Path,
    ) -> None:
        self.env, providers = _tpm_options(tcti, modules_dir)
        self.command = [
            "openssl", "s_client",
            "-connect", f"127.0.0.1:{port}", "-tls1_3",
            "-CAfile", str(ca_file), "-verify_return_error",
            "-verify_ip", "127.0.0.1", "-verify_quiet",
            "-cert", str(chain_file), "-cert_chain", str(chain_file),
            "-key", str(key_file), *providers,
            "-quiet", "-no_ign_eof", "-state",
        ]  # fmt: skip

    def connect(self, client_id: str = "bench-native") -> Connect:
        """Connect, wait for a successful CONNACK, then leave cleanly.

        s_client leaves on end of input, after it has sent close_notify
        and freed its key, which flushes the key from the TPM: a killed
        s_client would leave it loaded, and swtpm has three slots.
        """
        begun = time.perf_counter()
        process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        try:
            assert process.stdin is not None
            process.stdin.write(mqtt5_connect(client_id))
            process.stdin.flush()
            marks = _watch(process)
            process.stdin.write(DISCONNECT)
            process.stdin.close()
            process.wait(TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        ended = time.perf_counter()

        if process.returncode != 0:
            raise RuntimeError(f"s_client exited with {process.returncode}")
        start = marks["start"]
        return Connect(
            handshake=marks["handshake"] - start,
            connack=marks["connack"] - start,
            process=ended - begun,
        )


class CClient:
    """A warm native client: C and OpenSSL, the key loaded once.

    ``mqtt_tls_client.c`` (beside this file) is built with the system's
    compiler and OpenSSL, the same libssl Python's ``ssl`` uses, into
    ``build_dir``. It keeps one SSL_CTX and makes a new connection,
    a full TLS 1.3 handshake and an MQTT CONNECT each time it is asked:
    the native counterpart of a Session opened with a context kept.
    """

    def __init__(
        self,
        build_dir: Path,
        port: int,
        ca_file: Path,
        chain_file: Path,
        key_file: Path,
        tcti: str,
        modules_dir: Path,
    ) -> None:
        program = build_c_client(build_dir)
        env, _ = _tpm_options(tcti, modules_dir)
        env["BENCH_PROVIDER_PATH"] = str(modules_dir)
        self.process = subprocess.Popen(
            [
                str(program), "127.0.0.1", str(port), str(ca_file),
                str(chain_file), str(key_file), "bench-c-client",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )  # fmt: skip
        self._expect("ready")

    def connect(self) -> Connect:
        """One new connection; seconds to the handshake's end, to CONNACK."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        handshake, connack = (
            float(part) / 1e6 for part in self._expect(None).split()
        )
        return Connect(handshake=handshake, connack=connack, process=0.0)

    def close(self) -> None:
        """End of input: the client frees its key, flushing it from the TPM."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        reap_process(self.process, TIMEOUT)

    def _expect(self, word: str | None) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line or (word is not None and line != word):
            self.close()
            assert self.process.stderr is not None
            raise RuntimeError(
                f"C client: {line!r}: {self.process.stderr.read()[-500:]}"
            )
        return line


def build_c_client(build_dir: Path) -> Path:
    """Compile the C client into ``build_dir``; the path of the program."""
    source = Path(__file__).with_name("mqtt_tls_client.c")
    program = build_dir / "mqtt_tls_client"
    result = subprocess.run(
        [
            "cc", "-O2", "-Wall", "-o", str(program), str(source),
            "-lssl", "-lcrypto",
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"cannot build the C client: {result.stderr}")
    return program


@dataclasses.dataclass(frozen=True)
class Handshakes:
    """One s_time run: how many handshakes, in how much wall time."""

    count: int
    seconds: float

    @property
    def each(self) -> float:
        return self.seconds / self.count


class STime:
    """Runs ``openssl s_time -new`` with a credential held in a TPM.

    s_time takes only the leaf with ``-cert``; OpenSSL then builds the
    chain it sends from the ``-CAfile`` store, so that file must hold the
    intermediate as well as the root, or the broker refuses the client
    after the handshake (the handshake itself is timed all the same).
    """

    def __init__(
        self,
        port: int,
        ca_bundle: Path,
        chain_file: Path,
        key_file: Path,
        tcti: str,
        modules_dir: Path,
    ) -> None:
        self.env, providers = _tpm_options(tcti, modules_dir)
        self.command = [
            "openssl", "s_time",
            "-connect", f"127.0.0.1:{port}", "-new", "-tls1_3",
            "-CAfile", str(ca_bundle),
            "-cert", str(chain_file), "-key", str(key_file), *providers,
        ]  # fmt: skip

    def run(self, seconds: int) -> Handshakes:
        """Handshakes for ``seconds`` (s_time rounds up to a second)."""
        begun = time.perf_counter()
        result = subprocess.run(
            [*self.command, "-time", str(seconds)],
            capture_output=True,
            env=self.env,
            timeout=seconds + TIMEOUT,
            check=False,
        )
        took = time.perf_counter() - begun
        found = _CONNECTIONS.search(result.stdout)
        if result.returncode != 0 or found is None or not int(found[1]):
            raise RuntimeError(f"s_time failed: {result.stderr[-500:]!r}")
        return Handshakes(int(found[1]), took)


def _watch(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """When the handshake began and ended, and when CONNACK arrived."""
    assert process.stdout is not None and process.stderr is not None
    marks: dict[str, float] = {}
    seen = {"err": b"", "out": b""}
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ, "err")
        selector.register(process.stdout, selectors.EVENT_READ, "out")
        while not marks.keys() >= {"start", "handshake", "connack"}:
            left = deadline - time.monotonic()
            events = selector.select(max(left, 0.0))
            now = time.perf_counter()
            if not events:
                raise RuntimeError(f"s_client: no CONNACK: {seen}")
            for key, _ in events:
                stream = key.fileobj
                assert not isinstance(stream, int)
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"s_client ended early: {seen}")
                seen[key.data] += chunk
            _note(marks, seen, now)
    return marks


def _note(marks: dict[str, float], seen: dict[str, bytes], now: float) -> None:
    if "start" not in marks and STARTED in seen["err"]:
        marks["start"] = now
    if "handshake" not in marks and HANDSHAKE_DONE in seen["err"]:
        marks["handshake"] = now
    reply = seen["out"]
    if "connack" not in marks and len(reply) >= 4:
        if reply[0] != CONNACK or reply[3] != 0:
            raise RuntimeError(f"s_client: refused: {reply[:8].hex()}")
        marks["connack"] = now
