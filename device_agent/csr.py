"""Certificate signing requests for this device, from any key store."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent.chain import public_key_bytes
from device_agent.errors import CSRError


def build(
    signer: ec.EllipticCurvePrivateKey,
    device_id: str,
    device_uri: str,
    serial: str | None = None,
) -> x509.CertificateSigningRequest:
    """A SHA-256 CSR naming the device, signed by its key.

    The request is checked before it is returned: its signature verifies
    and it carries the key and name we meant to send.
    """
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))

    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_uri)]
            ),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )

    check(request, signer.public_key(), device_id)
    return request


def check(
    request: x509.CertificateSigningRequest,
    public_key: ec.EllipticCurvePublicKey,
    device_id: str,
) -> None:
    """Refuse a CSR whose signature, key or name is not what we expect."""
    if not request.is_signature_valid:
        raise CSRError("the CSR signature does not verify")
    if public_key_bytes(request.public_key()) != public_key_bytes(public_key):
        raise CSRError("the CSR does not carry this device's public key")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise CSRError("the CSR does not name this device")
