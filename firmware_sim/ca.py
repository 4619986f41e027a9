"""A manufacturing CA: a P-256 root and an intermediate that signs leafs."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware_sim.errors import CAError
from firmware_sim.registry import (
    DEVICE_ID,
    DEVICE_ID_RULE,
    SERVICE_NAMES,
    is_service_name,
)

logger = logging.getLogger(__name__)

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
# The serials the CA revoked, one a line with the time of revocation, so
# that every later CRL still lists them.
REVOKED = "revoked.txt"
# Every serial the CA issued, one a line with the time of issue, so that
# only those can be revoked: a mistyped serial would be listed for good.
# A CA made before this record was kept has none, and revokes any serial.
ISSUED = "issued.txt"

# Certificates start a little in the past so that a device whose clock
# runs slightly behind the CA's still accepts what it was just given.
BACKDATE = datetime.timedelta(minutes=5)

# A hundred years: longer lifetimes are typing mistakes, and a few more
# digits would pass the last date X.509 can express.
MAX_DAYS = 36500
# A CA outlives what it signs: twice the factory's ten-year IDevID.
CA_DAYS = 7300

# X.509 bounds a common name and an organization at 64 bytes (as UTF-8);
# the intermediate's common name is the CA name and this suffix.
MAX_NAME_BYTES = 64
_INTERMEDIATE_SUFFIX = " Intermediate CA"

# Certificates, keys and CSRs are a few kilobytes; anything far larger
# is the wrong file, and reading it whole would only cost memory.
MAX_FILE_BYTES = 1 << 20

# RFC 5280 allows serials of 20 bytes; cryptography signs positive ones
# of 159 bits at most.
MAX_SERIAL_BITS = 159

# A host name as certificates carry it: LDH labels of IDNA A-labels.
MAX_HOST_NAME = 253
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

CAPrivateKey = ec.EllipticCurvePrivateKey


class CertificateAuthority:
    """A root and an intermediate CA kept as PEM files in one directory."""

    def __init__(
        self,
        directory: Path,
        root: x509.Certificate,
        root_key: CAPrivateKey,
        intermediate: x509.Certificate,
        intermediate_key: CAPrivateKey,
    ) -> None:
        self.directory = Path(directory)
        self.root = root
        self._intermediate = intermediate
        self._root_key = root_key
        self._intermediate_key = intermediate_key

        # What every leaf takes from the intermediate, derived once: a
        # registrar issues thousands of leafs from one CA object.
        self._issuer = intermediate.subject
        self._aki = _authority_key_id(intermediate)
        self.intermediate_pem = intermediate.public_bytes(
            serialization.Encoding.PEM
        )

    @classmethod
    def create(
        cls,
        directory: Path,
        name: str = "Device Factory",
        days: int = CA_DAYS,
        *,
        issued_record: bool = True,
    ) -> CertificateAuthority:
        """Make a new root and intermediate in ``directory`` (made 0700).

        Refuses to touch a directory that already holds any CA file, and
        a name or lifetime that would make an unusable CA. Without
        ``issued_record`` the CA keeps no file of the serials it issues
        (and then revokes any serial): for a CA whose issuances are
        recorded elsewhere.
        """
        check_name(name)
        check_days(days)
        directory = Path(directory)
        existing = [
            f for f in (*CA_FILES, ISSUED) if os.path.lexists(directory / f)
        ]
        if existing:
            raise CAError(f"{directory} already holds a CA ({existing[0]})")

        ca = cls._generate(directory, name, days)
        ca._save(issued_record)
        logger.info("CA %r created in %s", name, directory)
        return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Read a CA that :meth:`create` wrote."""
        directory = Path(directory)
        ca = cls(
            directory,
            _read_cert(directory / ROOT_CERT),
            _read_key(directory / ROOT_KEY),
            _read_cert(directory / INTERMEDIATE_CERT),
            _read_key(directory / INTERMEDIATE_KEY),
        )
        ca._check_pairs()
        return ca

    @property
    def name(self) -> str:
        """The name the CA was created with: its root's organization."""
        names = self.root.subject.get_attributes_for_oid(
            NameOID.ORGANIZATION_NAME
        )
        if not names:
            return _describe(self.root.subject)
        return str(names[0].value)

    @property
    def intermediate(self) -> x509.Certificate:
        """The CA that signs leafs; read-only, as what leafs take from it
        is derived once."""
        return self._intermediate

    @property
    def root_path(self) -> Path:
        """The trust anchor file that verifiers of our leafs need."""
        return self.directory / ROOT_CERT

    @property
    def intermediate_path(self) -> Path:
        return self.directory / INTERMEDIATE_CERT

    @property
    def revoked_path(self) -> Path:
        return self.directory / REVOKED

    @property
    def issued_path(self) -> Path:
        return self.directory / ISSUED

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        days: int = 365,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        eku: Sequence[x509.ObjectIdentifier] | None = None,
        san: Sequence[x509.GeneralName] | None = None,
        service: bool = False,
    ) -> list[x509.Certificate]:
        """Issue a client certificate for ``csr``; return [leaf, intermediate].

        Subject and subjectAltName come from the CSR; ``san`` replaces the
        latter. The subject must hold one CN, a device id: the broker
        takes it for the username its ACL grants topics by. A leaf
        without subjectAltName fails the client verifier of
        cryptography. ``not_before``, ``not_after`` and ``eku`` override
        the defaults (now less a few minutes, ``days`` from now,
        clientAuth) so that tests can make certificates a device must
        refuse; an empty ``eku`` leaves the extension out. ``service``
        as for :meth:`issue_leaf`.
        """
        subject = csr.subject
        _check_signature(csr, subject)
        public_key = csr.public_key()
        _check_key_strength(public_key, subject)
        _check_device_subject(subject)
        now = _now()
        if not_after is None:
            check_days(days)
            self._check_current(now)
            self._check_outlives(now + datetime.timedelta(days=days), days)

        alt_names = (
            san_of(csr) if san is None else x509.SubjectAlternativeName(san)
        )
        leaf = self.issue_leaf(
            subject,
            public_key,
            not_before=not_before or now - BACKDATE,
            not_after=not_after or now + datetime.timedelta(days=days),
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH] if eku is None else eku,
            san=alt_names,
            service=service,
        )
        return [leaf, self.intermediate]

    def issue_leaf(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        *,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        eku: Sequence[x509.ObjectIdentifier],
        san: x509.SubjectAlternativeName | None,
        service: bool = False,
    ) -> x509.Certificate:
        """A leaf as :meth:`sign_csr` makes one, from a CSR checked already.

        Checking an ECDSA signature costs about as much as making one,
        and cryptography parses a CSR's subject and key anew on each
        read: a registrar that checks the CSR, its subject and its key
        itself passes on what it read instead of the CSR.

        A CN that is a service's name (the registrar's, in any case) is
        refused unless ``service``: the broker's ACL grants that name
        rights over every device's topics, whichever CA it trusts
        issued the certificate.
        """
        if not service:
            _check_not_service(subject)
        self._check_current(_now())
        builder = _leaf_builder(
            subject=subject,
            public_key=public_key,
            not_before=not_before,
            not_after=not_after,
            eku=eku,
        )
        if san is not None:
            # RFC 5280 wants subjectAltName critical when the subject is
            # empty.
            builder = builder.add_extension(san, critical=len(subject) == 0)
        return self._issue(builder, subject)

    def issue_client_cert(
        self, common_name: str, days: int = 365, **sign: Any
    ) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
        """A clientAuth certificate and its new P-256 key, for a service
        or a test client named ``common_name``; ``sign`` as for
        :meth:`sign_csr`, whose ``service=True`` a service needs."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_name(common_name))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(
                            f"urn:device-agent:{common_name}"
                        )
                    ]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return self.sign_csr(request, days, **sign), key

    def issue_server_cert(
        self,
        hostnames_and_ips: Sequence[str] = ("localhost", "127.0.0.1"),
        days: int = 365,
    ) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
        """A serverAuth certificate and its new P-256 key, for a broker."""
        if not hostnames_and_ips:
            raise CAError("a server certificate needs at least one name")
        check_days(days)

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self._check_current(now)
        subject = _name(hostnames_and_ips[0])
        builder = _leaf_builder(
            subject=subject,
            public_key=key.public_key(),
            not_before=now - BACKDATE,
            not_after=now + datetime.timedelta(days=days),
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        ).add_extension(
            x509.SubjectAlternativeName(
                [_general_name(n) for n in hostnames_and_ips]
            ),
            critical=False,
        )
        return [self._issue(builder, subject), self.intermediate], key

    def crl(
        self,
        revoked_serials: Iterable[int] = (),
        *,
        next_update: datetime.timedelta = datetime.timedelta(days=1),
        last_update: datetime.datetime | None = None,
    ) -> bytes:
        """A PEM CRL of the intermediate, revoking ``revoked_serials``.

        OpenSSL refuses every leaf of an issuer whose CRL is past its next
        update, so whoever serves this CRL must renew it before then.
        """
        last_update = last_update or _now()
        revoked = dict.fromkeys(revoked_serials, last_update)
        return self._sign_crl(revoked, last_update, next_update)

    def revoke(self, serials: Iterable[int]) -> list[int]:
        """Record ``serials`` as revoked from now on; return the new ones.

        :meth:`recorded_crl` lists every serial recorded here, so a CRL
        made later, to replace one past its next update, keeps them.
        """
        checked = [check_serial(serial) for serial in serials]
        if not checked:
            return []
        self.check_issued(checked)

        new = _record_revocations(self.revoked_path, checked)
        for serial in new:
            logger.info("serial %x revoked", serial)
        return new

    def check_issued(self, serials: Iterable[int]) -> None:
        """Refuse serials this CA has no record of issuing (CAError).

        A CA made before the record was kept refuses none.
        """
        wanted = set(serials)
        try:
            issued = _recorded_serials(self.issued_path, wanted)
        except FileNotFoundError:
            return
        unknown = sorted(wanted - issued)
        if unknown:
            raise CAError(
                f"serial {unknown[0]:x} was never issued by this CA (not "
                f"in {self.issued_path}); nothing revoked"
            )

    def revocations(self) -> dict[int, datetime.datetime]:
        """Every serial :meth:`revoke` recorded, with when it was revoked."""
        try:
            data = read_small_file(self.revoked_path, "a revocation list")
        except FileNotFoundError:
            return {}
        return _parse_revocations(self.revoked_path, data)

    def recorded_crl(
        self, next_update: datetime.timedelta = datetime.timedelta(days=1)
    ) -> bytes:
        """A PEM CRL of the intermediate listing every recorded serial."""
        return self._sign_crl(self.revocations(), _now(), next_update)

    def _sign_crl(
        self,
        revoked: Mapping[int, datetime.datetime],
        last_update: datetime.datetime,
        next_update: datetime.timedelta,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._issuer)
            .last_update(last_update)
            .next_update(last_update + next_update)
            .add_extension(x509.CRLNumber(_crl_number()), critical=False)
            .add_extension(self._aki, critical=False)
        )
        for serial, revoked_at in revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )

        crl = builder.sign(self._intermediate_key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def _generate(
        cls, directory: Path, name: str, days: int
    ) -> CertificateAuthority:
        not_before = _now() - BACKDATE
        not_after = not_before + datetime.timedelta(days=days)
        root_key = ec.generate_private_key(ec.SECP256R1())
        intermediate_key = ec.generate_private_key(ec.SECP256R1())

        root_name = _name(f"{name} Root CA", name)
        root = _ca_builder(
            root_name, root_name, root_key, root_key, not_before, not_after, 1
        ).sign(root_key, hashes.SHA256())
        intermediate = _ca_builder(
            _name(f"{name} Intermediate CA", name),
            root_name,
            intermediate_key,
            root_key,
            not_before,
            not_after,
            0,
        ).sign(root_key, hashes.SHA256())

        return cls(directory, root, root_key, intermediate, intermediate_key)

    def _save(self, issued_record: bool) -> None:
        files = [
            (ROOT_KEY, key_pem(self._root_key), 0o600),
            (INTERMEDIATE_KEY, key_pem(self._intermediate_key), 0o600),
            (ROOT_CERT, chain_pem([self.root]), 0o644),
            (INTERMEDIATE_CERT, chain_pem([self.intermediate]), 0o644),
        ]
        if issued_record:
            files.append((ISSUED, b"", 0o644))
        _make_private_dir(self.directory)

        # Half a CA would make the next 'ca init' refuse the directory,
        # so what this call wrote goes again if a write fails.
        written: list[Path] = []
        try:
            for file_name, data, mode in files:
                path = self.directory / file_name
                _write_new(path, data, mode)
                written.append(path)
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            raise CAError(f"{exc.filename}: {exc.strerror or exc}") from None

    def _check_pairs(self) -> None:
        pairs = [
            (ROOT_CERT, self.root, self._root_key),
            (INTERMEDIATE_CERT, self.intermediate, self._intermediate_key),
        ]
        for file_name, cert, key in pairs:
            if cert.public_key() != key.public_key():
                raise CAError(
                    f"{self.directory / file_name} does not match its key"
                )

    def _check_outlives(self, not_after: datetime.datetime, days: int) -> None:
        # A leaf valid past its issuer is refused by verifiers from the
        # day the issuer expires; better to say so when it is made.
        expiry = self.intermediate.not_valid_after_utc
        if not_after > expiry:
            most = (expiry - _now()).days
            raise CAError(
                f"a lifetime of {days} days outlives the CA's intermediate, "
                f"which expires on {expiry:%Y-%m-%d}: at most {most} days"
            )

    def _check_current(self, now: datetime.datetime) -> None:
        # What an expired intermediate signs, no verifier accepts.
        expiry = self.intermediate.not_valid_after_utc
        if now >= expiry:
            raise CAError(
                f"{self.intermediate_path}: the CA expired on "
                f"{expiry:%Y-%m-%d %H:%M} UTC"
            )

    def _issue(
        self, builder: x509.CertificateBuilder, subject: x509.Name
    ) -> x509.Certificate:
        cert = (
            builder.issuer_name(self._issuer)
            .add_extension(self._aki, critical=False)
            .sign(self._intermediate_key, hashes.SHA256())
        )
        # Recorded before it is handed out: a certificate the record
        # lacks could not be revoked.
        _record_issued(self.issued_path, cert.serial_number)
        # The arguments cost more than the line: only when it is shown.
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "issued %s serial %x, valid until %s",
                _describe(subject),
                cert.serial_number,
                cert.not_valid_after_utc.isoformat(),
            )
        return cert


def check_name(name: str) -> str:
    """The CA name unchanged if certificates can carry it; CAError if not."""
    if not name.strip():
        raise CAError("a CA name must not be empty")
    if not name.isprintable():
        raise CAError(f"CA name {name!r} holds a control character")

    longest = MAX_NAME_BYTES - len(_INTERMEDIATE_SUFFIX)
    size = len(name.encode())
    if size > longest:
        raise CAError(
            f"a CA name of {size} bytes is too long: '<name>"
            f"{_INTERMEDIATE_SUFFIX}' must fit the {MAX_NAME_BYTES} bytes "
            f"of a common name, so {longest} at most"
        )
    return name


# Hashes with practical collisions. cryptography reports their
# signatures as bad even when they verify, so a message of their own
# says what is wrong.
_WEAK_HASHES = {"sha1": "SHA-1", "md5": "MD5"}


def _check_signature(
    csr: x509.CertificateSigningRequest, subject: x509.Name
) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    weak = _WEAK_HASHES.get(algorithm.name) if algorithm else None
    if weak is not None:
        raise CAError(
            f"CSR for {_describe(subject)}: signed with {weak}, a weak "
            "hash; it is refused (sign it with SHA-256)"
        )

    if not csr.is_signature_valid:
        raise CAError(f"CSR for {_describe(subject)}: bad signature")


def _check_device_subject(subject: x509.Name) -> None:
    # The broker's ACL expands the CN into the device's topics: a CN
    # holding "/", "+" or "#" would reach into other devices' topics.
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        count = "no CN" if not names else f"{len(names)} CNs"
        raise CAError(
            f"CSR for {_describe(subject)}: {count}; a device certificate "
            "needs exactly one, its device id"
        )

    name = str(names[0].value)
    if not DEVICE_ID.fullmatch(name):
        raise CAError(
            f"CSR for {_describe(subject)}: CN {name[:MAX_NAME_BYTES]!r} "
            f"is not a device id ({DEVICE_ID_RULE})"
        )


def _check_not_service(subject: x509.Name) -> None:
    for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        name = str(attribute.value)
        if is_service_name(name):
            raise CAError(
                f"CN {name[:MAX_NAME_BYTES]!r} is reserved for a broker "
                f"service ({', '.join(SERVICE_NAMES)}): the broker would "
                "grant it rights over other devices' topics; refused"
            )


# Keys a CA of this decade signs for: NIST curves of 256 bits and up,
# RSA of 2048 bits and up, Ed25519.
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS = 2048


def _check_key_strength(
    key: CertificatePublicKeyTypes, subject: x509.Name
) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _CURVES):
            return
        what = f"an elliptic-curve key on {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= _MIN_RSA_BITS:
            return
        what = f"an RSA key of {key.key_size} bits"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        return
    else:
        what = f"a {type(key).__name__} key"
    raise CAError(
        f"CSR for {_describe(subject)}: {what} is not signed for (use "
        f"P-256, P-384, P-521, RSA of {_MIN_RSA_BITS} bits or more, or "
        f"Ed25519)"
    )


def check_days(days: int) -> int:
    """The lifetime unchanged if it is 1 to MAX_DAYS days; CAError if not."""
    if not 1 <= days <= MAX_DAYS:
        raise CAError(
            f"a lifetime of {days} days is outside 1-{MAX_DAYS}: "
            "a certificate must be valid from the day it is made"
        )
    return days


def check_serial(serial: int) -> int:
    """The serial unchanged if a CRL can list it; CAError if not."""
    if not 0 < serial < 1 << MAX_SERIAL_BITS:
        raise CAError(
            f"serial {serial:x} is not a certificate serial: one is "
            f"positive and at most {MAX_SERIAL_BITS} bits long"
        )
    return serial


def check_server_names(names: Sequence[str]) -> list[str]:
    """Host names and IP addresses for a server certificate, checked.

    Each comes back as the certificate carries it (see
    :func:`check_server_name`), duplicates dropped; the first becomes
    the common name, which must fit its 64 bytes.
    """
    checked = list(dict.fromkeys(check_server_name(n) for n in names))
    if not checked:
        raise CAError("a server certificate needs at least one name")
    if len(checked[0]) > MAX_NAME_BYTES:
        raise CAError(
            f"the first name becomes the common name, which holds at most "
            f"{MAX_NAME_BYTES} bytes: {checked[0][:20]}... does not fit; "
            "give a shorter name first"
        )
    return checked


def check_server_name(name: str) -> str:
    """A host name or IP address as a certificate carries it.

    An IP address comes back in its short form, a host name in Unicode
    as its IDNA A-labels, without a final dot. A leading ``*.`` is kept
    as a wildcard. Anything else raises CAError.
    """
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass

    wildcard = "*." if name.startswith("*.") else ""
    host = name.removeprefix(wildcard).removesuffix(".")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_host = ""
    labels = ascii_host.split(".")
    if len(ascii_host) > MAX_HOST_NAME or not all(
        _LABEL.fullmatch(label) for label in labels
    ):
        raise CAError(f"{name!r} is not a host name or IP address")
    return wildcard + ascii_host


def read_small_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES.

    Refuses a FIFO or a device, whose reading would block or not end,
    and names the file in every refusal. A missing file raises
    FileNotFoundError, for the caller to say what should have made it.
    """
    try:
        with open(path, "rb", opener=_open_nonblocking) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CAError(f"{path}: not a regular file")
            if info.st_size > MAX_FILE_BYTES:
                raise CAError(f"{path}: too large for {what}")
            return file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None


