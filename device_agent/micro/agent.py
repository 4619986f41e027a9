"""The agent on a MicroPython board: connect, enroll, renew, report.

It keeps the factory identity (IDevID) and the operational one (LDevID)
as flash stores of DER certificates plus the signer slot of their key.
It connects with the operational identity if it has one, else with the
factory one, and renews the operational identity over MQTT with the same
messages and topics as the CPython agent: a new key in the other
operational slot, a CSR signed by the signer, the registrar's chain
checked against our key and name, staged as a new generation, proven by
a second session that the broker accepts, and only then made current.
Any failure leaves the working credential as it was.

A board cannot verify the chain's signatures itself (no ECDSA in
MicroPython); the broker does that in the handshake of the second
session, which is why the new generation becomes current only after it.

Configuration, a JSON file on flash: ``device_id``, ``host``, ``port``,
``server_name``, ``ca`` (paths of DER root certificates), ``state`` (the
directory for credentials), ``signer`` (``{"kind": "atecc608", "scl":
N, "sda": N}`` or, in tests only, ``{"kind": "host", "port": N}``),
``time`` (``{"source": "ntp", "host": H}`` or ``{"source": "provided",
"unix": T}``), and optionally ``keepalive``, ``enroll_timeout`` and
``clock_skew``.
"""

import binascii
import json
import os
import time

from device_agent.core import clock, der, flashstore, messages
from device_agent.micro import csr, mqtt, transport
from device_agent.micro.boardclock import BoardClock
from device_agent.micro.errors import (
    BoardError,
    SignerError,
    StepError,
    os_reason,
)

IDEVID = "idevid"
LDEVID = "ldevid"
IDEVID_SLOT = 0
LDEVID_SLOTS = (1, 2)
SLOT_FILE = "slot"


def chain_files(chain, slot):
    """The files of a stored generation: c0.der (leaf), c1.der, ..., slot."""
    files = {SLOT_FILE: str(slot).encode()}
    for index in range(len(chain)):
        files["c" + str(index) + ".der"] = chain[index]
    return files


def read_chain(files):
    """The (chain, slot) kept in a generation's files."""
    chain = []
    index = 0
    while "c" + str(index) + ".der" in files:
        chain.append(files["c" + str(index) + ".der"])
        index += 1
    if not chain or SLOT_FILE not in files:
        raise StepError("error", "stored credential is incomplete")
    return chain, int(files[SLOT_FILE])


