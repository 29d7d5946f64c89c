"""The typed state of a Machine (kvmkit.vmm.persist) checked without any VM: a payload with a
serial port and a virtio-rng on PCI round-trips through plain data, and every malformed
part, the PCI transport's and root's included, is refused by `MachineState.from_dict`
with a SnapshotError naming the field (what `kvmkit restore` prints, exit status 2)."""

from __future__ import annotations

import base64
import copy
import ctypes
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from virtio_mock import new_memory

from kvmkit.abi import structs
from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.arch.x86_64 import layout
from kvmkit.devices.irq import NoIrq
from kvmkit.devices.legacy.serial import Serial8250
from kvmkit.devices.pci.root import PciRoot
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.snapshot.core import KvmState
from kvmkit.snapshot.format import SnapshotError
from kvmkit.snapshot.vcpu_state import VcpuState
from kvmkit.snapshot.vm_state import CHIPS, IRQCHIP_SIZE, PIT_SIZE, VmState
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.console import CommandState
from kvmkit.vmm.extensions import GuestExtensions
from kvmkit.vmm.machine import SETUP, Machine
from kvmkit.vmm.persist import DeviceStates, MachineState, VirtioEntry


def blob(struct_type: type[ctypes.Structure]) -> bytes:
    return bytes(ctypes.sizeof(struct_type))


def kvm_state() -> KvmState:
    vcpu = VcpuState(
        id=0, cpuid=[], mp_state=0, regs=blob(structs.kvm_regs), sregs=blob(structs.kvm_sregs),
        xsave=bytes(4096), xcrs=blob(structs.kvm_xcrs), debugregs=blob(structs.kvm_debugregs),
        lapic=blob(structs.kvm_lapic_state), msrs=[(0x10, 5)],
        events=blob(structs.kvm_vcpu_events),
    )  # fmt: skip
    chips = [int(c).to_bytes(4, "little") + bytes(IRQCHIP_SIZE - 4) for c in CHIPS]
    return KvmState(SETUP, VmState(clock=123, pit2=bytes(PIT_SIZE), irqchips=chips), [vcpu])