def _open_nonblocking(path: str, flags: int) -> int:
    # Opening a FIFO for reading waits for a writer unless non-blocking.
    return os.open(path, flags | os.O_NONBLOCK)


def chain_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as concatenated PEM, in the order given."""
    return b"".join(
        cert.public_bytes(serialization.Encoding.PEM) for cert in certs
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_files(
    files: Sequence[tuple[Path, bytes, int]],
    *,
    replace: bool = False,
    group: int | None = None,
) -> None:
    """Write each (path, data, mode) whole: all of the files or none.

    Each file is written beside its path and renamed into place, so
    readers see the old content or the new, never a part. Without
    ``replace`` a path that exists is refused, even one that appeared
    since the caller looked. ``group`` becomes the group of the files.
    """
    partials: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, data, mode in files:
            partials.append((_write_partial(path, data, mode, group), path))
        for partial, path in partials:
            _place(partial, path, replace)
            placed.append(path)
    except BaseException:
        for partial, _ in partials:
            partial.unlink(missing_ok=True)
        if not replace:
            for path in placed:
                path.unlink(missing_ok=True)
        raise


def _write_partial(
    path: Path, data: bytes, mode: int, group: int | None
) -> Path:
    # mkstemp makes a new file of its own (0600), so nothing it meets on
    # the way is written through, and a key is never readable by others.
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".partial", dir=path.parent
        )
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None

    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            if group is not None:
                os.fchown(file.fileno(), -1, group)
            os.fchmod(file.fileno(), mode)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CAError(f"{path}: {exc.strerror or exc}") from None
    return partial


def _place(partial: Path, path: Path, replace: bool) -> None:
    try:
        if replace:
            os.replace(partial, path)
            return
        # A hard link fails where a file exists, where a rename would
        # replace it.
        os.link(partial, path)
        partial.unlink()
    except FileExistsError:
        raise CAError(f"{path} exists already") from None
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: CAPrivateKey,
    issuer_key: CAPrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    path_length: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length),
            critical=True,
        )
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()
            ),
            critical=False,
        )
    )


def _leaf_builder(
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    eku: Sequence[x509.ObjectIdentifier],
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),
            critical=False,
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(eku)), critical=False
        )
    return builder


def san_of(
    csr: x509.CertificateSigningRequest,
) -> x509.SubjectAlternativeName | None:
    """The subjectAltName a CSR asks for; None if it asks for none."""
    try:
        return csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return None


def _authority_key_id(
    issuer: x509.Certificate,
) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = _key_usage(leaf=False)
_LEAF_KEY_USAGE = _key_usage(leaf=True)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)
        )
    return x509.Name(attributes)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


# How much of a subject a message or a log line repeats.
_SHOWN = 120


def _describe(name: x509.Name) -> str:
    # A CSR's subject is whatever its sender wrote: a control character
    # in it must not break a one-line message or forge a log line.
    text = name.rfc4514_string()
    if not text:
        return "(empty subject)"
    shown = text if text.isprintable() else repr(text)
    if len(shown) > _SHOWN:
        return f"{shown[:_SHOWN]}..."
    return shown


def _crl_number() -> int:
    # CRL numbers must grow with each CRL of an issuer. Microseconds since
    # the epoch grow without a counter file that two processes would
    # have to share.
    return time.time_ns() // 1000


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(
            read_small_file(path, "a certificate")
        )
    except FileNotFoundError:
        raise CAError(f"{path}: no such file; run 'ca init' first") from None
    except ValueError as exc:
        raise CAError(f"{path}: not a PEM certificate ({exc})") from None


def _read_key(path: Path) -> CAPrivateKey:
    try:
        key = serialization.load_pem_private_key(
            read_small_file(path, "a key"), None
        )
    except FileNotFoundError:
        raise CAError(f"{path}: no such file; run 'ca init' first") from None
    except (ValueError, TypeError) as exc:
        raise CAError(f"{path}: not an unencrypted PEM key ({exc})") from None

    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: not an EC key")
    return key


def _parse_revocations(
    path: Path, data: bytes
) -> dict[int, datetime.datetime]:
    # A line being appended is left out until its newline is written.
    complete, _, _ = data.rpartition(b"\n")
    lines = complete.decode(errors="replace").split("\n")

    revoked: dict[int, datetime.datetime] = {}
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#"):
            serial, when = _parse_revocation(line, f"{path}, line {number}")
            revoked.setdefault(serial, when)
    return revoked


def _parse_revocation(line: str, where: str) -> tuple[int, datetime.datetime]:
    serial_hex, _, text = line.partition(" ")
    try:
        serial = check_serial(int(serial_hex, 16))
        when = datetime.datetime.strptime(text, _TIME_FORMAT)
    except (ValueError, CAError):
        raise CAError(
            f"{where}: {line[:40]!r} is not 'SERIAL_HEX YYYY-MM-DDTHH:MM:SSZ'"
        ) from None
    return serial, when.replace(tzinfo=datetime.UTC)


def _record_revocations(path: Path, serials: Sequence[int]) -> list[int]:
    """Append to ``path`` the serials it lacks; return those.

    A lock keeps two revocations at once from both recording a serial;
    readers take no lock, and see only whole lines.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None

    with os.fdopen(fd, "r+b") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CAError(f"{path}: not a regular file")

        fcntl.flock(fd, fcntl.LOCK_EX)
        data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise CAError(f"{path}: too large for a revocation list")
        known = _parse_revocations(path, data)
        new = [s for s in dict.fromkeys(serials) if s not in known]
        if not new:
            return []

        # A line cut short by a crash gets a line of its own, where the
        # parser names it, rather than running into ours.
        text = "" if data.endswith(b"\n") or not data else "\n"
        when = _now().strftime(_TIME_FORMAT)
        text += "".join(f"{serial:x} {when}\n" for serial in new)
        try:
            file.write(text.encode())
            file.flush()
            os.fsync(fd)
        except OSError as exc:
            raise CAError(f"{path}: {exc.strerror or exc}") from None
    return new


