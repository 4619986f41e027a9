"""The manufacturing CA: files, issued certificates, CRLs, its CLI."""

import datetime
import ipaddress
import stat

import pytest
from click.testing import CliRunner
from conftest import edge_command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
)

from firmware_sim import cli
from firmware_sim.ca import CertificateAuthority
from firmware_sim.errors import CAError

NOW = datetime.datetime.now(datetime.UTC)
DEVICE = "dev-42"
DEVICE_URI = f"urn:device:{DEVICE}"


def make_csr(name=DEVICE, san=True, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0042"),
            ]
        )
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(DEVICE_URI)]
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


def client_verifier(ca, at=None):
    return (
        PolicyBuilder()
        .store(Store([ca.root]))
        .time(at or NOW)
        .build_client_verifier()
    )


def extension(cert, kind):
    return cert.extensions.get_extension_for_class(kind)


def test_create_writes_private_files_and_load_reads_them(tmp_path):
    directory = tmp_path / "ca"
    created = CertificateAuthority.create(directory, name="Acme")

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key_file in ("root.key", "intermediate.key"):
        assert stat.S_IMODE((directory / key_file).stat().st_mode) == 0o600
        assert b"BEGIN PRIVATE KEY" in (directory / key_file).read_bytes()

    loaded = CertificateAuthority.load(directory)
    assert loaded.root == created.root
    assert loaded.intermediate == created.intermediate
    assert "Acme Root CA" in loaded.root.subject.rfc4514_string()


def test_create_refuses_to_overwrite_a_ca(factory_ca):
    root = factory_ca.root_path.read_bytes()

    with pytest.raises(CAError, match="already holds a CA"):
        CertificateAuthority.create(factory_ca.directory)

    assert factory_ca.root_path.read_bytes() == root


def test_load_refuses_a_key_that_does_not_match(factory_ca, tmp_path):
    other = CertificateAuthority.create(tmp_path / "other")
    (factory_ca.directory / "intermediate.key").write_bytes(
        (other.directory / "intermediate.key").read_bytes()
    )

    with pytest.raises(CAError, match="does not match its key"):
        CertificateAuthority.load(factory_ca.directory)


def test_load_of_a_missing_ca_names_the_file(tmp_path):
    with pytest.raises(CAError, match=r"root\.pem: no such file"):
        CertificateAuthority.load(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("which", "path_length"), [("root", 1), ("intermediate", 0)]
)
def test_ca_certificates_carry_ca_extensions(factory_ca, which, path_length):
    cert = getattr(factory_ca, which)

    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == path_length

    usage = extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature

    ski = extension(cert, x509.SubjectKeyIdentifier).value
    aki = extension(cert, x509.AuthorityKeyIdentifier).value
    issuer_ski = extension(factory_ca.root, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    assert (
        ski.digest
        == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    )


def test_sign_csr_returns_leaf_and_intermediate(factory_ca):
    csr = make_csr()

    leaf, intermediate = factory_ca.sign_csr(csr, days=30)

    assert intermediate == factory_ca.intermediate
    assert leaf.subject == csr.subject
    assert leaf.issuer == factory_ca.intermediate.subject
    assert leaf.public_key() == csr.public_key()
    assert leaf.serial_number.bit_length() <= 159
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=30) < lifetime
    assert lifetime < datetime.timedelta(days=30, minutes=10)


