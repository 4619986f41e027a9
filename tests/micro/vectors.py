"""Certificates made by ``cryptography``, with the fields it reads back.

They are the oracle for the portable DER reader: the reader runs on
MicroPython, where nothing else could check it, so the expected values
come from a parser that has nothing to do with ours.
"""

import base64
import datetime
import json
import random
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

UTC = datetime.UTC

# Dates that stress the calendar and both ASN.1 time types: before 2000,
# a leap day, the last UTCTime second, GeneralizedTime after 2050 and a
# century that is not a leap year.
FIXED_DATES = [
    ("pre-2000", (1999, 12, 31, 23, 59, 59), (2000, 1, 1, 0, 0, 0)),
    ("leap-day", (2024, 2, 29, 12, 34, 56), (2049, 12, 31, 23, 59, 59)),
    ("generalized", (2050, 1, 1, 0, 0, 0), (2100, 3, 1, 0, 0, 1)),
]


def _name(common_name: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test")]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _spki(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return base64.b64encode(der).decode()


def _certificate(
    issuer_key: ec.EllipticCurvePrivateKey,
    label: str,
    start: datetime.datetime,
    end: datetime.datetime,
    serial: int,
    subject_cn: str | None,
) -> dict[str, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name("Vector CA"))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(issuer_key, hashes.SHA256())
    )
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    der = certificate.public_bytes(serialization.Encoding.DER)
    return {
        "label": label,
        "der": base64.b64encode(der).decode(),
        "pem": "",
        "not_before": int(certificate.not_valid_before_utc.timestamp()),
        "not_after": int(certificate.not_valid_after_utc.timestamp()),
        "serial": format(certificate.serial_number, "x"),
        "subject_cn": str(names[-1].value) if names else None,
        "issuer_cn": "Vector CA",
        "spki": _spki(key),
    }


def write(directory: Path, seed: int) -> Path:
    """Write the vectors and an empty ``scratch/`` into ``directory``."""
    rng = random.Random(seed)
    issuer = ec.generate_private_key(ec.SECP256R1())
    certificates = []
    for label, start, end in FIXED_DATES:
        certificates.append(
            _certificate(
                issuer,
                label,
                datetime.datetime(*start, tzinfo=UTC),
                datetime.datetime(*end, tzinfo=UTC),
                x509.random_serial_number(),
                "dev-" + label,
            )
        )
    for index in range(4):
        start_s = rng.randrange(0, 4_000_000_000)
        end_s = start_s + rng.randrange(1, 10**9)
        certificates.append(
            _certificate(
                issuer,
                "random-" + str(index),
                datetime.datetime.fromtimestamp(start_s, UTC),
                datetime.datetime.fromtimestamp(end_s, UTC),
                # Small serials and ones with the top bit set, which DER
                # encodes with a leading zero byte.
                rng.choice([1, 255, 2**159 - rng.randrange(1, 10**6)]),
                None if index == 0 else "random-" + str(index),
            )
        )

    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("dev-csr"))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scratch").mkdir(exist_ok=True)
    # One small file per item: a board with a 64 KiB heap cannot hold
    # all of them parsed at once.
    for index, certificate in enumerate(certificates):
        der = base64.b64decode(str(certificate.pop("der")))
        (directory / f"cert-{index}.der").write_bytes(der)
        certificate.pop("pem")
        (directory / f"cert-{index}.json").write_text(json.dumps(certificate))
    (directory / "count").write_text(str(len(certificates)))
    (directory / "chain.pem").write_text(
        "junk before\n"
        + "".join(
            x509.load_der_x509_certificate(
                (directory / f"cert-{i}.der").read_bytes()
            )
            .public_bytes(serialization.Encoding.PEM)
            .decode()
            for i in range(len(certificates))
        )
    )
    (directory / "csr.der").write_bytes(
        request.public_bytes(serialization.Encoding.DER)
    )
    (directory / "csr.json").write_text(
        json.dumps({"subject_cn": "dev-csr", "spki": _spki(key)})
    )
    return directory
