"""The clock guard: when the wall clock may judge validity."""

import ast
import math
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from device_agent.core import clock
from device_agent.core.clock import (
    TRUSTED,
    UNTRUSTED,
    advance,
    assess,
    decode_last_good,
    encode_last_good,
)

YEAR = 365 * 86400
INF = float("inf")

# Times on any epoch, 1970 or 2000 or a board's own, far into both sides.
TIMES = st.one_of(
    st.integers(-(10**10), 10**10), st.floats(-1e10, 1e10, width=64)
)
READINGS = st.one_of(
    TIMES, st.sampled_from([math.nan, INF, -INF]), st.integers(-(10**30), 0)
)
SKEWS = st.floats(0, 86400)
LISTS = st.lists(TIMES, max_size=4)


@given(
    now=READINGS,
    last_good=st.one_of(st.none(), TIMES),
    not_befores=LISTS,
    fresh=LISTS,
    skew=SKEWS,
)
def test_the_clock_is_trusted_exactly_when_every_check_passes(
    now: float,
    last_good: float | None,
    not_befores: list[float],
    fresh: list[float],
    skew: float,
) -> None:
    sane = (
        math.isfinite(now)
        and (last_good is None or now >= last_good - skew)
        and all(now >= not_before - skew for not_before in not_befores)
        and all(now <= not_after + skew for not_after in fresh)
    )
    state, reason = assess(now, last_good, not_befores, skew, fresh)
    assert state == (TRUSTED if sane else UNTRUSTED)
    assert (reason == "") == sane
    assert "\n" not in reason


@given(last_good=TIMES, behind=st.floats(0, 30 * YEAR), skew=SKEWS)
def test_a_clock_behind_the_last_known_good_time_is_untrusted(
    last_good: float, behind: float, skew: float
) -> None:
    now = last_good - skew - behind
    assume(now < last_good - skew)
    state, reason = assess(now, last_good, [], skew)
    assert state == UNTRUSTED
    assert "last known-good" in reason


@given(not_befores=st.lists(TIMES, min_size=1), early=st.floats(0, YEAR))
def test_a_clock_before_a_certificate_starts_is_untrusted(
    not_befores: list[float], early: float
) -> None:
    now = min(not_befores) - clock.DEFAULT_SKEW - early
    assume(now < max(not_befores) - clock.DEFAULT_SKEW)
    state, reason = assess(now, None, not_befores)
    assert state == UNTRUSTED
    assert "notBefore" in reason


@given(not_after=TIMES, ahead=st.floats(0, 100 * YEAR), skew=SKEWS)
def test_a_clock_past_a_fresh_certificate_is_untrusted(
    not_after: float, ahead: float, skew: float
) -> None:
    now = not_after + skew + ahead
    assume(now > not_after + skew)
    state, reason = assess(now, None, [], skew, [not_after])
    assert state == UNTRUSTED
    assert "fresh certificate" in reason


@given(
    last_good=TIMES,
    since=st.floats(0, 30 * YEAR),
    not_before=TIMES,
    skew=SKEWS,
)
def test_a_sane_clock_is_trusted(
    last_good: float, since: float, not_before: float, skew: float
) -> None:
    now = max(last_good, not_before) + since
    assert assess(now, last_good, [not_before], skew) == (TRUSTED, "")


def test_a_board_that_forgot_the_time_is_untrusted_until_it_is_set() -> None:
    last_good = 770_000_000  # mid 2024, counted from 2000
    issued = 760_000_000
    state, reason = assess(0, last_good, [issued])
    assert state == UNTRUSTED
    assert reason == "clock is 770000000 s behind the last known-good time"

    # Work resumes as soon as the clock is sane again.
    assert assess(last_good + 60, last_good, [issued]) == (TRUSTED, "")


def test_the_skew_forgives_clocks_a_little_apart() -> None:
    now = 1_700_000_000
    assert assess(now, now + 299, [now + 299], 300, [now - 299]) == (
        TRUSTED,
        "",
    )
    assert assess(now, now + 301, []) == (
        UNTRUSTED,
        "clock is 301 s behind the last known-good time",
    )
    assert assess(now, now, [now + 301]) == (
        UNTRUSTED,
        "clock is 301 s before a certificate's notBefore",
    )
    assert assess(now, now, [], 300, [now - 301]) == (
        UNTRUSTED,
        "clock is 301 s past a fresh certificate's notAfter",
    )


def test_a_clock_set_to_2099_passes_until_a_fresh_certificate_refutes_it() -> (
    None
):
    last_good = 1_750_000_000  # mid 2025, counted from 1970
    now = 4_070_908_800  # 2099
    assert assess(now, last_good, [last_good - YEAR]) == (TRUSTED, "")

    # The CA just issued a one-year certificate: the clock cannot be 2099.
    issued = last_good + 86400
    fresh = [issued + YEAR]
    state, reason = assess(now, last_good, [issued], 300, fresh)
    assert state == UNTRUSTED
    assert reason.endswith("s past a fresh certificate's notAfter")