@pytest.fixture
def state() -> Iterator[MachineState]:
    """The state of a one-vCPU machine with a virtio-rng on PCI, from real device objects."""
    mem = new_memory()
    rng = VirtioRng()
    root = PciRoot(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
    function = vp.VirtioPci(
        rng, mem, bar_address=root.allocate_bar(vp.BAR_SIZE), gsis=[24, 25],
        lines=[NoIrq(), NoIrq()], routing=None,
    )  # fmt: skip
    serial = Serial8250(NoIrq(), lambda data: None)
    try:
        yield MachineState(
            kvm=kvm_state(),
            config=MachineConfig(vcpus=1, mem_mib=64, command=["true"], rng=True,
                                 virtio_transport="pci"),
            drive_sizes=(), nonce="0123456789abcdef",
            command=CommandState(started=True, sent=1, buf=b"\n"),
            devices=DeviceStates(
                serial=serial.save(),
                virtio=[VirtioEntry(function.bar_address, -1, function.save(), rng.save())],
                pci_root=root.save(),
            ),
        )  # fmt: skip
    finally:
        rng.close()
        mem.close()


def payload(state: MachineState) -> dict[str, Any]:
    """What a state file or a migration stream carries: JSON."""
    data = json.loads(json.dumps(state.to_dict()))
    assert isinstance(data, dict)
    return data


def test_round_trip_through_plain_data(state: MachineState) -> None:
    assert MachineState.from_dict(payload(state)) == state


def _pci(d: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = d["devices"]["virtio"][0]["transport_state"]
    return entry


Damage = Callable[[dict[str, Any]], Any]
CASES: list[tuple[Damage, str]] = [
    # issue 19: a PCI transport state without its config data was a KeyError after the VM
    # was built
    (lambda d: _pci(d)["config"].pop("data"),
     r"devices\.virtio\[0\]\.transport_state\.config\.data is missing"),
    (lambda d: _pci(d)["config"].update(data="zz"), r"config\.data is not hex"),
    (lambda d: _pci(d)["config"].update(data="00"), r"config\.data must be 256 bytes"),
    (lambda d: _pci(d).update(version=2), "virtio-pci state version 2"),
    (lambda d: _pci(d)["msix"]["table"][0].append(0), "must be 4 u32 values"),
    (lambda d: _pci(d)["msix"]["pending"].pop(), "a bool per vector"),
    (lambda d: _pci(d)["queue_vectors"].append(0), "2 queue vectors for an MSI-X table of 2"),
    (lambda d: _pci(d).update(isr=4), r"transport_state\.isr must be an integer in \[0, 3\]"),
    (lambda d: _pci(d).update(queue_select=1 << 16), "queue_select must be an integer"),
    (lambda d: d["devices"]["virtio"][0].update(transport="mmio"), "not a pci device"),
    (lambda d: d["devices"]["pci_root"].update(address=0x8000_0001), "reserved bits"),
    (lambda d: d["devices"]["pci_root"].update(version=9), "PCI root state version 9"),
    (lambda d: d["devices"].pop("pci_root"), r"devices\.pci_root is missing"),
    (lambda d: d["devices"].pop("serial0"), r"devices\.serial0 is missing"),
    (lambda d: d["devices"]["serial0"].update(lcr=256), r"devices\.serial0\.lcr must be"),
    (lambda d: d["devices"]["virtio"][0]["device"].update(device_id=2),
     "is not the configured device"),
    (lambda d: d["devices"]["virtio"].append({}), "2 virtio devices saved, the configuration"),
    (lambda d: d["meta"]["config"].update(vcpus=2), "vCPU count does not match"),
    (lambda d: d["meta"]["command"].update(sent=2), r"meta\.command\.sent must be"),
    (lambda d: d["meta"]["config"].update(virtio_transport="isa"), "virtio_transport 'isa'"),
    (lambda d: d.update(kind="other"), "not a kvmkit-vm snapshot"),
    (lambda d: d["vcpus"][0].update(regs="AAAA"), r"vcpus\[0\]\.regs has 3 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "message"), CASES)
def test_malformed_parts_are_refused_by_name(
    state: MachineState, damage: Damage, message: str
) -> None:
    data = copy.deepcopy(payload(state))
    damage(data)
    with pytest.raises(SnapshotError, match=message):
        MachineState.from_dict(data)


def test_pci_states_written_before_they_had_a_version_load_as_version_1(
    state: MachineState,
) -> None:
    data = payload(state)
    del _pci(data)["version"]
    del data["devices"]["pci_root"]["version"]
    assert MachineState.from_dict(data) == state


def test_meta_config_keeps_the_drop_in_device_options(tmp_path: Any) -> None:
    """The state's `meta.config` (a snapshot's, and what a live migration's SETUP sends)
    brings back a drive's cache type and rate limiter, a net's MTU and limiters, the
    entropy device's limiter and the boot timer, through JSON, as the file and the
    stream carry it."""
    from kvmkit.devices.virtio.blk import CACHE_UNSAFE
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig
    from kvmkit.vmm.config import DriveConfig, NetConfig
    from kvmkit.vmm.persist import config_from_dict, config_to_dict

    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    lim = RateLimiterConfig(BucketConfig(4096, 100), BucketConfig(10, 1000, 5))
    cfg = MachineConfig(
        drives=[DriveConfig(img, False, "d", cache_type=CACHE_UNSAFE, rate_limiter=lim)],
        nets=[NetConfig("tap0", "02:00:00:00:00:01", 1400, None, lim)],
        rng=True, rng_rate_limiter=lim, boot_timer=True,
    )  # fmt: skip
    got, sizes = config_from_dict(json.loads(json.dumps(config_to_dict(cfg, (4096,)))))
    assert sizes == (4096,)
    assert (got.drives[0].cache_type, got.drives[0].rate_limiter) == (CACHE_UNSAFE, lim)
    net = got.nets[0]
    assert (net.mtu, net.rx_rate_limiter, net.tx_rate_limiter) == (1400, None, lim)
    assert got.rng and got.rng_rate_limiter == lim and got.boot_timer


# --nested and --hyperv (docs/nested.md, docs/hyperv.md): what a nested Hyper-V guest's state
# adds, and the refusals of damaged or inconsistent versions of it.
def nested_blob(flags: int = 0x101, size: int = 4224) -> bytes:
    """A KVM_GET_NESTED_STATE result as the lane's kvm_amd gives it while L2 runs: flags
    GUEST_MODE | GIF_SET, format SVM, the header's size = the blob's."""
    header = flags.to_bytes(2, "little") + (1).to_bytes(2, "little") + size.to_bytes(4, "little")
    return header + bytes(size - 8)


@pytest.fixture
def nested_state(state: MachineState) -> MachineState:
    vcpu = dataclasses.replace(state.kvm.vcpus[0], nested=nested_blob(),
                               msrs=[(0x10, 5), (0x40000083, 0x1000)])  # fmt: skip
    setup = dataclasses.replace(state.kvm.setup, nested=True, vcpu_caps=(199, 148),
                                extra_msrs=(0x40000083, 0x400000B1))  # fmt: skip
    config = dataclasses.replace(state.config, nested=True,
                                 hyperv=frozenset({"vpindex", "synic"}))  # fmt: skip
    kvm = dataclasses.replace(state.kvm, setup=setup, vcpus=[vcpu])
    return dataclasses.replace(state, kvm=kvm, config=config)


def test_nested_and_hyperv_state_round_trips(nested_state: MachineState) -> None:
    data = payload(nested_state)
    assert data["vcpus"][0]["nested_state"]["version"] == 1
    assert data["meta"]["config"]["hyperv"] == ["synic", "vpindex"]
    back = MachineState.from_dict(data)
    assert back == nested_state
    assert back.kvm.vcpus[0].nested == nested_blob()


def _nested(d: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = d["vcpus"][0]["nested_state"]
    return entry


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


NESTED_CASES: list[tuple[Damage, str]] = [
    (lambda d: _nested(d).update(version=2), r"nested_state: version 2, this kvmkit reads"),
    (lambda d: _nested(d).update(data=_b64(nested_blob(size=4096) + bytes(128))),
     "not a nested state KVM wrote"),
    (lambda d: _nested(d).update(data=_b64(nested_blob(flags=0x8000))),
     r"flags 0x8000"),
    (lambda d: _nested(d).update(data=_b64(b"\0" * 64)), "shorter than its header"),
    (lambda d: _nested(d).update(data=_b64(nested_blob(size=128 << 10))), "must be base64"),
    (lambda d: d["vcpus"][0].pop("nested_state"), "nested state must be on every vCPU"),
    (lambda d: d["setup"].update(nested=False), "nested state must be on every vCPU"),
    (lambda d: d["meta"]["config"].update(nested=False), "config.nested does not match"),
    (lambda d: d["setup"].update(vcpu_caps=[123]), r"setup\.vcpu_caps: only"),
    (lambda d: d["setup"].update(extra_msrs=[0x10]), r"setup\.extra_msrs: only Hyper-V"),
    (lambda d: d["meta"]["config"].update(hyperv=["synic"]), "synic needs vpindex"),
    (lambda d: d["meta"]["config"].update(hyperv=["warp"]), "unknown Hyper-V feature 'warp'"),
    (lambda d: d["meta"]["config"].update(hyperv=[]), "must be feature names"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "message"), NESTED_CASES)
def test_damaged_nested_and_hyperv_state_is_refused(
    nested_state: MachineState, damage: Damage, message: str
) -> None:
    data = copy.deepcopy(payload(nested_state))
    damage(data)
    with pytest.raises(SnapshotError, match=message):
        MachineState.from_dict(data)


def test_states_from_before_nested_and_hyperv_load_without_them(state: MachineState) -> None:
    data = payload(state)
    for key in ("nested", "vcpu_caps", "extra_msrs"):
        del data["setup"][key]
    for key in ("nested", "hyperv", "hyperv_kvm_leaves"):
        del data["meta"]["config"][key]
    back = MachineState.from_dict(data)
    assert back == state and not back.config.nested and back.config.hyperv is False


def test_a_machines_setup_and_config_carry_its_extensions() -> None:
    """What a snapshot and a live migration's SETUP message take from a Machine
    (`vm_setup()`, `state_config()`): the resolved --nested/--hyperv choices, so that the
    destination enables the same vCPU capabilities, saves the same extra MSRs and knows the
    vCPUs carry nested state."""
    machine = Machine(MachineConfig(nested=True, hyperv=True))
    try:
        assert machine.vm_setup() == SETUP  # not built: nothing resolved yet
        caps = (int(Cap.HYPERV_ENFORCE_CPUID), int(Cap.HYPERV_SYNIC2))
        extra = hv.extra_msrs({"synic", "stimer"})
        features = frozenset({"vpindex", "synic", "time", "stimer"})
        machine.extensions = GuestExtensions(
            nested=True, hyperv=hv.HvCpuid((), features), vcpu_caps=caps, extra_msrs=extra
        )
        setup = machine.vm_setup()
        assert (setup.nested, setup.vcpu_caps, setup.extra_msrs) == (True, caps, extra)
        assert type(SETUP).from_dict(setup.to_dict()) == setup
        config, sizes = machine.state_config()
        assert config.nested and config.hyperv == features and sizes == ()
    finally:
        machine.close()
