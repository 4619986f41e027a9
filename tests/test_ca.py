"""The manufacturing CA: files, issued certificates, CRLs, its CLI."""

import datetime
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
)
from sim_cli import assert_refused, invoke, tree

from firmware_sim.ca import MAX_DAYS, CertificateAuthority, chain_pem
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

    init = invoke(["ca", "init", "--dir", str(ca_dir)])
    assert init.exit_code == 0, init.output
    signed = invoke(
        ["ca", "sign", str(csr_file), "--out", str(out), "--dir", str(ca_dir)],
    )
    assert signed.exit_code == 0, signed.output

    leaf, intermediate = x509.load_pem_x509_certificates(out.read_bytes())
    ca = CertificateAuthority.load(ca_dir)
    assert intermediate == ca.intermediate
    assert client_verifier(ca).verify(leaf, [intermediate])


def test_cli_refusals_are_one_line(tmp_path):
    ca_dir = str(tmp_path / "ca")
    invoke(["ca", "init", "--dir", ca_dir])
    not_a_csr = tmp_path / "junk.csr"
    not_a_csr.write_bytes(b"junk")

    again = invoke(["ca", "init", "--dir", ca_dir])
    junk = invoke(
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
    result = invoke(
        ["--debug", "ca", "sign", "x.csr", "--out", "y", "--dir", ca_dir],
    )

    assert result.exit_code == CAError.exit_code
    assert "Traceback" in result.output
    assert "CAError" in result.output


@pytest.mark.parametrize("days", [-1, 0, MAX_DAYS + 1, 99999999])
def test_create_refuses_a_lifetime_outside_1_to_max_days(tmp_path, days):
    with pytest.raises(CAError, match="lifetime"):
        CertificateAuthority.create(tmp_path / "ca", days=days)

    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize(
    "name", ["x" * 49, "é" * 25, "x" * 65, "", "   ", "a\nb", "a\x00b"]
)
def test_create_refuses_a_name_that_no_certificate_can_carry(tmp_path, name):
    with pytest.raises(CAError, match="CA name"):
        CertificateAuthority.create(tmp_path / "ca", name=name)

    assert not (tmp_path / "ca").exists()


def test_create_takes_the_longest_name_that_fits(tmp_path):
    ca = CertificateAuthority.create(tmp_path / "ca", name="x" * 48)

    common_names = ca.intermediate.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    assert common_names[0].value == "x" * 48 + " Intermediate CA"


def test_create_leaves_the_mode_of_a_directory_that_exists(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)

    CertificateAuthority.create(directory)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    key_mode = (directory / "root.key").stat().st_mode
    assert stat.S_IMODE(key_mode) == 0o600


def test_create_under_a_file_names_it(tmp_path):
    (tmp_path / "file").write_text("x")

    with pytest.raises(CAError, match="not a directory"):
        CertificateAuthority.create(tmp_path / "file")


@pytest.mark.parametrize("days", [-1, 0, MAX_DAYS + 1])
def test_sign_csr_refuses_a_lifetime_outside_1_to_max_days(factory_ca, days):
    with pytest.raises(CAError, match="lifetime"):
        factory_ca.sign_csr(make_csr(), days)


def test_an_expired_ca_refuses_to_sign(tmp_path, monkeypatch):
    made = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    monkeypatch.setattr("firmware_sim.ca._now", lambda: made)
    ca = CertificateAuthority.create(tmp_path / "ca", days=1)
    monkeypatch.undo()

    with pytest.raises(CAError, match="expired"):
        ca.sign_csr(make_csr())
    with pytest.raises(CAError, match="expired"):
        ca.issue_server_cert()


def test_load_names_a_ca_file_that_is_not_a_regular_file(factory_ca):
    factory_ca.root_path.unlink()
    os.mkfifo(factory_ca.root_path)

    with pytest.raises(CAError, match=r"root\.pem: not a regular file"):
        CertificateAuthority.load(factory_ca.directory)


INIT_REFUSALS = {
    "negative days": (["--days", "-1"], "--days"),
    "zero days": (["--days", "0"], "--days"),
    "too many days": (["--days", "99999999"], "--days"),
    "long name": (["--name", "x" * 65], "--name"),
    "name too long for the intermediate": (["--name", "x" * 49], "--name"),
    "empty name": (["--name", ""], "--name"),
    "name with a newline": (["--name", "a\nb"], "--name"),
    "empty dir": (["--dir", ""], "--dir"),
    "dir under a file": (["--dir", "{tmp}/file/x"], "file"),
    "dir is a file": (["--dir", "{tmp}/file"], "file"),
}


@pytest.mark.parametrize(
    ("args", "named"), INIT_REFUSALS.values(), ids=INIT_REFUSALS.keys()
)
def test_cli_init_refuses_bad_input_in_one_line(tmp_path, args, named):
    (tmp_path / "file").write_text("x")
    args = [arg.format(tmp=tmp_path) for arg in args]
    before = tree(tmp_path)

    result = invoke(["ca", "init", "--dir", str(tmp_path / "ca"), *args])

    assert_refused(result, named)
    assert tree(tmp_path) == before


@pytest.fixture
def signing(tmp_path):
    """A CA, a CSR file and the tree of tmp_path, for 'ca sign' refusals."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(make_csr().public_bytes(serialization.Encoding.PEM))
    (tmp_path / "file").write_text("x")
    old_chain, _ = ca.issue_client_cert("old-device")
    (tmp_path / "old.pem").write_bytes(chain_pem(old_chain))
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.pem").symlink_to(tmp_path / "old.pem")
    (tmp_path / "dangling.pem").symlink_to(tmp_path / "nowhere")
    return tmp_path


SIGN_REFUSALS = {
    "negative days": (["--days", "-1"], "--days"),
    "zero days": (["--days", "0"], "--days"),
    "too many days": (["--days", "99999999"], "--days"),
    "out in a missing dir": (["--out", "/nonexist/x.pem"], "/nonexist"),
    "empty out": (["--out", ""], "--out"),
    "out under a file": (["--out", "{tmp}/file/x.pem"], "file"),
    "out is a fifo": (["--out", "{tmp}/fifo"], "fifo"),
    "out is a symlink": (["--out", "{tmp}/link.pem"], "link.pem"),
    "out is a dangling symlink": (["--out", "{tmp}/dangling.pem"], "dang"),
    "out is a dir": (["--out", "{tmp}/dir"], "dir"),
    "out is the CSR": (["--out", "{tmp}/device.csr"], "CSR"),
    "out is the root": (["--out", "{tmp}/ca/root.pem"], "root.pem"),
    "out is a key": (["--out", "{tmp}/ca/../ca/root.key"], "root.key"),
    "empty dir": (["--dir", ""], "--dir"),
    "dir under a file": (["--dir", "{tmp}/file/x"], "file"),
    "dir without a CA": (["--dir", "{tmp}/dir"], "ca init"),
    "csr is a fifo": (["--csr", "{tmp}/fifo"], "fifo"),
    "csr is empty": (["--csr", ""], "CSR_FILE"),
    "csr is missing": (["--csr", "{tmp}/none.csr"], "none.csr"),
    "csr is a device": (["--csr", "/dev/null"], "/dev/null"),
}


@pytest.mark.parametrize(
    ("args", "named"), SIGN_REFUSALS.values(), ids=SIGN_REFUSALS.keys()
)
def test_cli_sign_refuses_bad_input_in_one_line(signing, args, named):
    options = {"--csr": "{tmp}/device.csr", "--out": "{tmp}/old.pem"}
    options["--dir"] = "{tmp}/ca"
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = ["ca", "sign", options.pop("--csr")]
    for option, value in options.items():
        argv += [option, value]
    before = tree(signing)

    result = invoke([arg.format(tmp=signing) for arg in argv])

    assert_refused(result, named)
    assert tree(signing) == before


def test_cli_sign_leaves_a_device_node_alone(signing):
    device = signing / "full"
    try:
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making a device node needs root")

    result = _sign(signing, device)

    assert_refused(result, "full")
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_cli_sign_replaces_a_regular_file_whole(signing):
    out = signing / "old.pem"

    result = _sign(signing, out)

    assert result.exit_code == 0, result.output
    assert len(x509.load_pem_x509_certificates(out.read_bytes())) == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert not [p for p in signing.iterdir() if p.name.endswith(".partial")]


def _sign(directory, out):
    csr_file = str(directory / "device.csr")
    ca_dir = str(directory / "ca")
    return invoke(["ca", "sign", csr_file, "--out", str(out), "--dir", ca_dir])


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
        (lambda: ec.generate_private_key(ec.SECP192R1()), "secp192r1"),
    ],
)
def test_the_ca_refuses_to_sign_for_a_weak_key(tmp_path, make, named):
    ca = CertificateAuthority.create(tmp_path / "ca")
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak-1")])
        )
        .sign(make(), hashes.SHA256())
    )
    with pytest.raises(CAError, match=named):
        ca.sign_csr(request)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
)
def test_the_ca_signs_for_keys_of_todays_strength(tmp_path, make):
    ca = CertificateAuthority.create(tmp_path / "ca")
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ok-1")])
        )
        .sign(make(), hashes.SHA256())
    )
    leaf, _ = ca.sign_csr(request)
    assert leaf.public_key() == request.public_key()


def test_a_lifetime_past_the_intermediate_is_refused_naming_the_most(
    tmp_path,
):
    ca = CertificateAuthority.create(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "long-1")])
        )
        .sign(key, hashes.SHA256())
    )
    expiry = ca.intermediate.not_valid_after_utc
    with pytest.raises(CAError, match="outlives the CA's intermediate") as e:
        ca.sign_csr(request, days=36500)
    most = int(str(e.value).rsplit("at most ", 1)[1].split()[0])
    leaf, _ = ca.sign_csr(request, days=most)
    assert leaf.not_valid_after_utc <= expiry
