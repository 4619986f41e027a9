"""The renewal policy: when a certificate is due, retry waits, loops."""

import ast
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from device_agent.core import backoff, policy
from device_agent.core.policy import LoopDetector, renewal_time, retry_delay

YEAR = 365 * 86400
INF = float("inf")

# Times on any epoch, 1970 or 2000 or a board's own, far into both sides.
TIMES = st.one_of(
    st.integers(-(10**10), 10**10), st.floats(-1e10, 1e10, width=64)
)
LIFETIMES = st.one_of(st.integers(1, 30 * YEAR), st.floats(1, 30 * YEAR))
UNITS = st.floats(0, 1, exclude_max=True)
ATTEMPTS = st.integers(0, 100)
HINTS = st.one_of(
    st.none(),
    st.just(0),
    st.booleans(),
    st.integers(-10, 10**8),
    st.floats(allow_nan=True, allow_infinity=True),
)
BASES = st.floats(0.01, 100)
MINIMUMS = st.floats(0.01, 60)


def _valid_hint(hint: Any) -> float:
    if type(hint) not in (int, float) or not hint >= 0:
        return 0.0
    return min(float(hint), policy.MAX_RETRY_AFTER)


# -- renewal_time ---------------------------------------------------------


@given(
    not_before=TIMES,
    lifetime=LIFETIMES,
    fraction=st.floats(0, 1),
    jitter=st.floats(0, 0.5),
    unit=UNITS,
    floor=st.floats(0, 10 * YEAR),
)
def test_due_time_lies_between_the_floor_and_the_last_tenth(
    not_before: float,
    lifetime: float,
    fraction: float,
    jitter: float,
    unit: float,
    floor: float,
) -> None:
    not_after = not_before + lifetime
    due = renewal_time(not_before, not_after, fraction, jitter, unit, floor)

    span = not_after - not_before
    latest = not_after - span * policy.RETRY_SHARE
    assert not_before <= due <= latest
    assert due >= min(not_before + floor, latest)
    assert due >= min(not_before + fraction * span, latest)
    assert due <= max(
        not_before + (fraction + jitter) * span, not_before + floor
    )


@given(not_before=TIMES, not_after=TIMES, unit=UNITS)
def test_a_certificate_without_lifetime_is_due_at_once(
    not_before: float, not_after: float, unit: float
) -> None:
    assume(not_after <= not_before)
    due = renewal_time(not_before, not_after, unit=unit)
    assert due <= not_after
    assert due <= not_before


@given(not_before=TIMES, not_after=TIMES, unit=UNITS)
def test_any_validity_gives_a_due_time_inside_it(
    not_before: float, not_after: float, unit: float
) -> None:
    due = renewal_time(not_before, not_after, unit=unit)
    assert min(not_before, not_after) <= due <= max(not_before, not_after)


@given(not_before=TIMES, lifetime=LIFETIMES, units=st.tuples(UNITS, UNITS))
def test_a_later_random_unit_never_makes_renewal_sooner(
    not_before: float, lifetime: float, units: tuple[float, float]
) -> None:
    low, high = sorted(units)
    not_after = not_before + lifetime
    assert renewal_time(not_before, not_after, unit=low) <= renewal_time(
        not_before, not_after, unit=high
    )


@given(
    not_before=st.integers(-(10**9), 10**9),
    lifetime=st.integers(1, 30 * YEAR),
    shift=st.sampled_from([0, 946_684_800, -946_684_800, 10**9]),
    unit=UNITS,
)
def test_the_due_time_moves_with_the_epoch(
    not_before: int, lifetime: int, shift: int, unit: float
) -> None:
    """Boards count from 1970 or 2000: only the distances matter."""
    due = renewal_time(not_before, not_before + lifetime, unit=unit)
    shifted = renewal_time(
        not_before + shift, not_before + shift + lifetime, unit=unit
    )
    assert shifted - shift == pytest.approx(due, abs=1e-5)


def test_a_thirty_second_certificate_keeps_its_last_tenth_for_retries() -> (
    None
):
    # The 60-second floor would reach past expiry; the last tenth wins.
    assert renewal_time(1000, 1030) == 1027
    assert renewal_time(1000, 1030, floor=25) == 1025
    assert renewal_time(1000, 1030, floor=0) == pytest.approx(1020)
    assert renewal_time(1000, 1030, floor=0, unit=0.5) == pytest.approx(
        1020.75
    )


