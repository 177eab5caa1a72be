"""Log lines that peers cause, rate-limited: a peer must not fill the disk.

Any process of an allowed uid (and, for the uid refusal, any local process)
can open sessions as fast as it likes; each would log a line or two. A
``LogLimit`` lets through ``burst`` lines of each kind (format string) per
``interval`` seconds; the rest are counted, and the next line of that kind
after the interval says how many were left out. The kinds are the
container's own format strings, so the table stays small.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

#: Lines of one kind let through per interval, and the interval (seconds).
BURST = 20
INTERVAL = 10.0


class LogLimit:
    """``log(level, fmt, *args)``: at most ``burst`` lines per ``fmt`` per ``interval`` s."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        kind = self._kinds.get(fmt)
        if kind is None or now - kind.start >= self._interval:
            if kind is not None and kind.left_out:
                self._logger.log(
                    level,
                    "%d more lines like the next were left out in %.0f s (at most %d per %g s)",
                    kind.left_out,
                    now - kind.start,
                    self._burst,
                    self._interval,
                )
            kind = self._kinds[fmt] = _Kind(now)
        if kind.shown < self._burst:
            kind.shown += 1
            self._logger.log(level, fmt, *args)
        else:
            kind.left_out += 1


class _Kind:
    """One kind of line in its current interval."""

    __slots__ = ("left_out", "shown", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.shown = 0
        self.left_out = 0
