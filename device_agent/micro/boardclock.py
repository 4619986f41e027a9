"""Wall-clock time on a board, in seconds since 1970, only once it is set.

A board boots with its clock at its epoch (2000 on the ESP32, 1970 on the
unix port) or wherever a battery-less RTC stopped, so no certificate may
be judged until the time came from NTP or from someone who knows it.
``now`` raises until then. Times are converted from the board's epoch to
the 1970 epoch that certificate dates use.
"""

import time

from device_agent.core import der
from device_agent.micro.errors import ClockNotSetError


def epoch_offset():
    """Seconds from 1970-01-01 to this board's epoch."""
    year = time.gmtime(0)[0]  # dialect: ok epoch (this is the check)
    return der.days_from_civil(year, 1, 1) * 86400


class BoardClock:
    """The board's clock, trusted only after ``sync`` or ``set``."""

    def __init__(self):
        self.offset = epoch_offset()
        self.correction = 0
        self.source = None

    def sync(self, host="pool.ntp.org"):
        """Set the clock from NTP (MicroPython's ``ntptime``)."""
        import ntptime

        ntptime.host = host
        ntptime.settime()
        self.correction = 0
        self.source = "ntp:" + host

    def set(self, unix_time, source="provided"):
        """Take the time from someone who knows it, in seconds since 1970."""
        if type(unix_time) is not int:
            raise ValueError("the time must be whole seconds since 1970")
        self.correction = unix_time - self._board_unix()
        self.source = source

    def is_set(self):
        return self.source is not None

    def now(self):
        """Seconds since 1970, UTC; ClockNotSet before a time source."""
        if self.source is None:
            raise ClockNotSetError("the clock was not set since boot")
        return self._board_unix() + self.correction

    def _board_unix(self):
        return int(time.time()) + self.offset  # dialect: ok epoch (offset)