def test_a_one_year_certificate_is_due_after_eight_months() -> None:
    issued = 770_000_000  # mid 2024, counted from 2000 as some boards do
    due = renewal_time(issued, issued + YEAR)
    assert due - issued == pytest.approx(YEAR * 2 / 3)
    assert (due - issued) / 86400 == pytest.approx(243.33, abs=0.01)

    latest = renewal_time(issued, issued + YEAR, unit=0.999)
    assert latest - issued == pytest.approx(YEAR * (2 / 3 + 0.05 * 0.999))


def test_backdated_zero_and_inverted_validities() -> None:
    # A CA backdating by almost the whole lifetime makes it due at once.
    assert renewal_time(0, 100, fraction=0.95) == 90
    assert renewal_time(500, 500) == 500
    assert renewal_time(500, 400) == 400


@pytest.mark.parametrize(
    "arguments",
    [
        {"unit": 1.0},
        {"unit": -0.1},
        {"fraction": 1.5},
        {"fraction": math.nan},
        {"jitter": -0.01},
        {"floor": -1.0},
        {"not_before": math.nan},
        {"not_after": INF},
    ],
)
def test_renewal_time_refuses_nonsense(arguments: dict[str, float]) -> None:
    call: dict[str, float] = {"not_before": 0.0, "not_after": 100.0}
    call.update(arguments)
    with pytest.raises(ValueError):
        renewal_time(**call)


# -- retry_delay ----------------------------------------------------------


@st.composite
def near_expiry(draw: st.DrawFn) -> tuple[float, float, float]:
    """(now, not_after, lifetime), now often close to notAfter."""
    lifetime = draw(LIFETIMES)
    not_after = draw(TIMES)
    left = draw(
        st.one_of(
            st.floats(-lifetime, 1.1 * lifetime),
            st.floats(0, lifetime * policy.RETRY_SHARE),
            st.floats(0, 100),
        )
    )
    return not_after - left, not_after, lifetime


RETRY_CASES = {
    "attempt": ATTEMPTS,
    "clock": near_expiry(),
    "base": BASES,
    "spread": st.floats(0, 10_000),
    "unit": UNITS,
    "hint": HINTS,
    "minimum": MINIMUMS,
}


def _delay(
    attempt: int,
    clock: tuple[float, float, float],
    base: float,
    spread: float,
    unit: float,
    hint: Any,
    minimum: float,
) -> float:
    now, not_after, lifetime = clock
    return retry_delay(
        attempt,
        now,
        not_after,
        lifetime,
        base=base,
        cap=base + spread,
        unit=unit,
        retry_after=hint,
        minimum=minimum,
    )


@given(
    attempt=ATTEMPTS,
    now=TIMES,
    not_after=st.one_of(TIMES, st.just(INF), st.just(-INF)),
    lifetime=st.one_of(LIFETIMES, TIMES, st.just(INF), st.just(0)),
    unit=UNITS,
    hint=HINTS,
    minimum=MINIMUMS,
)
def test_a_retry_never_waits_less_than_the_minimum(
    attempt: int,
    now: float,
    not_after: float,
    lifetime: float,
    unit: float,
    hint: Any,
    minimum: float,
) -> None:
    delay = retry_delay(
        attempt,
        now,
        not_after,
        lifetime,
        unit=unit,
        retry_after=hint,
        minimum=minimum,
    )
    assert minimum <= delay < INF


@given(**RETRY_CASES)
def test_a_failure_never_pushes_the_next_attempt_past_expiry(
    attempt: int,
    clock: tuple[float, float, float],
    base: float,
    spread: float,
    unit: float,
    hint: Any,
    minimum: float,
) -> None:
    now, not_after, _ = clock
    assume(now + minimum < not_after)
    delay = _delay(attempt, clock, base, spread, unit, hint, minimum)
    assert now + delay < not_after