def test_leaf_extensions_make_a_client_certificate(factory_ca):
    leaf, _ = factory_ca.sign_csr(make_csr())

    constraints = extension(leaf, x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca

    usage = extension(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign

    eku = extension(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    san = extension(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        DEVICE_URI
    ]

    aki = extension(leaf, x509.AuthorityKeyIdentifier).value
    issuer_ski = extension(factory_ca.intermediate, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.value.digest
    assert extension(leaf, x509.SubjectKeyIdentifier).value.digest


def test_leaf_passes_cryptographys_client_verifier(factory_ca):
    leaf, intermediate = factory_ca.sign_csr(make_csr())

    verified = client_verifier(factory_ca).verify(leaf, [intermediate])

    assert verified.chain == [leaf, intermediate, factory_ca.root]
    assert x509.UniformResourceIdentifier(DEVICE_URI) in verified.subjects


def test_leaf_from_another_ca_fails_the_verifier(factory_ca, tmp_path):
    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    leaf, intermediate = other.sign_csr(make_csr())

    with pytest.raises(VerificationError):
        client_verifier(factory_ca).verify(leaf, [intermediate])


def test_leaf_without_san_fails_the_verifier(factory_ca):
    """cryptography's client verifier insists on a subjectAltName."""
    leaf, intermediate = factory_ca.sign_csr(make_csr(san=False))

    with pytest.raises(x509.ExtensionNotFound):
        extension(leaf, x509.SubjectAlternativeName)
    with pytest.raises(VerificationError, match=r"2\.5\.29\.17"):
        client_verifier(factory_ca).verify(leaf, [intermediate])


def test_san_override_replaces_the_csrs(factory_ca):
    uri = x509.UniformResourceIdentifier("urn:device:assigned")

    leaf, _ = factory_ca.sign_csr(make_csr(san=False), san=[uri])

    assert list(extension(leaf, x509.SubjectAlternativeName).value) == [uri]


def test_csr_with_a_bad_signature_is_refused(factory_ca):
    der = bytearray(make_csr().public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))

    with pytest.raises(CAError, match="bad signature"):
        factory_ca.sign_csr(tampered)


def test_expired_leaf_fails_the_verifier(factory_ca):
    leaf, intermediate = factory_ca.sign_csr(
        make_csr(),
        not_before=NOW - datetime.timedelta(days=10),
        not_after=NOW - datetime.timedelta(days=1),
    )

    assert leaf.not_valid_after_utc < NOW
    with pytest.raises(
        VerificationError, match="not valid at validation time"
    ):
        client_verifier(factory_ca).verify(leaf, [intermediate])


def test_not_yet_valid_leaf_fails_the_verifier(factory_ca):
    leaf, intermediate = factory_ca.sign_csr(
        make_csr(), not_before=NOW + datetime.timedelta(days=1)
    )

    assert leaf.not_valid_before_utc > NOW
    with pytest.raises(
        VerificationError, match="not valid at validation time"
    ):
        client_verifier(factory_ca).verify(leaf, [intermediate])


def test_server_only_leaf_fails_the_client_verifier(factory_ca):
    leaf, intermediate = factory_ca.sign_csr(
        make_csr(), eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )

    eku = extension(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(VerificationError):
        client_verifier(factory_ca).verify(leaf, [intermediate])


def test_empty_eku_leaves_the_extension_out(factory_ca):
    leaf, _ = factory_ca.sign_csr(make_csr(), eku=[])

    with pytest.raises(x509.ExtensionNotFound):
        extension(leaf, x509.ExtendedKeyUsage)


def test_server_certificate_names_localhost_and_loopback(factory_ca):
    (leaf, intermediate), key = factory_ca.issue_server_cert()

    assert leaf.public_key() == key.public_key()
    san = extension(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    eku = extension(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier = (
            PolicyBuilder()
            .store(Store([factory_ca.root]))
            .build_server_verifier(name)
        )
        assert verifier.verify(leaf, [intermediate])[0] == leaf


def test_crl_is_signed_by_the_intermediate_and_lists_serials(factory_ca):
    pem = factory_ca.crl([17, 4711], next_update=datetime.timedelta(hours=2))
    crl = x509.load_pem_x509_crl(pem)

    assert crl.issuer == factory_ca.intermediate.subject
    assert crl.is_signature_valid(factory_ca.intermediate.public_key())
    assert sorted(r.serial_number for r in crl) == [17, 4711]
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(
        hours=2
    )
    assert extension(crl, x509.CRLNumber).value.crl_number > 0
    aki = extension(crl, x509.AuthorityKeyIdentifier).value
    issuer_ski = extension(factory_ca.intermediate, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.value.digest


def test_later_crls_have_larger_numbers(factory_ca):
    numbers = [
        extension(
            x509.load_pem_x509_crl(factory_ca.crl()), x509.CRLNumber
        ).value.crl_number
        for _ in range(3)
    ]

    assert numbers == sorted(numbers)
    assert len(set(numbers)) == 3


def test_cli_init_and_sign(tmp_path):
    ca_dir = tmp_path / "ca"
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(make_csr().public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "chain.pem"
    runner = CliRunner()

    init = runner.invoke(
        edge_command(cli.run), ["ca", "init", "--dir", str(ca_dir)]
    )
    assert init.exit_code == 0, init.output
    signed = runner.invoke(
        edge_command(cli.run),
        ["ca", "sign", str(csr_file), "--out", str(out), "--dir", str(ca_dir)],
    )
    assert signed.exit_code == 0, signed.output

    leaf, intermediate = x509.load_pem_x509_certificates(out.read_bytes())
    ca = CertificateAuthority.load(ca_dir)
    assert intermediate == ca.intermediate
    assert client_verifier(ca).verify(leaf, [intermediate])


def test_cli_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    ca_dir = str(tmp_path / "ca")
    runner.invoke(edge_command(cli.run), ["ca", "init", "--dir", ca_dir])
    not_a_csr = tmp_path / "junk.csr"
    not_a_csr.write_bytes(b"junk")

    again = runner.invoke(
        edge_command(cli.run), ["ca", "init", "--dir", ca_dir]
    )
    junk = runner.invoke(
        edge_command(cli.run),
        ["ca", "sign", str(not_a_csr), "--out", "x", "--dir", ca_dir],
    )

    assert again.exit_code == 1
    assert "already holds a CA" in again.output
    assert junk.exit_code == 1
    assert "not a PEM or DER CSR" in junk.output
    for result in (again, junk):
        assert result.output.count("\n") == 1
        assert "Traceback" not in result.output


def test_cli_debug_shows_the_exception(tmp_path):
    ca_dir = str(tmp_path / "none")
    result = CliRunner().invoke(
        edge_command(cli.run),
        ["--debug", "ca", "sign", "x.csr", "--out", "y", "--dir", ca_dir],
    )

    assert result.exit_code == CAError.exit_code
    assert "Traceback" in result.output
    assert "CAError" in result.output