class Agent:
    def __init__(self, config, signer, board_clock):
        self.config = config
        self.signer = signer
        self.clock = board_clock
        self.device_id = config["device_id"]
        root = config["state"]
        self.stores = {
            IDEVID: flashstore.FlashStore(root + "/" + IDEVID),
            LDEVID: flashstore.FlashStore(root + "/" + LDEVID, keep=1),
        }
        self.last_good_path = root + "/last_good"
        self.cas = [_read_file(path, "CA file") for path in config["ca"]]
        self.skew = config.get("clock_skew", clock.DEFAULT_SKEW)
        self.client = None
        self.identity = None
        self.generation = None
        self.fields = None

    def start(self):
        """Connect with the operational identity, else the factory one."""
        which = LDEVID if self.stores[LDEVID].current() else IDEVID
        if self.stores[which].current() is None:
            pointer = self.stores[which].root + "/" + flashstore.POINTER
            if _read_text(pointer) is not None:
                raise StepError(
                    "error",
                    pointer + " names no generation on flash",
                )
            raise StepError("error", "no factory identity provisioned")
        number = self.stores[which].current()
        self.client, self.fields = self.connect(which, number)
        self.identity = which
        self.generation = number

    def connect(self, which, number):
        """A subscribed MQTT session with generation ``number``."""
        chain, slot = read_chain(self.stores[which].load(number))
        fields = der.certificate_fields(chain[0])
        now = self.judge_clock([fields["not_before"]])
        if now > fields["not_after"] + self.skew:
            raise StepError("expired", which + " certificate expired")

        stream, settimeout = transport.open_tls(
            self.config["host"],
            self.config["port"],
            self.config["server_name"],
            self.cas,
            chain,
            self.signer.tls_key(slot),
        )
        client_id = self.device_id + "." + which + "." + str(number)
        client = mqtt.Client(client_id, self.config.get("keepalive", 60))
        try:
            client.connect(stream, settimeout)
            client.subscribe(messages.response_topic(self.device_id), 1)
        except Exception:
            client.close()
            raise
        return client, fields

    def judge_clock(self, not_befores, fresh_not_afters=()):
        """Now, after the clock guard passed it; StepError if not."""
        now = self.clock.now()
        last_good = clock.decode_last_good(_read_text(self.last_good_path))
        state, reason = clock.assess(
            now, last_good, not_befores, self.skew, fresh_not_afters
        )
        if state != clock.TRUSTED:
            raise StepError("clock_untrusted", reason)
        _write_text(
            self.last_good_path,
            clock.encode_last_good(clock.advance(last_good, now)),
        )
        return now

    def renew(self):
        """Enroll or renew the operational identity; return milliseconds."""
        started = time.ticks_ms()
        store = self.stores[LDEVID]
        slot = self._next_slot()
        point = self.signer.new_key(slot)
        request = csr.build(
            self.device_id,
            point,
            lambda digest: self.signer.sign_digest(slot, digest),
        )
        chain = self._enroll(request)
        self._check_issued(chain, csr.public_key_info(point))

        number = store.stage(chain_files(chain, slot))
        try:
            client, fields = self.connect(LDEVID, number)
        except Exception:
            store.discard(number)
            raise
        store.commit(number)
        old = self.client
        self.client, self.fields = client, fields
        self.identity, self.generation = LDEVID, number
        if old is not None:
            old.disconnect()
        store.prune()
        return time.ticks_diff(time.ticks_ms(), started)

    def heartbeat(self):
        topic = "devices/" + self.device_id + "/heartbeat"
        body = json.dumps({"generation": self.generation})
        self.client.publish(topic, body.encode(), qos=1)

    def status(self):
        """What a person needs to know, as a dict of strings and numbers."""
        fields = self.fields or {}
        return {
            "device_id": self.device_id,
            "key": self.signer.protection(),
            "identity": self.identity,
            "generation": self.generation,
            "serial": fields.get("serial"),
            "not_after": fields.get("not_after"),
            "clock": self.clock.source or "not set",
        }

    def close(self):
        if self.client is not None:
            self.client.disconnect()
        self.client = None

    def _next_slot(self):
        current = self.stores[LDEVID].current()
        if current is None:
            return LDEVID_SLOTS[0]
        _, slot = read_chain(self.stores[LDEVID].load(current))
        return LDEVID_SLOTS[1] if slot == LDEVID_SLOTS[0] else LDEVID_SLOTS[0]

    def _enroll(self, request):
        request_id = binascii.hexlify(os.urandom(8)).decode()
        pem = der.to_pem(request, "CERTIFICATE REQUEST")
        self.client.publish(
            messages.request_topic(self.device_id),
            messages.encode_request(request_id, pem),
            qos=1,
        )
        deadline = time.ticks_add(
            time.ticks_ms(), int(self.config.get("enroll_timeout", 20) * 1000)
        )
        while True:
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                raise StepError("enroll_timeout", "no answer in time")
            message = self.client.wait(left / 1000)
            if message is None:
                continue
            topic, payload = message
            if topic != messages.response_topic(self.device_id):
                continue
            response = messages.decode_response(payload)
            if response["id"] != request_id:
                continue
            if response["status"] != messages.ISSUED:
                raise StepError(
                    "refused", response["reason"] + ": " + response["detail"]
                )
            return der.pem_blocks(response["chain"])

    def _check_issued(self, chain, spki):
        if not chain:
            raise StepError("bad_chain", "the registrar sent no chain")
        leaf = der.certificate_fields(chain[0])
        if leaf["spki"] != spki:
            raise StepError("bad_chain", "the leaf is not for our key")
        if leaf["subject_cn"] != self.device_id:
            raise StepError("bad_chain", "the leaf names someone else")
        self.judge_clock([leaf["not_before"]], [leaf["not_after"]])


def make_signer(config):
    """The configured signer; StepError("signer", why) if there is none.

    On a board a missing or unwired chip shows up here as an I2C error,
    and that must be reported as the signer's fault, not as a traceback.
    """
    kind = config.get("kind")
    if kind == "atecc608":
        try:
            import machine

            from device_agent.micro.atecc608 import Atecc608

            i2c = machine.I2C(
                config.get("bus", 0),
                scl=machine.Pin(config["scl"]),
                sda=machine.Pin(config["sda"]),
                freq=config.get("freq", 100000),
            )
            return Atecc608(i2c, config.get("address", 0x60))
        except Exception as error:
            raise StepError(
                "signer", "no ATECC608 on I2C: " + repr(error)
            ) from None
    if kind == "host":
        from device_agent.micro.hostsigner import HostSigner

        return HostSigner(config["port"])
    if kind == "software":
        from device_agent.micro.signer import software_signer

        try:
            return software_signer()
        except SignerError as error:
            raise StepError("signer", str(error)) from None
    raise StepError("signer", "unknown signer kind " + repr(kind))


# Any NTP answer before this (2024-01-01) is not the time: a server or
# network that answers garbage must not make old certificates look fresh
# or new ones look premature.
SANE_NTP_FLOOR = 1704067200


