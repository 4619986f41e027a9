"""Certificate requests for a P-256 key held by a signer, built as DER.

Only the encoding happens here; the signature over the request comes
from the signer (a secure element on a board), so no elliptic-curve
arithmetic runs in Python. The request names the device in its CN and,
as the CPython agent's does, in a URI subjectAltName.
"""

import binascii
import hashlib

# Object identifiers as their DER content bytes.
_EC_PUBLIC_KEY = binascii.unhexlify("2a8648ce3d0201")
_PRIME256V1 = binascii.unhexlify("2a8648ce3d030107")
_ECDSA_SHA256 = binascii.unhexlify("2a8648ce3d040302")
_COMMON_NAME = binascii.unhexlify("550403")
_EXTENSION_REQUEST = binascii.unhexlify("2a864886f70d01090e")
_SUBJECT_ALT_NAME = binascii.unhexlify("551d11")

SEQUENCE = 0x30
SET = 0x31
URI_TAG = 0x86
POINT_LENGTH = 64


def tlv(tag, content):
    """One DER element: tag, definite length, content."""
    length = len(content)
    if length < 0x80:
        head = bytes([length])
    else:
        # MicroPython's bytearray has no insert: collect, then reverse.
        digits = []
        while length:
            digits.append(length & 0xFF)
            length >>= 8
        digits.reverse()
        head = bytes([0x80 | len(digits)] + digits)
    return bytes([tag]) + head + content


def unsigned_integer(value):
    """A DER INTEGER from big-endian unsigned bytes."""
    value = bytes(value).lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return tlv(0x02, value)


def public_key_info(point):
    """The SubjectPublicKeyInfo of a P-256 point given as X || Y."""
    if len(point) != POINT_LENGTH:
        raise ValueError("a P-256 public key is 64 bytes, X then Y")
    algorithm = tlv(
        SEQUENCE, tlv(0x06, _EC_PUBLIC_KEY) + tlv(0x06, _PRIME256V1)
    )
    return tlv(SEQUENCE, algorithm + tlv(0x03, b"\x00\x04" + bytes(point)))


def signature_value(raw):
    """An ECDSA signature r || s as the DER the X.509 structures use."""
    if len(raw) != POINT_LENGTH:
        raise ValueError("a P-256 signature is 64 bytes, r then s")
    body = unsigned_integer(raw[:32]) + unsigned_integer(raw[32:])
    return tlv(SEQUENCE, body)


def build(device_id, point, sign):
    """A DER certificate request for ``device_id``'s key ``point``.

    ``sign`` takes the SHA-256 digest of the request body and returns the
    signature as r || s, made by whatever holds the private key.
    """
    name = tlv(
        SEQUENCE,
        tlv(
            SET,
            tlv(
                SEQUENCE,
                tlv(0x06, _COMMON_NAME) + tlv(0x0C, device_id.encode()),
            ),
        ),
    )
    uri = ("urn:device-agent:" + device_id).encode()
    extension = tlv(
        SEQUENCE,
        tlv(0x06, _SUBJECT_ALT_NAME)
        + tlv(0x04, tlv(SEQUENCE, tlv(URI_TAG, uri))),
    )
    attribute = tlv(
        SEQUENCE,
        tlv(0x06, _EXTENSION_REQUEST) + tlv(SET, tlv(SEQUENCE, extension)),
    )
    info = tlv(
        SEQUENCE,
        tlv(0x02, b"\x00")
        + name
        + public_key_info(point)
        + tlv(0xA0, attribute),
    )

    digest = hashlib.sha256(info).digest()
    signature = signature_value(sign(digest))
    algorithm = tlv(SEQUENCE, tlv(0x06, _ECDSA_SHA256))
    return tlv(SEQUENCE, info + algorithm + tlv(0x03, b"\x00" + signature))