def _record_issued(path: Path, serial: int) -> None:
    """Append ``serial`` to the issued record, if the CA keeps one.

    One write of a whole line to a file opened for appending: writers
    in other processes never interleave within a line.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return  # a CA older than the record
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CAError(f"{path}: not a regular file")
        line = f"{serial:x} {_now().strftime(_TIME_FORMAT)}\n"
        os.write(fd, line.encode())
        os.fsync(fd)
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _recorded_serials(path: Path, wanted: set[int]) -> set[int]:
    """Those of ``wanted`` that the issued record at ``path`` lists.

    Read line by line: the record grows with every issuance, and only
    the serials asked about are kept.

    :raises FileNotFoundError: the CA keeps no record.
    """
    found: set[int] = set()
    try:
        with open(path, "rb", opener=_open_nonblocking) as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise CAError(f"{path}: not a regular file")
            for line in file:
                serial_hex = line.split(b" ", 1)[0].strip()
                try:
                    serial = int(serial_hex, 16)
                except ValueError:
                    continue  # a line cut short by a crash, say
                if serial in wanted:
                    found.add(serial)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None
    return found


def _make_private_dir(directory: Path) -> None:
    """Make ``directory`` 0700 if it is missing; leave one that exists.

    A directory that exists belongs to whoever made it, maybe a home or a
    shared one; the keys inside are 0600 whatever its mode.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise CAError(f"{directory}: not a directory") from None
    except OSError as exc:
        where = exc.filename or directory
        raise CAError(f"{where}: {exc.strerror or exc}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL makes a CA that appeared since the check fail instead of
    # being overwritten; the mode applies from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