def make_clock(config):
    """The board clock, set; StepError("clock_untrusted") if it cannot be.

    NTP fails in ordinary ways on a board (no network yet, a timeout, a
    port without ``ntptime``), and each must end as one clear event.
    """
    board_clock = BoardClock()
    source = config.get("source")
    if source == "ntp":
        host = config.get("host", "pool.ntp.org")
        try:
            board_clock.sync(host)
        except Exception as error:
            raise StepError(
                "clock_untrusted",
                "no time from NTP server " + host + ": " + repr(error),
            ) from None
        if board_clock.now() < SANE_NTP_FLOOR:
            raise StepError(
                "clock_untrusted",
                "NTP server "
                + host
                + " gave an impossible time "
                + str(board_clock.now()),
            )
    elif source == "provided":
        try:
            board_clock.set(config["unix"])
        except (KeyError, ValueError) as error:
            raise StepError(
                "clock_untrusted", "bad provided time: " + str(error)
            ) from None
    else:
        raise StepError("error", "unknown time source " + repr(source))
    return board_clock


def main(config_path, renewals=0):
    """Bring the device up, renew ``renewals`` times, report each step.

    Each step prints one line, ``EVENT`` and a JSON object, so a person at
    the serial console and a test read the same thing. Every failure,
    from an unreadable configuration on, ends in one ``failed`` event:
    a traceback on a serial console is no report.
    """
    config = {}
    board_clock = None
    agent = None
    try:
        config = read_config(config_path)
        # The clock is set before anything else looks at a certificate.
        board_clock = make_clock(config["time"])
        agent = Agent(config, make_signer(config["signer"]), board_clock)
        agent.start()
        _event("connected", agent)
        if agent.identity == IDEVID:
            milliseconds = agent.renew()
            _event("enrolled", agent, milliseconds)
        for _ in range(renewals):
            milliseconds = agent.renew()
            agent.heartbeat()
            _event("renewed", agent, milliseconds)
    except StepError as failure:
        detail = failure.state + ": " + failure.detail
        _failed(agent, config, board_clock, detail)
        return False
    except SignerError as error:
        _failed(agent, config, board_clock, "signer: " + str(error))
        return False
    except BoardError as error:
        # Our own messages are written to be read; a class name says
        # which part of the board agent gave up.
        what = type(error).__name__ + ": " + str(error)
        _failed(agent, config, board_clock, "error: " + what)
        return False
    except OSError as error:
        _failed(agent, config, board_clock, "error: " + os_reason(error))
        return False
    except Exception as error:
        _failed(agent, config, board_clock, "error: " + repr(error))
        return False
    finally:
        if agent is not None:
            agent.close()
    return True


# What a board's configuration must name.
REQUIRED = (
    "device_id",
    "host",
    "port",
    "server_name",
    "ca",
    "state",
    "signer",
    "time",
)


def read_config(path):
    """The configuration at ``path``; StepError naming what is wrong."""
    try:
        config = json.loads(_read_file(path, "config"))
    except ValueError:
        raise StepError("error", "config " + path + ": not JSON") from None
    if not isinstance(config, dict):
        raise StepError("error", "config " + path + ": not a JSON object")
    missing = [name for name in REQUIRED if name not in config]
    if missing:
        raise StepError(
            "error", "config " + path + ": missing " + ", ".join(missing)
        )
    for name in ("time", "signer"):
        if not isinstance(config[name], dict):
            raise StepError(
                "error", "config " + path + ": " + name + " is not an object"
            )
    cas = config["ca"]
    if not isinstance(cas, list) or not all(isinstance(c, str) for c in cas):
        raise StepError(
            "error", "config " + path + ": ca is not a list of file paths"
        )
    return config


def _failed(agent, config, board_clock, detail):
    """The ``failed`` event, also when no agent could be made."""
    if agent is not None:
        _event("failed", agent, detail=detail)
        return
    record = {
        "device_id": config.get("device_id"),
        "key": None,
        "identity": None,
        "generation": None,
        "serial": None,
        "not_after": None,
        "clock": "not set",
        "event": "failed",
        "detail": detail,
    }
    if board_clock is not None and board_clock.source:
        record["clock"] = board_clock.source
    print("EVENT " + json.dumps(record))


def _event(name, agent, milliseconds=None, detail=None):
    record = agent.status()
    record["event"] = name
    if milliseconds is not None:
        record["ms"] = milliseconds
    if detail is not None:
        record["detail"] = detail
    print("EVENT " + json.dumps(record))


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def _read_file(path, what):
    try:
        return _read(path)
    except OSError as error:
        raise StepError(
            "error", what + " " + path + ": " + os_reason(error)
        ) from None


def _read_text(path):
    try:
        return _read(path).decode()
    except OSError:
        return None


def _write_text(path, text):
    temp = path + ".tmp"
    with open(temp, "w") as handle:
        handle.write(text)
    os.rename(temp, path)
