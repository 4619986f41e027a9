"""Test cases for device_agent.core that run on CPython and MicroPython.

Plain functions named ``test_*`` with bare asserts: pytest collects them
through tests/test_micro_core.py, and runner.py runs the same functions
under the MicroPython unix and WebAssembly ports. ``DATA`` is a directory
prepared by the CPython side (tests/micro/vectors.py): certificates made
by ``cryptography`` with the fields it reads from them, as the oracle for
the hand-written DER reader, and ``scratch/`` for flash stores.
"""

import binascii
import json
import os

from device_agent.core import backoff, clock, der, flashstore, messages, policy

DATA = "."


def raises(kind, function, *args):
    """Whether calling ``function(*args)`` raises ``kind``."""
    try:
        function(*args)
    except kind:
        return True
    return False


def unb64(text):
    # Bytes, not str: the WebAssembly port's binascii takes no str.
    return binascii.a2b_base64(text.encode())


def read_bytes(name):
    with open(DATA + "/" + name, "rb") as handle:
        return handle.read()


def certificates():
    """(DER, expected fields) of each vector certificate, one at a time."""
    count = int(read_bytes("count"))
    for index in range(count):
        prefix = "cert-" + str(index)
        expected = json.loads(read_bytes(prefix + ".json"))
        yield read_bytes(prefix + ".der"), expected


def scratch(name):
    return DATA + "/scratch/" + name


# Backoff and renewal policy.


def test_backoff_doubles_up_to_the_cap():
    assert backoff.delay(0, 10, 3600, 0.0) == 5
    assert backoff.delay(3, 10, 3600, 0.0) == 40
    assert backoff.delay(200, 10, 3600, 0.5) == 2700
    assert raises(ValueError, backoff.delay, -1, 10, 3600, 0.0)


def test_renewal_falls_due_at_two_thirds():
    due = policy.renewal_time(1000, 4000, unit=0.0)
    assert due == 3000
    jittered = policy.renewal_time(1000, 4000, jitter=0.05, unit=0.5)
    assert 3000 < jittered < 3100


def test_renewal_respects_floor_and_last_tenth():
    assert policy.renewal_time(0, 30, floor=60) == 27
    assert policy.renewal_time(0, 1000, floor=800) == 800
    assert policy.renewal_time(500, 100) == 100


def test_retry_delay_lands_before_expiry():
    now = 10000
    wait = policy.retry_delay(8, now, now + 100, 86400, unit=0.9)
    assert 1 <= wait < 100
    assert policy.retry_delay(0, now, now - 5, 100, unit=0.0) == 5


def test_retry_after_hint_ignores_bools():
    # True is not an int on MicroPython; the hint must not depend on it.
    plain = policy.retry_delay(0, 0, 10**9, 10**9, retry_after=None)
    flagged = policy.retry_delay(0, 0, 10**9, 10**9, retry_after=True)
    assert plain == flagged


def test_loop_detector_stops_hasty_renewals():
    detector = policy.LoopDetector(count=3, floor=60)
    for when in (1000, 1001, 1002):
        detector.record(when)
    assert detector.is_loop(1003, 1000, 1060)
    assert not detector.is_loop(5000, 1000, 1060)
    detector.reset()
    assert not detector.is_loop(1003, 1000, 1060)


# Clock guard.


def test_clock_trusts_a_sane_clock():
    state, reason = clock.assess(5000, 4000, [3000])
    assert state == clock.TRUSTED and reason == ""


def test_clock_distrusts_a_clock_behind_last_good():
    state, reason = clock.assess(1000, 5000, [])
    assert state == clock.UNTRUSTED
    assert "last known-good" in reason


def test_clock_distrusts_a_clock_before_not_before():
    state, _ = clock.assess(1000, None, [900, 5000], skew=60)
    assert state == clock.UNTRUSTED


def test_clock_advance_is_bounded_by_elapsed():
    assert clock.advance(None, 50) == 50
    assert clock.advance(100, 10**6, elapsed=30) == 130
    assert clock.advance(100, 50) == 100


def test_clock_text_round_trip_keeps_ints_exact():
    big = 1893456000
    assert clock.decode_last_good(clock.encode_last_good(big)) == big
    assert clock.decode_last_good("12.5\n") == 12.5
    assert clock.decode_last_good("nan") is None
    assert clock.decode_last_good(b"12") is None
    assert clock.decode_last_good("1e999") is None


# Enrollment messages.


def test_request_round_trip():
    data = messages.encode_request("abc123", "PEM")
    assert messages.decode_request(data) == ("abc123", "PEM")


def test_response_round_trip():
    issued = messages.decode_response(messages.encode_issued("ab", "C"))
    assert issued["status"] == messages.ISSUED and issued["chain"] == "C"
    refused = messages.decode_response(
        messages.encode_refused("ab", "busy", "later", retry_after=30)
    )
    assert refused["reason"] == "busy" and refused["retry_after"] == 30


def test_malformed_messages_are_refused():
    bad = [b"", b"[]", b'{"v": 2}', b'{"v": 1, "id": "zz", "csr": "x"}']
    for data in bad:
        assert raises(messages.MessageError, messages.decode_request, data)
    assert raises(messages.MessageError, messages.encode_request, "", "x")


