"""The seccomp options shared by `kvmkit run`, `kvmkit restore` and `kvmkit-firecracker`
(docs/security.md). A module of their own, importing only argparse and pathlib, so that
`kvmkit-firecracker` can build its parser without importing `kvmkit.cli.run` (and with it the
device configurations, the probe and the VMM config: ~140 ms before the API socket listened).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def seccomp_wanted(args: argparse.Namespace) -> bool:
    """`kvmkit run`/`restore`: filters with --seccomp or --seccomp-filter, not by default
    (docs/security.md says why), never with --no-seccomp."""
    if args.seccomp is None:
        return args.seccomp_filter is not None
    return bool(args.seccomp)


def add_seccomp_options(p: argparse.ArgumentParser) -> None:
    """`--seccomp/--no-seccomp` and `--seccomp-filter FILE` (docs/security.md)."""
    p.add_argument(
        "--seccomp", action=argparse.BooleanOptionalAction, default=None,
        help="run every VMM thread under its seccomp filter (default for now: off, on with "
        "--seccomp-filter; docs/security.md says why)",
    )  # fmt: skip
    p.add_argument(
        "--seccomp-filter", type=Path, metavar="FILE",
        help="seccomp filters from FILE (Firecracker's seccompiler JSON) instead of kvmkit's",
    )  # fmt: skip
