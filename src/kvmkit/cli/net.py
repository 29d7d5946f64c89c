"""`kvmkit net`: give a guest a network on the host side (a tap with an address).

    kvmkit net setup TAP --address 10.0.0.1/24 [--user UID]   # persistent tap, address, up
    kvmkit net teardown TAP

then `kvmkit run --net tap=TAP ...`, and in the guest `ip addr add 10.0.0.2/24 dev eth0;
ip link set eth0 up`. Run it inside `ip netns exec NS` to keep the tap in a namespace. It
uses iproute2's `ip` (root, or CAP_NET_ADMIN); `--user` lets that user's kvmkit open the tap.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
from typing import Any

from kvmkit.devices.virtio.net import NetConfig
from kvmkit.errors import UserError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "net", help="create/remove a host tap for --net",
        description="Host side of a guest network: create a persistent tap with an address "
        "(setup) or remove it (teardown). Needs root or CAP_NET_ADMIN and iproute2.",
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    setup = actions.add_parser("setup", help="create TAP, give it ADDRESS, bring it up")
    setup.add_argument("tap")
    setup.add_argument("--address", required=True, help="host side address, e.g. 10.0.0.1/24")
    setup.add_argument("--user", help="user (name or UID) allowed to open the tap")
    setup.set_defaults(func=run_setup)
    teardown = actions.add_parser("teardown", help="remove TAP")
    teardown.add_argument("tap")
    teardown.set_defaults(func=run_teardown)


def _ip(*args: str) -> None:
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)), None
    )
    if ip is None:
        raise UserError("kvmkit net: iproute2's `ip` is not installed")
    proc = subprocess.run([ip, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def guest_address(host: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    """The next address after the host's in its network: the one the guest can take."""
    net = host.network
    for candidate in net.hosts():
        if int(candidate) > int(host.ip):
            return f"{candidate}/{net.prefixlen}"
    raise UserError(f"--address {host}: no room for a guest address in {net}")


def run_setup(args: argparse.Namespace) -> int:
    try:
        NetConfig(args.tap).check()
        host = ipaddress.ip_interface(args.address)
    except ValueError as err:
        raise UserError(f"kvmkit net setup: {err}") from None
    if host.network.prefixlen == host.max_prefixlen:
        raise UserError(f"--address {args.address}: give a prefix length, e.g. /24")
    guest = guest_address(host)
    user = ["user", args.user] if args.user else []
    _ip("tuntap", "add", "dev", args.tap, "mode", "tap", "vnet_hdr", *user)
    try:
        _ip("addr", "add", str(host), "dev", args.tap)
        _ip("link", "set", args.tap, "up")
    except UserError:
        _ip("link", "del", args.tap)
        raise
    print(f"tap {args.tap}: {host}, up")
    print(f"  kvmkit run --net tap={args.tap} ...")
    print(f"  in the guest: ip addr add {guest} dev eth0; ip link set eth0 up")
    sys.stdout.flush()
    return 0


def run_teardown(args: argparse.Namespace) -> int:
    try:
        NetConfig(args.tap).check()
    except ValueError as err:
        raise UserError(f"kvmkit net teardown: {err}") from None
    _ip("link", "del", args.tap)
    return 0
