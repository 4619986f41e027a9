"""Chain parsing, leaf selection, ordering and verification."""

import datetime

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


def test_missing_intermediate_is_unknown_ca(cas, key):
    factory, _ = cas
    leaf, _ = issue(factory, key)
    assert refusal(pem(leaf), factory, key) == "unknown-ca"


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
