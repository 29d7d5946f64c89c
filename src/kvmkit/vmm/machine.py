"""A Linux microVM: built from a `MachineConfig`, run by one thread per vCPU.

    with Machine(MachineConfig(vcpus=2, command=["uname", "-r"])) as m:
        m.start()
        result = m.wait()
        print(result.exit_status, m.console.tail())

Building follows the order KVM requires: VM (KVM_CAP_X2APIC_API when an APIC ID is above
254), TSS/identity-map addresses, in-kernel irqchip and PIT, memory slots (guest RAM placed
by kvmkit.vmm.placement), guest tables (kernel, boot params, ACPI, MP table where it fits),
devices and their irqfds, then vCPUs, each with its APIC ID as its id (kvmkit.vmm.cpus;
docs/topology.md): CPUID before anything else on the vCPU, then MSRs, LAPIC LINT pins, FPU,
and the boot registers on vCPU 0; the others wait for INIT/SIPI in the in-kernel LAPIC.

The operations state transfer is built on (snapshots: kvmkit.vmm.snapshot; live migration:
kvmkit.migration):

    m.pause()                  every vCPU held outside KVM_RUN, the virtio workers parked
    state = m.capture_state()  a kvmkit.vmm.persist.MachineState (no guest memory)
    m.resume()
    m2 = Machine.from_state(state, memory)   memory: a GuestMemory from any source
    m2.start()                 (start(paused=True): built and held, for a later resume())
    m.migrate("unix:/tmp/m")   live migration (kvmkit.migration), the same state over a socket

Each vCPU thread owns its run state (kvmkit.vmm.runstate): pause and resume are events on
it, as are the GDB stub's stops.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kvmkit.abi.constants import KVM_PIT_SPEAKER_DUMMY, Cap
from kvmkit.arch.x86_64 import layout, mptable
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.arch.x86_64.acpi import write_acpi_tables
from kvmkit.arch.x86_64.cpuid import guest_cpuid
from kvmkit.arch.x86_64.hyperv import HV_X64_MSR_VP_INDEX
from kvmkit.arch.x86_64.msrs import boot_msrs
from kvmkit.arch.x86_64.numa import numa_tables
from kvmkit.boot.loader import load_linux, setup_boot_vcpu
from kvmkit.devices.boot_timer import LENGTH as BOOT_TIMER_LENGTH
from kvmkit.devices.boot_timer import BootTimer
from kvmkit.devices.bus import Bus
from kvmkit.devices.irq import EventFdIrq
from kvmkit.devices.legacy.i8042 import I8042
from kvmkit.devices.legacy.power import AcpiPower
from kvmkit.devices.legacy.rtc import CmosRtc
from kvmkit.devices.legacy.serial import Serial8250
from kvmkit.devices.virtio.balloon import VirtioBalloon
from kvmkit.devices.virtio.blk import VirtioBlk
from kvmkit.devices.virtio.device import VirtioDevice
from kvmkit.devices.virtio.mmio import MmioTransportState, VirtioMmio
from kvmkit.devices.virtio.mmio import cmdline_entry as virtio_cmdline_entry
from kvmkit.devices.virtio.net import NetConfig, VirtioNet, format_mac, parse_mac
from kvmkit.devices.virtio.pci import PciTransportState, VirtioPci
from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.vsock import VirtioVsock
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, KvmError, Vcpu, Vm
from kvmkit.kvm.coalesced import CoalescedRing, RingDrainer
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.core import VmSetup, build_vm, capture_kvm_state
from kvmkit.snapshot.format import SnapshotError
from kvmkit.snapshot.vcpu_state import enable_vcpu_caps, resume_vcpu, saveable_msrs
from kvmkit.threads import ThreadKind, start_thread
from kvmkit.unixsock import remove_stale_socket
from kvmkit.vmm import cpus
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.console import CommandOutput, ConsoleStream, new_nonce
from kvmkit.vmm.dispatch import StopKind, Stopped
from kvmkit.vmm.extensions import GuestExtensions, resolve
from kvmkit.vmm.pci import MachinePci
from kvmkit.vmm.persist import DeviceStates, MachineState, VirtioEntry
from kvmkit.vmm.placement import add_guest_ram
from kvmkit.vmm.runstate import Event, RunState
from kvmkit.vmm.vcpu import VcpuThread
from kvmkit.vmm.vfio import MachineVfio

if TYPE_CHECKING:
    from kvmkit.migration.send import MigrationProgress, MigrationResult

log = logging.getLogger(__name__)

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
KEYBOARD_IRQ = 1
# kvmkit's default kernel options (docs/api.md "The kernel command line"): the console on
# the 8250, reboot through the i8042 reset line (which kvmkit turns into "the guest
# rebooted"), reboot at once on panic, and no probing of a PS/2 controller kvmkit does not
# fully emulate (Firecracker's choices). `--cmdline`/`boot_args` replace them for a kernel
# the user gives, as Firecracker's boot_args replaces its default.
BASE_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 pci=off "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)
PANIC_MARKER = b"Kernel panic - not syncing"
# After the command reported its status the init powers off; if that takes longer than
# this, the VM is stopped anyway (the status is already known).
POWEROFF_GRACE = 10.0
VFIO_NO_SNAPSHOT = (
    "a machine with passthrough devices (--vfio) cannot be snapshotted or migrated: their "
    "state is in the hardware, not in kvmkit"
)
# How long close() waits for the VM's threads in all before leaving stuck ones behind.
CLOSE_TIMEOUT = 10.0
PAUSE_TIMEOUT = 10.0
DEFAULT_MAX_DOWNTIME_MS = 300  # QEMU's default downtime limit (migrate_set_parameter)
# How `build` creates the VM (and a restore recreates it): Intel needs three pages for
# real-mode emulation and an identity-map page below 4 GiB, outside RAM and device windows
# (KVM API doc, KVM_SET_TSS_ADDR); the in-kernel irqchip and PIT, the PIT with KVM's stub of
# the speaker port 0x61 (KVM_PIT_SPEAKER_DUMMY: arch/x86/kvm/i8254.c registers it in-kernel).
SETUP = VmSetup(
    irqchip=True, pit=True, pit_flags=KVM_PIT_SPEAKER_DUMMY,
    tss_addr=0xFFFB_D000, identity_map_addr=0xFFFB_C000,
)  # fmt: skip


class EndReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    PANIC = "panic"
    TRIPLE_FAULT = "triple-fault"
    ERROR = "error"
    STOPPED = "stopped"
    MIGRATED = "migrated"


# `kvmkit run` exit statuses when no command status is available (documented in the README).
EXIT_STATUS = {
    EndReason.POWEROFF: 0,
    EndReason.REBOOT: 3,
    EndReason.PANIC: 4,
    EndReason.TRIPLE_FAULT: 5,
    EndReason.ERROR: 6,
    EndReason.STOPPED: 130,
    EndReason.MIGRATED: 0,
}
MESSAGES = {
    EndReason.POWEROFF: "the guest powered off",
    EndReason.REBOOT: "the guest rebooted",
    EndReason.PANIC: "the guest kernel panicked",
    EndReason.TRIPLE_FAULT: "the guest triple-faulted (CPU reset)",
    EndReason.ERROR: "the VM stopped on an error",
    EndReason.STOPPED: "the VM was stopped",
    EndReason.MIGRATED: "the guest migrated away",
}


@dataclass
class MachineResult:
    reason: EndReason
    command_status: int | None
    detail: str = ""

    @property
    def exit_status(self) -> int:
        if self.command_status is not None:
            return self.command_status
        return EXIT_STATUS[self.reason]

    @property
    def message(self) -> str:
        text = MESSAGES[self.reason]
        return f"{text}: {self.detail}" if self.detail else text


def _limits(config: RateLimiterConfig) -> RateLimiterConfig | None:
    return config if config.limits else None


def _disk_name(index: int) -> str:
    """Linux's name for the `index`th virtio-blk disk: vda..vdz, then vdaa, vdab, ... (the
    base-26 scheme of drivers/block/virtio_blk.c, the same as sd's)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("a") + rem) + name
    return f"vd{name}"


