"""The seccomp options shared by `kvmkit run`, `kvmkit restore` and `kvmkit-firecracker`
(docs/security.md). A module of their own, importing only argparse and pathlib, so that
`kvmkit-firecracker` can build its parser without importing `kvmkit.cli.run` (and with it the
device configurations, the probe and the VMM config: ~140 ms before the API socket listened).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def seccomp_wanted(args: argparse.Namespace, default: bool = False) -> bool:
    """--seccomp/--no-seccomp/--seccomp-filter: whether to run under filters. `default` is
    the command's own (on for kvmkit-firecracker, as in Firecracker; off for kvmkit run and
    restore, docs/security.md says why); --seccomp-filter turns them on."""
    if args.seccomp is None:
        return default or args.seccomp_filter is not None
    return bool(args.seccomp)


def add_seccomp_options(p: argparse.ArgumentParser, default: bool = False) -> None:
    """`--seccomp/--no-seccomp` and `--seccomp-filter FILE` (docs/security.md)."""
    p.add_argument(
        "--seccomp", action=argparse.BooleanOptionalAction, default=None,
        help="run every VMM thread under its seccomp filter (default: "
        + ("on" if default else "off, on with --seccomp-filter; docs/security.md says why")
        + ")",
    )  # fmt: skip
    p.add_argument(
        "--seccomp-filter", type=Path, metavar="FILE",
        help="seccomp filters from FILE (Firecracker's seccompiler JSON) instead of kvmkit's",
    )  # fmt: skip
