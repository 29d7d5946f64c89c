"""Firecracker's token buckets (kvmkit.devices.virtio.ratelimit): refill arithmetic with a
fake clock, the one-time burst, over-sized requests, updates, the API shape, and the real
timerfd that wakes a blocked limiter."""

from __future__ import annotations

import os
import select
import time

import pytest

from kvmkit.devices.virtio.ratelimit import (
    BucketConfig,
    Kind,
    RateLimiter,
    RateLimiterConfig,
    TokenBucket,
)

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns

    def advance_ms(self, ms: float) -> None:
        self.ns += int(ms * MS)


def test_bucket_refills_at_size_per_refill_time() -> None:
    clock = Clock()
    b = TokenBucket(BucketConfig(size=1000, refill_time=100), clock)
    assert b.reduce(1000) is True  # starts full
    assert b.reduce(1) is False  # empty: nothing taken
    clock.advance_ms(10)  # 10% of the refill time: 100 tokens
    assert b.reduce(101) is False
    assert b.reduce(100) is True
    assert b.reduce(1) is False
    clock.advance_ms(1000)  # long idle: full, never more than size
    assert b.reduce(1000) is True and b.reduce(1) is False


def test_fractions_of_a_token_are_not_lost() -> None:
    clock = Clock()
    b = TokenBucket(BucketConfig(size=3, refill_time=1), clock)  # one token per 1/3 ms
    assert b.reduce(3) is True
    got = 0
    for _ in range(30):
        clock.advance_ms(0.2)  # 0.6 token each step
        while b.reduce(1) is True:
            got += 1
    # 30 * 0.6 = 18; at most one lost to rounding the time used up (a bucket that reset its
    # clock at every refill would have made none of the 0.6 steps into a token).
    assert 17 <= got <= 18


def test_one_time_burst_is_spent_first_and_not_refilled() -> None:
    clock = Clock()
    b = TokenBucket(BucketConfig(size=100, refill_time=1000, one_time_burst=500), clock)
    assert b.reduce(500) is True and b.one_time_burst == 0 and b.budget == 100
    assert b.reduce(100) is True and b.reduce(1) is False
    clock.advance_ms(10_000)
    assert b.reduce(100) is True and b.reduce(1) is False  # the burst does not come back
    assert b.one_time_burst == 0


def test_a_request_larger_than_the_bucket_passes_when_full_then_pays_back() -> None:
    clock = Clock()
    b = TokenBucket(BucketConfig(size=100, refill_time=1000), clock)
    assert b.reduce(350) is True  # a full bucket lets it through ...
    assert b.budget == -250  # ... in debt for the 250 tokens beyond the bucket
    assert b.reduce(350) is False  # not before the debt is paid and the bucket full again
    assert b.wait_ns(350) == 3500 * MS
    clock.advance_ms(2500)
    assert b.reduce(1) is False  # the debt is paid: the budget is back at 0
    clock.advance_ms(10)
    assert b.reduce(1) is True  # 10 ms make one token
    # Over a long run big requests get the configured rate, not more.
    clock = Clock()
    b = TokenBucket(BucketConfig(size=100, refill_time=1000), clock)
    passed = 0
    for _ in range(10_000):
        clock.advance_ms(1)
        if b.reduce(250):
            passed += 250
    assert 750 <= passed <= 1100  # 100 tokens/s for 10 s (+ the bucket), less one request


def test_time_spent_full_is_not_banked() -> None:
    """After a long idle spell the bucket is full, not more: spending it in small pieces and
    then asking again waits for the refill (a limiter never lets through more than its size
    plus the burst at once)."""
    clock = Clock()
    b = TokenBucket(BucketConfig(size=1000, refill_time=1000), clock)
    clock.advance_ms(60_000)
    for _ in range(10):
        assert b.reduce(100) is True
    assert b.reduce(100) is False
    assert b.wait_ns(100) == 100 * MS


def test_disabled_buckets_do_not_limit() -> None:
    lim = RateLimiter(RateLimiterConfig(BucketConfig(0, 100), BucketConfig(10, 0)))
    assert not lim.limits
    assert all(lim.consume_request(1 << 30) for _ in range(100))
    assert lim.fd == -1  # no timer until something has to wait


