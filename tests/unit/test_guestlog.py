"""Guest-triggered log lines are rate-limited per call site and error records are bounded
(kvmkit.guestlog): a hostile guest repeating what makes the VMM log cannot flood the host."""

from __future__ import annotations

import logging
import time

import pytest

from kvmkit.guestlog import ErrorRecord, GuestLog


def test_a_burst_then_one_line_per_interval_with_the_count_of_dropped_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("kvmkit.test.guestlog")
    caplog.set_level(logging.INFO, logger=logger.name)
    glog = GuestLog(logger, burst=3, interval=0.2)
    for i in range(50):
        glog.info("bad packet %d", i)
    glog.info("another call site")  # its own budget
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad packet 0", "bad packet 1", "bad packet 2", "another call site"]
    assert glog.suppressed == 47
    time.sleep(0.25)
    glog.info("bad packet %d", 50)
    assert caplog.records[-1].getMessage() == "bad packet 50 (47 more suppressed)"


def test_a_disabled_level_costs_nothing_and_counts_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("kvmkit.test.guestlog.quiet")
    caplog.set_level(logging.WARNING, logger=logger.name)
    glog = GuestLog(logger, burst=1)
    for _ in range(10):
        glog.debug("ignored read at %d", 0)
    assert caplog.records == [] and glog.suppressed == 0


def test_error_record_keeps_the_first_and_last_and_counts_all() -> None:
    rec = ErrorRecord(keep_first=2, keep_last=3)
    assert rec == [] and not rec
    for i in range(100):
        rec.append(f"e{i}")
    assert rec == ["e0", "e1", "e97", "e98", "e99"]
    assert len(rec) == 5 and rec.count == 100 and rec[0] == "e0" and rec[-1] == "e99"
