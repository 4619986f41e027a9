"""The TPM key store served from a child process, for long-lived callers.

tpm2-pytss and the TSS libraries it links (FAPI with curl, GnuTLS and
Kerberos behind it) add about 8 MB to a process and can never be
unloaded. The daemon needs them only for the few operations of a
renewal, while TLS reaches the TPM through the OpenSSL provider, so it
asks a child process that holds them instead: the child is started on
first use and ends when it has been idle for a few seconds, or when its
parent goes away (its standard input closes).

Requests and answers are JSON lines on the child's standard input and
output; binary values travel in base64.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import Buffer

from device_agent.errors import KeyStoreError, TPMError
from device_agent.keys.tpm import TPMKeyStore

logger = logging.getLogger(__name__)

IDLE_SECONDS = 5.0
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class ProcessTPMKeyStore:
    """The TPM key store, with every TPM operation made by a child process.

    It holds the same keys as :class:`TPMKeyStore` and answers the same
    calls; only the process that talks to the TPM differs.
    """

    kind = TPMKeyStore.kind
    hardware_protected = TPMKeyStore.hardware_protected
    key_suffix = TPMKeyStore.key_suffix

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti

    def answers(self) -> bool:
        """Whether a TPM answers at the configured TCTI."""
        return bool(_call(self.tcti, "answers")["answers"])

    def generate(self, path: Path) -> ec.EllipticCurvePublicKey:
        reply = _call(self.tcti, "generate", path=str(path))
        logger.info("TPM key created at %s", path)
        return _public_key(reply)

    def public_key(self, path: Path) -> ec.EllipticCurvePublicKey:
        return _public_key(_call(self.tcti, "public_key", path=str(path)))

    @contextmanager
    def signer(self, path: Path) -> Iterator[ec.EllipticCurvePrivateKey]:
        yield _ChildKey(self.tcti, path, self.public_key(path))

    def info(self) -> dict[str, Any]:
        """What the TPM says about itself, for ``tpm info`` and status."""
        return dict(_call(self.tcti, "info")["info"])

    def check_loads(self, path: Path) -> None:
        """Load the key into the TPM once, raising the TPM's own error."""
        _call(self.tcti, "check_loads", path=str(path))


