"""Bounded records of what a guest can trigger: rate-limited log lines and a capped list of
errors. A hostile guest repeats whatever makes the VMM write a line or keep a record (a
corrupt ring after every reset, a bad packet per frame), so neither may grow with it.

`GuestLog` wraps a `logging.Logger`: each call site (its format string) may log `burst`
lines at once, then one per `interval` seconds; lines dropped meanwhile are counted and the
next line that passes says how many ("... (12 more suppressed)"). Every log line a guest
can cause goes through one (devices, transports, the vCPU loop), whatever its level.

`ErrorRecord` keeps the first and the last few of a device's error messages and a total:
what a test or an operator needs to see what went wrong, in constant memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

BURST = 10  # lines per call site before the limit applies
INTERVAL = 10.0  # then one line per call site every this many seconds
MAX_SITES = 256  # call sites tracked per GuestLog (format strings: a code constant set)


class _Bucket:
    __slots__ = ("stamp", "suppressed", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = float(BURST)
        self.stamp = now
        self.suppressed = 0


class GuestLog:
    """A logger for guest-triggered lines, rate-limited per format string (see module)."""

    def __init__(self, logger: logging.Logger, *, burst: int = BURST,
                 interval: float = INTERVAL) -> None:  # fmt: skip
        self.logger = logger
        self._burst = burst
        self._rate = 1.0 / interval
        self._sites: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.suppressed = 0  # lines dropped in total (for tests and metrics)

    def _allow(self, msg: str) -> int | None:
        """None: drop the line; else how many lines of this site were dropped before it."""
        now = time.monotonic()
        with self._lock:
            bucket = self._sites.get(msg)
            if bucket is None:
                if len(self._sites) >= MAX_SITES:
                    self._sites.pop(next(iter(self._sites)))
                bucket = self._sites[msg] = _Bucket(now)
            bucket.tokens = min(float(self._burst),
                                bucket.tokens + (now - bucket.stamp) * self._rate)  # fmt: skip
            bucket.stamp = now
            if bucket.tokens < 1.0:
                bucket.suppressed += 1
                self.suppressed += 1
                return None
            bucket.tokens -= 1.0
            dropped, bucket.suppressed = bucket.suppressed, 0
            return dropped

    def log(self, level: int, msg: str, *args: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        dropped = self._allow(msg)
        if dropped is None:
            return
        if dropped:
            self.logger.log(level, msg + " (%d more suppressed)", *args, dropped)
        else:
            self.logger.log(level, msg, *args)

    def debug(self, msg: str, *args: Any) -> None:
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def exception(self, msg: str, *args: Any) -> None:
        """An ERROR line with the exception being handled (a device bug a guest hit)."""
        if not self.logger.isEnabledFor(logging.ERROR):
            return
        dropped = self._allow(msg)
        if dropped is not None:
            suffix = f" ({dropped} more suppressed)" if dropped else ""
            self.logger.error(msg + suffix, *args, exc_info=True)


class ErrorRecord:
    """A device's error messages in bounded memory: the first `keep_first` (what started it)
    and the last `keep_last`, plus the total count. Reads like a list of the kept ones."""

    def __init__(self, keep_first: int = 8, keep_last: int = 8) -> None:
        self._first: list[str] = []
        self._last: deque[str] = deque(maxlen=keep_last)
        self._keep_first = keep_first
        self.count = 0

    def append(self, message: str) -> None:
        self.count += 1
        if len(self._first) < self._keep_first:
            self._first.append(message)
        else:
            self._last.append(message)

    def _kept(self) -> list[str]:
        return [*self._first, *self._last]

    def __getitem__(self, index: int) -> str:
        return self._kept()[index]

    def __len__(self) -> int:
        return len(self._first) + len(self._last)

    def __bool__(self) -> bool:
        return self.count > 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return self._kept() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ErrorRecord({self._kept()!r}, count={self.count})"
