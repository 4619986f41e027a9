"""Registrar throughput: certificates issued a second, against raw signing.

Run from the repository top::

    .venv/bin/python -m bench.registrar [--runs N]

The registrar's signing path is :meth:`Registrar.handle`: it decodes the
request, parses the CSR, checks its signature, key type and identity,
looks the device up in the registry, signs with the operational CA,
records the issuance in SQLite and encodes the answer. No MQTT: the
broker's share is measured by the connect and fleet benchmarks.

The baseline, in the same run and interleaved batch by batch with the
same CSRs: cryptography alone loading each CSR and building and signing
the same certificate (the same subject, key, validity, extensions and
issuer), and nothing else. A second baseline adds only the CSR's
signature check, which no CA can skip, to show what remains.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench import report
from bench.stopping import stoppable
from device_agent.core import messages
from firmware_sim import registrar
from firmware_sim.ca import CertificateAuthority
from firmware_sim.registry import Registry

TARGET_RATIO = 0.5
BATCH = 50
KEYS = 8
LIFETIME = datetime.timedelta(days=1)


class Requests:
    """Enrollment requests from registered devices, and their CSRs."""

    def __init__(self, registry: Registry, count: int) -> None:
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(KEYS)]
        self.pems: list[bytes] = []
        self.requests: list[tuple[str, bytes]] = []
        for number in range(count):
            device_id = f"bench-{number:05d}"
            registry.add(device_id)
            pem = _csr(device_id, keys[number % KEYS])
            self.pems.append(pem)
            payload = messages.encode_request(f"{number:08x}", pem.decode())
            self.requests.append((device_id, payload))


def _csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR as the agent makes one: CN, serial number, URI SAN."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "BENCH"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:bench:{device_id}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


class RawSigner:
    """The same certificate as the registrar issues, by cryptography alone."""

    def __init__(self, ca: CertificateAuthority, key: object) -> None:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.issuer = ca.intermediate.subject
        ski = ca.intermediate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        self.aki = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        )

    def sign(self, pem: bytes, check: bool = False) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(pem)
        if check and not csr.is_signature_valid:
            raise ValueError("bad CSR signature")
        public_key = csr.public_key()
        san = csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + LIFETIME)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(san, critical=False)
            .add_extension(self.aki, critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _rate(count: int, work: Callable[[int], object]) -> float:
    began = time.perf_counter()
    for index in range(count):
        work(index)
    return count / (time.perf_counter() - began)


def _signing(
    raw: RawSigner, pems: list[bytes], check: bool
) -> Callable[[int], object]:
    def one(index: int) -> object:
        return raw.sign(pems[index], check)

    return one


def _recording(
    registry: Registry, made: Requests, offset: int
) -> Callable[[int], object]:
    def one(index: int) -> object:
        return _record(registry, made, offset + index)

    return one


def _record(registry: Registry, made: Requests, index: int) -> object:
    """Only the SQLite record of an issuance, as the registrar makes it."""
    now = datetime.datetime.now(datetime.UTC)
    device_id = made.requests[index][0]
    return registry.record_issuance(
        device_id, index + 1, "00" * 32, now, now + LIFETIME, "bench"
    )


def measure(runs: int, root: Path) -> dict[str, list[float]]:
    """Rates a second of each case, one batch of each per round."""
    layout = registrar.prepare(root / "registrar")
    ca = CertificateAuthority.load(layout.ca_dir)
    key = serialization.load_pem_private_key(
        (layout.ca_dir / "intermediate.key").read_bytes(), None
    )
    raw = RawSigner(ca, key)
    rates: dict[str, list[float]] = {
        "registrar": [],
        "raw": [],
        "check": [],
        "record": [],
    }

    with Registry(layout.registry_path) as registry:
        service = registrar.Registrar(
            ca,
            registry,
            "127.0.0.1",
            0,
            layout.root_path,
            layout.chain_path,
            layout.key_path,
            lifetime=int(LIFETIME.total_seconds()),
        )
        made = Requests(registry, BATCH * (runs + 1))

        def issue(offset: int) -> Callable[[int], object]:
            def one(index: int) -> object:
                answer = service.handle(*made.requests[offset + index])
                if answer is None or b'"issued"' not in answer:
                    raise RuntimeError(f"the registrar refused: {answer!r}")
                return answer

            return one

        for round_ in range(runs + 1):
            offset = round_ * BATCH
            pems = made.pems[offset : offset + BATCH]
            cases: dict[str, Callable[[int], object]] = {
                "registrar": issue(offset),
                "raw": _signing(raw, pems, check=False),
                "check": _signing(raw, pems, check=True),
                "record": _recording(registry, made, offset),
            }
            order = list(cases)
            if round_ % 2:
                order.reverse()
            for name in order:
                rate = _rate(BATCH, cases[name])
                if round_:  # the first round warms up
                    rates[name].append(rate)

        issued = service.counts().get("issued", 0)
        if issued != BATCH * (runs + 1):
            raise RuntimeError(f"issued {issued} certificates")
    return rates


def build_table(rates: dict[str, list[float]], runs: int) -> report.Table:
    med = {name: report.median(values) for name, values in rates.items()}
    table = report.Table(
        f"registrar: certificates issued a second, in process; {runs} "
        f"rounds of {BATCH}, interleaved",
        ["measure", "median", "note"],
    )
    table.add(
        "(a) Registrar.handle: checks, sign, SQLite record, answer",
        f"{med['registrar']:.0f}/s",
        f"{1000 / med['registrar']:.2f} ms each",
    )
    table.add(
        "(b) cryptography alone: load CSR, build, sign the same cert",
        f"{med['raw']:.0f}/s",
        f"{1000 / med['raw']:.2f} ms each",
    )
    table.add(
        "    (b) and the CSR's signature checked",
        f"{med['check']:.0f}/s",
        f"{1000 / med['check']:.2f} ms each",
    )
    table.add(
        "    of (a): the SQLite record of one issuance",
        f"{med['record']:.0f}/s",
        f"{1000 / med['record']:.2f} ms each",
    )
    table.rule()
    value = med["registrar"] / med["raw"]
    table.add(
        f"ratio (a) / (b), target >= {TARGET_RATIO}",
        f"{value:.2f}",
        "ok" if value >= TARGET_RATIO else "UNDER TARGET",
    )
    table.add(
        "ratio (a) / (b with the check)",
        f"{med['registrar'] / med['check']:.2f}",
    )
    return table


@stoppable
def main() -> int:
    options = report.arguments("bench.registrar", __doc__ or "")
    report.quiet_logging()
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        rates = measure(options.runs, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    build_table(rates, options.runs).print()
    med = {name: report.median(values) for name, values in rates.items()}
    value = med["registrar"] / med["raw"]
    report.summarize(
        "registrar: certificates issued a second, in process",
        f"{med['registrar']:.0f}/s",
        f"cryptography alone {med['raw']:.0f}/s; with the CSR check "
        f"{med['check']:.0f}/s",
        f"ratio {value:.2f}, target >= {TARGET_RATIO}: "
        + ("ok" if value >= TARGET_RATIO else "UNDER TARGET")
        + f"; {med['registrar'] / med['check']:.2f} of raw with the check",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