class _ChildKey(ec.EllipticCurvePrivateKey):
    """A TPM key that signs by asking the child process.

    Only what a certificate request needs is offered: the public key and
    ECDSA signatures. The key stays in the TPM, so it cannot be
    exported or used for key agreement.
    """

    def __init__(
        self, tcti: str, path: Path, public: ec.EllipticCurvePublicKey
    ) -> None:
        self._tcti = tcti
        self._path = path
        self._public = public

    def sign(
        self,
        data: Buffer,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise ValueError("the TPM key signs with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if not isinstance(algorithm, hashes.HashAlgorithm) or (
            algorithm.name not in _HASHES
        ):
            raise ValueError(f"the TPM key cannot sign with {algorithm}")
        reply = _call(
            self._tcti,
            "sign",
            path=str(self._path),
            data=_b64(bytes(data)),
            hash=algorithm.name,
        )
        return base64.b64decode(reply["signature"])

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(
        self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey
    ) -> bytes:
        raise ValueError("the TPM key is for signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise ValueError("a TPM key cannot be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise ValueError("a TPM key cannot be exported")

    def __copy__(self) -> _ChildKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _ChildKey:
        return self


class _Child:
    """One running child process, for one TCTI."""

    def __init__(self, tcti: str) -> None:
        # Isolated mode: neither the working directory nor PYTHON*
        # variables decide which code gets to use the TPM key.
        self.tcti = tcti
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__, tcti],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Send one request; its answer, or None if the child is gone."""
        stdin, stdout = _pipes(self.process)
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
        except OSError:
            return None

        line = stdout.readline()
        if not line:
            return None
        answer: dict[str, Any] = json.loads(line)
        return answer

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        stdin, _ = _pipes(self.process)
        with suppress(OSError):
            stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_lock = threading.Lock()
_children: dict[str, _Child] = {}
_timers: dict[str, threading.Timer] = {}


def _call(tcti: str, op: str, **args: str) -> dict[str, Any]:
    """Run one operation in the child for ``tcti``, starting it if need be.

    A child that ended between two calls is replaced and the request
    sent again: it ends only when it had nothing to do, so the request
    never reached it.
    """
    request = {"op": op, **args}
    with _lock:
        _cancel_idle(tcti)
        try:
            answer = _ask(tcti, request)
            if answer is None:
                _drop(tcti)
                answer = _ask(tcti, request)
            if answer is None:
                _drop(tcti)
                raise TPMError("the TPM helper process ended unexpectedly")
        finally:
            _arm_idle(tcti)
    return _result(answer)


def _ask(tcti: str, request: dict[str, Any]) -> dict[str, Any] | None:
    child = _children.get(tcti)
    if child is None or not child.alive():
        try:
            child = _children[tcti] = _Child(tcti)
        except OSError as exc:
            raise TPMError(
                f"cannot start the TPM helper process: {exc}"
            ) from None
    return child.ask(request)


def _drop(tcti: str) -> None:
    child = _children.pop(tcti, None)
    if child is not None:
        child.close()


def _cancel_idle(tcti: str) -> None:
    timer = _timers.pop(tcti, None)
    if timer is not None:
        timer.cancel()


def _arm_idle(tcti: str) -> None:
    if tcti not in _children:
        return
    timer = threading.Timer(IDLE_SECONDS, _end_idle, (tcti,))
    timer.daemon = True
    _timers[tcti] = timer
    timer.start()


def _end_idle(tcti: str) -> None:
    with _lock:
        if threading.current_thread() is not _timers.get(tcti):
            return
        del _timers[tcti]
        _drop(tcti)


def close_all() -> None:
    """End every child now, for a caller about to exit."""
    with _lock:
        for tcti in list(_timers):
            _cancel_idle(tcti)
        for tcti in list(_children):
            _drop(tcti)


def _result(answer: dict[str, Any]) -> dict[str, Any]:
    error = answer.get("error")
    if error is None:
        return dict(answer["ok"])
    if error["kind"] == "tpm":
        raise TPMError(error["message"], error.get("rc"))
    raise KeyStoreError(error["message"])


def _public_key(reply: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(base64.b64decode(reply["public"]))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyStoreError("the TPM key is not an elliptic-curve key")
    return key


def _pipes(process: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    if process.stdin is None or process.stdout is None:
        raise TPMError("the TPM helper process has no pipes")
    return process.stdin, process.stdout


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _der(key: ec.EllipticCurvePublicKey) -> str:
    return _b64(
        key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def _serve_one(store: TPMKeyStore, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    path = Path(request.get("path", ""))
    if op == "answers":
        return {"answers": store.answers()}
    if op == "generate":
        return {"public": _der(store.generate(path))}
    if op == "public_key":
        return {"public": _der(store.public_key(path))}
    if op == "sign":
        data = base64.b64decode(request["data"])
        algorithm = ec.ECDSA(_HASHES[request["hash"]]())
        with store.signer(path) as key:
            return {"signature": _b64(key.sign(data, algorithm))}
    if op == "check_loads":
        store.check_loads(path)
        return {}
    if op == "info":
        return {"info": store.info()}
    raise KeyStoreError(f"unknown TPM helper operation {op!r}")


def serve(tcti: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer requests until the parent closes our standard input."""
    store = TPMKeyStore(tcti)
    for line in requests:
        answer: dict[str, Any]
        try:
            answer = {"ok": _serve_one(store, json.loads(line))}
        except TPMError as exc:
            error = {"kind": "tpm", "message": exc.detail, "rc": exc.rc}
            answer = {"error": error}
        except KeyStoreError as exc:
            answer = {"error": {"kind": "key", "message": str(exc)}}
        except Exception as exc:  # one bad request must not end the child
            message = f"TPM helper could not serve a request: {exc}"
            answer = {"error": {"kind": "key", "message": message}}
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()


def _main() -> None:
    # The parent decides when we stop: it closes our input. A stop
    # signal sent to its whole group must not cut a key operation short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format="tpm helper: %(message)s"
    )

    # Answers go out on a private copy of standard output, and anything
    # a library prints goes to standard error, so that no stray line can
    # be read as an answer.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.argv[1], sys.stdin.buffer, answers)


if __name__ == "__main__":
    _main()
