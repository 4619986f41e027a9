"""Bad-input campaign: every refusal is one clear line and changes nothing.

Run from the repository top::

    .venv/bin/python -m campaigns.bad_input [--fuzz 2000] [--seed N]
                                            [--every K] [--groups ...]

Cases, each against one software device with a factory identity and
an operational one, and a running registrar:

- chain files for ``install-chain``: garbage, wrong PEM labels, a huge
  file, a loop, another key, another CA, expired, not yet valid, no
  clientAuth, a CA certificate as leaf, another device's name;
- config files: missing and unknown fields, wrong types, bad TOML,
  unreachable paths;
- CLI arguments;
- enrollment responses over MQTT, from a registrar stand-in: malformed
  JSON, a wrong request id, another device's chain, oversize;
- registrar requests: a CSR naming another device, weak keys, a bad
  signature, malformed messages.

A device case passes when the command exits non-zero with exactly one
line on stderr and no traceback, and the state directory hashes the
same before and after. A registrar case passes when the answer is a
refusal or nothing, and no certificate was issued. Then Hypothesis
feeds ``--fuzz`` inputs to each parser (chain reader, config loader,
enrollment message decoders, clock decoder, the registrar's CSR
checks); any exception other than the parser's own refusal fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench import report
from bench.stopping import stoppable
from bench.world import Device, World, world
from campaigns import common
from device_agent.core import messages
from firmware_sim.ca import CertificateAuthority, chain_pem

DEVICE = "bad-input"
OTHER = "bad-input-other"
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
CLI_TIMEOUT = 60.0
FAST = {"enroll_timeout": 1.0, "connect_timeout": 5.0}
GROUPS = ("chains", "configs", "cli", "responses", "requests")


@dataclasses.dataclass
class Tally:
    """Cases tried and passed per group, failures, fuzz inputs."""

    passed: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    fuzzed: dict[str, int] = dataclasses.field(default_factory=dict)
    every: int = 1
    offered: dict[str, int] = dataclasses.field(default_factory=dict)

    def take(self, group: str) -> bool:
        """Whether to run the group's next case: one in ``every``."""
        seen = self.offered.get(group, 0)
        self.offered[group] = seen + 1
        return seen % self.every == 0

    def record(self, group: str, name: str, problem: str | None) -> None:
        self.counts[group] = self.counts.get(group, 0) + 1
        if problem is None:
            self.passed[group] = self.passed.get(group, 0) + 1
        else:
            self.failures.append(f"{group} / {name}: {problem}")


