"""Certificate chains: read any common encoding, find ours, verify it."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.errors import ChainError

logger = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 1024 * 1024
MAX_CERTIFICATES = 32
MAX_DEPTH = 8
# Real device and CA certificates are 0.5-2 KiB. A much larger one would
# be presented in every TLS handshake and brokers refuse oversized ones,
# so it is refused here instead of breaking every connection later.
MAX_CERTIFICATE_BYTES = 16 * 1024

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,40})-----(.*?)-----END \1-----", re.DOTALL
)
_CERT_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE")
_PKCS7_LABELS = (b"PKCS7", b"CMS")


def read_bundle(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM (any order), DER or PKCS#7 certs-only."""
    if not data.strip():
        raise ChainError("unreadable", "the file is empty")
    if len(data) > MAX_BUNDLE_BYTES:
        raise ChainError("unreadable", f"larger than {MAX_BUNDLE_BYTES} bytes")

    certs = _read_pem(data) if b"-----BEGIN" in data else _read_der(data)

    if not certs:
        raise ChainError("unreadable", "no certificate found")
    if len(certs) > MAX_CERTIFICATES:
        raise ChainError(
            "unreadable", f"more than {MAX_CERTIFICATES} certificates"
        )
    for number, cert in enumerate(certs, 1):
        _check_parsable(cert, number)
    return certs


def _check_parsable(cert: x509.Certificate, number: int) -> None:
    """Read every part we rely on now, so a malformed one fails here.

    cryptography parses extensions, names and keys lazily; a hostile
    certificate would otherwise fail later, in the middle of checks.
    """
    size = len(cert.public_bytes(serialization.Encoding.DER))
    if size > MAX_CERTIFICATE_BYTES:
        raise ChainError(
            "unreadable",
            f"certificate {number} is {size} bytes, over the "
            f"{MAX_CERTIFICATE_BYTES} allowed",
        )
    try:
        cert.public_key()
        for extension in cert.extensions:
            _ = extension.value
        for name in (cert.subject, cert.issuer):
            name.rfc4514_string()
        _ = cert.not_valid_before_utc, cert.not_valid_after_utc
        _ = cert.signature_hash_algorithm
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise ChainError(
            "unreadable", f"certificate {number}: {_first(exc)}"
        ) from None


def _read_pem(data: bytes) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1)
        block = match.group(0)
        try:
            if label in _CERT_LABELS:
                certs.append(x509.load_pem_x509_certificate(block))
            elif label in _PKCS7_LABELS:
                certs.extend(_pkcs7(block, pem=True))
            elif b"PRIVATE KEY" in label:
                raise ChainError(
                    "unreadable",
                    "the file holds a private key; give certificates only",
                )
            else:
                raise ChainError(
                    "unreadable", f"unexpected PEM block {label.decode()!r}"
                )
        except ValueError as exc:
            raise ChainError(
                "unreadable", f"bad {label.decode()} block: {_first(exc)}"
            ) from None
    if data.count(b"-----BEGIN") != len(list(_PEM_BLOCK.finditer(data))):
        raise ChainError("unreadable", "a PEM block is incomplete")
    return certs


def _read_der(data: bytes) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:
        return _pkcs7(data, pem=False)
    except ValueError:
        pass
    raise ChainError(
        "unreadable", "neither PEM, DER certificate nor PKCS#7 certificates"
    )


