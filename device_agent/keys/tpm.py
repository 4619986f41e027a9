"""TPM key store: P-256 keys made and used inside a TPM 2.0."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.errors import KeyStoreError, TPMError
from device_agent.keys.software import check_private_file, write_private_file

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

logger = logging.getLogger(__name__)

# TPM property and handle numbers, from the TPM 2.0 spec,
# so that reading them needs no import of the TSS bindings.
_PT_MANUFACTURER = 0x105
_PT_VENDOR_STRINGS = (0x106, 0x107, 0x108, 0x109)
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_FIRMWARE_VERSION_2 = 0x10C
_HR_TRANSIENT = 0x80000000
_RC_OBJECT_MEMORY = 0x902
_TCTI_LAYER = 0xA
_OBJECT_MEMORY_HINT = (
    "; objects are left loaded in the TPM: /dev/tpmrm0 frees them when "
    "their process ends, but with a TPM without resource manager (swtpm "
    "in bring-up) run 'tpm-simulator flush --state-dir <its state dir>'"
)
_EK_CERT_INDICES = {"rsa": 0x01C00002, "ecc": 0x01C0000A}


class TPMKeyStore:
    """Keys that never leave the TPM.

    A key is made under the owner hierarchy's storage key (recreated from
    the standard template on each use) with fixedTPM, fixedParent and
    sensitiveDataOrigin, and only its TSS2 PRIVATE KEY blob, which the TPM
    alone can load, is written to disk. Every handle this class loads is
    flushed before it returns, also when the TPM fails midway.
    """

    kind = "tpm"
    hardware_protected = True
    key_suffix = ".tss2.pem"

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti

    def answers(self) -> bool:
        """Whether a TPM answers at the configured TCTI."""
        try:
            with self._context() as ectx, _tss_errors("asking for random"):
                ectx.get_random(8)
        except TPMError as exc:
            logger.debug("no TPM at %s: %s", self.tcti, exc)
            return False
        return True

    def generate(self, path: Path) -> ec.EllipticCurvePublicKey:
        from tpm2_pytss.tsskey import TSSPrivKey

        with self._context() as ectx, _tss_errors("creating a key"):
            blob = TSSPrivKey.create_ecc(ectx)
        write_private_file(path, blob.to_pem())
        logger.info("TPM key created at %s", path)
        return _public_key(blob)

    def public_key(self, path: Path) -> ec.EllipticCurvePublicKey:
        return _public_key(self._read_blob(path))

    @contextmanager
    def signer(self, path: Path) -> Iterator[ec.EllipticCurvePrivateKey]:
        from tpm2_pytss.cryptography import tpm_ecc_private_key

        blob = self._read_blob(path)
        with self._context() as ectx:
            with _tss_errors("loading the key"):
                handle = blob.load(ectx)
            try:
                with _tss_errors("signing"):
                    yield tpm_ecc_private_key(ectx, handle)
            finally:
                _flush(ectx, handle)

    def check_loads(self, path: Path) -> None:
        """Load the key into the TPM once, raising the TPM's own error."""
        with self.signer(path):
            pass

    def info(self) -> dict[str, Any]:
        """What the TPM says about itself, for ``tpm info`` and status."""
        with self._context() as ectx, _tss_errors("reading properties"):
            props = _properties(ectx)
            transient = transient_handles(ectx)
            ek_certs = {
                name: _nv_exists(ectx, index)
                for name, index in _EK_CERT_INDICES.items()
            }

        vendor = "".join(
            _ascii(props.get(p, 0)) for p in _PT_VENDOR_STRINGS
        ).strip()
        return {
            "tcti": self.tcti,
            "manufacturer": _ascii(props.get(_PT_MANUFACTURER, 0)).strip(),
            "vendor": vendor,
            "firmware": f"{props.get(_PT_FIRMWARE_VERSION_1, 0):08x}."
            f"{props.get(_PT_FIRMWARE_VERSION_2, 0):08x}",
            "transient_handles": len(transient),
            "ek_certificates": [k for k, v in ek_certs.items() if v],
        }

    def _read_blob(self, path: Path) -> Any:
        from tpm2_pytss.tsskey import TSSPrivKey

        check_private_file(path)
        try:
            return TSSPrivKey.from_pem(path.read_bytes())
        except Exception as exc:  # the ASN.1 decoder raises many kinds
            raise KeyStoreError(
                f"{path}: not a TSS2 PRIVATE KEY: {exc}"
            ) from None

    @contextmanager
    def _context(self) -> Iterator[ESAPI]:
        from tpm2_pytss import ESAPI

        try:
            with _tss_errors(f"opening the TPM at {self.tcti}"):
                ectx = ESAPI(self.tcti)
        except TPMError as exc:
            # The TCTI layer failing to reach the TPM: say it as every
            # other command does.
            if exc.rc is not None and exc.rc >> 16 == _TCTI_LAYER:
                raise TPMError(f"no TPM answers at {self.tcti}") from exc
            raise
        try:
            yield ectx
        finally:
            ectx.close()


def transient_handles(ectx: ESAPI) -> list[int]:
    """The transient object handles loaded in the TPM right now."""
    from tpm2_pytss.constants import TPM2_CAP

    handles: list[int] = []
    more = True
    start = _HR_TRANSIENT
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
        found = [int(h) for h in data.data.handles]
        found = [h for h in found if h >> 24 == _HR_TRANSIENT >> 24]
        handles.extend(found)
        if not found:
            break
        start = found[-1] + 1
    return handles


def _public_key(blob: Any) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(blob.public.to_der())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyStoreError("the TPM key is not an elliptic-curve key")
    return key


def _flush(ectx: ESAPI, handle: Any) -> None:
    try:
        ectx.flush_context(handle)
    except Exception as exc:  # a dead TPM must not hide the first error
        logger.warning("could not flush TPM handle: %s", exc)


def _properties(ectx: ESAPI) -> dict[int, int]:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.FIXED, 64)
    return {
        int(p.property): int(p.value)
        for p in data.data.tpmProperties.tpmProperty
    }


def _nv_exists(ectx: ESAPI, index: int) -> bool:
    from tpm2_pytss.constants import TPM2_CAP

    _, data = ectx.get_capability(TPM2_CAP.HANDLES, index, 1)
    return any(int(h) == index for h in data.data.handles)


def _ascii(value: int) -> str:
    raw = value.to_bytes(4, "big")
    return "".join(chr(b) for b in raw if 0x20 <= b < 0x7F)


@contextmanager
def _tss_errors(doing: str) -> Iterator[None]:
    """Turn the TSS bindings' exceptions into a TPMError naming the step."""
    from tpm2_pytss import TSS2_Exception

    try:
        yield
    except TSS2_Exception as exc:
        rc = int(exc.rc)
        hint = _OBJECT_MEMORY_HINT if rc & 0xFFF == _RC_OBJECT_MEMORY else ""
        raise TPMError(f"TPM error while {doing}: {exc}{hint}", rc) from exc