@pytest.mark.parametrize(
    "arguments",
    [{"skew": -1.0}, {"skew": math.nan}, {"last_good": math.nan}],
)
def test_assess_refuses_nonsense(arguments: dict[str, float]) -> None:
    call: dict[str, object] = {"now": 0.0, "last_good": 0.0, "not_befores": []}
    call.update(arguments)
    with pytest.raises(ValueError):
        assess(**call)  # type: ignore[arg-type]


# -- advance --------------------------------------------------------------


@given(
    last_good=st.one_of(st.none(), TIMES),
    now=TIMES,
    elapsed=st.one_of(st.none(), st.floats(-10, YEAR)),
)
def test_the_last_good_time_never_moves_back_nor_past_the_clock(
    last_good: float | None, now: float, elapsed: float | None
) -> None:
    new = advance(last_good, now, elapsed)
    if last_good is None:
        assert new == now
        return
    assert new >= last_good
    assert new <= max(last_good, now)
    if elapsed is not None:
        assert new <= last_good + max(elapsed, 0)


@given(
    start=TIMES,
    steps=st.lists(
        st.one_of(
            st.floats(0, 3600),
            st.floats(-30 * YEAR, 100 * YEAR),
            st.sampled_from([math.nan, INF]),
        ),
        max_size=20,
    ),
    skew=SKEWS,
)
def test_an_agent_following_the_guard_never_loses_known_good_time(
    start: float, steps: list[float], skew: float
) -> None:
    """Readings that wander and jump are judged, and only trusted ones
    are kept; the kept time never decreases."""
    last_good: float | None = None
    now = start
    for step in steps:
        reading = now + step
        state, _ = assess(reading, last_good, [start], skew)
        before = last_good
        if state == TRUSTED:
            last_good = advance(last_good, reading)
            now = reading
        if before is not None:
            assert last_good is not None
            assert last_good >= before


def test_elapsed_time_keeps_a_jump_to_2099_from_locking_the_guard() -> None:
    last_good = 1_750_000_000  # mid 2025
    jumped = 4_070_908_800  # 2099, five seconds later by the monotonic clock
    assert advance(last_good, jumped, elapsed=5.0) == last_good + 5

    # Once the clock is put right, the guard trusts it straight away.
    corrected = last_good + 10
    assert assess(corrected, last_good + 5, []) == (TRUSTED, "")

    # Without elapsed the jump would have been kept, and the correct time
    # refused for the next 74 years.
    poisoned = advance(last_good, jumped)
    assert assess(corrected, poisoned, [])[0] == UNTRUSTED


def test_a_fresh_certificate_closes_the_gap_after_a_restart() -> None:
    stored = 1_700_000_000
    issued = stored + 90 * 86400  # the CA's notBefore, months later
    assert advance(stored, stored + 90 * 86400 + 60, elapsed=60) == (
        stored + 60
    )
    assert advance(stored + 60, issued) == issued


# -- storing the last good time --------------------------------------------


@given(value=st.one_of(TIMES, st.integers(-(10**30), 10**30), st.floats()))
def test_a_stored_time_reads_back_exactly(value: float) -> None:
    assume(math.isfinite(value))
    text = encode_last_good(value)
    assert text.endswith("\n")
    back = decode_last_good(text)
    assert back == value
    assert type(back) is type(value)


@given(text=st.one_of(st.text(), st.binary(), st.none(), st.integers()))
def test_any_stored_text_reads_as_a_finite_time_or_none(text: object) -> None:
    value = decode_last_good(text)
    assert value is None or math.isfinite(value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "nan",
        "inf",
        "-Infinity",
        "1e999",
        "0x10",
        "1_000",
        "12abc",
        "1.2.3",
        "--1",
        "+",
        "١٢٣",  # digits, but not ASCII ones
        "1" * 41,
        b"1700000000",
        None,
    ],
)
def test_garbage_reads_as_no_time(text: object) -> None:
    assert decode_last_good(text) is None


def test_stored_times_tolerate_whitespace() -> None:
    assert decode_last_good(" 1700000000 \r\n") == 1_700_000_000
    assert decode_last_good("1700000000.25") == 1_700_000_000.25
    assert decode_last_good("-5") == -5


@pytest.mark.parametrize("value", [math.nan, INF, True, "1700000000", None])
def test_only_a_finite_time_can_be_stored(value: object) -> None:
    with pytest.raises(ValueError):
        encode_last_good(value)  # type: ignore[arg-type]


# -- portability ----------------------------------------------------------


def test_the_guard_imports_nothing_micropython_lacks() -> None:
    """No imports at run time; typing names behind a guard only."""
    source = Path(clock.__file__).read_text()
    tree = ast.parse(source)
    for node in tree.body:
        assert not isinstance(node, ast.Import | ast.ImportFrom)
        if isinstance(node, ast.If):
            assert ast.unparse(node.test) == "TYPE_CHECKING"
    for word in ("isinstance", "dataclass", "Enum", "math."):
        assert word not in source
