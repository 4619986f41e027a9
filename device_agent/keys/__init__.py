"""Where private keys live: in a TPM, or in a file when there is none."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.config import Settings
from device_agent.errors import KeyStoreError

if TYPE_CHECKING:
    from device_agent.keys.tpm import TPMKeyStore
    from device_agent.keys.tpmproc import ProcessTPMKeyStore

logger = logging.getLogger(__name__)

# Whether TPM operations of this process run in a child process.
_tpm_in_child = False


class KeyStore(Protocol):
    """A place that makes P-256 keys and signs with them.

    A key is named by the file that holds it: a TSS2 PRIVATE KEY blob for
    the TPM, a PKCS#8 file for the software store.
    """

    kind: str
    hardware_protected: bool
    key_suffix: str

    def generate(self, path: Path) -> ec.EllipticCurvePublicKey:
        """Make a new key and write it, never overwriting, at ``path``."""
        ...

    def public_key(self, path: Path) -> ec.EllipticCurvePublicKey:
        """The public half of the key at ``path``."""
        ...

    def signer(
        self, path: Path
    ) -> AbstractContextManager[ec.EllipticCurvePrivateKey]:
        """A key object cryptography can sign with, valid inside the block."""
        ...


def kind_of(path: Path) -> str:
    """Which store a key file belongs to, from its name."""
    from device_agent.keys.software import SoftwareKeyStore
    from device_agent.keys.tpm import TPMKeyStore

    for store in (TPMKeyStore, SoftwareKeyStore):
        if path.name.endswith(store.key_suffix):
            return store.kind
    raise KeyStoreError(f"{path}: not a key file this agent wrote")


def serve_tpm_from_child(enabled: bool = True) -> None:
    """Make this process leave every TPM key operation to a child process.

    For the daemon: it then never loads the TSS bindings, which cost
    more memory than the rest of the agent and cannot be unloaded.
    """
    global _tpm_in_child  # noqa: PLW0603 (one switch per process)
    _tpm_in_child = enabled


def tpm_store(tcti: str) -> TPMKeyStore | ProcessTPMKeyStore:
    """The TPM key store for ``tcti``, in this process or in a child."""
    if _tpm_in_child:
        from device_agent.keys.tpmproc import ProcessTPMKeyStore

        return ProcessTPMKeyStore(tcti)
    from device_agent.keys.tpm import TPMKeyStore

    return TPMKeyStore(tcti)


def for_kind(kind: str, settings: Settings) -> KeyStore:
    """The store that handles keys of ``kind``."""
    if kind == "tpm":
        return tpm_store(settings.tcti)
    if kind == "software":
        from device_agent.keys.software import SoftwareKeyStore

        return SoftwareKeyStore()
    raise KeyStoreError(f"unknown key store {kind!r}")


def for_key(path: Path, settings: Settings) -> KeyStore:
    """The store that holds an existing key: decided by the key, not config.

    A key made in the TPM is only usable through the TPM, so an
    unreachable TPM is an error here and never a reason to use another
    store.
    """
    return for_kind(kind_of(path), settings)


def choose(settings: Settings) -> KeyStore:
    """The store a new key should go to, following ``key_store``."""
    if settings.key_store != "auto":
        return for_kind(settings.key_store, settings)

    tpm = tpm_store(settings.tcti)
    if tpm.answers():
        return tpm
    logger.warning(
        "no TPM answers at %s; key_store=auto uses the software store, "
        "whose keys are not hardware-protected",
        settings.tcti,
    )
    return for_kind("software", settings)