@given(**RETRY_CASES)
def test_a_later_attempt_never_waits_less(
    attempt: int,
    clock: tuple[float, float, float],
    base: float,
    spread: float,
    unit: float,
    hint: Any,
    minimum: float,
) -> None:
    this = _delay(attempt, clock, base, spread, unit, hint, minimum)
    then = _delay(attempt + 1, clock, base, spread, unit, hint, minimum)
    assert this <= then


@given(**RETRY_CASES)
def test_retry_after_is_honoured_unless_expiry_cuts_it(
    attempt: int,
    clock: tuple[float, float, float],
    base: float,
    spread: float,
    unit: float,
    hint: Any,
    minimum: float,
) -> None:
    delay = _delay(attempt, clock, base, spread, unit, hint, minimum)
    plain = _delay(attempt, clock, base, spread, unit, None, minimum)
    assert delay >= plain

    wanted = _valid_hint(hint)
    if delay < wanted:
        # Only the expiry bound shortens a hint, and it does not depend on
        # the hint: asking for even longer changes nothing.
        now, not_after, _ = clock
        assert now < not_after
        longest = policy.MAX_RETRY_AFTER
        assert delay == _delay(
            attempt, clock, base, spread, unit, longest, minimum
        )


@given(
    attempt=ATTEMPTS,
    now=TIMES,
    expired_for=st.floats(0, 30 * YEAR),
    lifetime=LIFETIMES,
    base=BASES,
    spread=st.floats(0, 10_000),
    unit=UNITS,
    hint=HINTS,
    minimum=MINIMUMS,
    never_expires=st.booleans(),
)
def test_an_expired_certificate_gets_the_plain_backoff(
    attempt: int,
    now: float,
    expired_for: float,
    lifetime: float,
    base: float,
    spread: float,
    unit: float,
    hint: Any,
    minimum: float,
    never_expires: bool,
) -> None:
    not_after = INF if never_expires else now - expired_for
    clock = (now, not_after, lifetime)
    delay = _delay(attempt, clock, base, spread, unit, hint, minimum)

    wait = backoff.delay(attempt, base, base + spread, unit)
    assert delay == max(wait, _valid_hint(hint), minimum)


@pytest.mark.parametrize(
    "hint", [None, math.nan, -1, -INF, True, False, "60", [60]]
)
def test_a_retry_after_that_is_not_seconds_is_ignored(hint: Any) -> None:
    plain = retry_delay(4, 0.0, 1e9, 2e9)
    assert retry_delay(4, 0.0, 1e9, 2e9, retry_after=hint) == plain


# What a server may say in a refusal, valid or not.
SAMPLE_HINTS = (None, 0, 5, 3600, 1e9, INF, math.nan, -1, True)


class Run:
    """A renewal that keeps failing, with its randomness drawn once."""

    def __init__(
        self,
        minimum: float,
        lifetime: float,
        not_after: float,
        base: float,
        cap: float,
        attempt: int,
        rng: random.Random,
    ) -> None:
        self.minimum = minimum
        self.lifetime = lifetime
        self.not_after = not_after
        self.base = base
        self.cap = cap
        self.attempt = attempt
        self.rng = rng

    def attempts(self, now: float, since: float) -> list[float]:
        """The first three attempts at or after since, from a failure at
        now, each attempt failing in turn; fewer if expiry comes first."""
        times: list[float] = []
        attempt = self.attempt
        while len(times) < 3:
            now += retry_delay(
                attempt,
                now,
                self.not_after,
                self.lifetime,
                base=self.base,
                cap=self.cap,
                unit=self.rng.random(),
                retry_after=self.rng.choice(SAMPLE_HINTS),
                minimum=self.minimum,
            )
            if now >= self.not_after:
                break
            if now >= since:
                times.append(now)
            attempt += 1
        return times


@st.composite
def runs(draw: st.DrawFn) -> Run:
    minimum = draw(MINIMUMS)
    base = draw(BASES)
    return Run(
        minimum=minimum,
        lifetime=draw(st.floats(50 * minimum, 30 * YEAR)),
        not_after=draw(TIMES),
        base=base,
        cap=base + draw(st.floats(0, 100_000)),
        attempt=draw(ATTEMPTS),
        rng=draw(st.randoms(use_true_random=False)),
    )


