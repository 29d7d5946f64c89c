"""`kvmkit.vmm.snapshot.Overrides`: a snapshot load's new taps and vsock socket put into a
state payload before it is checked (pure data; the API tests load real snapshots)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kvmkit.snapshot.format import SnapshotError
from kvmkit.vmm.snapshot import Overrides


def payload() -> dict[str, Any]:
    return {
        "meta": {"config": {
            "nets": [{"tap": "tap0", "iface_id": "eth0"}, {"tap": "tap1", "iface_id": "eth1"}],
            "vsock": {"cid": 3, "uds_path": "/gone/v.sock"},
        }},
        "devices": {"virtio": [
            {"device": {"device": {"tap": "tap0", "mac": "06:00:00:00:00:01"}}},
            {"device": {"device": {"tap": "tap1", "mac": "06:00:00:00:00:02"}}},
            {"device": {"device": {"cid": 3}}},
        ]},
    }  # fmt: skip


def test_taps_and_socket_are_replaced_in_config_and_device_state() -> None:
    p = payload()
    Overrides({"eth1": "clone1"}, "/tmp/c.sock").apply(p)
    cfg = p["meta"]["config"]
    assert [n["tap"] for n in cfg["nets"]] == ["tap0", "clone1"]
    assert [d["device"]["device"].get("tap") for d in p["devices"]["virtio"]] == [
        "tap0", "clone1", None]  # fmt: skip
    assert cfg["vsock"]["uds_path"] == "/tmp/c.sock"


def test_unknown_iface_or_missing_vsock_in_firecracker_words() -> None:
    with pytest.raises(SnapshotError, match=r"Unknown Network Device: .*'eth9'.*'eth0', 'eth1'"):
        Overrides({"eth9": "x"}).apply(payload())
    p = payload()
    p["meta"]["config"]["vsock"] = None
    with pytest.raises(SnapshotError, match="Unknown Vsock Device"):
        Overrides(vsock_uds="/tmp/c.sock").apply(p)
    # A state from before iface ids: no interface can be named.
    p = payload()
    for n in p["meta"]["config"]["nets"]:
        del n["iface_id"]
    with pytest.raises(SnapshotError, match=r"\(its iface ids: none\)"):
        Overrides({"eth0": "x"}).apply(p)


@pytest.mark.parametrize("bad", [{}, {"meta": []}, {"meta": {"config": 5}}])
def test_a_payload_without_a_config_is_left_for_the_state_check(bad: dict[str, Any]) -> None:
    before = copy.deepcopy(bad)
    Overrides({"eth0": "x"}, "/tmp/c.sock").apply(bad)
    assert bad == before  # MachineState.from_dict refuses it, with its own message


def test_malformed_nets_and_devices_name_no_interface() -> None:
    bad = {"meta": {"config": {"nets": [1, None, {"tap": "t"}]}}, "devices": {"virtio": 5}}
    before = copy.deepcopy(bad)
    Overrides().apply(bad)
    assert bad == before
    with pytest.raises(SnapshotError, match="Unknown Network Device"):
        Overrides({"eth0": "x"}).apply(bad)
