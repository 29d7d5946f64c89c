"""Firecracker's I/O rate limiters: two token buckets, bytes (`bandwidth`) and operations
(`ops`), applied by a device before it serves a request (Firecracker API spec, definitions
`RateLimiter` and `TokenBucket`; docs/api.md "Rate limiters").

A bucket holds up to `size` tokens and refills at `size` tokens per `refill_time`
milliseconds; `one_time_burst` is extra credit spent first and never refilled. A bucket of
size 0 or refill time 0 does not limit (as in Firecracker). A request that needs more tokens
than the bucket holds is let through when it finds the bucket full and leaves the bucket in
debt for the rest (Firecracker's "over-consumption"), so an oversized request is slowed,
never refused forever, and the rate holds. Unlike Firecracker's buckets, these refill before
every request, so time a bucket spends full is not banked: the most a limiter lets through
at once is its size (plus the one-time burst).

When a request does not get its tokens the limiter is *blocked*: it arms a timerfd for the
moment the missing tokens will be there, and the device stops serving that queue, holding
the request. The queue's own worker thread watches the timerfd (`fd`, `DeviceLimiter`);
when it fires the limiter unblocks and the queue is served again. Nothing polls.

Pure logic apart from the timerfd (created on first need, through libc, as Python 3.11 has
no `os.timerfd_*`); the clock is injectable for tests.
"""

from __future__ import annotations

import ctypes
import enum
import os
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmkit.devices.virtio.device import VirtioDevice

NS_PER_MS = 1_000_000
U64_MAX = (1 << 64) - 1
# <sys/timerfd.h>, <time.h>
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
# The longest wait a timer is armed for (2^62 ns, 146 years): a bucket of one token per
# 2^64-1 ms makes waits past what timespec's 64-bit tv_sec holds, which ctypes would
# silently wrap into a short one (a throttled queue woken over and over).
MAX_DELAY_NS = 1 << 62


class Kind(enum.Enum):
    BYTES = "bandwidth"
    OPS = "ops"


@dataclass(frozen=True)
class BucketConfig:
    """One `TokenBucket` of the API: `size` tokens, refilled in `refill_time` ms."""

    size: int
    refill_time: int
    one_time_burst: int = 0

    @property
    def limits(self) -> bool:
        return self.size > 0 and self.refill_time > 0

    def to_api(self) -> dict[str, int]:
        out = {"size": self.size, "refill_time": self.refill_time}
        if self.one_time_burst:
            out["one_time_burst"] = self.one_time_burst
        return out

    @classmethod
    def from_api(cls, obj: Any, where: str = "token bucket") -> BucketConfig:
        """From the API's JSON (already checked against the schema by the API layer;
        checked again here for the Python API and snapshot files)."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object")
        values = {}
        for name in ("size", "refill_time", "one_time_burst"):
            value = obj.get(name, 0)
            if name != "one_time_burst" and name not in obj:
                raise ValueError(f"{where}: missing field `{name}`")
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
                raise ValueError(f"{where}.{name}: expected an integer from 0 to 2^64-1")
            values[name] = value
        unknown = set(obj) - set(values)
        if unknown:
            raise ValueError(f"{where}: unknown field `{sorted(unknown)[0]}`")
        return cls(values["size"], values["refill_time"], values["one_time_burst"])


@dataclass(frozen=True)
class RateLimiterConfig:
    """The API's `RateLimiter`: a bandwidth bucket (bytes) and an ops bucket, each optional."""

    bandwidth: BucketConfig | None = None
    ops: BucketConfig | None = None

    @property
    def limits(self) -> bool:
        return any(b is not None and b.limits for b in (self.bandwidth, self.ops))

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bandwidth is not None:
            out["bandwidth"] = self.bandwidth.to_api()
        if self.ops is not None:
            out["ops"] = self.ops.to_api()
        return out

    @classmethod
    def from_api(cls, obj: Any, where: str = "rate_limiter") -> RateLimiterConfig:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = set(obj) - {"bandwidth", "ops"}
        if unknown:
            raise ValueError(f"{where}: unknown field `{sorted(unknown)[0]}`")
        return cls(
            *(
                BucketConfig.from_api(obj[k], f"{where}.{k}") if obj.get(k) is not None
                else None
                for k in ("bandwidth", "ops")
            )
        )  # fmt: skip

    def merged(self, update: RateLimiterConfig) -> RateLimiterConfig:
        """This configuration with `update`'s buckets in place of its own: a PATCH changes the
        buckets it names and leaves the others (Firecracker's `BucketUpdate`)."""
        return RateLimiterConfig(
            update.bandwidth if update.bandwidth is not None else self.bandwidth,
            update.ops if update.ops is not None else self.ops,
        )