@given(run=runs(), share=st.floats(0, 1))
def test_three_more_attempts_follow_a_failure_in_the_last_tenth(
    run: Run, share: float
) -> None:
    least = 3.01 * run.minimum
    left = least + share * (run.lifetime * policy.RETRY_SHARE - least)
    start = run.not_after - left
    assert len(run.attempts(start, since=start)) == 3


@given(run=runs(), share=st.floats(0, 1))
def test_retries_from_before_the_last_tenth_land_in_it_three_times(
    run: Run, share: float
) -> None:
    tenth = run.lifetime * policy.RETRY_SHARE
    # From the due time at the latest: the floor never pushes it further.
    left = tenth + share * min(run.lifetime - 2 * tenth, 20 * run.cap)
    since = run.not_after - tenth
    assert len(run.attempts(run.not_after - left, since)) == 3


def test_a_thirty_second_certificate_retries_each_second_at_the_end() -> None:
    # Renewal fell due at 27 s, with 3 s left: one attempt a second.
    now, attempts = 1027.0, []
    for attempt in range(3):
        now += retry_delay(attempt, now, 1030.0, 30.0)
        attempts.append(now)
    assert attempts == [1028.0, 1029.0, 1030.0]

    # Earlier in its life a wait stops a third of the way into the last
    # tenth, here at 28 s, rather than running its 15-second backoff.
    assert retry_delay(1, 1020.0, 1030.0, 30.0, unit=0.5) == pytest.approx(8)


def test_a_one_year_certificate_backs_off_to_an_hour() -> None:
    not_after = 800_000_000 + YEAR
    early = not_after - 100 * 86400
    assert retry_delay(0, early, not_after, YEAR) == 5.0
    assert retry_delay(0, early, not_after, YEAR, unit=0.5) == 7.5
    assert retry_delay(20, early, not_after, YEAR) == 1800.0
    assert retry_delay(20, early, not_after, YEAR, unit=0.99) < 3600.0
    assert retry_delay(0, early, not_after, YEAR, retry_after=600) == 600.0

    # An hour before expiry each wait leaves two thirds of what is left.
    late = not_after - 3600
    assert retry_delay(20, late, not_after, YEAR) == pytest.approx(1200)
    assert retry_delay(0, late, not_after, YEAR, retry_after=7200) == (
        pytest.approx(1200)
    )

    # Expired: the agent enrolls afresh at the normal pace, and waits no
    # longer than a week whatever a server asks.
    expired = not_after + 1
    assert retry_delay(20, expired, not_after, YEAR) == 1800.0
    assert retry_delay(0, expired, not_after, YEAR, retry_after=INF) == (
        policy.MAX_RETRY_AFTER
    )


def test_rounding_never_lands_a_retry_on_expiry() -> None:
    # Next to a clock value this large, a wait a hair under one second
    # rounds to exactly one second: the minimum has to do.
    now = 1e10
    delay = retry_delay(0, now, now + 1, 1e-9, minimum=0.5)
    assert now + delay < now + 1


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"attempt": True}, TypeError),
        ({"attempt": 1.0}, TypeError),
        ({"attempt": -1}, ValueError),
        ({"minimum": 0.0}, ValueError),
        ({"now": math.nan}, ValueError),
        ({"not_after": math.nan}, ValueError),
        ({"unit": 1.0}, ValueError),
        ({"base": 0.0}, ValueError),
        ({"cap": 1.0, "base": 2.0}, ValueError),
    ],
)
def test_retry_delay_refuses_nonsense(
    arguments: dict[str, float], error: type[Exception]
) -> None:
    call: dict[str, Any] = {
        "attempt": 0,
        "now": 0.0,
        "not_after": 100.0,
        "lifetime": 100.0,
    }
    call.update(arguments)
    with pytest.raises(error):
        retry_delay(**call)


# -- LoopDetector ---------------------------------------------------------


