"""`Vm`: the handle on one virtual machine (VM ioctls)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from kvmkit.abi import ioctls, structs
from kvmkit.abi.constants import (
    KVM_MSI_VALID_DEVID,
    Cap,
    DirtyLogFlag,
    IoeventfdFlag,
    IrqchipId,
    IrqfdFlag,
    IrqRoutingType,
    MemFlag,
)
from kvmkit.kvm._ioctl import close_fd, ioctl_int, ioctl_ptr
from kvmkit.kvm.device import KvmDevice
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmkit.kvm.system import Kvm

PAGE_SIZE = 4096
# The largest GSI routing table KVM accepts (KVM_MAX_IRQ_ROUTES).
MAX_IRQ_ROUTES = 4096


def route_irqchip(gsi: int, chip: IrqchipId | int, pin: int) -> structs.kvm_irq_routing_entry:
    e = structs.kvm_irq_routing_entry()
    e.gsi, e.type = gsi, IrqRoutingType.IRQCHIP
    e.u.irqchip.irqchip, e.u.irqchip.pin = int(chip), pin
    return e


def route_msi(gsi: int, address: int, data: int) -> structs.kvm_irq_routing_entry:
    e = structs.kvm_irq_routing_entry()
    e.gsi, e.type = gsi, IrqRoutingType.MSI
    e.u.msi.address_lo = address & 0xFFFFFFFF
    e.u.msi.address_hi = address >> 32
    e.u.msi.data = data
    return e


def default_x86_routes() -> list[structs.kvm_irq_routing_entry]:
    """The routing KVM_CREATE_IRQCHIP installs: GSI 0-15 to both PICs, 0-23 to the IOAPIC
    (with ISA IRQ 0 wired to IOAPIC pin 2, as on real chipsets)."""
    routes = []
    for gsi in range(16):
        chip = IrqchipId.PIC_MASTER if gsi < 8 else IrqchipId.PIC_SLAVE
        routes.append(route_irqchip(gsi, chip, gsi % 8))
    for gsi in range(24):
        routes.append(route_irqchip(gsi, IrqchipId.IOAPIC, 2 if gsi == 0 else gsi))
    return routes


class Vm:
    """One VM file descriptor. Each method is one ioctl; failures raise `KvmError`."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self._run_size = kvm.vcpu_mmap_size()

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check_extension(self, cap: Cap | int) -> int:
        """Per-VM capability check (KVM_CAP_CHECK_EXTENSION_VM)."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION(vm)", ioctls.CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        ec = structs.kvm_enable_cap()
        ec.cap, ec.flags = int(cap), flags
        for i, a in enumerate(args[:4]):
            ec.args[i] = a
        ioctl_ptr(self.fd, f"KVM_ENABLE_CAP({_cap_name(cap)})", ioctls.ENABLE_CAP, ec)

    # -- memory
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
        flags: MemFlag | int = 0,
    ) -> None:  # fmt: skip
        """Install, move or (with memory_size=0) delete a memory slot."""
        region = structs.kvm_userspace_memory_region()
        region.slot, region.flags = slot, int(flags)
        region.guest_phys_addr, region.memory_size = guest_phys_addr, memory_size
        region.userspace_addr = userspace_addr
        ioctl_ptr(self.fd, "KVM_SET_USER_MEMORY_REGION", ioctls.SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, memory_size: int) -> bytearray:
        """The slot's dirty bitmap (one bit per 4 KiB page, little-endian 64-bit words). KVM
        clears it and write-protects the pages as it reads it, unless manual protection is
        on (`enable_manual_dirty_log`): then the bits stay until `clear_dirty_log`."""
        npages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
        bitmap = bytearray(((npages + 63) // 64) * 8)
        buf = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        log = structs.kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = ctypes.addressof(buf)
        ioctl_ptr(self.fd, "KVM_GET_DIRTY_LOG", ioctls.GET_DIRTY_LOG, log)
        del buf
        return bitmap

    def enable_manual_dirty_log(self, flags: DirtyLogFlag | int) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with `flags` (0 turns it off again): pages are
        re-protected only by `clear_dirty_log`, range by range, not by KVM_GET_DIRTY_LOG for
        the whole slot at once (KVM API doc, 7.18)."""
        self.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, int(flags))

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes | bytearray,
                        num_pages: int) -> None:  # fmt: skip
        """KVM_CLEAR_DIRTY_LOG: clear the dirty bits set in `bitmap` (one bit per page from
        `first_page`, which must be a multiple of 64; `num_pages` too, unless the range ends
        at the end of the slot) and write-protect those pages again."""
        buf = bytearray(bitmap) or bytearray(8)
        cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
        req = structs.kvm_clear_dirty_log()
        req.slot, req.first_page, req.num_pages = slot, first_page, num_pages
        req.dirty_bitmap = ctypes.addressof(cbuf)
        ioctl_ptr(self.fd, "KVM_CLEAR_DIRTY_LOG", ioctls.CLEAR_DIRTY_LOG, req)
        del cbuf

    def set_tss_addr(self, addr: int) -> None:
        """Three pages KVM needs below 4 GiB on Intel for real-mode emulation."""
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", ioctls.SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        ioctl_ptr(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ioctls.SET_IDENTITY_MAP_ADDR, value)

    # -- interrupt controllers, timers, interrupts
    def create_irqchip(self) -> None:
        ioctl_int(self.fd, "KVM_CREATE_IRQCHIP", ioctls.CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: IrqchipId | int) -> structs.kvm_irqchip:
        chip = structs.kvm_irqchip()
        chip.chip_id = int(chip_id)
        ioctl_ptr(self.fd, "KVM_GET_IRQCHIP", ioctls.GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: structs.kvm_irqchip) -> None:
        ioctl_ptr(self.fd, "KVM_SET_IRQCHIP", ioctls.SET_IRQCHIP, chip)

    def create_pit2(self, flags: int = 0) -> None:
        config = structs.kvm_pit_config()
        config.flags = flags
        ioctl_ptr(self.fd, "KVM_CREATE_PIT2", ioctls.CREATE_PIT2, config)

    def get_pit2(self) -> structs.kvm_pit_state2:
        state = structs.kvm_pit_state2()
        ioctl_ptr(self.fd, "KVM_GET_PIT2", ioctls.GET_PIT2, state)
        return state

    def set_pit2(self, state: structs.kvm_pit_state2) -> None:
        ioctl_ptr(self.fd, "KVM_SET_PIT2", ioctls.SET_PIT2, state)

    def irq_line(self, irq: int, level: int) -> None:
        line = structs.kvm_irq_level()
        line.irq, line.level = irq, level
        ioctl_ptr(self.fd, "KVM_IRQ_LINE", ioctls.IRQ_LINE, line)

    def irq_line_status(self, irq: int, level: int) -> int:
        """Like irq_line, and returns the delivery status (>0 delivered, 0 coalesced/masked)."""
        line = structs.kvm_irq_level()
        line.irq, line.level = irq, level
        ioctl_ptr(self.fd, "KVM_IRQ_LINE_STATUS", ioctls.IRQ_LINE_STATUS, line)
        return int(line.status)

    def irqfd(
        self, fd: int, gsi: int, *, deassign: bool = False, resample_fd: int | None = None
    ) -> None:
        """Wire an eventfd to a GSI: each write to `fd` raises the interrupt in the kernel."""
        req = structs.kvm_irqfd()
        req.fd, req.gsi = fd, gsi
        flags = IrqfdFlag.DEASSIGN if deassign else IrqfdFlag(0)
        if resample_fd is not None:
            flags |= IrqfdFlag.RESAMPLE
            req.resamplefd = resample_fd
        req.flags = int(flags)
        ioctl_ptr(self.fd, "KVM_IRQFD", ioctls.IRQFD, req)

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool = False,
        datamatch: int | None = None, deassign: bool = False,
    ) -> None:  # fmt: skip
        """Signal `fd` on a guest write to `addr` (port I/O if `pio`), without an exit."""
        req = structs.kvm_ioeventfd()
        req.fd, req.addr, req.len = fd, addr, length
        flags = IoeventfdFlag(0)
        if pio:
            flags |= IoeventfdFlag.PIO
        if datamatch is not None:
            flags |= IoeventfdFlag.DATAMATCH
            req.datamatch = datamatch
        if deassign:
            flags |= IoeventfdFlag.DEASSIGN
        req.flags = int(flags)
        ioctl_ptr(self.fd, "KVM_IOEVENTFD", ioctls.IOEVENTFD, req)

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: guest writes to [addr, addr+size) (ports if `pio`)
        go to the coalesced ring instead of exiting; reads still exit. Userspace must drain
        the ring before it handles any other exit (see `kvmkit.kvm.coalesced`)."""
        zone = structs.kvm_coalesced_mmio_zone()
        zone.addr, zone.size, zone.pio = addr, size, int(pio)
        ioctl_ptr(self.fd, "KVM_REGISTER_COALESCED_MMIO", ioctls.REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        zone = structs.kvm_coalesced_mmio_zone()
        zone.addr, zone.size, zone.pio = addr, size, int(pio)
        ioctl_ptr(
            self.fd, "KVM_UNREGISTER_COALESCED_MMIO", ioctls.UNREGISTER_COALESCED_MMIO, zone
        )

    def signal_msi(self, address: int, data: int, devid: int | None = None) -> int:
        msi = structs.kvm_msi()
        msi.address_lo, msi.address_hi, msi.data = address & 0xFFFFFFFF, address >> 32, data
        if devid is not None:
            msi.flags, msi.devid = KVM_MSI_VALID_DEVID, devid
        return ioctl_ptr(self.fd, "KVM_SIGNAL_MSI", ioctls.SIGNAL_MSI, msi)

    def set_gsi_routing(self, entries: Sequence[structs.kvm_irq_routing_entry]) -> None:
        """Replace the whole GSI routing table."""
        if len(entries) > MAX_IRQ_ROUTES:
            raise KvmError("KVM_SET_GSI_ROUTING", errno.EINVAL, f"{len(entries)} routes")
        table = structs.irq_routing_type(len(entries))()
        table.nr = len(entries)
        for i, e in enumerate(entries):
            table.entries[i] = e
        ioctl_ptr(self.fd, "KVM_SET_GSI_ROUTING", ioctls.SET_GSI_ROUTING, table)

    # -- devices
    def create_device(self, device_type: int) -> KvmDevice:
        """KVM_CREATE_DEVICE: an in-kernel device of `device_type` (KVM_DEV_TYPE_*)."""
        req = structs.kvm_create_device()
        req.type = device_type
        ioctl_ptr(self.fd, "KVM_CREATE_DEVICE", ioctls.CREATE_DEVICE, req)
        return KvmDevice(int(req.fd))

    # -- clock
    def get_clock(self) -> structs.kvm_clock_data:
        data = structs.kvm_clock_data()
        ioctl_ptr(self.fd, "KVM_GET_CLOCK", ioctls.GET_CLOCK, data)
        return data

    def set_clock(self, data: structs.kvm_clock_data) -> None:
        ioctl_ptr(self.fd, "KVM_SET_CLOCK", ioctls.SET_CLOCK, data)

    def set_tsc_khz(self, khz: int) -> None:
        """Default TSC frequency of vCPUs created afterwards (KVM_CAP_VM_TSC_CONTROL)."""
        ioctl_int(self.fd, "KVM_SET_TSC_KHZ(vm)", ioctls.SET_TSC_KHZ, khz)

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        ioctl_int(self.fd, "KVM_SET_BOOT_CPU_ID", ioctls.SET_BOOT_CPU_ID, vcpu_id)

    # -- vCPUs
    def xsave_size(self) -> int:
        """Bytes of `KVM_GET_XSAVE2` (at least 4096), or 4096 without KVM_CAP_XSAVE2."""
        size = self.check_extension(Cap.XSAVE2)
        return max(size, structs.KVM_XSAVE_REGION_BYTES)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", ioctls.CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(self, fd, vcpu_id, self._run_size)
        self.vcpus.append(vcpu)
        return vcpu


def _cap_name(cap: Cap | int) -> str:
    try:
        return Cap(cap).name
    except ValueError:
        return str(int(cap))