def test_topics_name_the_device():
    topic = messages.request_topic("dev-1")
    assert messages.device_of(topic) == "dev-1"
    assert messages.device_of("devices//enroll/request") is None


# DER and PEM.


def test_days_from_civil_known_dates():
    assert der.days_from_civil(1970, 1, 1) == 0
    assert der.days_from_civil(2000, 1, 1) == 10957
    assert der.days_from_civil(2000, 3, 1) == 11017
    assert der.days_from_civil(2100, 3, 1) == 47541
    assert der.days_from_civil(1969, 12, 31) == -1


def test_certificate_fields_match_cryptography():
    seen = 0
    for data, case in certificates():
        fields = der.certificate_fields(data)
        label = case["label"]
        assert fields["not_before"] == case["not_before"], label
        assert fields["not_after"] == case["not_after"], label
        assert fields["serial"] == case["serial"], label
        assert fields["subject_cn"] == case["subject_cn"], label
        assert fields["issuer_cn"] == case["issuer_cn"], label
        assert fields["spki"] == unb64(case["spki"]), label
        dates = der.certificate_dates(data)
        assert dates == (case["not_before"], case["not_after"])
        seen += 1
    assert seen >= 3


def test_csr_fields_match_cryptography():
    case = json.loads(read_bytes("csr.json"))
    fields = der.csr_fields(read_bytes("csr.der"))
    assert fields["subject_cn"] == case["subject_cn"]
    assert fields["spki"] == unb64(case["spki"])


def test_pem_chain_splits_in_order():
    blocks = der.pem_blocks(read_bytes("chain.pem").decode())
    assert len(blocks) == int(read_bytes("count"))
    for index in range(len(blocks)):
        assert blocks[index] == read_bytes("cert-" + str(index) + ".der")
    assert der.pem_blocks(der.to_pem(blocks[0])) == [blocks[0]]
    assert der.pem_blocks("no blocks here") == []


def test_broken_pem_and_der_are_refused():
    data = read_bytes("cert-0.der")
    assert raises(der.DerError, der.certificate_fields, data[:-1])
    assert raises(der.DerError, der.certificate_fields, data + b"\x00")
    assert raises(der.DerError, der.certificate_fields, b"\x30\x80")
    assert raises(der.DerError, der.certificate_fields, b"")
    torn = "-----BEGIN CERTIFICATE-----\nAAAA\n"
    assert raises(der.DerError, der.pem_blocks, torn)
    assert raises(der.DerError, der.pem_blocks, b"bytes")


def test_every_truncation_is_refused_cleanly():
    data = read_bytes("cert-0.der")
    for cut in range(0, len(data), 7):
        assert raises(der.DerError, der.certificate_fields, data[:cut])


# Flash store.


def test_store_stages_commits_and_loads():
    store = flashstore.FlashStore(scratch("basic"))
    assert store.current() is None
    first = store.stage({"cert.der": b"one", "key.der": b"k1"})
    assert store.current() is None
    store.commit(first)
    assert store.load() == {"cert.der": b"one", "key.der": b"k1"}
    second = store.stage({"cert.der": b"two"})
    store.commit(second)
    assert store.current() == second
    assert store.load() == {"cert.der": b"two"}


def test_store_rolls_back_and_prunes():
    store = flashstore.FlashStore(scratch("rollback"), keep=1)
    numbers = []
    for text in (b"a", b"b", b"c"):
        numbers.append(store.stage({"cert.der": text}))
        store.commit(numbers[-1])
    assert store.rollback() == numbers[1]
    assert store.load() == {"cert.der": b"b"}
    store.commit(numbers[2])
    assert store.prune() == [numbers[0]]
    assert store.generations() == numbers[1:]
    assert raises(flashstore.StoreError, store.discard, numbers[2])


def test_store_survives_a_cut_during_pointer_rename():
    root = scratch("torn")
    store = flashstore.FlashStore(root)
    old = store.stage({"cert.der": b"old"})
    store.commit(old)
    new = store.stage({"cert.der": b"new"})
    # A rename that deletes the target first was cut between the two
    # steps: only the complete temporary pointer is left.
    with open(root + "/current.tmp", "wb") as handle:
        handle.write(f"{new:04d}\n".encode())
    os.remove(root + "/current")
    again = flashstore.FlashStore(root)
    assert again.current() == new
    assert again.load() == {"cert.der": b"new"}


def test_store_ignores_torn_writes():
    root = scratch("staging")
    store = flashstore.FlashStore(root)
    good = store.stage({"cert.der": b"good"})
    store.commit(good)
    # A generation cut short while written, and a torn temporary pointer.
    os.mkdir(root + "/t0002")
    with open(root + "/t0002/cert.der", "wb") as handle:
        handle.write(b"ha")
    with open(root + "/current.tmp", "wb") as handle:
        handle.write(b"00")
    again = flashstore.FlashStore(root)
    assert again.current() == good
    assert again.generations() == [good]
    assert again.load() == {"cert.der": b"good"}
    assert "t0002" not in os.listdir(root)


def test_store_refuses_bad_input():
    store = flashstore.FlashStore(scratch("refuse"))
    assert raises(ValueError, store.stage, {})
    assert raises(ValueError, store.stage, {"../x": b""})
    assert raises(flashstore.StoreError, store.commit, 7)
    assert raises(flashstore.StoreError, store.rollback)
    assert raises(flashstore.StoreError, store.load)