def _cmdline_quote(argv: list[str]) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(argv).encode()).decode().rstrip("=")


class Machine:
    def __init__(
        self,
        config: MachineConfig,
        *,
        command_output: Callable[[bytes], None] | None = None,
        kvm_device: str = "/dev/kvm",
    ) -> None:
        self.config = config
        self.console = ConsoleStream()
        self.nonce = new_nonce()
        self._command_output = command_output
        self._kvm_device = kvm_device
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.mem = GuestMemory()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.threads: list[VcpuThread] = []
        self._irqs: list[EventFdIrq] = []
        self._result: MachineResult | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.command: CommandOutput | None = None
        self.serial: Serial8250 | None = None
        self.ring: RingDrainer | None = None  # the coalesced PIO ring, when KVM has one
        self._coalesced_ports: list[tuple[int, int]] = []
        self.i8042: I8042 | None = None
        self.boot_timer: BootTimer | None = None
        self.started_at = 0.0
        # (base, irq, device); over PCI: (BAR address, -1: MSI-X, device)
        self.virtio: list[tuple[int, int, VirtioDevice]] = []
        self.virtio_transports: list[VirtioMmio | VirtioPci] = []  # in the order of self.virtio
        self.pci: MachinePci | None = None  # the PCI bus: virtio_transport="pci" or vfio
        self.vfio: MachineVfio | None = None  # passthrough devices (config.vfio)
        # The virtio queue workers (devices/virtio/worker.py); pause parks them.
        self._virtio_workers: VirtioWorkers | None = None
        self._restored = False  # built by from_state: KVM_KVMCLOCK_CTRL before the vCPUs run
        self.x2apic_api = 0  # KVM_CAP_X2APIC_API flags enabled (APIC IDs above 254)
        # --nested and --hyperv as resolved against the host (kvmkit.vmm.extensions)
        self.extensions = GuestExtensions()
        self.rebuild_ms: dict[str, float] = {}  # from_state's steps, in milliseconds
        # The MSRs a state of this machine holds, found before any vCPU runs (the vCPUs
        # would hold their mutex in KVM_RUN): saves the probing from a migration's downtime.
        self._msr_indices: list[int] | None = None

    # -- life cycle
    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything and release it, in bounded time (CLOSE_TIMEOUT for the threads
        in all): a thread that does not stop (a vCPU or worker stuck in the kernel, a
        console reader that never reads) is left behind as a daemon thread, and what it may
        still touch (guest memory, the vCPU mappings, device fds) is not unmapped or closed
        under it; the process is about to end anyway."""
        self.stop()
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [f"vcpu{t.vcpu.id}" for t in self.threads if t.thread.is_alive()]
        if self.ring is not None:
            if self.ring.stop(max(0.0, deadline - time.monotonic())):
                self.ring.ring.release()
            else:
                stuck.append("coalesced-drain")
            self.ring = None
        if (workers := self._virtio_workers) is not None:
            if not workers.stop(max(0.0, deadline - time.monotonic())):
                stuck.extend(f"virtio worker {name}" for name in workers.not_parked())
            workers.close()
        self.console.close(max(0.0, deadline - time.monotonic()))
        if stuck:
            # A stuck vCPU thread may still serve a trapped BAR access through a passthrough
            # device's fd: those stay open too (the process's exit releases them).
            log.warning("closing the VM with %s still running: its memory stays mapped",
                        ", ".join(stuck))  # fmt: skip
            return
        if self.vfio is not None:  # before the VM: its slots and irqfds go first
            self.vfio.close()
            self.vfio = None
        if self.vm is not None:
            self.vm.close()
        for _, _, dev in self.virtio:
            dev.close()
        for irq in self._irqs:
            irq.close()
        if self.pci is not None:
            self.pci.close()
        self.mem.close()
        if self.kvm is not None:
            self.kvm.close()

    # -- building
    def kernel_and_initrd(self) -> tuple[Path, Path | None, str]:
        """The kernel, initrd and command line to boot (the default image when none given).

        The command line (docs/api.md "The kernel command line") is the base, then what
        describes the devices kvmkit built, then kvmkit's console protocol:
        - base: for a kernel the user gives, `cmdline` (`--cmdline`, `boot_args`) when set,
          replacing kvmkit's defaults (BASE_CMDLINE), as Firecracker's boot_args replaces
          its default; for the default image, kvmkit's defaults and `quiet` (its init relies
          on them) with `cmdline` after them;
        - devices, always (Firecracker adds them to boot_args too): the root drive's `root=`
          and `ro`/`rw`, and a `virtio_mmio.device=` per virtio-mmio device;
        - `kvmkit.nonce=` and `kvmkit.cmd=` when a command runs (and the nonce whenever the
          default image boots)."""
        cfg = self.config
        if cfg.kernel is not None:
            kernel, initrd = cfg.kernel, cfg.initrd
            parts = [cfg.cmdline if cfg.cmdline is not None else self.base_cmdline()]
        else:
            from kvmkit.image.guest import default_image

            image = default_image()
            kernel, initrd = image.kernel, image.initrd
            parts = [f"{self.base_cmdline()} quiet"]
            if cfg.cmdline:
                parts.append(cfg.cmdline)
        parts += self.device_cmdline()
        if cfg.command or cfg.kernel is None:
            parts.append(f"kvmkit.nonce={self.nonce}")
        if cfg.command:
            parts.append(f"kvmkit.cmd={_cmdline_quote(cfg.command)}")
        if cfg.extra_cmdline:
            parts.append(cfg.extra_cmdline)
        return kernel, initrd, " ".join(p for p in parts if p)

    def device_cmdline(self) -> list[str]:
        """The parameters that describe the devices kvmkit built (see kernel_and_initrd)."""
        out = []
        for i, drive in enumerate(self.config.drives):
            if drive.root:
                # Firecracker's root device: root=PARTUUID= when a partuuid is given, else
                # the drive's own name; virtio-blk names disks vda, vdb, ... in probe order,
                # which is the drives' order on both transports.
                if drive.partuuid:
                    out.append(f"root=PARTUUID={drive.partuuid}")
                else:
                    out.append(f"root=/dev/{_disk_name(i)}")
                out.append("ro" if drive.read_only else "rw")
        # Kernels built the Firecracker way find virtio-mmio devices on the command line
        # (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); others from the ACPI DSDT.
        out += [virtio_cmdline_entry(base, irq) for base, irq in self.virtio_slots()]
        return out

    def uses_pci(self) -> bool:
        """virtio devices over PCI or passthrough devices: the guest needs its PCI bus (no
        `pci=off`)."""
        cfg = self.config
        return (cfg.virtio_transport == "pci" and cfg.virtio_count > 0) or bool(cfg.vfio)

    def base_cmdline(self) -> str:
        return BASE_CMDLINE.replace(" pci=off", "") if self.uses_pci() else BASE_CMDLINE

    def build(self) -> None:
        cfg = self.config
        install_kick_handler()
        kernel, initrd, cmdline = self.kernel_and_initrd()
        try:
            self.kvm = kvm = Kvm(self._kvm_device)
        except OSError as err:
            raise UserError(str(err.strerror or err)) from None
        cfg.validate(cpus.host_limits(kvm))
        supported = kvm.supported_cpuid()
        self.extensions = ext = resolve(cfg, kvm, supported)  # refuses what the host lacks
        topology = cfg.cpu_topology
        apic_ids = topology.apic_ids()
        try:
            self.vm = vm = kvm.create_vm()
        except KvmError as err:
            raise UserError(f"cannot create a VM: {err}") from None
        self.x2apic_api = cpus.prepare_vm(vm, topology)  # before any vCPU exists
        assert SETUP.identity_map_addr is not None
        vm.set_tss_addr(SETUP.tss_addr)
        vm.set_identity_map_addr(SETUP.identity_map_addr)
        vm.create_irqchip()
        vm.create_pit2(SETUP.pit_flags)

        mem_size = cfg.mem_mib << 20
        add_guest_ram(self.mem, cfg)
        self.mem.register(vm)

        rsdp = write_acpi_tables(
            self.mem, apic_ids, pm_port=AcpiPower.PM1_EVT_PORT,
            reset_port=AcpiPower.RESET_PORT,
            virtio_mmio=[(b, layout.VIRTIO_MMIO_SIZE, irq) for b, irq in self.virtio_slots()],
            pci_window=(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE) if self.uses_pci() else None,
            pci_io_window=(layout.PCI_IO_BASE, layout.PCI_IO_SIZE) if cfg.vfio else None,
            pci_intx=bool(cfg.vfio),
            numa=numa_tables(cfg.numa, cfg.vcpus, mem_size) if cfg.numa else None,
        )  # fmt: skip
        # The MP table where it can describe the machine (8-bit APIC IDs, up to 40 vCPUs);
        # Linux takes the MADT when there is ACPI, so larger machines lose nothing.
        why_not = mptable.describes(apic_ids)
        if why_not is None:
            mptable.write_mptable(self.mem, apic_ids)
        else:
            log.debug("no MP table: %s", why_not)
        self.boot = load_linux(
            self.mem, kernel, initrd=initrd, cmdline=cmdline, mem_size=mem_size, rsdp_addr=rsdp
        )

        self._add_devices(vm)
        # KVM emulates the TSC-deadline timer but reports it through a capability, not in
        # KVM_GET_SUPPORTED_CPUID (KVM API doc). Without it Linux calibrates the LAPIC timer
        # against the PIT, which fails under nested emulation ("APIC timer disabled due to
        # verification failure") and leaves the guest without a working tick.
        tsc_deadline = kvm.check_extension(Cap.TSC_DEADLINE_TIMER) > 0
        msrs = boot_msrs()
        for index in range(cfg.vcpus):
            vcpu = cpus.create_vcpu(vm, topology, index)
            cpuid = guest_cpuid(supported, topology, index, tsc_deadline=tsc_deadline,
                                nested=ext.nested, hyperv=ext.hyperv)  # fmt: skip
            vcpu.set_cpuid2(cpuid)
            enable_vcpu_caps(vcpu, ext.vcpu_caps)  # after CPUID, before any Hyper-V MSR
            vcpu.set_msrs(msrs)
            if "vpindex" in ext.hyperv_features:
                # VP index = vCPU index, the number Linux gives the CPU (KVM's default is
                # the creation order, the same here; set it so it does not depend on that).
                vcpu.set_msrs([(HV_X64_MSR_VP_INDEX, index)])
            self._setup_lapic(vcpu)
            self._setup_fpu(vcpu)
            if index == 0:
                setup_boot_vcpu(vcpu, self.boot, self.mem)
            self.threads.append(VcpuThread(vcpu, self.pio, self.mmio, self._on_vcpu_stopped))
        self._msr_indices = saveable_msrs(kvm, self.threads[0].vcpu, self.extensions.extra_msrs)

    def _add_devices(self, vm: Vm) -> None:
        serial_irq = EventFdIrq(SERIAL_IRQ)
        self._irqs.append(serial_irq)
        vm.irqfd(serial_irq.fd, serial_irq.gsi)
        self.serial = Serial8250(serial_irq, self.console.feed, fifo64=self.config.serial_fifo64,
                                 tx_ready=self.console.has_room)  # fmt: skip
        self.console.on_room = self.serial.tx_space
        self.pio.insert(self.serial, SERIAL_PORT, 8, "serial0")
        if self.config.coalesce_serial and vm.check_extension(Cap.COALESCED_PIO) > 0:
            # THR writes queue in KVM's ring instead of exiting one by one: with nested
            # virtualization each exit costs about a millisecond (see kvm/coalesced.py).
            vm.register_coalesced_mmio(SERIAL_PORT, 1, pio=True)
            self._coalesced_ports.append((SERIAL_PORT, 1))
        kbd_irq = EventFdIrq(KEYBOARD_IRQ)
        self._irqs.append(kbd_irq)
        vm.irqfd(kbd_irq.fd, kbd_irq.gsi)
        self.i8042 = i8042 = I8042(
            on_reset=lambda: self._finish(EndReason.REBOOT, "i8042 reset"), irq=kbd_irq.trigger
        )
        self.pio.insert(i8042, I8042.BASE, I8042.LENGTH, "i8042")
        self.pio.insert(CmosRtc(), CmosRtc.BASE, CmosRtc.LENGTH, "rtc")
        power = AcpiPower(
            on_poweroff=lambda: self._finish(EndReason.POWEROFF),
            on_reset=lambda: self._finish(EndReason.REBOOT, "ACPI reset"),
        )
        self.pio.insert(power, AcpiPower.BASE, AcpiPower.LENGTH, "acpi-power")
        if self.config.boot_timer:
            self.boot_timer = BootTimer()
            self.mmio.insert(self.boot_timer, layout.BOOT_TIMER_ADDR, BOOT_TIMER_LENGTH,
                             "boot-timer")  # fmt: skip
        self._add_virtio(vm)
        if self.config.vfio:
            self.vfio = MachineVfio(self.config.vfio, self.mem, self._pci_bus(vm))
            self.vfio.open()

    def _pci_bus(self, vm: Vm) -> MachinePci:
        if self.pci is None:
            self.pci = MachinePci(vm, self.mem, self.pio, self.mmio,
                                  io_window=bool(self.config.vfio))  # fmt: skip
        return self.pci

    def virtio_slots(self) -> list[tuple[int, int]]:
        """(MMIO base, IRQ) of each virtio-mmio device, in order: drives, the rng, nets, vsock,
        the balloon."""
        c = self.config
        if c.virtio_transport != "mmio":
            return []
        first = int(c.boot_timer)  # the boot timer has the first page (layout.BOOT_TIMER_ADDR)
        return [
            (layout.VIRTIO_MMIO_BASE + (first + i) * layout.VIRTIO_MMIO_SIZE,
             layout.VIRTIO_MMIO_IRQS[i])
            for i in range(c.virtio_count)
        ]  # fmt: skip

    def _add_virtio(self, vm: Vm) -> None:
        devices: list[VirtioDevice] = []
        what = ""
        try:
            for i, d in enumerate(self.config.drives):
                what = f"--drive {d.path}"
                devices.append(VirtioBlk(
                    d.path, read_only=d.read_only, serial=d.serial, name=_disk_name(i),
                    cache_type=d.cache_type, rate_limiter=d.rate_limiter,
                ))  # fmt: skip
            if self.config.rng:
                devices.append(VirtioRng(rate_limiter=self.config.rng_rate_limiter))
            for i, n in enumerate(self.config.nets):
                what = f"--net tap={n.tap}"
                mac = parse_mac(n.mac) if n.mac else None
                devices.append(VirtioNet(
                    n.tap, mac, name=f"eth{i}", mtu=n.mtu, rx_rate_limiter=n.rx_rate_limiter,
                    tx_rate_limiter=n.tx_rate_limiter, mmds=n.mmds,
                ))  # fmt: skip
            if (vsock := self.config.vsock) is not None:
                what = f"--vsock uds={vsock.uds_path}"
                devices.append(VirtioVsock(vsock.cid, vsock.uds_path))
            if (balloon := self.config.balloon) is not None:
                devices.append(VirtioBalloon(balloon.amount_mib, balloon.deflate_on_oom,
                                             balloon.stats_polling_interval_s))  # fmt: skip
        except OSError as err:  # no /dev/net/tun, no permission, a busy tap, a stale socket
            for dev in devices:
                dev.close()
            raise UserError(f"{what}: {err}") from None
        if not devices:
            return
        self._virtio_workers = worker = VirtioWorkers()
        if self.config.virtio_transport == "pci":
            pci = self._pci_bus(vm)
            for dev in devices:
                function = pci.add_virtio(dev)
                worker.add(dev)
                self.virtio.append((function.bar_address, -1, dev))
                self.virtio_transports.append(function)
            return
        for (base, irq_no), dev in zip(self.virtio_slots(), devices, strict=True):
            irq = EventFdIrq(irq_no)
            self._irqs.append(irq)
            vm.irqfd(irq.fd, irq.gsi)
            transport = VirtioMmio(dev, self.mem, irq)
            transport.attach(vm, base)
            self.mmio.insert(transport, base, layout.VIRTIO_MMIO_SIZE, f"virtio-{dev.name}")
            worker.add(dev)
            self.virtio.append((base, irq_no, dev))
            self.virtio_transports.append(transport)

    @staticmethod
    def _setup_lapic(vcpu: Vcpu) -> None:
        # LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as the MP spec's virtual
        # wire mode has them at reset on a PC (MP spec 1.4, 3.6.2.2; Firecracker set_lint).
        lapic = vcpu.get_lapic()
        lapic.set_reg(x86.APIC_LVT0, 0x700)
        lapic.set_reg(x86.APIC_LVT1, 0x400)
        vcpu.set_lapic(lapic)

    @staticmethod
    def _setup_fpu(vcpu: Vcpu) -> None:
        fpu = vcpu.get_fpu()
        fpu.fcw = 0x37F  # x87 reset value (SDM vol. 1 8.1.5)
        fpu.mxcsr = 0x1F80  # SSE reset value (SDM vol. 1 10.2.3)
        vcpu.set_fpu(fpu)

    # -- running
    def start(self, *, paused: bool = False) -> None:
        """Build the VM if needed and start the vCPU threads; with `paused` each vCPU is held
        before its first instruction (a restored machine loaded paused) until `resume()`."""
        if self.vm is None:
            self.build()
        if self.config.command:
            if self.command is None:  # a restored machine brings its own (from_state)
                sink = self._command_output or (lambda data: None)
                self.command = CommandOutput(self.nonce, sink)
            self.console.add_listener(self.command.feed)
            start_thread(ThreadKind.WATCH, "command", self._watch_command)
        self._attach_ring()
        self.started_at = time.monotonic()
        if self._virtio_workers is not None:
            self._virtio_workers.start()
        if self._restored:
            # KVM_KVMCLOCK_CTRL right before the vCPUs run again: the guest learns it was
            # paused (no soft-lockup reports for the time it spent on disk or on the wire).
            for t in self.threads:
                resume_vcpu(t.vcpu)
        for index, t in enumerate(self.threads):
            if paused:
                t.control.request(Event.PAUSE)  # the first KVM_RUN returns at once
            # --cpu-affinity: the thread inherits its CPUs from its first instruction.
            with cpus.affinity(self.config.vcpu_affinity(index)):
                t.start()
        if paused:
            self.pause()

    def _attach_ring(self) -> None:
        if not self._coalesced_ports or not self.threads or self.ring is not None:
            return
        ring = CoalescedRing(self.threads[0].vcpu.coalesced_ring_page())
        self.ring = RingDrainer(ring, self._coalesced_write)
        for t in self.threads:
            t.drain = self.ring.drain
        self.ring.start()

    def _coalesced_write(self, pio: bool, addr: int, size: int, data: bytes) -> None:
        (self.pio if pio else self.mmio).write_burst(addr, size, data)

    def drain_coalesced(self) -> None:
        """Hand every write still queued in the coalesced ring to its device."""
        if self.ring is not None:
            self.ring.drain()

    def _watch_command(self) -> None:
        assert self.command is not None
        while not self._done.is_set():
            if not self.command.done.wait(0.2):
                # A line the command printed before going quiet is shown whole (its newline
                # was held back in case it began the EXIT marker).
                self.command.release_newline(quiet=0.5)
            else:
                if not self._done.wait(POWEROFF_GRACE):
                    self._finish(EndReason.POWEROFF, "stopped after the command finished")
                return

    def send_ctrl_alt_del(self) -> bool:
        """Ctrl+Alt+Del on the i8042 keyboard; False if the guest does not listen to it."""
        return self.i8042 is not None and self.i8042.send_ctrl_alt_del()

    def write_console(self, data: bytes) -> None:
        if self.serial is not None:
            self.serial.enqueue_input(data)

    def _on_vcpu_stopped(self, vcpu_id: int, stopped: Stopped) -> None:
        reasons = {
            StopKind.SHUTDOWN: EndReason.TRIPLE_FAULT,
            StopKind.SYSTEM_RESET: EndReason.REBOOT,
            StopKind.SYSTEM_SHUTDOWN: EndReason.POWEROFF,
            StopKind.SYSTEM_CRASH: EndReason.PANIC,
            StopKind.ERROR: EndReason.ERROR,
            StopKind.STOPPED: EndReason.STOPPED,
        }
        detail = f"vcpu{vcpu_id}: {stopped.detail}" if stopped.detail else ""
        self._finish(reasons[stopped.kind], detail)

    def _finish(self, reason: EndReason, detail: str = "") -> None:
        with self._lock:
            if self._result is not None:
                return
            if reason == EndReason.REBOOT and PANIC_MARKER in self.console.tail(64 * 1024):
                reason = EndReason.PANIC  # panic=-1 reboots at once; the console says why
            status = self.command.status if self.command is not None else None
            self._result = MachineResult(reason, status, detail)
        self._done.set()
        # Every vCPU is asked to stop even if asking one fails (a kick that finds its
        # thread gone): one error must not leave the others running.
        for t in self.threads:
            try:
                t.stop()
            except Exception:
                log.exception("vcpu%d: stop failed", t.vcpu.id)

    def stop(self) -> None:
        self._finish(EndReason.STOPPED)

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        """Block until the VM ends; None on timeout (the VM keeps running)."""
        if not self._done.wait(timeout):
            return None
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.ring is not None:
            self.ring.drain(max(0.0, deadline - time.monotonic()))
        # The guest's last bytes reach the listeners before the result (bounded: a reader
        # that stopped reading is given up on, vmm/console.py).
        delivered = self.console.flush()
        assert self._result is not None
        if self.command is not None:
            if delivered and self._result.reason is not EndReason.MIGRATED:
                # (A guest that migrated goes on printing at the destination, which has the
                # bytes held back here in the parser state it received.)
                self.command.flush()
            # The EXIT marker may still have been in the console's delivery buffer when the
            # VM ended: take the status the parser has now, or find the marker in the raw
            # console if the output could not all be delivered.
            if self._result.command_status is None:
                status = self.command.status
                if status is None and not delivered:
                    status = self.command.status_in(self.console.tail(64 * 1024))
                self._result.command_status = status
        return self._result

    # -- pause, capture, rebuild: what snapshots and migration are built on
    @property
    def paused(self) -> bool:
        """Every vCPU held by a pause outside KVM_RUN (or ended) and every virtio queue
        worker parked: the state `capture_state()` reads is final."""
        workers = self._virtio_workers
        if workers is not None and not workers.paused:
            return False
        return bool(self.threads) and all(
            t.control.state is RunState.FINISHED
            or (t.control.held and (t.control.state is RunState.PAUSED
                                    or t.control.status.pause_pending))
            or not t.alive
            for t in self.threads
        )  # fmt: skip

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """The PAUSE event on every vCPU, then wait until each is held outside KVM_RUN (or
        has ended); then park every virtio queue worker between passes (after the vCPUs: no
        new notification arrives; a worker finishes at most the chain it is serving, its
        pass being cut there), make the devices' effects durable (virtio-blk fdatasync) and
        hand the coalesced ring's writes to their devices. A vCPU the debugger holds is held
        already (kvmkit.vmm.runstate). UserError, with the machine running again, when a
        vCPU or a worker does not stop within `timeout`."""
        if self.vm is None or not self.threads:
            raise UserError("the machine is not running: nothing to pause")
        for t in self.threads:
            t.control.try_request(Event.PAUSE)  # already paused, or finished: nothing to do
        for t in self.threads:
            if not t.control.wait_held(timeout, lambda t=t: t.alive):  # type: ignore[misc]
                self.resume()
                raise UserError(f"vcpu{t.vcpu.id} did not pause within {timeout} s")
        workers = self._virtio_workers
        try:
            if workers is not None and not workers.pause(timeout):
                busy = ", ".join(workers.not_parked())
                raise UserError(f"virtio worker {busy} did not pause within {timeout} s")
            for _, _, dev in self.virtio:
                try:
                    dev.quiesce()
                except OSError as err:
                    raise UserError(f"virtio {dev.name}: {err}") from None
        except UserError:
            self.resume()
            raise
        self.drain_coalesced()  # device state includes every write the guest made
        if self.command is not None:
            self.command.freeze(True)

    def resume(self) -> None:
        """The virtio queue workers run again, then the RESUME event on every paused vCPU,
        each told first that it was paused (KVM_KVMCLOCK_CTRL)."""
        if self.command is not None:
            self.command.freeze(False)
        if self._virtio_workers is not None:
            self._virtio_workers.resume()
        for t in self.threads:
            status = t.control.status
            if status.state is RunState.PAUSED or status.pause_pending:
                if t.control.parked:
                    resume_vcpu(t.vcpu)
                t.control.request(Event.RESUME)

    def vm_setup(self) -> VmSetup:
        """How this machine's VM was set up (what a state records and a rebuild repeats)."""
        ext = self.extensions
        return dataclasses.replace(SETUP, x2apic_api=self.x2apic_api, nested=ext.nested,
                                   vcpu_caps=ext.vcpu_caps, extra_msrs=ext.extra_msrs)

    def state_config(self) -> tuple[MachineConfig, tuple[int, ...]]:
        """The configuration a state of this machine carries, with each drive's image size:
        the devices as they are now (a PATCH may have changed a drive's image or a rate
        limiter since boot; the limiters' buckets come back full), each net with the MAC the
        guest knows (a random one when none was configured) and its tap by name."""
        cfg = self.config
        blks = [dev for _, _, dev in self.virtio if isinstance(dev, VirtioBlk)]
        drives = [
            dataclasses.replace(
                d, path=dev.path, serial=dev.serial.decode("latin-1"),
                cache_type=dev.cache_type, rate_limiter=_limits(dev.limiter.config),
            )
            for d, dev in zip(cfg.drives, blks, strict=True)
        ]  # fmt: skip
        net_devs = [dev for _, _, dev in self.virtio if isinstance(dev, VirtioNet)]
        nets = [NetConfig(dev.tap_name, format_mac(dev.mac), dev.mtu,
                          _limits(dev.rx_limiter.config), _limits(dev.tx_limiter.config),
                          mmds=n.mmds, iface_id=n.iface_id)
                for n, dev in zip(cfg.nets, net_devs, strict=True)]  # fmt: skip
        rng = next((_limits(dev.limiter.config) for _, _, dev in self.virtio
                    if isinstance(dev, VirtioRng)), None)  # fmt: skip
        ext = self.extensions  # with --hyperv: the features the guest got on this host
        hyperv = ext.hyperv_features if ext.hyperv is not None else self.config.hyperv
        config = dataclasses.replace(cfg, drives=drives, nets=nets, rng_rate_limiter=rng,
                                     hyperv=hyperv)  # fmt: skip
        return config, tuple(os.fstat(dev.fd).st_size for dev in blks)

    def capture_state(self) -> MachineState:
        """The state of the paused machine, without guest memory (kvmkit.vmm.persist)."""
        if self.config.vfio:  # snapshots and migration both start here
            raise UserError(VFIO_NO_SNAPSHOT)
        if self.vm is None or self.kvm is None or not self.threads:
            raise UserError("the machine is not running: nothing to capture")
        if not self.paused:
            raise UserError("pause the machine before taking its state")
        self.console.flush()  # the parser state below must include every byte printed so far
        config, drive_sizes = self.state_config()
        assert self.serial is not None
        devices = DeviceStates(
            serial=self.serial.save(),
            virtio=[VirtioEntry(base, irq, transport.save(), dev.save())
                    for (base, irq, dev), transport in zip(self.virtio, self.virtio_transports,
                                                           strict=True)],
            pci_root=self.pci.root.save() if self.pci is not None else None,
        )  # fmt: skip
        return MachineState(
            kvm=capture_kvm_state(self.kvm, self.vm, [t.vcpu for t in self.threads],
                                  self.vm_setup(), on_vcpu=self._on_vcpu_thread,
                                  msr_indices=self._msr_indices),
            config=config, drive_sizes=drive_sizes, nonce=self.nonce,
            command=self.command.save() if self.command is not None else None, devices=devices,
        )  # fmt: skip

    def _on_vcpu_thread(self, vcpu: Vcpu, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the thread of a held vCPU (capture_kvm_state's timer delivery)."""
        thread = next(t for t in self.threads if t.vcpu is vcpu)
        return thread.control.call_held(fn, thread_alive=thread.thread.is_alive)

    def migrate(
        self, destination: str, *, max_downtime_ms: int = DEFAULT_MAX_DOWNTIME_MS,
        bandwidth_mib_s: float | None = None,
        progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationResult:  # fmt: skip
        """Live-migrate the running guest to a `kvmkit restore --incoming` (or
        `kvmkit.migration.receive_migration`) listening at `destination` (`unix:PATH` or
        `tcp:HOST:PORT`); see kvmkit.migration. On success the guest runs there and this
        machine has ended (EndReason.MIGRATED); on any failure MigrationError is raised and
        the guest runs on here."""
        from kvmkit.migration.machine import migrate_machine

        return migrate_machine(self, destination, max_downtime_ms=max_downtime_ms,
                               bandwidth_mib_s=bandwidth_mib_s, progress=progress)  # fmt: skip

    def release_host_devices(self) -> None:
        """A migration's hand-over: give up the host side the destination's devices open
        by name (taps, the vsock socket). The machine must be paused."""
        for _, _, dev in self.virtio:
            dev.release_host()

    def reacquire_host_devices(self) -> None:
        """Undo `release_host_devices` (the migration failed after it). A device whose host
        side cannot be opened again goes into its error state; the guest runs on."""
        for _, _, dev in self.virtio:
            try:
                dev.reacquire_host()
            except OSError as err:
                dev.device_error(f"cannot take its host side back: {err}")

    def finish_migrated(self, detail: str) -> None:
        """The destination took the guest over: end this machine (the vCPUs stay paused
        until they stop)."""
        self._finish(EndReason.MIGRATED, detail)

    @classmethod
    def from_state(
        cls, state: MachineState, memory: GuestMemory, *,
        command_output: Callable[[bytes], None] | None = None, kvm_device: str = "/dev/kvm",
        advance_clock: bool = False, prepared: tuple[Kvm, Vm] | None = None,
    ) -> Machine:  # fmt: skip
        """A machine rebuilt from a checked state onto `memory` (its regions laid out as the
        state's machine had them, not yet registered with a VM; the machine owns it from
        here, also on failure). `start()` resumes the guest where it was paused.
        `advance_clock` (a live migration): the guest's kvmclock and TSC move on by the time
        since the state was taken (kvmkit.snapshot.core.build_vm) instead of continuing
        from where they were (a snapshot). `prepared`: a /dev/kvm handle and a VM that
        `kvmkit.snapshot.core.prepare_vm` made for `state.kvm.setup` and `memory` beforehand
        (a migration's destination, while the pages arrived); the machine owns them from
        here.

        The restore order, and why:
          1. the host side the devices reopen: a vsock socket file a killed process left
             behind is removed (a live one is refused), before anything else exists
          2. KVM: VM, TSS/identity map, irqchip and PIT, memory slots, every vCPU (CPUID
             first ... vCPU events last), the VM state (PIT -> clock -> irqchip); no vCPU
             runs before KVM_SET_CLOCK (kvmkit.snapshot.core.build_vm)
          3. devices rebuilt from the configuration at the same slots (irqfds, ioeventfds,
             MSI routes), then their state taken over without a reset: the serial port, each
             virtio device and its transport (a pending interrupt status is raised again:
             the irqchip is restored, so the edge is not lost), the PCI root's latch; every
             ready queue is kicked once
          4. the command-output parser, then the vCPU threads (not started)
          5. at start(): KVM_KVMCLOCK_CTRL on each vCPU, then they run
        """
        config = state.config
        machine = cls(config, command_output=command_output, kvm_device=kvm_device)
        machine.mem.close()
        machine.mem = memory
        machine.nonce = state.nonce
        machine._restored = True
        try:
            if config.vsock is not None:
                # The process that took the state removes its socket when it exits; a killed
                # one leaves the file. A live socket (that VM still runs) is not taken over.
                try:
                    remove_stale_socket(config.vsock.uds_path)
                except OSError as err:
                    raise UserError(f"vsock: {err.strerror or err}") from None
            install_kick_handler()
            vm = None
            if prepared is not None:
                machine.kvm, vm = prepared
                prepared = None  # owned now: closed with the machine
            try:
                machine.kvm = kvm = machine.kvm or Kvm(kvm_device)
            except OSError as err:
                raise UserError(str(err.strerror or err)) from None
            t0 = time.monotonic()
            restored = build_vm(kvm, state.kvm, memory, advance_clock=advance_clock,
                                prepared=vm)  # fmt: skip
            machine.vm = restored.vm
            setup = state.kvm.setup
            machine.x2apic_api = setup.x2apic_api
            machine.extensions = GuestExtensions(
                nested=setup.nested, vcpu_caps=setup.vcpu_caps, extra_msrs=setup.extra_msrs)
            t1 = time.monotonic()
            machine._add_devices(restored.vm)
            t2 = time.monotonic()
            machine._restore_devices(state.devices)
            t3 = time.monotonic()
            # How long each step took (a migration's destination reports it: it is downtime)
            machine.rebuild_ms = {"kvm": (t1 - t0) * 1e3, "devices": (t2 - t1) * 1e3,
                                  "device state": (t3 - t2) * 1e3}  # fmt: skip
            if config.command:
                sink = command_output or (lambda data: None)
                machine.command = CommandOutput(state.nonce, sink)
                if state.command is not None:
                    machine.command.restore(state.command)
            for vcpu in restored.vcpus:
                machine.threads.append(
                    VcpuThread(vcpu, machine.pio, machine.mmio, machine._on_vcpu_stopped)
                )
            machine._msr_indices = saveable_msrs(kvm, restored.vcpus[0],
                                                 machine.extensions.extra_msrs)
        except BaseException:
            if prepared is not None:
                prepared[1].close()
                prepared[0].close()
            machine.close()
            raise
        return machine

    def _restore_devices(self, devices: DeviceStates) -> None:
        """Step 3 of `from_state`: checked device states onto the rebuilt devices."""
        assert self.serial is not None
        self.serial.restore(devices.serial)
        entries = zip(self.virtio, self.virtio_transports, devices.virtio, strict=True)
        for i, ((base, irq, dev), transport, saved) in enumerate(entries):
            path = f"devices.virtio[{i}]"
            # irq -1: a PCI function (its interrupts are MSI-X vectors, in the transport state)
            if (saved.base, saved.irq) != (base, irq):
                raise SnapshotError(f"snapshot state: {path}: not at this machine's slot")
            mmio = isinstance(transport, VirtioMmio)
            if isinstance(saved.transport, MmioTransportState) != mmio:
                raise SnapshotError(f"snapshot state: {path}: not a {transport.KIND} device")
            dev.restore(saved.device, f"{path}.device")
            if isinstance(transport, VirtioMmio):
                assert isinstance(saved.transport, MmioTransportState)
                transport.restore(saved.transport)
            else:
                assert isinstance(saved.transport, PciTransportState)
                transport.restore(saved.transport)
        if self.pci is not None and devices.pci_root is not None:
            self.pci.root.restore(devices.pci_root)
        for _, _, dev in self.virtio:
            dev.kick_ready_queues()

    def describe(self) -> str:
        """The machine's state as text, for a VM that seems stuck (`kvmkit run` prints it on
        SIGUSR1): vCPU threads and their exits, the console, each virtio device and queue
        (kvmkit's indexes beside the guest's rings) and the worker threads. Never blocks."""
        lines = [f"kvmkit VM state after {time.monotonic() - self.started_at:.1f} s"]
        for t in self.threads:
            st = t.stats
            lines.append(
                f"vcpu{t.vcpu.id}: {t.control.state.value}"
                f"{'' if t.thread.is_alive() else ' (thread ended)'}, {t.exits} exits (io in "
                f"{st.exit_io_in}, out {st.exit_io_out}, mmio read {st.exit_mmio_read}, write "
                f"{st.exit_mmio_write})"
            )
        c = self.console
        lines.append(f"console: {c.total} bytes from the guest, {c.dropped} dropped")
        for (_, _, dev), transport in zip(self.virtio, self.virtio_transports, strict=True):
            lines.extend(dev.describe())
            isr = getattr(transport, "isr", getattr(transport, "_isr", None))
            lines.append(f"  transport {transport.KIND}: interrupt status {isr}")
        if self._virtio_workers is not None:
            lines.extend(self._virtio_workers.describe())
        return "\n".join(lines) + "\n"

    @property
    def exits(self) -> int:
        return sum(t.exits for t in self.threads)
