"""`kvmkit-firecracker`: kvmkit in place of the `firecracker` binary, for tools that launch
Firecracker themselves. It takes every option of `firecracker --help` (Firecracker 1.x,
src/firecracker/src/main.rs) with Firecracker's meaning, or accepts it and does nothing where
kvmkit has no equivalent (docs/api.md lists which), plus kvmkit's --seccomp; everything
else goes through the same
action layer as `kvmkit run --api-sock` (docs/api.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmkit import __version__
from kvmkit.errors import UserError

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_PAYLOAD = 51200  # Firecracker's HTTP_MAX_PAYLOAD_SIZE
# Firecracker's validate_instance_id: 1 to 64 characters, alphanumeric or '-'.
INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


def _level(text: str) -> str:
    """Firecracker's levels, case-insensitive."""
    for level in LEVELS:
        if text.lower() == level.lower():
            return level
    raise argparse.ArgumentTypeError(f"invalid level {text!r}: one of {', '.join(LEVELS)}")


def _u64(text: str) -> int:
    if not text.isdigit() or int(text) >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not an unsigned 64-bit integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmkit-firecracker",
        description="kvmkit with Firecracker's command line (see docs/api.md).",
    )
    p.add_argument("--api-sock", default=DEFAULT_API_SOCK, help="API socket path")
    p.add_argument("--config-file", type=Path, help="boot from this JSON configuration")
    p.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    p.add_argument("--id", default="anonymous-instance", help="microVM id")
    p.add_argument("--log-path", help="logger path (an existing file or FIFO)")
    p.add_argument("--level", type=_level, help="log level: " + ", ".join(LEVELS))
    p.add_argument("--module", help="only log records of this module")
    p.add_argument("--show-level", action="store_true", help="the level in each log line")
    p.add_argument("--show-log-origin", action="store_true", help="file:line in each log line")
    p.add_argument("--metrics-path", help="metrics path (an existing file or FIFO)")
    p.add_argument(
        "--boot-timer", action="store_true",
        help="Firecracker's boot timer device: log the boot time when the guest writes 123 "
        "to MMIO 0xd0000000",
    )  # fmt: skip
    p.add_argument("--http-api-max-payload-size", type=_u64, default=DEFAULT_PAYLOAD,
                   help="API body size limit in bytes (default 51200)")  # fmt: skip
    p.add_argument("--enable-pci", action="store_true",
                   help="virtio devices on PCI (virtio-pci with MSI-X) instead of MMIO")
    from kvmkit.cli.seccomp_options import add_seccomp_options

    add_seccomp_options(p, default=True)
    p.add_argument("--start-time-us", type=_u64, metavar="US",
                   help="process start (CLOCK_MONOTONIC, µs) as the launcher saw it: "
                   "api_server.process_startup_time_us counts from there")  # fmt: skip
    p.add_argument("--start-time-cpu-us", type=_u64, metavar="US",
                   help="process CPU time at start (µs): process_startup_time_cpu_us")
    p.add_argument("--parent-cpu-time-us", type=_u64, metavar="US",
                   help="the launcher's CPU time (µs), added to process_startup_time_cpu_us")
    p.add_argument("--mmds-size-limit", type=_u64, metavar="BYTES",
                   help="MMDS data store limit in bytes (default: the API payload limit)")
    p.add_argument("--metadata", type=Path, metavar="FILE",
                   help="MMDS contents (a JSON object), as if PUT /mmds")
    p.add_argument("--describe-snapshot", type=Path, metavar="FILE",
                   help="print the data format version of a snapshot state file and exit")
    p.add_argument("--snapshot-version", action="store_true",
                   help="print the snapshot data format version this kvmkit writes and exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from kvmkit import seccomp
    from kvmkit.cli.api_run import run_api
    from kvmkit.cli.seccomp_options import seccomp_wanted

    seccomp.start_strace()  # KVMKIT_SECCOMP_STRACE: list this process's calls (security.md)
    args = build_parser().parse_args(argv)
    prog = "kvmkit-firecracker"
    if args.version:
        print(f"kvmkit-firecracker v{__version__} (kvmkit)\n")
        return 0
    if args.snapshot_version:
        from kvmkit.snapshot.format import FORMAT_VERSION

        print(f"v{FORMAT_VERSION}")
        return 0
    try:
        if args.describe_snapshot is not None:
            print(f"v{_snapshot_format_version(args.describe_snapshot)}")
            return 0
        if not INSTANCE_ID.match(args.id):
            raise UserError(f"--id {args.id!r}: 1 to 64 characters, alphanumeric or '-'")
        if args.no_api and args.config_file is None:
            raise UserError("--no-api needs --config-file")
        filters = seccomp.cli_filters(seccomp_wanted(args, default=True), args.seccomp_filter)
        metadata = None if args.metadata is None else _check_json(args.metadata, "--metadata")
    except UserError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_status
    extra: dict[str, Any] = {}
    if args.log_path:
        logger: dict[str, Any] = {"log_path": args.log_path, "show_level": args.show_level,
                                  "show_log_origin": args.show_log_origin}  # fmt: skip
        if args.level:
            logger["level"] = args.level
        if args.module:
            logger["module"] = args.module
        extra["logger"] = logger
    if args.metrics_path:
        extra["metrics"] = {"metrics_path": args.metrics_path}
    from kvmkit.api import server

    server.MAX_BODY = max(1, args.http_api_max_payload_size)
    try:
        return run_api(
            api_sock=None if args.no_api else args.api_sock, config_file=args.config_file,
            instance_id=args.id, prog=prog, extra_config=extra or None,
            virtio_transport="pci" if args.enable_pci else "mmio", boot_timer=args.boot_timer,
            start_times=(args.start_time_us, args.start_time_cpu_us, args.parent_cpu_time_us),
            mmds_size_limit=(args.mmds_size_limit if args.mmds_size_limit is not None
                             else args.http_api_max_payload_size), mmds_data=metadata,
            firecracker_exit=True,
            seccomp_filters=filters,
        )  # fmt: skip
    except UserError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130


def _check_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{what} {path}: {err.strerror}") from None
    except ValueError as err:
        raise UserError(f"{what} {path}: not valid JSON: {err}") from None


def _snapshot_format_version(path: Path) -> int:
    """The format version in a snapshot state file's header (Firecracker's
    `--describe-snapshot` prints its own format's), checked to be a kvmkit snapshot."""
    from kvmkit.snapshot.format import HEADER, MAGIC, SnapshotError

    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER.size)
    except OSError as err:
        raise UserError(f"--describe-snapshot {path}: {err.strerror}") from None
    if len(head) < HEADER.size:
        raise SnapshotError(f"--describe-snapshot {path}: truncated (no header)")
    magic, version, _arch, _length = HEADER.unpack(head)
    if magic != MAGIC:
        raise SnapshotError(f"--describe-snapshot {path}: not a kvmkit snapshot state file")
    return int(version)


if __name__ == "__main__":
    sys.exit(main())
