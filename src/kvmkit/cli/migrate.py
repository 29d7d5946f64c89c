"""`kvmkit migrate --api-sock SOCK --to unix:PATH|tcp:HOST:PORT`: ask a running VMM (`kvmkit
run --api-sock`, `kvmkit restore ... --api-sock`) to live-migrate its guest to a `kvmkit
restore --incoming` listening at the address.

One line of progress per pre-copy round (and every few seconds in a long round): the round,
pages sent, pages still dirty, the guest's dirty rate and the downtime expected if the
guest stopped now; then where the downtime went, and last one line with `downtime N ms`
and the total time. Exit status 0:
the guest runs at the destination and the VMM behind SOCK has ended; 1: the migration failed
(the reason is printed, the guest runs on in that VMM); 2: bad arguments or no VMM on SOCK.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from typing import Any

from kvmkit.errors import UserError

POLL = 0.25  # seconds between GET /migration
QUIET = 2.0  # a progress line at least this often while a round runs


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "migrate", help="live-migrate a running microVM to another kvmkit",
        description="Live-migrate the guest of the VMM serving --api-sock to a `kvmkit "
        "restore --incoming` listening at --to (docs/migration.md).",
    )  # fmt: skip
    p.add_argument("--api-sock", required=True, metavar="PATH", help="the source VMM's API socket")
    p.add_argument("--to", required=True, metavar="URL",
                   help="the destination: unix:PATH or tcp:HOST:PORT")  # fmt: skip
    p.add_argument("--max-downtime-ms", type=int, default=None, metavar="N",
                   help="stop pre-copy once the rest would take N ms (default 300)")  # fmt: skip
    p.add_argument("--bandwidth-mib-s", type=float, default=None, metavar="N",
                   help="cap the stream at N MiB/s (default: no cap)")  # fmt: skip
    p.set_defaults(func=migrate)


def _line(info: dict[str, Any]) -> str:
    return (
        f"round {info.get('round', 0)}: {info.get('pages_sent', 0)} pages sent "
        f"({info.get('bytes_sent', 0) / 2**20:.1f} MiB), {info.get('dirty_pages', 0)} dirty, "
        f"dirty rate {info.get('dirty_rate_mib_s', 0.0):.1f} MiB/s, "
        f"expected downtime {info.get('expected_downtime_ms', 0.0):.0f} ms"
    )


def _show(info: dict[str, Any], printed: int) -> int:
    """Print the rounds of `info["history"]` not printed yet; how many are printed now."""
    history = info.get("history")
    if not isinstance(history, list):
        return printed
    for entry in history[printed:]:
        if isinstance(entry, dict):
            print(f"kvmkit migrate: {_line(entry)}", flush=True)
    return max(printed, len(history))


def migrate(args: argparse.Namespace) -> int:
    from kvmkit.api.client import request
    from kvmkit.migration.stream import parse_address

    parse_address(args.to)  # a malformed address: one line, exit status 2, nothing asked
    body: dict[str, Any] = {"destination_url": args.to}
    if args.max_downtime_ms is not None:
        body["max_downtime_ms"] = args.max_downtime_ms
    if args.bandwidth_mib_s is not None:
        body["bandwidth_mib_s"] = args.bandwidth_mib_s
    try:
        status, info = request(args.api_sock, "GET", "/", timeout=10)
    except OSError as err:
        raise UserError(f"--api-sock {args.api_sock}: {err.strerror or err}") from None
    answer: dict[str, Any] = {}

    def put() -> None:
        try:
            answer["reply"] = request(args.api_sock, "PUT", "/migration", body, timeout=None)
        except (OSError, http.client.HTTPException) as err:
            answer["error"] = err

    worker = threading.Thread(target=put, name="migrate-put", daemon=True)
    worker.start()
    printed = 0  # rounds of the history shown so far
    shown = time.monotonic()
    while worker.is_alive():
        worker.join(POLL)
        try:
            status, info = request(args.api_sock, "GET", "/migration", timeout=10)
        except (OSError, http.client.HTTPException):
            # The source VMM ends as the migration completes, possibly halfway through this
            # answer (IncompleteRead): the PUT's answer says how it went.
            continue
        if status != 200 or not isinstance(info, dict):
            continue
        now = time.monotonic()
        before, printed = printed, _show(info, printed)
        if printed > before:
            shown = now
        elif info.get("state") in ("precopy", "stop-and-copy") and now - shown >= QUIET:
            print(f"kvmkit migrate: {_line(info)} ({info['state']})", flush=True)  # a long round
            shown = now
    if "error" in answer:
        print(f"kvmkit migrate: failed: the VMM did not answer: {answer['error']}",
              file=sys.stderr)  # fmt: skip
        return 1
    status, value = answer["reply"]
    if status != 200 or not isinstance(value, dict):
        fault = value.get("fault_message") if isinstance(value, dict) else value
        print(f"kvmkit migrate: {fault}", file=sys.stderr)
        return 1
    _show(value, printed)
    how = "" if value.get("converged", True) else \
        f", stop-and-copy forced: {value.get('stop_reason', 'round limit')}"
    phases = value.get("downtime_phases_ms")
    if isinstance(phases, dict) and phases:
        print("kvmkit migrate: where the downtime went: " + ", ".join(
            f"{k} {v:.0f} ms" for k, v in phases.items()))  # fmt: skip
    # The last line: the outcome (the "ends with one line containing downtime N ms").
    print(
        f"kvmkit migrate: migrated to {args.to}: downtime {value['downtime_ms']:.0f} ms, "
        f"total {value['total_s']:.2f} s ({value['rounds']} rounds, {value['pages_sent']} "
        f"pages, {value['bytes_sent'] / 2**20:.1f} MiB sent{how})",
        flush=True,
    )
    return 0
