"""PEM and DER conversion and the few certificate fields a board needs.

A board without ``cryptography`` still has to know when its certificate
starts and ends, whether a certificate is for its own key and which
device it names. That is parsing, not cryptography: this module walks
DER by hand and verifies no signature. Chains are verified elsewhere (by
``cryptography`` on CPython, by the broker's TLS handshake on a board).

Times are seconds since 1970-01-01 UTC, worked out from the calendar
rather than the platform's epoch, which is 2000 on some boards.
"""

import binascii

# Annotations are for the type checker; MicroPython ignores them, and
# nothing here evaluates them at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    # (tag, content start, content end, header start)
    Element = tuple[int, int, int, int]

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OID = 0x06
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
VERSION_TAG = 0xA0

# 2.5.4.3, id-at-commonName, as its DER content bytes.
COMMON_NAME_OID = b"\x55\x04\x03"
_STRING_TAGS = (0x0C, 0x13, 0x16, 0x14, 0x1E)

_PEM_BEGIN = "-----BEGIN "
_PEM_END = "-----END "
_DASHES = "-----"
_LINE = 64
_MAX_LENGTH_BYTES = 4


class DerError(ValueError):
    """Bytes or text that are not the DER or PEM we expect."""


def pem_blocks(text: str, label: str = "CERTIFICATE") -> list[bytes]:
    """The DER of every PEM block with ``label`` in ``text``, in order.

    Blocks with other labels and text around the blocks are skipped; a
    block that starts and never ends, or whose body is not base64, is an
    error rather than a silent loss of a certificate.
    """
    if type(text) is not str:
        raise DerError("PEM must be text")
    begin = _PEM_BEGIN + label + _DASHES
    end = _PEM_END + label + _DASHES
    found = []
    body: list[str] | None = None
    for raw in text.split("\n"):
        line = raw.strip()
        if body is None:
            if line == begin:
                body = []
            continue
        if line == end:
            found.append(_decode_base64("".join(body)))
            body = None
        elif line.startswith(_DASHES):
            raise DerError("PEM block " + label + " has no END line")
        else:
            body.append(line)
    if body is not None:
        raise DerError("PEM block " + label + " has no END line")
    return found


def to_pem(der: bytes, label: str = "CERTIFICATE") -> str:
    """``der`` as one PEM block with 64-character lines."""
    encoded = binascii.b2a_base64(der).decode().strip()
    lines = [_PEM_BEGIN + label + _DASHES]
    for start in range(0, len(encoded), _LINE):
        lines.append(encoded[start : start + _LINE])
    lines.append(_PEM_END + label + _DASHES)
    return "\n".join(lines) + "\n"


