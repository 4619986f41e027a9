"""Exponential backoff with jitter for reconnects and retries."""


def delay(attempt: int, base: float, cap: float, unit: float) -> float:
    """Seconds to wait before retry number ``attempt`` (counted from 0).

    The ceiling doubles with each attempt up to ``cap``; the wait is the
    upper half of that ceiling plus ``unit`` (a random number in [0, 1))
    times the lower half, so clients that failed together spread out but
    none retries at once.
    """
    if attempt < 0 or base <= 0 or cap < base:
        raise ValueError("backoff needs attempt >= 0 and 0 < base <= cap")
    ceiling = cap
    if attempt < 64:
        ceiling = min(cap, base * (2**attempt))
    half = ceiling / 2
    return half + half * unit
