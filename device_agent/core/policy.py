"""When to renew, how long to wait after a failure, and when to stop."""

from . import backoff

# Annotations are for the type checker; MicroPython ignores them, and
# nothing here evaluates them at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_FRACTION = 2 / 3
DEFAULT_JITTER = 0.05
DEFAULT_FLOOR = 60.0
DEFAULT_BASE = 10.0
DEFAULT_CAP = 3600.0
DEFAULT_MINIMUM = 1.0

# The last tenth of a lifetime belongs to retries: renewal falls due before
# it, and retries are spaced so that several attempts fall inside it.
RETRY_SHARE = 0.1

# A server's hint is the word of a peer, so an absurd one is cut to a week.
MAX_RETRY_AFTER = 7 * 86400.0

LOOP_COUNT = 3
LOOP_SHARE = 0.1

_INFINITY = float("inf")


def renewal_time(
    not_before: float,
    not_after: float,
    fraction: float = DEFAULT_FRACTION,
    jitter: float = DEFAULT_JITTER,
    unit: float = 0.0,
    floor: float = DEFAULT_FLOOR,
) -> float:
    """The time at which a certificate falls due for renewal.

    That is ``fraction`` of the lifetime plus ``unit * jitter`` of it after
    notBefore, but no sooner than ``floor`` seconds after notBefore and no
    later than the start of the last tenth of the lifetime. The last tenth
    wins over the floor, so a certificate that lives less than ten ninths
    of the floor is renewed at nine tenths of its life. A certificate without a
    lifetime (notAfter at or before notBefore) is due at once: the answer
    is the earlier of the two times.
    """
    _check_finite(not_before, "not_before")
    _check_finite(not_after, "not_after")
    _check_finite(fraction, "fraction")
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must lie in [0, 1]")
    _check_finite(jitter, "jitter")
    _check_finite(floor, "floor")
    if jitter < 0 or floor < 0:
        raise ValueError("jitter and floor must not be negative")
    _check_unit(unit)

    lifetime = not_after - not_before
    if lifetime <= 0:
        return min(not_before, not_after)

    wanted = not_before + (fraction + unit * jitter) * lifetime
    earliest = not_before + floor
    latest = not_after - lifetime * RETRY_SHARE
    return min(max(wanted, earliest), latest)


def retry_delay(
    attempt: int,
    now: float,
    not_after: float,
    lifetime: float,
    base: float = DEFAULT_BASE,
    cap: float = DEFAULT_CAP,
    unit: float = 0.0,
    retry_after: float | None = None,
    minimum: float = DEFAULT_MINIMUM,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0 first).

    The wait is the exponential backoff of ``backoff.delay``, or the
    server's ``retry_after`` if that is longer, and never below
    ``minimum``. Before expiry it is cut short so the next attempt comes
    before notAfter: until the last tenth of the lifetime a wait may reach
    a third of the way into that tenth, and inside it each wait leaves two
    thirds of the time that remains, so that after a failure in the last
    tenth with more than three ``minimum`` left, at least three more
    attempts come before expiry. The cut wins over ``retry_after``. Once
    expired, or with an infinite ``not_after``, the backoff applies alone:
    the agent then enrolls with its factory identity. A ``retry_after``
    that is not a number of seconds (None, NaN, negative) is ignored.
    """
    if type(attempt) is not int:
        raise TypeError("attempt must be an int")
    _check_finite(now, "now")
    _check_not_nan(not_after, "not_after")
    _check_not_nan(lifetime, "lifetime")
    _check_finite(base, "base")
    _check_finite(cap, "cap")
    _check_finite(minimum, "minimum")
    if minimum <= 0:
        raise ValueError("minimum must be positive, or retries would spin")
    _check_unit(unit)

    wait = max(backoff.delay(attempt, base, cap, unit), _hint(retry_after))
    bound = _expiry_bound(now, not_after, lifetime)
    if bound is not None:
        wait = min(wait, bound)
    return max(wait, minimum)


class LoopDetector:
    """Spots an agent that renews fresh certificates over and over.

    A renewal is hasty when it starts less than a tenth of the current
    certificate's lifetime, or of ``floor`` if that is longer, after the
    successful renewal before it. ``renewal_time`` waits two thirds of a
    lifetime by default, so haste means the certificates arrive already
    due: a CA that backdates or shortens them, or a clock that runs
    ahead. ``is_loop`` says yes when the renewal about to start and the
    ``count - 1`` latest recorded ones were all hasty, so at most
    ``count - 1`` hasty renewals succeed before the agent stops. A clock
    that stepped back between two renewals makes that gap hasty too.
    ``reset`` forgets the history, for instance once an operator has
    looked at the device.
    """

    def __init__(
        self, count: int = LOOP_COUNT, floor: float = DEFAULT_FLOOR
    ) -> None:
        if type(count) is not int or count < 1:
            raise ValueError("count must be a positive int")
        _check_finite(floor, "floor")
        self.count = count
        self.floor = floor
        self.times: list[float] = []

    def record(self, when: float) -> None:
        """Note a successful renewal at ``when``."""
        _check_finite(when, "when")
        self.times.append(when)
        del self.times[: -self.count]

    def reset(self) -> None:
        self.times = []

    def is_loop(self, now: float, not_before: float, not_after: float) -> bool:
        """Whether a renewal starting at ``now`` would continue a loop.

        ``not_before`` and ``not_after`` are those of the certificate the
        renewal would replace.
        """
        _check_finite(now, "now")
        _check_finite(not_before, "not_before")
        _check_finite(not_after, "not_after")
        if len(self.times) < self.count:
            return False

        lifetime = not_after - not_before
        limit = max(lifetime, self.floor) * LOOP_SHARE
        later = now
        for earlier in reversed(self.times):
            if not later - earlier < limit:
                return False
            later = earlier
        return True


def _expiry_bound(
    now: float, not_after: float, lifetime: float
) -> float | None:
    # None when there is no expiry left to protect.
    remaining = not_after - now
    if remaining <= 0 or remaining == _INFINITY:
        return None

    # A lifetime that is unknown (not positive or infinite) counts as if
    # all the time left were already in the last tenth.
    keep = remaining * 2 / 3
    if 0 < lifetime < _INFINITY:
        keep = min(keep, lifetime * RETRY_SHARE * 2 / 3)
    bound = remaining - keep

    # Far from zero, rounding can put now + bound on notAfter itself; the
    # caller's minimum then has to do.
    if not now + bound < not_after:
        return 0.0
    return bound


def _hint(retry_after: "Any") -> float:
    # bool is a subclass of int on CPython but not on MicroPython, so the
    # type is compared exactly.
    if type(retry_after) not in (int, float):
        return 0.0
    if not retry_after >= 0:
        return 0.0
    return min(float(retry_after), MAX_RETRY_AFTER)


def _check_finite(value: float, name: str) -> None:
    # Subtracting a number from itself gives zero only when it is finite,
    # which needs no math module.
    if type(value) not in (int, float) or value - value != 0:
        raise ValueError(name + " must be a finite number")


def _check_not_nan(value: float, name: str) -> None:
    # NaN is the one number that is not at most infinity.
    if type(value) not in (int, float) or not value <= _INFINITY:
        raise ValueError(name + " must be a number")


def _check_unit(unit: float) -> None:
    if type(unit) not in (int, float) or not 0 <= unit < 1:
        raise ValueError("unit must lie in [0, 1)")
