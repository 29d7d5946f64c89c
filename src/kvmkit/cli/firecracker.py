"""`kvmkit-firecracker`: kvmkit in place of the `firecracker` binary, for tools that launch
Firecracker themselves. Accepts Firecracker's main options (--api-sock, --config-file,
--no-api, --id, --log-path, --level, --show-level, --show-log-origin, --module,
--metrics-path, --boot-timer, --http-api-max-payload-size, --no-seccomp,
--seccomp-filter, and kvmkit's --seccomp); everything else goes through
the same action layer as `kvmkit run --api-sock` (docs/api.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmkit import __version__
from kvmkit.errors import UserError

DEFAULT_API_SOCK = "/run/firecracker.socket"


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
    p.add_argument("--level", help="log level: Error, Warning, Info, Debug, Trace, Off")
    p.add_argument("--module", help="only log records of this module")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--metrics-path", help="metrics path (an existing file or FIFO)")
    p.add_argument("--boot-timer", action="store_true", help="accepted, no effect")
    p.add_argument("--http-api-max-payload-size", type=int, help="API body size limit")
    p.add_argument(
        "--seccomp", action=argparse.BooleanOptionalAction, default=None,
        help="run every thread under its seccomp filter (kvmkit's default for now: off, "
        "on with --seccomp-filter; docs/security.md says why)",
    )  # fmt: skip
    p.add_argument(
        "--seccomp-filter", type=Path, metavar="FILE",
        help="seccomp filters from FILE, in Firecracker's seccompiler JSON (docs/security.md)",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"kvmkit-firecracker {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from kvmkit import seccomp
    from kvmkit.cli.api_run import run_api
    from kvmkit.cli.run import seccomp_wanted

    trace = seccomp.strace_argv()
    if trace is not None:  # KVMKIT_SECCOMP_STRACE: list this process's calls (security.md)
        os.execvp(trace[0], trace)
    args = build_parser().parse_args(argv)
    try:
        filters = seccomp.cli_filters(seccomp_wanted(args), args.seccomp_filter)
    except UserError as err:
        print(f"kvmkit-firecracker: {err}", file=sys.stderr)
        return err.exit_status
    if args.no_api and args.config_file is None:
        print("kvmkit-firecracker: --no-api needs --config-file", file=sys.stderr)
        return 2
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
    if args.http_api_max_payload_size is not None:
        from kvmkit.api import server

        server.MAX_BODY = max(1, args.http_api_max_payload_size)
    try:
        return run_api(
            api_sock=None if args.no_api else args.api_sock, config_file=args.config_file,
            instance_id=args.id, prog="kvmkit-firecracker", extra_config=extra or None,
            seccomp_filters=filters,
        )  # fmt: skip
    except UserError as err:
        print(f"kvmkit-firecracker: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
