"""`kvmkit ctl --api-sock PATH ACTION`: a thin client of kvmkit's API (any
Firecracker-compatible socket works). GETs print the JSON answer; other actions print
nothing and exit 0 on success; a refused request prints its fault message and exits 1;
no server on the socket: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvmkit.errors import UserError

ACTIONS = {
    # name: (method, path, body)
    "info": ("GET", "/", None),
    "version": ("GET", "/version", None),
    "config": ("GET", "/vm/config", None),
    "machine-config": ("GET", "/machine-config", None),
    "start": ("PUT", "/actions", {"action_type": "InstanceStart"}),
    "pause": ("PATCH", "/vm", {"state": "Paused"}),
    "resume": ("PATCH", "/vm", {"state": "Resumed"}),
    "ctrl-alt-del": ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    "flush-metrics": ("PUT", "/actions", {"action_type": "FlushMetrics"}),
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ctl", help="control a VMM through its API socket",
        description="A thin client of kvmkit's Firecracker-compatible API (docs/api.md).",
    )  # fmt: skip
    p.add_argument("--api-sock", required=True, metavar="PATH", help="the VMM's API socket")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (method, path, _) in ACTIONS.items():
        acts.add_parser(name, help=f"{method} {path}")
    snap = acts.add_parser("snapshot", help="PUT /snapshot/create (pause the VM first)")
    snap.add_argument("--state", required=True, help="snapshot state file to write")
    snap.add_argument("--mem", required=True, help="guest-memory file to write")
    snap.add_argument("--diff", action="store_true", help="a diff snapshot")
    load = acts.add_parser("load", help="PUT /snapshot/load (before any configuration)")
    load.add_argument("--state", required=True)
    load.add_argument("--mem", required=True)
    load.add_argument("--resume", action="store_true", help="resume the VM once loaded")
    for verb in ("get", "put", "patch"):
        usage = "PATH" if verb == "get" else "PATH JSON"
        raw = acts.add_parser(verb, help=f"{verb.upper()} {usage}: any request")
        raw.add_argument("path")
        if verb != "get":
            raw.add_argument("body", help="JSON body")
    p.set_defaults(func=ctl)


def ctl(args: argparse.Namespace) -> int:
    from kvmkit.api.client import request

    action = args.action
    body: Any
    if action in ACTIONS:
        method, path, body = ACTIONS[action]
    elif action == "snapshot":
        method, path = "PUT", "/snapshot/create"
        body = {"snapshot_path": args.state, "mem_file_path": args.mem,
                "snapshot_type": "Diff" if args.diff else "Full"}  # fmt: skip
    elif action == "load":
        method, path = "PUT", "/snapshot/load"
        body = {"snapshot_path": args.state, "mem_file_path": args.mem,
                "resume_vm": args.resume}  # fmt: skip
    else:
        method, path = action.upper(), args.path
        body = None
        if action != "get":
            try:
                body = json.loads(args.body)
            except ValueError as err:
                raise UserError(f"the body is not valid JSON: {err}") from None
    try:
        status, value = request(args.api_sock, method, path, body, timeout=args.timeout)
    except OSError as err:
        raise UserError(f"--api-sock {args.api_sock}: {err.strerror or err}") from None
    if status >= 300:
        fault = value.get("fault_message") if isinstance(value, dict) else value
        print(f"kvmkit ctl {action}: {status} {fault}", file=sys.stderr)
        return 1
    if value is not None:
        print(json.dumps(value, indent=2))
    return 0
