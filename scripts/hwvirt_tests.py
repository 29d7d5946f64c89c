"""Run the `hwvirt` tests inside one `kvmkit lane` boot, resuming after a lane wedge.

Used by scripts/run-hwvirt-tests.sh on hosts without VMX/SVM. All selected tests run in a
single lane boot (one pytest session). The nested KVM under QEMU/TCG has been seen to wedge:
the whole lane VM goes idle and no timeout inside it fires. So each test has a time limit
watched from outside (the conftest hook writes a line per finished test to
KVMKIT_TEST_PROGRESS); when the running test exceeds it, the lane is stopped and a new lane
runs the tests not yet finished. A lane that ends before its pytest session does (the lane
kernel was seen to reboot mid-run) is handled the same way. A test that wedges or ends the
lane twice counts as failed.

A test that fails is run once more, in a new lane, after the others: the nested guests
under QEMU/TCG have been seen to fail now and then in ways the same code does not repeat
(a guest triple fault in a long serial-output run). Both runs are reported; a test that
passes only the second time is listed as flaky, one that fails twice fails the run.

Prints pytest's own output as it streams, then one summary line:
``hwvirt: N passed, N failed`` (xfailed counts as passed: a strict xfail that passes fails).
Exit status 0 only when every test passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIMIT = 600.0  # seconds one test may take inside the lane before it counts as wedged
# Tests known to be long, by a word in their id. The migration test (four kvmkit processes,
# three moves of a 256 MiB guest) ran 687 s up to its third move in a lane beside four others.
LIMITS = {"megabytes": 2400.0, "migrates_three_times": 1500.0}
GOOD = {"passed", "xfailed", "xpassed"}  # xpassed: a non-strict xfail that passed
RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "xpassed": 2, "failed": 3, "error": 4}


def collect(python: str) -> list[str]:
    proc = subprocess.run(
        [python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "hwvirt", "--collect-only",
         "-q", "tests"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode not in (0, 5) or (not ids and proc.returncode != 5):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("hwvirt tests: collection failed")
    return ids


def limit_for(nodeid: str) -> float:
    for word, limit in LIMITS.items():
        if word in nodeid:
            return limit
    return DEFAULT_LIMIT


def read_progress(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        outcome, _, nodeid = line.partition(" ")
        if nodeid:
            rows.append((outcome, nodeid))
    return rows


def run_lane(python: str, ids: list[str], progress: Path, outcomes: dict[str, str]) -> str | None:
    """One lane boot running `ids` in order. Returns the id of the test that wedged the
    lane, or None when the pytest session ended by itself."""
    argv = [
        python, "-m", "kvmkit", "lane", "--timeout", str(int(sum(map(limit_for, ids)) + 600)),
        # The lane's default of one vCPU (docs/lane.md), unless KVMKIT_HWVIRT_LANE_CPUS says.
        *(["--cpus", cpus] if (cpus := os.environ.get("KVMKIT_HWVIRT_LANE_CPUS")) else []),
        "--module", "tun",  # tests/hwvirt/test_net_vsock_linux.py: taps for virtio-net
        "--", str(REPO / python) if not os.path.isabs(python) else python,
        "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfExX", *ids,
    ]  # fmt: skip
    env = dict(os.environ, KVMKIT_TEST_PROGRESS=str(progress))
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    seen = len(read_progress(progress))
    started = time.monotonic()
    while True:
        try:
            proc.wait(5)
            return None
        except subprocess.TimeoutExpired:
            pass
        rows = read_progress(progress)
        for outcome, nodeid in rows[seen:]:
            old = outcomes.get(nodeid)
            if old is None or RANK.get(outcome, 4) > RANK.get(old, 4):
                outcomes[nodeid] = outcome
        if len(rows) > seen:
            seen, started = len(rows), time.monotonic()
        current = next((i for i in ids if i not in outcomes), None)
        if current is None:
            continue  # all reported; the session is finishing
        if time.monotonic() - started > limit_for(current):
            print(f"hwvirt tests: no progress for {limit_for(current):.0f} s in {current}; "
                  "stopping the lane", flush=True)  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return current


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("python", nargs="?", default=".venv/bin/python")
    args = ap.parse_args()
    ids = collect(args.python)
    if not ids:
        print("hwvirt: 0 passed, 0 failed (no test selected)")
        return 0
    wedges: dict[str, int] = {}
    boots = 0
    with tempfile.TemporaryDirectory(prefix="hwvirt-", dir=REPO / "build") as tmp:
        first = run_all(args.python, ids, Path(tmp) / "progress", wedges)
        boots += first.boots
        again = [i for i in ids if first.outcomes.get(i) not in GOOD]
        second = Round({}, 0, "")
        if again:
            print(f"hwvirt tests: {len(again)} failed; running them once more in a new lane",
                  flush=True)  # fmt: skip
            second = run_all(args.python, again, Path(tmp) / "progress2", wedges)
            boots += second.boots
    flaky = [i for i in again if second.outcomes.get(i) in GOOD]
    failed = [i for i in again if second.outcomes.get(i) not in GOOD]
    print(f"hwvirt tests: {len(ids)} tests, {boots} lane boot(s), "
          f"{sum(wedges.values())} wedge(s) resumed")  # fmt: skip
    if first.log:
        print("hwvirt tests: failures of the first run:\n" + first.log)
    if second.log:
        print("hwvirt tests: failures of the second run:\n" + second.log)
    for nodeid in flaky:
        print(f"FLAKY {nodeid} (failed, then passed in a new lane)")
    for nodeid in failed:
        print(f"FAILED {nodeid} ({second.outcomes.get(nodeid, 'not run')}, twice)")
    passed = len(ids) - len(failed)
    print(f"hwvirt: {passed} passed ({len(flaky)} on the second try), {len(failed)} failed")
    return 0 if not failed else 1


@dataclass
class Round:
    outcomes: dict[str, str]
    boots: int
    log: str


def run_all(python: str, ids: list[str], progress: Path, wedges: dict[str, int]) -> Round:
    """Run `ids` in lane boots until each has an outcome (resuming after wedges)."""
    outcomes: dict[str, str] = {}
    boots = 0
    while True:
        remaining = [i for i in ids if i not in outcomes]
        if not remaining:
            break
        boots += 1
        wedged = run_lane(python, remaining, progress, outcomes)
        # Take any line written after the last poll.
        for outcome, nodeid in read_progress(progress):
            old = outcomes.get(nodeid)
            if old is None or RANK.get(outcome, 4) > RANK.get(old, 4):
                outcomes[nodeid] = outcome
        if wedged is None:
            # The session ended. Tests without a report: the lane VM itself went down under
            # the first of them (seen: the lane kernel rebooting mid-run, QEMU exit 0).
            wedged = next((i for i in remaining if i not in outcomes), None)
            if wedged is None:
                break
            print(f"hwvirt tests: the lane ended during {wedged}; resuming in a new lane",
                  flush=True)  # fmt: skip
        wedges[wedged] = wedges.get(wedged, 0) + 1
        if wedges[wedged] >= 2:
            outcomes[wedged] = "error"
            print(f"hwvirt tests: {wedged} wedged or ended the lane twice: counted as failed")
    log_path = Path(str(progress) + ".log")
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    return Round(outcomes, boots, log)


if __name__ == "__main__":
    sys.exit(main())
