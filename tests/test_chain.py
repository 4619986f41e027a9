"""Chain parsing, leaf selection, ordering and verification."""

import datetime
import subprocess
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import chain, csr
from device_agent.errors import ChainError
from firmware_sim.ca import CertificateAuthority

NOW = datetime.datetime.now(datetime.UTC)
DEVICE = "dev-7"


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    base = tmp_path_factory.mktemp("cas")
    return (
        CertificateAuthority.create(base / "factory"),
        CertificateAuthority.create(base / "other", name="Other CA"),
    )


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP256R1())


def request(key, device=DEVICE):
    return csr.build(key, device, f"urn:device-agent:{device}")


def pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def issue(ca, key, **kwargs):
    return ca.sign_csr(request(key, kwargs.pop("device", DEVICE)), **kwargs)


def accept(data, ca, key, device=DEVICE, now=NOW):
    ordered = chain.order_chain(chain.read_bundle(data), key.public_key())
    chain.verify(ordered, [ca.root], device, now)
    return ordered


def refusal(data, ca, key, **kwargs):
    with pytest.raises(ChainError) as info:
        accept(data, ca, key, **kwargs)
    assert "\n" not in str(info.value)
    return info.value.reason


def test_pem_in_any_order_with_extras(cas, key):
    factory, other = cas
    leaf, inter = issue(factory, key)
    stranger = issue(other, ec.generate_private_key(ec.SECP256R1()))[0]
    data = pem(inter, stranger, factory.root, leaf)
    assert accept(data, factory, key) == [leaf, inter]


def test_leaf_is_chosen_by_key_not_position(cas, key):
    factory, _ = cas
    someone = issue(factory, ec.generate_private_key(ec.SECP256R1()))[0]
    leaf, inter = issue(factory, key)
    assert accept(pem(someone, inter, leaf), factory, key)[0] == leaf


def test_der_and_pkcs7(cas, key):
    factory, _ = cas
    leaf, inter = issue(factory, key)
    der_leaf = leaf.public_bytes(serialization.Encoding.DER)
    assert chain.read_bundle(der_leaf) == [leaf]
    for encoding in (serialization.Encoding.DER, serialization.Encoding.PEM):
        data = pkcs7.serialize_certificates([inter, leaf], encoding)
        assert accept(data, factory, key) == [leaf, inter]


def test_pkcs7_written_by_openssl_reads_without_a_warning(cas, key, tmp_path):
    """``openssl crl2pkcs7`` writes BER, which cryptography warns about."""
    factory, _ = cas
    leaf, inter = issue(factory, key)
    source = tmp_path / "chain.pem"
    source.write_bytes(pem(leaf, inter))
    for form in ("DER", "PEM"):
        made = subprocess.run(
            ["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(source),
             "-outform", form],
            capture_output=True, check=True,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert accept(made.stdout, factory, key) == [leaf, inter]


def test_missing_intermediate_is_unknown_ca_naming_the_issuer(cas, key):
    factory, _ = cas
    leaf, inter = issue(factory, key)
    with pytest.raises(ChainError) as info:
        accept(pem(leaf), factory, key)
    assert info.value.reason == "unknown-ca"
    issuer = inter.subject.rfc4514_string()
    assert info.value.detail.startswith(
        f"intermediate missing: no certificate for issuer {issuer}"
    )


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


_ECDSA_SHA256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
_ECDSA_SHA1 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0401")))


def sha1_leaf(ca, key):
    """A leaf signed by ``ca``'s intermediate with ECDSA and SHA-1.

    cryptography no longer signs with SHA-1, so the certificate is put
    together by hand from a SHA-256 one.
    """
    leaf = issue(ca, key)[0]
    tbs = leaf.tbs_certificate_bytes
    header = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    body = tbs[header:].replace(_ECDSA_SHA256, _ECDSA_SHA1, 1)
    tbs = _der(0x30, body)
    signature = ca._intermediate_key.sign(tbs, ec.ECDSA(hashes.SHA1()))
    return x509.load_der_x509_certificate(
        _der(0x30, tbs + _ECDSA_SHA1 + _der(0x03, b"\0" + signature))
    )


def test_a_sha1_signature_is_refused_by_name(cas, key):
    factory, _ = cas
    leaf = sha1_leaf(factory, key)
    with pytest.raises(ChainError) as info:
        accept(pem(leaf, factory.intermediate), factory, key)
    assert info.value.reason == "weak-signature"
    assert f"'{DEVICE}' is signed with sha1" in info.value.detail


def leaf_with(ca, key, extension):
    """A leaf from ``ca``'s intermediate with one more, critical, extension."""
    template = issue(ca, key)[0]
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(template.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    for existing in template.extensions:
        builder = builder.add_extension(existing.value, existing.critical)
    builder = builder.add_extension(extension, critical=True)
    return builder.sign(ca._intermediate_key, hashes.SHA256())


@pytest.mark.parametrize(
    ("extension", "named"),
    [
        (
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
            ),
            "1.3.6.1.4.1.99999.1",
        ),
        (x509.InhibitAnyPolicy(1), "inhibitAnyPolicy (2.5.29.54)"),
    ],
)
def test_an_unsupported_critical_extension_is_named_without_a_repr(
    cas, key, extension, named
):
    factory, _ = cas
    leaf = leaf_with(factory, key, extension)
    with pytest.raises(ChainError) as info:
        accept(pem(leaf, factory.intermediate), factory, key)
    assert info.value.reason == "unsupported-extension"
    assert info.value.detail.endswith(f"not supported: {named}")
    assert "<" not in str(info.value) and "{" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (
            {
                "not_before": NOW - datetime.timedelta(days=10),
                "not_after": NOW - datetime.timedelta(days=1),
            },
            "expired",
        ),
        (
            {
                "not_before": NOW + datetime.timedelta(days=1),
                "not_after": NOW + datetime.timedelta(days=10),
            },
            "not-yet-valid",
        ),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "not-client"),
        ({"device": "someone-else"}, "wrong-identity"),
    ],
)
def test_refusals(cas, key, kwargs, reason):
    factory, _ = cas
    assert refusal(pem(*issue(factory, key, **kwargs)), factory, key) == reason