def _pkcs7(data: bytes, pem: bool) -> list[x509.Certificate]:
    """Certificates of a PKCS#7 bundle, also in BER as OpenSSL writes it.

    cryptography reads BER after warning that it is not DER; the bundle
    is fine, and a user of the CLI should not see a library's warning.
    The module is imported here: it brings the e-mail package along, a
    megabyte that the daemon, which reads PEM chains, has no use for.
    """
    from cryptography.hazmat.primitives.serialization import pkcs7

    load = (
        pkcs7.load_pem_pkcs7_certificates
        if pem
        else pkcs7.load_der_pkcs7_certificates
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(load(data))


def _first(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def public_key_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def order_chain(
    certs: Sequence[x509.Certificate], our_key: PublicKeyTypes
) -> list[x509.Certificate]:
    """Leaf first, then each issuer; certificates off that path dropped.

    The leaf is the certificate that holds our public key, never simply
    the first one in the file. Self-signed roots are dropped too: the
    trust anchor comes from configuration, not from the bundle.
    """
    ours = public_key_bytes(our_key)
    leaves = [c for c in certs if public_key_bytes(c.public_key()) == ours]
    if not leaves:
        raise ChainError(
            "not-our-key", "no certificate in it holds this device's key"
        )
    leaf = max(leaves, key=lambda c: c.not_valid_before_utc)

    chain = [leaf]
    current = leaf
    while len(chain) <= MAX_DEPTH and not _self_signed(current):
        issuer = _find_issuer(current, certs)
        if issuer is None or issuer in chain or _self_signed(issuer):
            break
        chain.append(issuer)
        current = issuer
    return chain


def _find_issuer(
    cert: x509.Certificate, pool: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in pool:
        if candidate is cert or candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_anchors(
    path: Path, what: str = "trust anchor"
) -> list[x509.Certificate]:
    """The trust anchors in a CA file; errors call the file ``what``."""
    try:
        data = _read_regular(path)
    except OSError as exc:
        raise ChainError(
            "unknown-ca", f"{what} {path}: {exc.strerror or exc}"
        ) from None
    try:
        return read_bundle(data)
    except ChainError as exc:
        raise ChainError(
            "unknown-ca", f"{what} {path}: {exc.detail}"
        ) from None


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes, up to one more than MAX_BUNDLE_BYTES.

    Opened without blocking, so a FIFO put in its place cannot hang us,
    and checked before reading, so a device file cannot flood us.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return stream.read(MAX_BUNDLE_BYTES + 1)


def verify(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    device_id: str | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Check a leaf-first chain as a client credential for this device.

    Dates and purpose are checked first so the refusal can say which
    one failed; then cryptography's verifier builds the path to one of
    the anchors and checks every signature on it.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = chain[0]
    for cert in chain:
        _check_dates(cert, now, "certificate" if cert is leaf else "issuer")
    _check_client_use(leaf)
    if device_id is not None:
        _check_identity(leaf, device_id)

    policy = (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(now)
        .max_chain_depth(MAX_DEPTH)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
    )
    try:
        policy.build_client_verifier().verify(leaf, list(chain[1:]))
    except verification.VerificationError as exc:
        raise _diagnose(chain, anchors, str(exc)) from None


# Hashes the verifier accepts in signatures; Ed25519 and Ed448 have none.
_ACCEPTED_HASHES = ("sha256", "sha384", "sha512")
_BAD_EXTENSION = re.compile(r"invalid extension: ([0-9.]+)")
# cryptography's messages may end in a Python or Rust rendering of a
# certificate or an algorithm, which says nothing to a person.
_REPR = re.compile(r"\s*\(encountered processing .*|\s*[<{].*", re.DOTALL)


def _diagnose(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    message: str,
) -> ChainError:
    """Say why the verifier refused ``chain``, in words and names.

    Only called once it refused, so these checks can never turn away a
    chain the verifier accepts.
    """
    for number, cert in enumerate(chain):
        what = "certificate" if number == 0 else "issuer"
        algorithm = cert.signature_hash_algorithm
        if algorithm is not None and algorithm.name not in _ACCEPTED_HASHES:
            return ChainError(
                "weak-signature",
                f"{what} {_name(cert)} is signed with {algorithm.name}, "
                f"which is not accepted (use {', '.join(_ACCEPTED_HASHES)})",
            )

    named = _BAD_EXTENSION.search(message)
    for number, cert in enumerate(chain):
        what = "certificate" if number == 0 else "issuer"
        for extension in cert.extensions:
            unknown = isinstance(extension.value, x509.UnrecognizedExtension)
            blamed = named is not None and (
                extension.oid.dotted_string == named.group(1)
            )
            if extension.critical and (unknown or blamed):
                return ChainError(
                    "unsupported-extension",
                    f"{what} {_name(cert)} has a critical extension that "
                    f"is not supported: {_oid_name(extension.oid)}",
                )

    last = chain[-1]
    issuer = last.issuer.rfc4514_string() or "(empty name)"
    namesakes = [c for c in [*chain, *anchors] if c.subject == last.issuer]
    if not namesakes:
        missing = (
            "intermediate missing"
            if last is chain[0]
            else "does not chain to the trust anchor"
        )
        return ChainError(
            "unknown-ca",
            f"{missing}: no certificate for issuer {issuer} in the chain "
            "or the trust anchor",
        )
    if _find_issuer(last, namesakes) is None:
        return ChainError(
            "unknown-ca",
            f"does not chain to the trust anchor: the certificate named "
            f"{issuer} has another key than the one that signed "
            f"{_name(last)}",
        )

    first_line = message.splitlines()[0] if message else "no path found"
    detail = _REPR.sub("", first_line).rstrip(" :")
    return ChainError(
        "unknown-ca", f"does not chain to the trust anchor ({detail})"
    )


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = oid._name
    if name and name != "Unknown OID":
        return f"{name} ({oid.dotted_string})"
    return oid.dotted_string


def _check_dates(
    cert: x509.Certificate, now: datetime.datetime, what: str
) -> None:
    if now < cert.not_valid_before_utc:
        raise ChainError(
            "not-yet-valid",
            f"{what} {_name(cert)} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z",
        )
    if now > cert.not_valid_after_utc:
        raise ChainError(
            "expired",
            f"{what} {_name(cert)} expired "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        )


def _check_client_use(leaf: x509.Certificate) -> None:
    try:
        constraints = leaf.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise ChainError("not-client", "the certificate is a CA certificate")

    try:
        usages = leaf.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ).value
    except x509.ExtensionNotFound:
        usages = None
    allowed = {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
    if usages is not None and not allowed & set(usages):
        raise ChainError(
            "not-client", "the certificate is not for TLS client auth"
        )

    try:
        key_usage = leaf.extensions.get_extension_for_class(
            x509.KeyUsage
        ).value
    except x509.ExtensionNotFound:
        key_usage = None
    if key_usage is not None and not key_usage.digital_signature:
        raise ChainError(
            "not-client", "the certificate's key may not sign (keyUsage)"
        )


def _check_identity(leaf: x509.Certificate, device_id: str) -> None:
    names = [
        a.value
        for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if names != [device_id]:
        raise ChainError(
            "wrong-identity",
            f"issued to {', '.join(map(str, names)) or 'no name'}, "
            f"not {device_id}",
        )

    # A device URI naming someone else makes the certificate name two
    # devices; the registrar and the broker would each see another one.
    try:
        alt = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return
    uris = alt.get_values_for_type(x509.UniformResourceIdentifier)
    ours = f"urn:device-agent:{device_id}"
    others = [
        u for u in uris if u.startswith("urn:device-agent:") and u != ours
    ]
    if others:
        raise ChainError(
            "wrong-identity", f"names {others[0]}, not {device_id}"
        )


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return repr(str(names[0].value)) if names else "(no CN)"


def to_pem(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