class TokenBucket:
    """A bucket that refills continuously: `size` tokens per `refill_time` ms, starting full,
    with `one_time_burst` tokens spent before the budget."""

    def __init__(self, config: BucketConfig, clock: Callable[[], int]) -> None:
        assert config.limits
        self.size = config.size
        self.refill_ns = config.refill_time * NS_PER_MS
        self.one_time_burst = config.one_time_burst
        self.budget = config.size
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        """Add the tokens the time since the last refill made. A bucket that reaches `size`
        stops the clock there: time spent full is not banked for later (the burst a
        limiter allows is its size, never more)."""
        now = self._clock()
        elapsed = now - self._last
        if elapsed <= 0:
            return
        tokens = elapsed * self.size // self.refill_ns
        if self.budget + tokens >= self.size:
            self.budget, self._last = self.size, now
            return
        if tokens == 0:
            return
        # Advance the clock by the time those whole tokens took (rounded up), so that the
        # fraction of a token left over is not lost at high request rates.
        self._last += -(-tokens * self.refill_ns // self.size)
        self.budget += tokens

    def reduce(self, tokens: int) -> bool:
        """Take `tokens` (the one-time burst first, then the budget); False, taking nothing,
        if there are not enough. A request larger than the bucket goes through when it
        finds the bucket full and leaves it in debt (a negative budget) that the refill pays
        before anything else passes, so the rate holds for large requests too."""
        if self.one_time_burst >= tokens:
            self.one_time_burst -= tokens
            self._last = self._clock()  # the budget stays full meanwhile
            return True
        need = tokens - self.one_time_burst
        self._refill()
        if need <= self.size:
            enough = need <= self.budget
        else:
            enough = self.budget >= self.size  # larger than the bucket: when it is full
        if not enough:
            return False
        self.one_time_burst = 0
        self.budget -= need
        return True

    def wait_ns(self, tokens: int) -> int:
        """How long until `tokens` (at most a full bucket) are there."""
        self._refill()
        missing = min(tokens, self.size) - self.budget
        if missing <= 0:
            return 0
        return -(-missing * self.refill_ns // self.size)

    def replenish(self, tokens: int) -> None:
        self.budget = min(self.size, self.budget + tokens)


class RateLimiter:
    """A device's limiter for one direction (a drive, a net interface's rx or tx, the
    entropy device). `consume` before serving; when it says no, stop serving, watch `fd`
    and call `on_timer()` when it is readable, then try again."""

    def __init__(self, config: RateLimiterConfig | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:  # fmt: skip
        self._clock = clock
        self.config = RateLimiterConfig()
        self.bandwidth: TokenBucket | None = None
        self.ops: TokenBucket | None = None
        self.blocked = False
        self._fd = -1
        self.throttled = 0  # requests refused for want of tokens (Firecracker's *_throttled)
        self.timer_events = 0  # timer expiries handled (Firecracker's rate_limiter_event_count)
        self.update(config or RateLimiterConfig())

    @property
    def limits(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    @property
    def fd(self) -> int:
        """The timerfd the device watches (-1 until the limiter first blocks)."""
        return self._fd

    def update(self, config: RateLimiterConfig) -> None:
        """New buckets (full); a bucket that does not limit is removed. A blocked limiter
        retries at once under the new limits."""
        self.config = config
        self.bandwidth = (
            TokenBucket(config.bandwidth, self._clock)
            if config.bandwidth is not None and config.bandwidth.limits else None
        )  # fmt: skip
        self.ops = (
            TokenBucket(config.ops, self._clock)
            if config.ops is not None and config.ops.limits else None
        )  # fmt: skip
        if self.blocked:
            self._arm(1)

    def consume(self, tokens: int, kind: Kind) -> bool:
        """Take `tokens` of `kind` for a request; False (and the timer armed) if it must
        wait. A blocked limiter refuses everything until its timer fired."""
        if self.blocked:
            return False
        bucket = self.bandwidth if kind is Kind.BYTES else self.ops
        if bucket is None:
            return True
        if bucket.reduce(tokens):
            return True
        self.throttled += 1
        self._arm(max(1, bucket.wait_ns(tokens)))
        return False

    def consume_request(self, nbytes: int) -> bool:
        """One operation of `nbytes` bytes: both buckets, or neither (the ops token is given
        back when the bytes must wait)."""
        if not self.consume(1, Kind.OPS):
            return False
        if not self.consume(nbytes, Kind.BYTES):
            if self.ops is not None:
                self.ops.replenish(1)
            return False
        return True

    def on_timer(self) -> bool:
        """The timerfd is readable: the limiter is no longer blocked. False for a spurious
        wake-up (nothing expired)."""
        if self._fd < 0:
            return False
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        self.timer_events += 1
        self.blocked = False
        return True

    def describe(self, held: bool = False) -> str:
        """For a VM's state dump (SIGUSR1): whether the queue waits for this limiter (and
        holds a request), how often it was throttled; empty for a limiter that never
        limited anything."""
        if not self.limits and not self.throttled:
            return ""
        state = "blocked" if self.blocked else "open"
        return (f"rate limiter {state}{', a request held' if held else ''}, throttled "
                f"{self.throttled} times, {self.timer_events} timer wake-ups")

    def _arm(self, delay_ns: int) -> None:
        if self._fd < 0:
            self._fd = _timerfd_create()
        _timerfd_settime(self._fd, delay_ns)
        self.blocked = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DeviceLimiter(RateLimiter):
    """The RateLimiter of one queue of a device (a drive's queue, a NIC's rx or tx queue,
    the entropy queue). Its timer is watched by that queue's own worker thread
    (`kvmkit.devices.virtio.worker`): when it fires, the worker marks the limiter unblocked
    and notifies the queue through its eventfd, so the same worker serves it again, the
    held request first, under the queue's serve lock and budget, as if the guest had
    notified. The limiter's state is only touched under that serve lock."""

    def __init__(self, device: VirtioDevice, queue: int,
                 config: RateLimiterConfig | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:  # fmt: skip
        super().__init__(config, clock)
        self._device = device
        self._queue = queue
        self._watched = -1

    def wait(self) -> None:
        """After `consume` said no: make sure the queue's worker wakes when the timer fires
        (the timerfd exists by now)."""
        watcher = self._device.queue_watcher(self._queue)
        if watcher is None or self.fd < 0 or self._watched == self.fd:
            return
        watcher.watch(self._device, self.fd, selectors.EVENT_READ, self._fired)
        self._watched = self.fd

    def _fired(self, events: int) -> None:
        if self.on_timer():
            self._device.notify_queue(self._queue)

    def reconfigure(self, update: RateLimiterConfig) -> None:
        """PATCH after boot: the buckets `update` names are replaced (full), the others stay
        (Firecracker's `BucketUpdate`). Taken under the queue's serve lock, so it waits for
        the request being served (one at most); a throttled queue retries at once."""
        with self._device.serve_locks[self._device.group_of(self._queue)]:
            self.update(self.config.merged(update))

    def unwatch(self) -> None:
        """The device left the live state (reset, NEEDS_RESET) or is closing."""
        watcher = self._device.queue_watcher(self._queue)
        if self._watched >= 0 and watcher is not None:
            watcher.unwatch(self._watched)
        self._watched = -1
        self.blocked = False  # nothing waits any more; a new request starts afresh

    def close(self) -> None:
        self.unwatch()
        super().close()


# -- timerfd(2) through libc

_libc: ctypes.CDLL | None = None


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _timerfd_create() -> int:
    fd = int(_lib().timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_create: {os.strerror(err)}")
    return fd


def _timerfd_settime(fd: int, delay_ns: int) -> None:
    """A one-shot expiry `delay_ns` from now (relative; 0 would disarm, so at least 1; at
    most MAX_DELAY_NS)."""
    spec = _itimerspec()
    delay_ns = min(max(1, delay_ns), MAX_DELAY_NS)
    spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(delay_ns, 1_000_000_000)
    if _lib().timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
    # Setting a timer resets its expiration count (fs/timerfd.c timerfd_setup): an
    # expiry of an earlier arming that was not read yet does not wake the device early.


def timerfd_open() -> int:
    """A non-blocking CLOCK_MONOTONIC timerfd (other devices' timers: the balloon's
    statistics interval)."""
    return _timerfd_create()


def timerfd_arm(fd: int, delay_ns: int) -> None:
    """Arm `fd` to expire once, `delay_ns` from now."""
    _timerfd_settime(fd, delay_ns)
