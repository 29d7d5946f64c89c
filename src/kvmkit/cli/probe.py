"""`kvmkit probe`: what this host's KVM can do."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvmkit.errors import UserError
from kvmkit.kvm import KvmError, KvmUnavailable
from kvmkit.probe import device_from_env, probe


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "probe", help="report what this host's KVM can do",
        description="Report the KVM API version, capabilities, implementation, guest speed "
        "and LAPIC timer behaviour of this host.",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default=None, help="KVM device (default /dev/kvm or $KVMKIT_DEVICE)")
    p.add_argument("--no-speed", action="store_true", help="skip the guest speed measurement")
    p.set_defaults(func=run)


def _fmt_ips(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value / 1e6:,.1f} M instructions/s"


def run(args: argparse.Namespace) -> int:
    device = args.device or device_from_env()
    try:
        result = probe(device, measure=not args.no_speed)
    except KvmUnavailable as err:
        raise UserError(str(err.strerror)) from None
    except KvmError as err:
        raise UserError(
            f"{device} opened but {err}: another hypervisor may hold the virtualization "
            "extensions, or the process is out of memory/locked-memory limit"
        ) from None
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    rows = [
        ("device", result.device),
        ("host kernel", result.kernel),
        ("KVM API version", str(result.api_version)),
        ("implementation", f"{result.implementation} ({result.implementation_reason})"),
        ("unmodified Linux guests", "yes" if result.linux_guests else
            "no (use `kvmkit lane` to run them under emulated AMD-V)"),
        ("nested virtualization", "yes (`kvmkit run --nested`)" if result.nested else
            f"no ({result.nested_reason})"),
        ("Hyper-V enlightenments", ", ".join(result.hyperv_features) if result.hyperv_features
            else f"none ({result.hyperv_reason or 'no feature kvmkit knows'})"),
        ("guest speed CPL0", _fmt_ips(result.cpl0_ips)),
        ("guest speed CPL3", _fmt_ips(result.cpl3_ips)),
        ("KVM_GET_LAPIC live TMCCT", _yes_no(result.lapic_tmcct_live)),
        ("expired one-shot keeps TMICT", _yes_no(result.lapic_expired_oneshot_keeps_tmict)),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\ncapabilities:")
    cap_width = max(len(k) for k in result.capabilities)
    for name, cap_value in result.capabilities.items():
        print(f"  {name:<{cap_width}}  {cap_value}")
    for what, problem in result.errors.items():
        print(f"warning: {what} check failed: {problem}", file=sys.stderr)
    return 0


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")