def tree_hash(root: Path) -> str:
    """One hash of every name, link target, mode and byte under root."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(directory, name)
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{info.st_mode}".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def check_refusal(
    device: Device,
    args: Sequence[str],
    stdin: bytes | None = None,
    config: Path | None = None,
) -> str | None:
    """Run one command that must be refused; None if it was, cleanly."""
    base = device.command() if config is None else _command(config)
    # status.json belongs to the daemon, which is not running here.
    before = tree_hash(device.state)
    result = subprocess.run(
        [*base, *args],
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    after = tree_hash(device.state)
    err = result.stderr.decode(errors="replace")
    lines = err.strip().splitlines()
    if result.returncode == 0:
        return "accepted"
    if "Traceback" in err or len(lines) != 1:
        return f"stderr was {err[:300]!r}"
    if not lines[0].startswith("error: "):
        return f"unclear line {lines[0]!r}"
    if before != after:
        return "the state directory changed"
    return None


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "device_agent", "--config", str(config)]


# -- chain files -----------------------------------------------------


def _csr_for(key: Any, name: str) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:device-agent:{name}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return chain_pem(certs)


def _loop_chain(public: Any) -> bytes:
    """A leaf under two CAs that each claim the other as issuer."""
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def ca(subject: str, issuer: str, key: Any, signer: Any) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), True
            )
            .sign(signer, hashes.SHA256())
        )

    a = ca("Loop A", "Loop B", key_a, key_b)
    b = ca("Loop B", "Loop A", key_b, key_a)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name(DEVICE))
        .issuer_name(name("Loop A"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(key_a, hashes.SHA256())
    )
    return _pem([leaf, a, b])


def chain_cases(here: World, device: Device) -> Iterator[tuple[str, bytes]]:
    ca = here.factory_ca
    other = CertificateAuthority.create(here.root / "other-ca", name="Other")
    request = x509.load_pem_x509_csr(device.run("csr").encode())
    public = request.public_key()
    stranger = _csr_for(ec.generate_private_key(ec.SECP256R1()), DEVICE)
    rng = random.Random(6)  # noqa: S311 - repeatable garbage
    good = _pem(ca.sign_csr(request))

    for size in (0, 1, 7, 64, 512, 4096, 65536):
        yield f"garbage {size} bytes", rng.randbytes(size)
    for label in (
        "CERTIFICATE REQUEST", "PUBLIC KEY", "X509 CRL", "PRIVATE KEY",
        "EC PRIVATE KEY", "PKCS7", "TRUSTED CERTIFICATE", "CERTIFICATE",
        "RSA PUBLIC KEY", "", "CERTIFICATE\x00",
    ):  # fmt: skip
        body = good.split(b"-----\n", 1)[1].split(b"-----END", 1)[0]
        yield (
            f"label {label!r}",
            f"-----BEGIN {label}-----\n".encode()
            + body
            + f"-----END {label}-----\n".encode(),
        )
    yield "truncated PEM", good[: len(good) // 2]
    yield "PEM with a corrupt body", good.replace(b"M", b"!", 3)
    yield (
        "DER truncated",
        ca.sign_csr(request)[0].public_bytes(serialization.Encoding.DER)[:100],
    )
    yield "huge: 20 MB of PEM", good * (20_000_000 // len(good))
    yield "huge: 20 MB of zeros", bytes(20_000_000)
    yield "loop in the chain", _loop_chain(public)
    yield "another key", _pem(ca.sign_csr(stranger))
    yield "another CA", _pem(other.sign_csr(request))
    yield (
        "expired",
        _pem(
            ca.sign_csr(request, not_before=NOW - 3 * DAY, not_after=NOW - DAY)
        ),
    )
    yield (
        "not yet valid",
        _pem(
            ca.sign_csr(request, not_before=NOW + DAY, not_after=NOW + 3 * DAY)
        ),
    )
    yield (
        "serverAuth only",
        _pem(ca.sign_csr(request, eku=[ExtendedKeyUsageOID.SERVER_AUTH])),
    )
    yield (
        "codeSigning only",
        _pem(ca.sign_csr(request, eku=[ExtendedKeyUsageOID.CODE_SIGNING])),
    )
    yield "CA certificate as leaf", _pem([ca.intermediate, ca.root])
    yield "root alone", _pem([ca.root])
    yield (
        "another device's name",
        _pem(
            ca.sign_csr(
                request,
                san=[
                    x509.UniformResourceIdentifier(f"urn:device-agent:{OTHER}")
                ],
            )
        ),
    )
    yield "leaf without its intermediate", _pem(ca.sign_csr(request)[:1])
    yield (
        "a private key in the bundle",
        good
        + (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        ),
    )
    yield "UTF-16 PEM", good.decode().encode("utf-16")
    yield "only whitespace", b" \n\t\n" * 100


def run_chains(here: World, device: Device, tally: Tally) -> None:
    directory = here.root / "chains"
    directory.mkdir()
    for number, (name, data) in enumerate(chain_cases(here, device)):
        if not tally.take("chain files"):
            continue
        path = directory / f"chain-{number}.pem"
        path.write_bytes(data)
        tally.record(
            "chain files",
            name,
            check_refusal(device, ["install-chain", str(path)]),
        )
    for name, args in (
        ("missing file", ["install-chain", str(directory / "none.pem")]),
        ("a directory", ["install-chain", str(directory)]),
        ("/dev/zero", ["install-chain", "/dev/zero"]),
        ("garbage on stdin", ["install-chain", "-"]),
    ):
        if tally.take("chain files"):
            problem = check_refusal(device, args, stdin=b"\x00garbage")
            tally.record("chain files", name, problem)


# -- config files ----------------------------------------------------

BAD_VALUES: dict[str, list[Any]] = {
    "device_id": [42, "", "a/b", "x" * 65, "dev #1", "+", ["a"]],
    "serial": [3, "has space", "x" * 65],
    "key_store": ["hsm", 1, ""],
    "tcti": ["tcp:1.2.3.4", 5, ""],
    "broker_host": [8883, "", "a/b", "x" * 254],
    "broker_port": [0, 65536, "http", -1, 1.5, True],
    "ca_file": [5, "", "\0"],
    "trust_anchor": [5, ""],
    "server_name": [1, "", "a b"],
    "tls_min_version": ["1.1", "1.0", "ssl3", 1.1],
    "mqtt_version": ["4", 3, "3.1"],
    "keepalive": [0, 1, "x", 70000],
    "connect_timeout": [0, -1, "soon", True],
    "heartbeat_interval": [0, "x", 1e9],
    "renew_fraction": [0.05, 0.99, 2, "half"],
    "renew_jitter": [-0.1, 0.6, "x"],
    "renew_floor": [-1, "x"],
    "retry_base": [0, "x"],
    "retry_cap": [0, "x", 1e12],
    "clock_skew": [-5, "x"],
    "enroll_timeout": [0, 1e6, "x"],
    "renewal_hook": ["", 5, "'unclosed"],
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_cases(device: Device) -> Iterator[tuple[str, str, list[str]]]:
    """(name, config text, command) for configs that must be refused."""
    good = device.config.read_text()
    lines = good.splitlines()
    for field, values in BAD_VALUES.items():
        kept = "\n".join(ln for ln in lines if not ln.startswith(f"{field} ="))
        for value in values:
            text = f"{kept}\n{field} = {_toml_value(value)}\n"
            yield f"{field} = {value!r}"[:60], text, ["status"]
    for field in ("device_id", "state_dir"):
        kept = "\n".join(ln for ln in lines if not ln.startswith(f"{field} ="))
        yield f"missing {field}", kept + "\n", ["status"]
    for extra in ("insecure = true", "verify_tls = false", "colour = 'blue'"):
        yield f"unknown: {extra}", f"{good}{extra}\n", ["status"]
    yield "invalid TOML", good + "this is = = not toml\n", ["status"]
    yield "duplicate key", good + lines[2] + "\n", ["status"]
    yield "empty file", "", ["status"]
    yield "a table for a value", good + "[ca_file]\nx = 1\n", ["status"]
    yield (
        "retry_cap below retry_base",
        (good + "retry_base = 100\nretry_cap = 10\n"),
        ["status"],
    )
    missing = "/nonexistent/ca.pem"
    swapped = good.replace(
        f'ca_file = "{_setting(good, "ca_file")}"', f'ca_file = "{missing}"'
    )
    yield "unreachable ca_file", swapped, ["connect"]
    yield "unreachable broker", good + "broker_port = 1\n", ["connect"]
    yield (
        "state_dir elsewhere",
        good.replace(str(device.state), "/nonexistent/state"),
        ["connect"],
    )


def _setting(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"{name} ="):
            return str(json.loads(line.split("=", 1)[1].strip()))
    return ""


def run_configs(here: World, device: Device, tally: Tally) -> None:
    directory = here.root / "configs"
    directory.mkdir()
    for number, (name, text, args) in enumerate(config_cases(device)):
        if not tally.take("config files"):
            continue
        path = directory / f"agent-{number}.toml"
        path.write_text(text)
        problem = check_refusal(device, args, config=path)
        tally.record("config files", name, problem)
    not_utf8 = directory / "latin1.toml"
    not_utf8.write_bytes(b'device_id = "caf\xe9"\n')
    for name, path in (
        ("not UTF-8", not_utf8),
        ("config is a directory", directory),
        ("no config file", directory / "none.toml"),
    ):
        if tally.take("config files"):
            problem = check_refusal(device, ["status"], config=path)
            tally.record("config files", name, problem)


# -- CLI arguments ---------------------------------------------------

CA = "/etc/hostname"  # any readable file: these fail before reading it
CLI_CASES: list[list[str]] = [
    [],
    ["bogus"],
    ["--bogus", "status"],
    ["status", "--bogus"],
    ["--set", "noequals", "status"],
    ["--set", "=x", "status"],
    ["--set", "unknown=1", "status"],
    ["--set", "broker_port=99999", "status"],
    ["install-chain"],
    ["install-chain", "a", "b"],
    ["connect", "--count", "0"],
    ["connect", "--count", "x"],
    ["connect", "--timeout", "-1"],
    ["connect", "--tls-max-version", "1.1"],
    ["connect", "--subscribe", "a/#/b"],
    ["connect", "--subscribe", ""],
    ["connect", "--publish", "a/+", "x"],
    ["connect", "--publish", "a"],
    ["connect", "--subscribe", "a\x7fb/\u2028"],
    ["renew"],
    ["reset"],
    ["keygen", "--bogus"],
    ["keygen"],  # a current key exists: no --force
    ["csr", "--out", "/nonexistent/dir/x.csr"],
    ["csr", "--out", "/dev/full"],
    ["init"],
    ["init", "--device-id", "x"],
    ["init", "--device-id", "bad id", "--broker", "h", "--ca-file", CA],
    ["init", "--device-id", "ok", "--broker", ":x", "--ca-file", CA],
    ["init", "--device-id", "ok", "--broker", "h", "--ca-file", "/no/ca"],
    ["init", "--device-id", "ok", "--broker", "h", "--ca-file", CA],
    ["init", "--device-id", "ok", "--broker", "[::1", "--ca-file", CA],
    ["init", "--device-id", "ok", "--broker", "h:999999", "--ca-file", CA],
    ["init", "--device-id", "ok", "--key-store", "hsm", "--broker", "h",
     "--ca-file", CA],
    ["status", "--json", "--json", "--bogus"],
    ["tpm"],
]  # fmt: skip


def run_cli(device: Device, tally: Tally) -> None:
    for args in CLI_CASES:
        if not tally.take("CLI arguments"):
            continue
        name = " ".join(args) or "(no arguments)"
        tally.record("CLI arguments", name, check_refusal(device, args))


# -- enrollment responses over MQTT ----------------------------------


class StandIn:
    """The registrar's MQTT identity, answering with what it is told.

    ``answer`` gets the request id and CSR and returns the payload to
    publish on the device's response topic, or None for silence.
    """

    def __init__(self, here: World, layout: Any) -> None:
        import ssl

        import paho.mqtt.client as mqtt

        from firmware_sim.registrar import NAME

        self.answer: Callable[[str, str], bytes | None] = lambda i, c: None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{NAME}-stand-in"
        )
        context = ssl.create_default_context(
            cafile=str(here.factory_ca.root_path)
        )
        context.load_cert_chain(layout.chain_path, layout.key_path)
        self.client.tls_set_context(context)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", here.port)
        self.client.loop_start()
        self.client.subscribe(messages.request_topic("+"), qos=1)
        if not ready.wait(10):
            raise RuntimeError("the stand-in registrar could not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        device = messages.device_of(message.topic)
        try:
            request_id, csr_pem = messages.decode_request(message.payload)
        except messages.MessageError:
            return
        payload = self.answer(request_id, csr_pem)
        if payload is not None and device is not None:
            client.publish(messages.response_topic(device), payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def response_cases(
    here: World, operational: CertificateAuthority
) -> Iterator[tuple[str, Callable[[str, str], bytes | None]]]:
    def issued_for(name: str) -> Callable[[str, str], bytes | None]:
        def answer(request_id: str, csr_pem: str) -> bytes:
            key = ec.generate_private_key(ec.SECP256R1())
            certs = operational.sign_csr(_csr_for(key, name))
            return messages.encode_issued(request_id, _pem(certs).decode())

        return answer

    def raw(payload: bytes) -> Callable[[str, str], bytes | None]:
        return lambda request_id, csr_pem: payload

    def shaped(**fields: Any) -> Callable[[str, str], bytes | None]:
        def answer(request_id: str, csr_pem: str) -> bytes:
            message = {"v": 1, "id": request_id, **fields}
            return json.dumps(message).encode()

        return answer

    def wrong_id(request_id: str, csr_pem: str) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        certs = operational.sign_csr(csr)
        return messages.encode_issued(
            "ffff" + request_id, _pem(certs).decode()
        )

    def expired(request_id: str, csr_pem: str) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        certs = operational.sign_csr(
            csr, not_before=NOW - 3 * DAY, not_after=NOW - DAY
        )
        return messages.encode_issued(request_id, _pem(certs).decode())

    def other_ca(request_id: str, csr_pem: str) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        stranger = CertificateAuthority.create(
            here.root / f"stranger-{request_id}", name="Stranger"
        )
        return messages.encode_issued(
            request_id, _pem(stranger.sign_csr(csr)).decode()
        )

    yield "malformed JSON", raw(b"{not json")
    yield "JSON array", raw(b"[1, 2]")
    yield "empty payload", raw(b"")
    yield "binary garbage", raw(bytes(range(256)))
    yield (
        "oversize (1 MB)",
        raw(b'{"v": 1, "id": "' + b"a" * 1_000_000 + b'"}'),
    )
    yield "version 2", shaped(v=2, status="issued", chain="x")
    yield "unknown status", shaped(status="maybe")
    yield "issued without a chain", shaped(status="issued")
    yield "issued with garbage", shaped(status="issued", chain="garbage")
    yield (
        "refused with an unknown reason",
        shaped(status="refused", reason="no-idea"),
    )
    yield "wrong request id", wrong_id
    yield "no answer at all", lambda request_id, csr_pem: None
    yield "another device's chain", issued_for(OTHER)
    yield "a chain for another key", issued_for(DEVICE)
    yield "expired chain", expired
    yield "chain from another CA", other_ca


def run_responses(here: World, device: Device, tally: Tally) -> None:
    from firmware_sim import registrar

    layout = registrar.prepare(here.root / "registrar")
    operational = CertificateAuthority.load(layout.ca_dir)
    here.registrar.stop()
    stand_in = StandIn(here, layout)
    try:
        for name, answer in response_cases(here, operational):
            if not tally.take("enrollment responses"):
                continue
            stand_in.answer = answer
            problem = check_refusal(device, ["renew", "--now"])
            tally.record("enrollment responses", name, problem)
    finally:
        stand_in.close()
        here.registrar.start()


# -- registrar requests ----------------------------------------------


def _weak_keys() -> Iterator[tuple[str, Any]]:
    yield "RSA 1024", rsa.generate_private_key(65537, 1024)  # noqa: S505
    yield "RSA 2048", rsa.generate_private_key(65537, 2048)
    yield "P-384", ec.generate_private_key(ec.SECP384R1())
    yield "secp256k1", ec.generate_private_key(ec.SECP256K1())
    yield "P-192", ec.generate_private_key(ec.SECP192R1())
    yield "Ed25519", ed25519.Ed25519PrivateKey.generate()


def request_cases() -> Iterator[tuple[str, bytes]]:
    request_id = 0

    def wrap(csr_pem: str) -> bytes:
        nonlocal request_id
        request_id += 1
        return messages.encode_request(f"{request_id:08x}", csr_pem)

    def pem_of(csr: x509.CertificateSigningRequest) -> str:
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    p256 = ec.generate_private_key(ec.SECP256R1())
    yield "CSR naming another device", wrap(pem_of(_csr_for(p256, OTHER)))
    yield (
        "CSR naming no one",
        wrap(
            pem_of(
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([]))
                .sign(p256, hashes.SHA256())
            )
        ),
    )
    for name, key in _weak_keys():
        algorithm = None if name == "Ed25519" else hashes.SHA256()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
            )
            .sign(key, algorithm)
        )
        yield f"weak key: {name}", wrap(pem_of(csr))
    good = _csr_for(p256, DEVICE).public_bytes(serialization.Encoding.DER)
    flipped = good[:-4] + bytes(b ^ 0xFF for b in good[-4:])
    broken = x509.load_der_x509_csr(flipped)
    yield "bad signature", wrap(pem_of(broken))
    yield (
        "CSR PEM of nothing",
        wrap(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
            "-----END CERTIFICATE REQUEST-----\n"
        ),
    )
    yield "not a CSR", wrap("hello")
    yield "malformed JSON", b"{nope"
    yield "no id", json.dumps({"v": 1, "csr": "x"}).encode()
    yield "version 9", json.dumps({"v": 9, "id": "ab", "csr": "x"}).encode()
    yield "deep nesting", b"[" * 100_000 + b"]" * 100_000
    yield "oversize", b'{"v": 1, "id": "ab", "csr": "' + b"A" * 200_000 + b'"}'
    yield "id not hex", json.dumps({"v": 1, "id": "zz", "csr": "x"}).encode()


def run_requests(here: World, tally: Tally) -> None:
    issued = len(here.registry.issuances())
    for name, payload in request_cases():
        if not tally.take("registrar requests"):
            continue
        problem = None
        try:
            answer = here.registrar.handle(DEVICE, payload)
            if answer is not None:
                decoded = messages.decode_response(answer)
                if decoded["status"] != "refused":
                    problem = f"answered {decoded['status']}"
        except Exception as exc:  # the registrar must never raise
            problem = f"raised {type(exc).__name__}: {exc}"
        if len(here.registry.issuances()) != issued:
            problem = "a certificate was issued"
        tally.record("registrar requests", name, problem)
    for name in ("unregistered device",):
        payload = next(request_cases())[1]
        answer = here.registrar.handle("nobody-known", payload)
        decoded = messages.decode_response(answer) if answer else {}
        problem = None if decoded.get("status") == "refused" else str(decoded)
        tally.record("registrar requests", name, problem)


# -- fuzzing ---------------------------------------------------------


def fuzz(count: int, seed: int, tally: Tally) -> None:
    """Hypothesis inputs for every parser; only its refusal may escape."""
    import tomllib

    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fix_seed
    from hypothesis import strategies as st

    from device_agent import chain, config
    from device_agent.core import clock
    from device_agent.errors import ChainError, ConfigError
    from firmware_sim import registrar

    pem_like = st.builds(
        lambda label, body: (
            f"-----BEGIN {label}-----\n".encode()
            + body
            + f"\n-----END {label}-----\n".encode()
        ),
        st.sampled_from(["CERTIFICATE", "PKCS7", "CERTIFICATE REQUEST", "X"]),
        st.binary(max_size=300),
    )
    json_like = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )
    message = st.builds(
        lambda fields: json.dumps(fields).encode(),
        st.fixed_dictionaries(
            {},
            optional={
                "v": st.sampled_from([1, 2, "1", None]),
                "id": st.text(max_size=20) | st.integers(),
                "status": st.sampled_from(["issued", "refused", "x"]),
                "chain": st.text(max_size=50) | json_like,
                "csr": st.text(max_size=50) | json_like,
                "reason": st.text(max_size=20),
                "retry_after": json_like,
            },
        ),
    )

    def chain_reader(data: bytes) -> None:
        with contextlib.suppress(ChainError):
            chain.read_bundle(data)

    def config_loader(values: dict[str, Any]) -> None:
        with contextlib.suppress(ConfigError):
            config.build(values)

    def config_text(text: str) -> None:
        with contextlib.suppress(ConfigError, tomllib.TOMLDecodeError):
            config.build(tomllib.loads(text))

    def decode_response(data: bytes) -> None:
        with contextlib.suppress(messages.MessageError):
            messages.decode_response(data)

    def decode_request(data: bytes) -> None:
        with contextlib.suppress(messages.MessageError):
            messages.decode_request(data)

    def clock_decode(value: Any) -> None:
        clock.decode_last_good(value)

    def csr_checks(text: str) -> None:
        try:
            csr = registrar._parse_csr(text)
            registrar._check_signature(csr)
            registrar._check_key(csr)
        except registrar._Refusal:
            pass

    targets: list[tuple[str, Any, Callable[[Any], None]]] = [
        ("chain reader", st.binary(max_size=600) | pem_like, chain_reader),
        (
            "config loader",
            st.dictionaries(
                st.sampled_from([*sorted(BAD_VALUES), "state_dir"]),
                json_like,
                max_size=6,
            ),
            config_loader,
        ),
        ("config text", st.text(max_size=200), config_text),
        (
            "enrollment response decode",
            st.binary(max_size=200) | message,
            decode_response,
        ),
        (
            "registrar request decode",
            st.binary(max_size=200) | message,
            decode_request,
        ),
        ("clock decode", json_like, clock_decode),
        (
            "registrar CSR checks",
            st.text(max_size=200)
            | pem_like.map(lambda b: b.decode(errors="replace")),
            csr_checks,
        ),
    ]
    for name, strategy, target in targets:
        tried = [0]
        test = _counting(target, tried)
        run = fix_seed(seed)(
            settings(
                max_examples=count,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(strategy)(test))
        )
        try:
            run()
        except Exception as exc:  # a parser let something else escape
            first = str(exc).strip().splitlines()
            tally.failures.append(
                f"fuzz / {name}: {type(exc).__name__}: "
                f"{first[0] if first else ''}"
            )
        tally.fuzzed[name] = tried[0]


def _counting(
    target: Callable[[Any], None], tried: list[int]
) -> Callable[[Any], None]:
    def test(value: Any) -> None:
        tried[0] += 1
        target(value)

    return test


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.argument_parser("bad_input", __doc__)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        help="run one case in this many of each group (the short run)",
    )
    parser.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"which case groups to run (default {','.join(GROUPS)})",
    )
    options = parser.parse_args(argv)
    if options.every < 1:
        parser.error("--every must be at least 1")
    if options.fuzz < 0:
        parser.error("--fuzz must not be negative")
    options.groups = set(
        common.choose(parser, "--groups", options.groups, GROUPS)
    )
    return options


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    started = time.monotonic()
    tally = Tally(every=options.every)

    with world(registered=[DEVICE, OTHER]) as here:
        device = here.device(
            DEVICE, tpm=False, trust_anchor=here.client_ca_file
        )
        device.configure(**FAST)
        device.run("renew", "--now")  # an operational identity too
        device.run("keygen", "--force")  # and a pending factory key
        steps: dict[str, Callable[[], None]] = {
            "chains": lambda: run_chains(here, device, tally),
            "configs": lambda: run_configs(here, device, tally),
            "cli": lambda: run_cli(device, tally),
            "responses": lambda: run_responses(here, device, tally),
            "requests": lambda: run_requests(here, tally),
        }
        for group, step in steps.items():
            if group in options.groups:
                step()
    if options.fuzz:
        fuzz(options.fuzz, options.seed, tally)

    table = report.Table(
        "bad-input campaign", ["group", "cases tried", "passed"]
    )
    for group, count in tally.counts.items():
        table.add(group, str(count), str(tally.passed.get(group, 0)))
    table.rule()
    tried = sum(tally.counts.values())
    table.add("total", str(tried), str(sum(tally.passed.values())))
    table.rule()
    for name, count in tally.fuzzed.items():
        table.add(f"fuzz: {name}", str(count), "")
    table.add("fuzz inputs in all", str(sum(tally.fuzzed.values())), "")
    table.add("failed", str(len(tally.failures)), "")
    table.add("time", f"{time.monotonic() - started:.1f} s", "")
    table.print()
    if not tried and not sum(tally.fuzzed.values()):
        # A run that tried nothing has shown nothing, whatever it says.
        tally.failures.append("no case was run")
    return 1 if common.failed(tally.failures) else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