@given(
    lifetime=LIFETIMES,
    floor=st.floats(0, 600),
    count=st.integers(1, 5),
    start=TIMES,
    shares=st.lists(st.floats(-1, 0.99), min_size=5, max_size=5),
)
def test_renewals_quicker_than_a_tenth_of_the_lifetime_are_a_loop(
    lifetime: float,
    floor: float,
    count: int,
    start: float,
    shares: list[float],
) -> None:
    limit = max(lifetime, floor) * policy.LOOP_SHARE
    detector = LoopDetector(count=count, floor=floor)
    now = start
    for share in shares[:count]:
        detector.record(now)
        now += share * limit
    assert detector.is_loop(now, now - lifetime / 2, now + lifetime / 2)

    detector.reset()
    assert not detector.is_loop(now, now - lifetime / 2, now + lifetime / 2)


@given(
    lifetime=st.floats(86400, 30 * YEAR),
    spent=st.floats(0.7, 1),
    transaction=st.floats(0.1, 600),
    start=TIMES,
)
def test_a_ca_issuing_certificates_already_due_is_stopped(
    lifetime: float, spent: float, transaction: float, start: float
) -> None:
    detector = LoopDetector()
    now, renewed = start, 0
    while True:
        # The CA backdates each certificate so far that it is due at once.
        not_before = now - spent * lifetime
        not_after = not_before + lifetime
        now = max(now, renewal_time(not_before, not_after)) + transaction
        if detector.is_loop(now, not_before, not_after):
            break
        detector.record(now)
        renewed += 1
        assert renewed <= policy.LOOP_COUNT
    assert renewed == policy.LOOP_COUNT


@given(
    lifetime=st.floats(policy.DEFAULT_FLOOR / 6, 30 * YEAR),
    start=TIMES,
    backdates=st.lists(st.floats(0, 0.25), min_size=8, max_size=8),
    units=st.lists(UNITS, min_size=8, max_size=8),
    waits=st.lists(st.floats(0, 1000), min_size=8, max_size=8),
)
def test_renewals_on_schedule_are_never_a_loop(
    lifetime: float,
    start: float,
    backdates: list[float],
    units: list[float],
    waits: list[float],
) -> None:
    """Even with notBefore backdated by a quarter of the lifetime."""
    detector = LoopDetector()
    now = start
    for backdate, unit, wait in zip(backdates, units, waits, strict=True):
        not_before = now - backdate * lifetime
        not_after = not_before + lifetime
        now = renewal_time(not_before, not_after, unit=unit) + wait
        assert not detector.is_loop(now, not_before, not_after)
        detector.record(now)


def test_thirty_second_certificates_renewed_every_27_seconds_are_fine() -> (
    None
):
    detector = LoopDetector()
    for renewal in range(10):
        issued = 1000.0 + 27 * renewal
        assert not detector.is_loop(issued + 27, issued, issued + 30)
        detector.record(issued + 27)


def test_haste_means_strictly_less_than_a_tenth() -> None:
    detector = LoopDetector(floor=0)
    for when in (0.0, 10.0, 20.0):
        detector.record(when)
    assert not detector.is_loop(30.0, 0.0, 100.0)

    detector.reset()
    for when in (0.0, 9.5, 19.0):
        detector.record(when)
    assert detector.is_loop(28.5, 0.0, 100.0)


def test_a_clock_stepping_back_between_renewals_counts_as_haste() -> None:
    detector = LoopDetector()
    for when in (5000.0, 4000.0, 3000.0):
        detector.record(when)
    assert detector.is_loop(2000.0, 0.0, YEAR)
    assert not detector.is_loop(2000.0 + YEAR, 0.0, YEAR)


def test_the_detector_keeps_only_what_it_needs() -> None:
    detector = LoopDetector(count=2)
    for when in range(10):
        detector.record(float(when))
    assert detector.times == [8.0, 9.0]
    with pytest.raises(ValueError):
        LoopDetector(count=0)


# -- portability ----------------------------------------------------------

CORE = Path(policy.__file__).parent


def test_the_policy_imports_nothing_micropython_lacks() -> None:
    """Only sibling core modules at run time; typing behind a guard."""
    tree = ast.parse((CORE / "policy.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            pytest.fail("imports " + ast.unparse(node))
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1, ast.unparse(node)
        if isinstance(node, ast.If):
            assert ast.unparse(node.test) == "TYPE_CHECKING"
    source = (CORE / "policy.py").read_text()
    for word in ("isinstance", "dataclass", "Enum", "sort_keys"):
        assert word not in source
