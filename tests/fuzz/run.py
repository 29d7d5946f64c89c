"""Run kvmkit's fuzz targets with atheris (docs/security.md, "Fuzzing").

    python tests/fuzz/run.py TARGET [libFuzzer options]   one target, in this process
    python tests/fuzz/run.py --all --seconds N             each target N seconds (make fuzz)

A target is a module of this directory exposing `TestOneInput(data)`. It runs under atheris
(libFuzzer) with kvmkit's code instrumented for coverage, from its seed corpus
(corpus/<target>/, read only) and a work corpus (<workdir>/<target>/, where new inputs go).
A crash (an exception escaping the target, a timeout, memory beyond the limit) stops the run;
libFuzzer writes the input to <workdir>/<target>-crash-<sha1>: replay it with
`python tests/fuzz/run.py TARGET FILE`, fix kvmkit, then add it to corpus/<target>/ as
`crash-<what>` so the host suite replays it from then on.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
TARGETS = (
    "virtqueue", "virtio_blk", "virtio_net", "virtio_vsock", "virtio_rng", "virtio_balloon",
    "mmds", "snapshot",
    "migration", "api_http", "api_json", "gdb_rsp", "loader", "cpio", "acpi",
)  # fmt: skip
# libFuzzer options of every run: inputs up to 32 KiB (a ring, its chains and their
# buffers fit), a 10 s timeout per input (a hang is a crash), 2 GiB of RSS at most (an
# unbounded allocation is a crash too).
DEFAULT_OPTIONS = ["-max_len=32768", "-timeout=10", "-rss_limit_mb=2048"]


def fuzz_one(target: str, options: list[str]) -> None:
    """Fuzz `target` in this process (atheris exits the process when it is done)."""
    import atheris

    # kvmkit's log lines about refused input (every few inputs) would flood the terminal.
    logging.getLogger("kvmkit").setLevel(logging.CRITICAL)
    sys.path.insert(0, str(HERE))
    # Coverage feedback from kvmkit's code (instrumenting the standard library too costs
    # seconds per start and adds little: its parsers are not what is under test).
    with atheris.instrument_imports(include=["kvmkit"]):
        module = importlib.import_module(target)
    atheris.Setup([sys.argv[0], *DEFAULT_OPTIONS, *options], module.TestOneInput)
    atheris.Fuzz()


def fuzz_all(seconds: int, workdir: Path, targets: list[str]) -> int:
    """Each target for `seconds` in its own process, one after the other; stop at the
    first crash. Prints the CPU time each one used."""
    total = 0.0
    for target in targets:
        work = workdir / target
        work.mkdir(parents=True, exist_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        cmd = [sys.executable, __file__, target, f"-max_total_time={seconds}",
               f"-artifact_prefix={workdir}/{target}-", "-print_final_stats=1",
               str(work), str(CORPUS / target)]  # fmt: skip
        print(f"== fuzz {target}: {seconds} s", flush=True)
        status = subprocess.run(cmd).returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        total += cpu
        print(f"== fuzz {target}: {cpu:.1f} s CPU, {time.monotonic() - t0:.1f} s wall, "
              f"exit status {status}", flush=True)  # fmt: skip
        if status != 0:
            print(f"== fuzz: CRASH in target {target} (input under {workdir}/{target}-*)",
                  flush=True)  # fmt: skip
            return 1
    print(f"== fuzz: {len(targets)} targets, no crash, {total:.1f} s CPU in all", flush=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in TARGETS:
        fuzz_one(sys.argv[1], sys.argv[2:])
        return 0  # not reached: atheris exits
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="run every target")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 120)))
    parser.add_argument("--workdir", type=Path, default=Path(".fuzz"))
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated targets (default: all)")  # fmt: skip
    args = parser.parse_args()
    if not args.all:
        parser.error(f"name a target ({', '.join(TARGETS)}) or give --all")
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    return fuzz_all(args.seconds, args.workdir.resolve(), targets)


if __name__ == "__main__":
    sys.exit(main())