def test_other_ca_and_other_key(cas, key):
    factory, other = cas
    assert refusal(pem(*issue(other, key)), factory, key) == "unknown-ca"
    with pytest.raises(ChainError) as info:
        accept(pem(*issue(other, key)), factory, key)
    assert "no certificate for issuer" in info.value.detail
    assert other.root.subject.rfc4514_string() in info.value.detail
    not_ours = ec.generate_private_key(ec.SECP256R1())
    data = pem(*issue(factory, not_ours))
    assert refusal(data, factory, key) == "not-our-key"


def test_ca_certificate_as_leaf(cas, key):
    factory, _ = cas
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    assert refusal(pem(cert), factory, key) == "not-client"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n",
        b"hello world",
        b"\x30\x03\x02\x01\x01",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIB",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"x" * (chain.MAX_BUNDLE_BYTES + 1),
    ],
)
def test_unreadable(cas, key, data):
    factory, _ = cas
    assert refusal(data, factory, key) == "unreadable"


def test_private_key_in_bundle_is_refused(cas, key):
    factory, _ = cas
    secret = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ChainError, match="private key"):
        chain.read_bundle(pem(*issue(factory, key)) + secret)


def test_repeated_certificates_are_dropped(cas, key):
    factory, _ = cas
    leaf, inter = issue(factory, key)
    data = pem(leaf, inter, inter, leaf, inter)
    assert accept(data, factory, key) == [leaf, inter]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_give_certificates_or_chain_error(data):
    try:
        result = chain.read_bundle(data)
    except ChainError as exc:
        assert exc.reason == "unreadable"
    else:
        assert all(isinstance(c, x509.Certificate) for c in result)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"CERTIFICATE", b"PKCS7", b"X509 CRL", b"EC PRIVATE KEY"]
        ),
        max_size=4,
    ),
    st.binary(max_size=200),
)
def test_pem_shaped_garbage(labels, body):
    import base64

    blocks = b"".join(
        b"-----BEGIN %s-----\n%s\n-----END %s-----\n"
        % (label, base64.encodebytes(body), label)
        for label in labels
    )
    try:
        chain.read_bundle(blocks)
    except ChainError as exc:
        assert exc.reason == "unreadable"


def _patched(key, value: bytes, count: int) -> bytes:
    """A certificate whose SAN is hostile, made by patching the DER.

    Builders refuse duplicate or malformed extensions, so placeholder
    extensions (OID 2.5.29.99) are added and their OID is rewritten to
    subjectAltName (2.5.29.17) in the encoding afterwards.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    placeholder = x509.ObjectIdentifier("2.5.29.99")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    for index in range(count):
        oid = (
            x509.ObjectIdentifier(f"2.5.29.99.{index}")
            if index
            else placeholder
        )
        builder = builder.add_extension(
            x509.UnrecognizedExtension(oid, value), critical=False
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )
    return der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")


@pytest.mark.parametrize(
    ("value", "count"),
    [(b"\x30\x00", 1), (b"\xff\xff\xff", 1)],
    ids=["empty-san", "garbage-san"],
)
def test_hostile_extensions_are_unreadable_not_a_crash(key, value, count):
    data = _patched(key, value, count)
    try:
        chain.read_bundle(data)
    except ChainError as exc:
        assert exc.reason == "unreadable"


def test_duplicate_extension_is_unreadable(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("2.5.29.99"), b"\x30\x00"
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("a.example")]),
            critical=False,
        )
    )
    der = builder.sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )
    patched = der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")
    assert patched != der
    with pytest.raises(ChainError, match=r"unreadable|certificate 1"):
        chain.read_bundle(patched)


def test_oversized_certificate_is_refused(cas, key):
    factory, _ = cas
    names = [x509.DNSName(f"n{i}.example") for i in range(2000)]
    leaf = factory.sign_csr(request(key), san=names)[0]
    with pytest.raises(ChainError, match="bytes, over"):
        chain.read_bundle(pem(leaf))


def test_truncated_last_block_is_named(cas, key):
    factory, _ = cas
    data = pem(*issue(factory, key))
    with pytest.raises(ChainError, match="incomplete"):
        chain.read_bundle(data[:-40])


def test_leaf_without_san_or_eku_is_accepted(cas, key):
    factory, _ = cas
    plain = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
        )
        .sign(key, hashes.SHA256())
    )
    leaf, inter = factory.sign_csr(plain, eku=[])
    assert accept(pem(leaf, inter), factory, key) == [leaf, inter]
