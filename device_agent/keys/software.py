"""Software key store: a P-256 key in a PKCS#8 file only its owner reads."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.errors import KeyStoreError

logger = logging.getLogger(__name__)


class SoftwareKeyStore:
    """Keys made by cryptography and kept in files at mode 0600.

    Anyone who can read the file holds the key: this store exists for
    boards without a TPM and says so wherever it is reported.
    """

    kind = "software"
    hardware_protected = False
    key_suffix = ".pkcs8.pem"

    def generate(self, path: Path) -> ec.EllipticCurvePublicKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, pem)
        logger.info("software key created at %s", path)
        return key.public_key()

    def public_key(self, path: Path) -> ec.EllipticCurvePublicKey:
        return self._load(path).public_key()

    @contextmanager
    def signer(self, path: Path) -> Iterator[ec.EllipticCurvePrivateKey]:
        yield self._load(path)

    def _load(self, path: Path) -> ec.EllipticCurvePrivateKey:
        check_private_file(path)
        data = path.read_bytes()
        if not data.strip():
            raise KeyStoreError(f"{path}: key file is empty")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # cryptography's own message carries an FAQ link and OpenSSL
            # error codes: noise for someone looking at a broken file.
            raise KeyStoreError(
                f"{path}: not a readable key (no PEM private key in it)"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise KeyStoreError(f"{path}: not a P-256 key")
        return key


def check_private_file(path: Path) -> None:
    """Refuse a key file that others could read or that we do not own."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyStoreError(f"{path}: key file is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyStoreError(f"{path}: key is not a regular file")
    if info.st_mode & 0o077 and not _holds_private_key(path):
        # Then the key is gone, replaced by some other file: a mode
        # change would not bring it back.
        raise KeyStoreError(f"{path}: key file holds no private key")
    if info.st_mode & 0o077:
        raise KeyStoreError(
            f"{path}: key file is readable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); "
            "refusing to use it, run 'chmod 600' if it was not exposed"
        )
    if info.st_uid != os.geteuid():
        raise KeyStoreError(f"{path}: key file belongs to another user")


def _holds_private_key(path: Path) -> bool:
    """Whether the file's PEM armour names a private key of any kind."""
    try:
        with path.open("rb") as stream:
            head = stream.read(4096)
    except OSError:
        return True  # the caller reports what it can see: the mode
    return b"PRIVATE KEY-----" in head


def write_private_file(path: Path, data: bytes) -> None:
    """Write a new file at 0600 in a private directory, durably.

    The file must not exist yet: keys are never overwritten in place, and
    the directory, which the credential store made, must be private.
    """
    if stat.S_IMODE(path.parent.stat().st_mode) & 0o077:
        raise KeyStoreError(f"{path.parent}: not a private directory")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyStoreError(f"{path}: a key is already there") from None
    except OSError as exc:
        raise KeyStoreError(f"{path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