def test_consume_request_takes_both_buckets_or_neither() -> None:
    clock = Clock()
    lim = RateLimiter(RateLimiterConfig(BucketConfig(1000, 100), BucketConfig(10, 100)), clock)
    try:
        assert lim.consume_request(1000)
        assert lim.ops is not None and lim.ops.budget == 9
        assert not lim.consume_request(10)  # no bytes left: the op token goes back
        assert lim.ops.budget == 9 and lim.blocked and lim.throttled == 1
        assert not lim.consume_request(1)  # blocked until the timer fired
    finally:
        lim.close()


def test_blocked_limiter_wakes_through_its_timerfd() -> None:
    lim = RateLimiter(RateLimiterConfig(BucketConfig(100, 50)))  # 100 bytes per 50 ms
    try:
        assert lim.consume(100, Kind.BYTES)
        t0 = time.monotonic()
        assert not lim.consume(60, Kind.BYTES) and lim.fd >= 0
        assert select.select([lim.fd], [], [], 2)[0] == [lim.fd]
        waited = time.monotonic() - t0
        assert 0.02 <= waited < 1.0  # 60 tokens take 30 ms to come back
        assert lim.on_timer() and not lim.blocked and lim.timer_events == 1
        assert lim.consume(60, Kind.BYTES)
        assert not lim.on_timer()  # nothing expired: a spurious wake-up
    finally:
        lim.close()


def test_update_replaces_named_buckets_and_unblocks() -> None:
    clock = Clock()
    lim = RateLimiter(RateLimiterConfig(BucketConfig(10, 1000), BucketConfig(5, 1000)), clock)
    try:
        assert lim.consume(10, Kind.BYTES) and not lim.consume(1, Kind.BYTES)
        update = RateLimiterConfig(bandwidth=BucketConfig(1 << 20, 1000))
        lim.update(lim.config.merged(update))
        assert lim.config.ops == BucketConfig(5, 1000)  # not named: kept
        fired = select.select([lim.fd], [], [], 2)[0]
        assert fired and lim.on_timer()  # re-armed to fire at once
        assert lim.consume(1 << 19, Kind.BYTES)
        lim.update(RateLimiterConfig(BucketConfig(0, 0), None))  # size 0: no limit
        assert not lim.limits
    finally:
        lim.close()


def test_api_shape_round_trip_and_errors() -> None:
    body = {"bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 5},
            "ops": {"size": 10, "refill_time": 1000}}  # fmt: skip
    cfg = RateLimiterConfig.from_api(body)
    assert cfg.to_api() == body and cfg.limits
    for bad, needle in [
        ({"bandwidth": {"size": 1}}, "missing field `refill_time`"),
        ({"ops": {"size": -1, "refill_time": 1}}, "ops.size"),
        ({"bandwidth": {"size": 1, "refill_time": True}}, "refill_time"),
        ({"burst": {}}, "unknown field `burst`"),
        ([], "expected an object"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RateLimiterConfig.from_api(bad)


def test_an_absurdly_slow_bucket_arms_a_far_timer_not_a_wrapped_one() -> None:
    """One token per 2^64-1 ms and a 1000-byte request: the wait for the 1000 tokens owed is
    2^64-1 s, past timespec's range; it is capped, not wrapped (to -1 s: EINVAL in the
    device's worker; other values: a short timer waking the device over and over)."""
    import ctypes

    from kvmkit.devices.virtio import ratelimit

    lim = RateLimiter(RateLimiterConfig(BucketConfig(1, (1 << 64) - 1)))
    try:
        assert lim.consume(1000, Kind.BYTES)  # the full bucket lets it through, in debt
        assert not lim.consume(1, Kind.BYTES) and lim.blocked
        spec = ratelimit._itimerspec()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.timerfd_gettime(lim.fd, ctypes.byref(spec)) == 0
        assert spec.it_value.tv_sec > 100 * 365 * 86400, spec.it_value.tv_sec
        assert select.select([lim.fd], [], [], 0.2)[0] == []
    finally:
        lim.close()


def test_timerfd_is_closed() -> None:
    lim = RateLimiter(RateLimiterConfig(BucketConfig(1, 1000)))
    assert lim.consume(1, Kind.BYTES) and not lim.consume(1, Kind.BYTES)
    fd = lim.fd
    lim.close()
    with pytest.raises(OSError):
        os.fstat(fd)
