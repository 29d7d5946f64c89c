"""Run the `hwvirt` tests inside `kvmkit lane` boots, resuming after a lane wedge.

Used by scripts/run-hwvirt-tests.sh on hosts without VMX/SVM. Tests are grouped by the lane
they need: most run in the default lane, and a module or test marked
`@pytest.mark.lane_devices("edu", ..., modules=(...))` runs in a lane booted with those
`--device`s and `--module`s (the VFIO tests: an emulated IOMMU slows every DMA in the lane,
so the others do not get one). KVMKIT_HWVIRT_LANES (default 2, one per core of a 2-core
host; each lane has one TCG vCPU) workers run side by side: the test files are spread over
them by their WEIGHTS, and each worker runs its share of the default group in one lane boot
(one pytest session), then its share of a device group, if it got one, in another.

The nested KVM under QEMU/TCG has been seen to wedge: the whole lane VM goes idle and no
timeout inside it fires. So each test has a time limit watched from outside (the conftest
hook writes a line per finished test to KVMKIT_TEST_PROGRESS); when the running test
exceeds it, the lane is stopped and a new lane (of the same group) runs the tests not yet
finished. A lane that ends before its pytest session does (the lane
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
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIMIT = 600.0  # seconds one test may take inside the lane before it counts as wedged
# Tests known to be long, by a word in their id. The migration test (four kvmkit processes,
# three moves of a 256 MiB guest) ran 687 s up to its third move in a lane beside four others.
LIMITS = {"megabytes": 2400.0, "migrates_three_times": 1500.0, "edu_passthrough": 1200.0}
GOOD = {"passed", "xfailed", "xpassed"}  # xpassed: a non-strict xfail that passed
RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "xpassed": 2, "failed": 3, "error": 4}


@dataclass(frozen=True)
class LaneConfig:
    """What a group of tests needs of its lane (the `lane_devices` marker)."""

    devices: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out: list[str] = []
        for device in self.devices:
            out += ["--device", device]
        for module in self.modules:
            out += ["--module", module]
        return out

    def describe(self) -> str:
        if not self.devices and not self.modules:
            return "default lane"
        return "lane " + " ".join(self.args())


def collect(python: str, paths: tuple[str, ...] = ("tests",)) -> dict[LaneConfig, list[str]]:
    """The selected test ids (under `paths`) by the lane they need, the default lane first."""
    with tempfile.NamedTemporaryFile(prefix="hwvirt-lanes-", suffix=".jsonl") as out:
        proc = subprocess.run(
            [python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "hwvirt", "--collect-only",
             "-q", *paths],
            cwd=REPO, capture_output=True, text=True, check=False,
            env=dict(os.environ, KVMKIT_LANE_CONFIGS=out.name),
        )  # fmt: skip
        configs = {}
        for line in Path(out.name).read_text().splitlines():
            row = json.loads(line)
            configs[row["nodeid"]] = LaneConfig(tuple(row["devices"]), tuple(row["modules"]))
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode not in (0, 5) or (not ids and proc.returncode != 5):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("hwvirt tests: collection failed")
    groups: dict[LaneConfig, list[str]] = {LaneConfig(): []}
    for nodeid in ids:
        groups.setdefault(configs.get(nodeid, LaneConfig()), []).append(nodeid)
    return {lane: group for lane, group in groups.items() if group}


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


def lane_argv(python: str, ids: list[str], lane: LaneConfig) -> list[str]:
    """The `kvmkit lane` command that runs `ids` in one pytest session in a lane booted for
    `lane` (its --device and --module options)."""
    return [
        python, "-m", "kvmkit", "lane", "--timeout", str(int(sum(map(limit_for, ids)) + 600)),
        # The lane's default of one vCPU (docs/lane.md), unless KVMKIT_HWVIRT_LANE_CPUS says.
        *(["--cpus", cpus] if (cpus := os.environ.get("KVMKIT_HWVIRT_LANE_CPUS")) else []),
        "--module", "tun",  # tests/hwvirt/test_net_vsock_linux.py: taps for virtio-net
        *lane.args(),
        "--", str(REPO / python) if not os.path.isabs(python) else python,
        "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfExX", "--durations=10", *ids,
    ]  # fmt: skip


def run_lane(
    python: str, ids: list[str], progress: Path, outcomes: dict[str, str], lane: LaneConfig
) -> str | None:
    """One lane boot running `ids` in order. Returns the id of the test that wedged the
    lane, or None when the pytest session ended by itself."""
    argv = lane_argv(python, ids, lane)
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


# Seconds a test file took in a one-vCPU lane (CI of 2026-12-03), used only to balance the
# default lane's tests across the concurrent lanes; a file not listed counts DEFAULT_WEIGHT.
WEIGHTS = {
    "tests/hwvirt/test_linux_boot.py": 600.0,  # + the --rootfs test, 80 s
    "tests/hwvirt/test_gdb_linux.py": 150.0,
    "tests/hwvirt/test_topology_linux.py": 120.0,
    "tests/hwvirt/test_net_vsock_linux.py": 120.0,
    "tests/hwvirt/test_snapshot_linux.py": 100.0,
    "tests/hwvirt/test_migration_linux.py": 500.0,  # 524-573 s under a load of 20
    "tests/hwvirt/test_vfio_linux.py": 280.0,
    # pytest 367 and 440 s in two one-vCPU lanes (3 guest boots, 2 restores, kvmkit probe)
    "tests/hwvirt/test_nested_hyperv_linux.py": 400.0,
    # 136 + 94 s under the default seccomp filters, with the snapshot load (2026-12-03)
    "tests/hwvirt/test_firecracker_dropin_linux.py": 230.0,
    "tests/hwvirt/test_mmds_linux.py": 115.0,
}
DEFAULT_WEIGHT = 80.0


def lanes_wanted() -> int:
    """How many lanes run at once: KVMKIT_HWVIRT_LANES, else 2 (one per core of a 2-core
    host; each lane is one TCG vCPU, so two lanes use both cores)."""
    raw = os.environ.get("KVMKIT_HWVIRT_LANES", "2")
    try:
        return max(1, int(raw))
    except ValueError:
        raise SystemExit(f"KVMKIT_HWVIRT_LANES={raw!r}: expected a number") from None


Job = tuple["LaneConfig", list[str]]  # one lane boot: its kind and the tests it runs


def plan(groups: dict[LaneConfig, list[str]], lanes: int) -> list[list[Job]]:
    """Spread the tests over `lanes` workers that run side by side. The unit is a test file
    (a file's tests share its module fixtures, often one guest boot); heaviest first onto the
    lightest worker. Each worker then runs one lane boot per lane kind it got (the default
    lane's files together, each device group's files together), tests in their original order."""
    files: dict[tuple[LaneConfig, str], list[str]] = {}
    for lane, ids in groups.items():
        for nodeid in ids:
            files.setdefault((lane, nodeid.split("::", 1)[0]), []).append(nodeid)
    count = max(1, min(lanes, len(files)))
    loads = [0.0] * count
    bins: list[dict[LaneConfig, list[str]]] = [{} for _ in range(count)]
    for lane, name in sorted(files, key=lambda k: -WEIGHTS.get(k[1], DEFAULT_WEIGHT)):
        i = loads.index(min(loads))
        loads[i] += WEIGHTS.get(name, DEFAULT_WEIGHT)
        bins[i].setdefault(lane, []).extend(files[(lane, name)])
    order = list(groups)
    workers = []
    for chosen in bins:
        jobs = []
        for lane in order:  # the default lane first, as collect() lists it
            if lane in chosen:
                picked = set(chosen[lane])
                jobs.append((lane, [n for n in groups[lane] if n in picked]))
        if jobs:
            workers.append(jobs)
    return workers


def run_round(
    python: str, groups: dict[LaneConfig, list[str]], tmp: Path, tag: str,
    wedges: dict[str, int], lanes: int,
) -> Round:  # fmt: skip
    """Run every group's tests in up to `lanes` lanes side by side (each lane boot its own
    progress file and resume loop); prints a line per lane boot as it ends."""
    workers = plan(groups, lanes)
    total = Round()

    def one(w: int, jobs: list[Job]) -> Round:
        done = Round()
        for n, (lane, ids) in enumerate(jobs):
            started = time.monotonic()
            part = run_all(python, ids, tmp / f"{tag}{w}-{n}", wedges, lane)
            done.merge(part)
            print(f"hwvirt tests: {lane.describe()} (worker {w + 1}/{len(workers)}): "
                  f"{len(ids)} test(s), {part.boots} boot(s), {time.monotonic() - started:.0f} s",
                  flush=True)  # fmt: skip
        return done

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [pool.submit(one, w, jobs) for w, jobs in enumerate(workers)]
        for future in futures:
            total.merge(future.result())
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("python", nargs="?", default=".venv/bin/python")
    ap.add_argument("--lane-devices-only", action="store_true",
                    help="only the tests that need a lane with devices (lane_devices marker)")
    args = ap.parse_args()
    groups = collect(args.python)
    if args.lane_devices_only:
        groups.pop(LaneConfig(), None)
    ids = [nodeid for group in groups.values() for nodeid in group]
    if not ids:
        print("hwvirt: 0 passed, 0 failed (no test selected)")
        return 0
    lanes = lanes_wanted()
    wedges: dict[str, int] = {}
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hwvirt-", dir=REPO / "build") as tmp:
        first = run_round(args.python, groups, Path(tmp), "progress", wedges, lanes)
        boots = first.boots
        again = [i for i in ids if first.outcomes.get(i) not in GOOD]
        second = Round()
        if again:
            print(f"hwvirt tests: {len(again)} failed; running them once more in a new lane",
                  flush=True)  # fmt: skip
            retry = {lane: [i for i in group if i in again] for lane, group in groups.items()}
            retry = {lane: group for lane, group in retry.items() if group}
            second = run_round(args.python, retry, Path(tmp), "again", wedges, lanes)
            boots += second.boots
    flaky = [i for i in again if second.outcomes.get(i) in GOOD]
    failed = [i for i in again if second.outcomes.get(i) not in GOOD]
    print(f"hwvirt tests: {len(ids)} tests, {boots} lane boot(s) ({lanes} at a time), "
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
    outcomes: dict[str, str] = field(default_factory=dict)
    boots: int = 0
    log: str = ""

    def merge(self, other: Round) -> None:
        self.outcomes.update(other.outcomes)
        self.boots += other.boots
        self.log += other.log


def run_all(
    python: str, ids: list[str], progress: Path, wedges: dict[str, int], lane: LaneConfig
) -> Round:
    """Run `ids` in lane boots until each has an outcome (resuming after wedges)."""
    outcomes: dict[str, str] = {}
    boots = 0
    while True:
        remaining = [i for i in ids if i not in outcomes]
        if not remaining:
            break
        boots += 1
        wedged = run_lane(python, remaining, progress, outcomes, lane)
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
