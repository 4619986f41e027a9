"""The clock guard: whether the wall clock may judge certificate validity."""

# Annotations are for the type checker; MicroPython ignores them, and
# nothing here evaluates them at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

TRUSTED = "trusted"
UNTRUSTED = "untrusted"
DEFAULT_SKEW = 300.0

# A stored time is a plain decimal number; anything longer or with other
# characters is not one we wrote.
_NUMBER_CHARS = "0123456789+-.eE"
_MAX_TEXT = 40


def assess(
    now: float,
    last_good: float | None,
    not_befores: "Iterable[float]",
    skew: float = DEFAULT_SKEW,
    fresh_not_afters: "Iterable[float]" = (),
) -> tuple[str, str]:
    """The clock's state, TRUSTED or UNTRUSTED, and why.

    Untrusted, beyond ``skew``: a clock behind the last known-good time,
    before the notBefore of a certificate we hold, or past one of
    ``fresh_not_afters``, the notAfter of a certificate another party
    found valid a moment ago (one the CA just issued, or the one a broker
    accepted in the handshake that just completed). The reason is empty
    when trusted and otherwise one line naming the failed check.

    A clock stepped forward with no fresh certificate to contradict it
    passes: it looks exactly like a device that was off for that long.
    ``advance`` keeps such a clock from locking the guard for good.
    """
    _check_finite(skew, "skew")
    if skew < 0:
        raise ValueError("skew must not be negative")
    if last_good is not None:
        _check_finite(last_good, "last_good")
    if not _finite(now):
        return UNTRUSTED, "the clock reading is not a finite number"

    if last_good is not None and now < last_good - skew:
        return _untrusted(last_good - now, "behind the last known-good time")

    latest = _extreme(not_befores, "not_befores", later=True)
    if latest is not None and now < latest - skew:
        return _untrusted(latest - now, "before a certificate's notBefore")

    earliest = _extreme(fresh_not_afters, "fresh_not_afters", later=False)
    if earliest is not None and now > earliest + skew:
        return _untrusted(
            now - earliest, "past a fresh certificate's notAfter"
        )
    return TRUSTED, ""


def advance(
    last_good: float | None, now: float, elapsed: float | None = None
) -> float:
    """The new last known-good time after ``now`` was assessed as trusted.

    It never moves backwards, nor forwards beyond ``now``. With
    ``elapsed``, the seconds a monotonic clock measured since ``last_good``
    was set, it moves at most that far: a wall clock stepped forward while
    the agent runs then cannot drag the last known-good time along, which
    would lock the guard long after the clock is put right. The lag this
    leaves after a restart is harmless, as it only makes the backward check
    more lenient; a time the CA vouched for, such as a fresh certificate's
    notBefore, may be passed as ``now`` without ``elapsed`` to close it.
    """
    _check_finite(now, "now")
    if last_good is None:
        return now
    _check_finite(last_good, "last_good")

    target = now
    if elapsed is not None:
        _check_finite(elapsed, "elapsed")
        target = min(now, last_good + max(elapsed, 0))
    return max(last_good, target)


def encode_last_good(value: float) -> str:
    """The text to store for a last known-good time."""
    _check_finite(value, "value")
    # An int stays an int, exact, which matters on boards whose floats are
    # single precision: there a float of today's time is off by a minute.
    return repr(value) + "\n"


def decode_last_good(text: object) -> float | None:
    """The time in stored text, or None if the text is not one we wrote."""
    if type(text) is not str:
        return None
    text = text.strip()
    if not text or len(text) > _MAX_TEXT:
        return None
    for char in text:
        if char not in _NUMBER_CHARS:
            return None

    try:
        if _is_integer(text):
            return int(text)
        value = float(text)
    except ValueError:
        return None
    return value if _finite(value) else None


def _extreme(
    values: "Iterable[float]", name: str, later: bool
) -> float | None:
    found = None
    for value in values:
        _check_finite(value, name)
        if found is None or (value > found if later else value < found):
            found = value
    return found


def _untrusted(seconds: float, what: str) -> tuple[str, str]:
    return UNTRUSTED, "clock is " + str(int(seconds)) + " s " + what


def _is_integer(text: str) -> bool:
    digits = text[1:] if text[0] in "+-" else text
    return digits.isdigit()


def _finite(value: object) -> bool:
    # Subtracting a number from itself gives zero only when it is finite,
    # which needs no math module.
    if type(value) is int:
        return True
    if type(value) is not float:
        return False
    return value - value == 0


def _check_finite(value: object, name: str) -> None:
    if not _finite(value):
        raise ValueError(name + " must be a finite number")