def read(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """The (tag, content start, content end) of the element at ``offset``.

    Only definite lengths are DER; an element that runs past the data is
    refused, so callers may slice with the offsets they get back.
    """
    if offset + 2 > len(data):
        raise DerError("DER element truncated at " + str(offset))
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte DER tags are not used here")
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES:
            raise DerError("DER length form not supported")
        if start + count > len(data):
            raise DerError("DER length truncated")
        length = 0
        for index in range(count):
            length = (length << 8) | data[start + index]
        start += count
    end = start + length
    if end > len(data):
        raise DerError("DER element runs past the data")
    return tag, start, end


def children(data: bytes, start: int, end: int) -> "list[Element]":
    """The elements between ``start`` and ``end``.

    Each is (tag, content start, content end, header start); the header
    start lets a caller take the whole element, as for a public key.
    """
    found = []
    offset = start
    while offset < end:
        tag, content, stop = read(data, offset)
        if stop > end:
            raise DerError("DER element runs past its parent")
        found.append((tag, content, stop, offset))
        offset = stop
    return found


def certificate_fields(der: bytes) -> "dict[str, object]":
    """The fields a board uses from a certificate in DER.

    Keys: ``serial`` (lower-case hex), ``not_before`` and ``not_after``
    (seconds since 1970, UTC), ``subject_cn`` and ``issuer_cn`` (str or
    None) and ``spki`` (the DER of the SubjectPublicKeyInfo, to compare
    with the key the board holds).
    """
    tbs = _tbs(der)
    fields = children(der, tbs[1], tbs[2])
    if fields and fields[0][0] == VERSION_TAG:
        fields = fields[1:]
    if len(fields) < 6:
        raise DerError("certificate has too few fields")
    serial, _, issuer, validity, subject, spki = fields[:6]
    _expect(serial, INTEGER, "serial number")
    _expect(validity, SEQUENCE, "validity")

    times = children(der, validity[1], validity[2])
    if len(times) != 2:
        raise DerError("validity must hold two times")
    return {
        "serial": _hex(der[serial[1] : serial[2]]),
        "not_before": parse_time(der, times[0]),
        "not_after": parse_time(der, times[1]),
        "issuer_cn": common_name(der, issuer),
        "subject_cn": common_name(der, subject),
        "spki": _whole(der, spki, "subject public key"),
    }


def certificate_dates(der: bytes) -> tuple[int, int]:
    """The (notBefore, notAfter) of a DER certificate, seconds since 1970."""
    fields = certificate_fields(der)
    return fields["not_before"], fields["not_after"]  # type: ignore[return-value]


def csr_fields(der: bytes) -> "dict[str, object]":
    """``subject_cn`` and ``spki`` of a certificate request in DER."""
    info = _tbs(der)
    fields = children(der, info[1], info[2])
    if len(fields) < 3:
        raise DerError("certificate request has too few fields")
    _expect(fields[0], INTEGER, "request version")
    return {
        "subject_cn": common_name(der, fields[1]),
        "spki": _whole(der, fields[2], "request public key"),
    }


def common_name(der: bytes, name: "Element") -> str | None:
    """The last common name in a Name element, or None if it has none."""
    _expect(name, SEQUENCE, "name")
    found = None
    for rdn in children(der, name[1], name[2]):
        _expect(rdn, SET, "relative distinguished name")
        for attribute in children(der, rdn[1], rdn[2]):
            parts = children(der, attribute[1], attribute[2])
            if len(parts) != 2 or parts[0][0] != OID:
                raise DerError("malformed name attribute")
            oid = der[parts[0][1] : parts[0][2]]
            if bytes(oid) != COMMON_NAME_OID:
                continue
            if parts[1][0] not in _STRING_TAGS:
                raise DerError("common name is not a string")
            found = _text(der, parts[1])
    return found


def parse_time(der: bytes, element: "Element") -> int:
    """A UTCTime or GeneralizedTime element as seconds since 1970."""
    tag = element[0]
    text = _text(der, element)
    if tag == UTC_TIME:
        if len(text) != 13:
            raise DerError("UTCTime must be YYMMDDHHMMSSZ")
        year = _digits(text, 0, 2)
        # RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        year += 1900 if year >= 50 else 2000
        rest = text[2:]
    elif tag == GENERALIZED_TIME:
        if len(text) != 15:
            raise DerError("GeneralizedTime must be YYYYMMDDHHMMSSZ")
        year = _digits(text, 0, 4)
        rest = text[4:]
    else:
        raise DerError("not a time")
    if rest[-1] != "Z":
        raise DerError("certificate times must be in UTC (Z)")

    month = _digits(rest, 0, 2)
    day = _digits(rest, 2, 4)
    hour = _digits(rest, 4, 6)
    minute = _digits(rest, 6, 8)
    second = _digits(rest, 8, 10)
    if not (1 <= month <= 12 and 1 <= day <= _days_in(year, month)):
        raise DerError("certificate date out of range")
    if hour > 23 or minute > 59 or second > 59:
        raise DerError("certificate time out of range")
    days = days_from_civil(year, month, day)
    return days * 86400 + hour * 3600 + minute * 60 + second


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar.

    Counted with whole-year and whole-month arithmetic from March, so
    that February's leap day falls at the end of a counted year.
    """
    if month <= 2:
        year -= 1
    era = year // 400
    year_of_era = year - era * 400
    shifted_month = month - 3 if month > 2 else month + 9
    day_of_year = (153 * shifted_month + 2) // 5 + day - 1
    day_of_era = (
        year_of_era * 365 + year_of_era // 4 - year_of_era // 100
    ) + day_of_year
    return era * 146097 + day_of_era - 719468


def _whole(der: bytes, element: "Element", what: str) -> bytes:
    _expect(element, SEQUENCE, what)
    return bytes(der[element[3] : element[2]])


def _tbs(der: bytes) -> "Element":
    outer = read(der, 0)
    if outer[0] != SEQUENCE:
        raise DerError("not a DER SEQUENCE")
    if outer[2] != len(der):
        raise DerError("trailing bytes after the DER structure")
    tag, start, end = read(der, outer[1])
    if tag != SEQUENCE:
        raise DerError("to-be-signed part has an unexpected DER tag")
    return (tag, start, end, outer[1])


def _expect(element: "Element", tag: int, what: str) -> None:
    if element[0] != tag:
        raise DerError(what + " has an unexpected DER tag")


def _text(der: bytes, element: "Element") -> str:
    try:
        return bytes(der[element[1] : element[2]]).decode()
    except UnicodeError:
        raise DerError("text in the certificate is not UTF-8") from None


def _digits(text: str, start: int, end: int) -> int:
    part = text[start:end]
    if len(part) != end - start or not part.isdigit():
        raise DerError("certificate time has non-digits")
    return int(part)


def _days_in(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _hex(data: bytes) -> str:
    text = binascii.hexlify(data).decode()
    # A positive serial may carry a leading zero byte for its sign.
    stripped = text.lstrip("0")
    return stripped if stripped else "0"


def _decode_base64(text: str) -> bytes:
    try:
        # Bytes, not str: the WebAssembly port's binascii takes no str.
        return binascii.a2b_base64(text.encode())
    except ValueError:
        raise DerError("PEM body is not base64") from None
