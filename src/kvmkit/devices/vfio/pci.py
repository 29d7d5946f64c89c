"""A host PCI function given to the guest through VFIO: a `PciFunction` on kvmkit's bus whose
configuration space, BARs and interrupts are the device's, with what the guest must not
reach directly emulated by kvmkit.

Configuration space (256 bytes, mechanism #1). Reads and writes go to VFIO's config region
(where the host kernel already virtualizes what is unsafe: the command register's INTx
disable, power management, ...), except for the bytes kvmkit emulates in its own copy:
  BARs 0x10-0x27 and the ROM BAR 0x30   guest-physical addresses are the machine's, not the
                                        host's: sizing (all-ones writes) and moves follow the
                                        write mask of each BAR (PCI 3.0 §6.2.5)
  Interrupt Line 0x3C                   a scratch register
  the MSI and MSI-X capabilities        the guest's messages become KVM routes (msi.py)
and a write of Initiate FLR to the PCI Express Device Control register (PCIe 3.0 §7.8.4)
becomes VFIO_DEVICE_RESET plus a reset of the emulated registers.

BARs. A memory BAR VFIO lets us mmap is mapped into the guest as KVM memory slots at the
BAR's guest address (no exit per access) while memory decoding is on, except for the pages
holding the MSI-X table and PBA, which stay trapped; everything else (I/O BARs, BARs or
pages VFIO does not let us map, the ROM) is served from MMIO/port exits by reads and writes
of the VFIO region. A BAR the guest moves is unmapped and mapped again at its new address.

Interrupts. INTx: an eventfd VFIO signals (the host masks the line until it is unmasked),
a KVM irqfd on the slot's INTx GSI with a resample eventfd that KVM signals when the guest
ends the level interrupt, given to VFIO as its unmask trigger: no Python on the path. MSI and
MSI-X: msi.py. VFIO allows one of INTx, MSI and MSI-X at a time; INTx is on whenever neither
message kind is.

The guest is hostile: every offset and length is checked before it reaches VFIO, a write
VFIO refuses is dropped, a failed read returns all ones, and a BAR placed over another mapping
is simply not mapped (its accesses then exit and are served by region reads and writes).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmkit.abi import vfio as abi
from kvmkit.devices.pci.config import (
    BAR0,
    BAR_COUNT,
    CLASS_PROG,
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    CONFIG_SIZE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    REVISION_ID,
    ROM_ADDRESS,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    PciConfigSpace,
)
from kvmkit.devices.pci.root import PciFunction
from kvmkit.devices.vfio.layout import (
    IO,
    MEM64,
    PAGE_SIZE,
    BarSpec,
    decode_bars,
    find_capabilities,
    mmap_segments,
)
from kvmkit.devices.vfio.msi import VfioMsi, VfioMsix
from kvmkit.devices.vfio.platform import VfioPlatform, irqs_off, new_eventfd
from kvmkit.guestlog import GuestLog
from kvmkit.memory.region import host_address
from kvmkit.vfio.handles import RegionInfo, VfioDevice

log = logging.getLogger(__name__)
# Lines a guest can cause (its config and BAR writes), rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

ROM_BAR = 6  # the expansion ROM's index in `mapped` (after BAR0-5)
ROM_MIN_SIZE = 2048  # PCI 3.0 §6.2.5.2: the ROM BAR decodes at least 2 KiB
ROM_ADDRESS_MASK = 0xFFFFF800


@dataclass
class _Bar:
    spec: BarSpec
    region: RegionInfo
    address: int  # where kvmkit placed it at start (the guest may move it)
    segments: list[tuple[int, int]] = field(default_factory=list)  # mmapped (offset, size)
    maps: list[mmap.mmap] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # platform handles while mapped


class VfioPci(PciFunction):
    """The device behind `device` as a function of kvmkit's PCI bus. `allocate_mem` and
    `allocate_io` place BARs (firmware's job); `platform` wires memory and interrupts."""

    def __init__(
        self, device: VfioDevice, platform: VfioPlatform, *,
        allocate_mem: Callable[[int], int], allocate_io: Callable[[int], int] | None,
    ) -> None:  # fmt: skip
        self.device = device
        self.platform = platform
        info = device.info()
        if not info.flags & abi.DeviceFlag.PCI or info.num_regions <= abi.PciRegion.CONFIG:
            raise ValueError(f"{device.name} is not a vfio-pci device")
        self.can_reset = bool(info.flags & abi.DeviceFlag.RESET)
        if self.can_reset:
            # Start from the device's reset state, whatever its last user left in it.
            try:
                device.reset()
            except OSError as err:
                log.warning("%s: VFIO_DEVICE_RESET at start failed: %s", device.name, err)
        self.config_region = device.region_info(abi.PciRegion.CONFIG)
        raw = device.pread(self.config_region.offset, CONFIG_SIZE)
        vendor, dev_id = struct.unpack_from("<HH", raw, VENDOR_ID)
        sub_vendor, sub_id = struct.unpack_from("<HH", raw, SUBSYSTEM_VENDOR_ID)
        config = PciConfigSpace(
            vendor=vendor, device=dev_id, revision=raw[REVISION_ID],
            class_code=int.from_bytes(raw[CLASS_PROG : CLASS_PROG + 3], "little"),
            subsystem_vendor=sub_vendor, subsystem=sub_id,
        )  # fmt: skip
        # kvmkit's copy: the device's registers, nothing writable until marked emulated.
        config.data[:] = raw
        config.wmask[:] = bytes(CONFIG_SIZE)
        super().__init__(config)
        self.emulated = bytearray(CONFIG_SIZE)  # 1: kvmkit's copy answers (and takes writes)
        self.msi: VfioMsi | None = None
        self.msix: VfioMsix | None = None
        self._intx_fds: tuple[int, int] | None = None  # (trigger, resample) once attached
        self._intx_on = False
        self.intx_gsi: int | None = None
        try:
            self._setup(raw, info.num_irqs, allocate_mem, allocate_io)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.device.name

    # -- building
    def _setup(
        self, raw: bytes, num_irqs: int, allocate_mem: Callable[[int], int],
        allocate_io: Callable[[int], int] | None,
    ) -> None:  # fmt: skip
        regions = [self.device.region_info(i) for i in range(BAR_COUNT)]
        self.bars: dict[int, _Bar] = {}
        self.emulated[BAR0 : BAR0 + 4 * BAR_COUNT] = b"\x01" * (4 * BAR_COUNT)
        self.config.data[BAR0 : BAR0 + 4 * BAR_COUNT] = bytes(4 * BAR_COUNT)
        for spec in decode_bars(raw, [r.size for r in regions]):
            if spec.kind == IO:
                if allocate_io is None:
                    raise ValueError(f"{self.name}: BAR{spec.index} is an I/O BAR")
                address = allocate_io(spec.size)
            else:
                address = allocate_mem(max(spec.size, PAGE_SIZE))
            self.bars[spec.index] = _Bar(spec, regions[spec.index], address)
            self._set_bar_register(spec, address)
        # Expansion ROM (§6.2.5.2): emulated, read through the ROM region, off until enabled.
        self.emulated[ROM_ADDRESS : ROM_ADDRESS + 4] = b"\x01" * 4
        struct.pack_into("<I", self.config.data, ROM_ADDRESS, 0)
        self.rom: RegionInfo | None = None
        rom = self.device.region_info(abi.PciRegion.ROM)
        if rom.size and rom.flags & abi.RegionFlag.READ:
            size = max(1 << (rom.size - 1).bit_length(), ROM_MIN_SIZE)
            self.rom = rom
            self.rom_size = size
            struct.pack_into("<I", self.config.data, ROM_ADDRESS, allocate_mem(size))
            mask = (~(size - 1) & ROM_ADDRESS_MASK) | abi.PCI_ROM_ADDRESS_ENABLE
            self.config.wmask[ROM_ADDRESS : ROM_ADDRESS + 4] = mask.to_bytes(4, "little")
        # Interrupt Line: the OS writes what it routed INTx to; kvmkit keeps it.
        self.emulated[INTERRUPT_LINE] = 1
        self.config.wmask[INTERRUPT_LINE] = 0xFF
        self.config.data[INTERRUPT_LINE] = 0xFF  # §6.2.4: "unknown / no connection"
        caps = find_capabilities(raw)
        if abi.PCI_CAP_ID_MSI in caps and num_irqs > abi.PciIrq.MSI:
            self.msi = VfioMsi(
                self.config, self.emulated, caps[abi.PCI_CAP_ID_MSI], self.device, self.platform,
                self._disable_intx, self._enable_intx,
            )  # fmt: skip
        if abi.PCI_CAP_ID_MSIX in caps and num_irqs > abi.PciIrq.MSIX:
            self.msix = VfioMsix(
                self.config, self.emulated, caps[abi.PCI_CAP_ID_MSIX], self.device,
                self.platform, self._disable_intx, self._enable_intx,
            )  # fmt: skip
        # Function-level reset through the PCI Express capability (PCIe 3.0 §7.8.3, §7.8.4).
        self.flr_byte: int | None = None
        pcie = caps.get(abi.PCI_CAP_ID_EXP)
        if pcie is not None and pcie + abi.PCI_EXP_DEVCTL + 2 <= CONFIG_SIZE:
            devcap = struct.unpack_from("<I", raw, pcie + abi.PCI_EXP_DEVCAP)[0]
            if devcap & abi.PCI_EXP_DEVCAP_FLR:
                self.flr_byte = pcie + abi.PCI_EXP_DEVCTL + 1  # bit 15 is bit 7 of this byte
        self.intx_pin = raw[INTERRUPT_PIN] if 1 <= raw[INTERRUPT_PIN] <= 4 else 0
        if self.intx_pin and (
            num_irqs <= abi.PciIrq.INTX or self.device.irq_info(abi.PciIrq.INTX).count < 1
        ):
            self.intx_pin = 0
        self._map_bars()
        # Firmware leaves decoding on for the BARs it assigned (as SeaBIOS does), so a guest
        # can reach them before any driver enables the device.
        command = self._device_command()
        if any(b.spec.kind != IO for b in self.bars.values()) or self.rom is not None:
            command |= COMMAND_MEMORY
        if any(b.spec.kind == IO for b in self.bars.values()):
            command |= COMMAND_IO
        self._forward(COMMAND, command.to_bytes(2, "little"))

    def _set_bar_register(self, spec: BarSpec, address: int) -> None:
        value = address | spec.flags
        mask = spec.size_mask
        reg = BAR0 + 4 * spec.index
        width = 8 if spec.kind == MEM64 else 4
        self.config.data[reg : reg + width] = (value & ((1 << 8 * width) - 1)).to_bytes(
            width, "little"
        )
        self.config.wmask[reg : reg + width] = mask.to_bytes(width, "little")

    def _map_bars(self) -> None:
        """mmap the pages of each memory BAR that VFIO allows and kvmkit need not trap."""
        for bar in self.bars.values():
            if bar.spec.kind == IO or not bar.region.flags & abi.RegionFlag.MMAP:
                continue
            holes = self.msix.holes(bar.spec.index) if self.msix is not None else []
            for offset, size in mmap_segments(bar.region.mmap_areas, holes):
                if offset + size > bar.spec.size:
                    continue
                try:
                    m = self.device.mmap(bar.region.offset + offset, size)
                except OSError as err:
                    log.info("%s BAR%d: not mmapped (%s), trapped", self.name, bar.spec.index,
                             err)  # fmt: skip
                    continue
                bar.segments.append((offset, size))
                bar.maps.append(m)

    def attach(self, slot: int) -> None:
        """The function is in `slot` of bus 0: wire INTx to the GSI the DSDT routes it to."""
        if not self.intx_pin:
            return
        gsi = self.platform.intx_gsi(slot, self.intx_pin)
        trigger, resample = new_eventfd(), new_eventfd()
        self._intx_fds = (trigger, resample)
        self.platform.irqfd(trigger, gsi, resample_fd=resample)
        self.intx_gsi = gsi
        with self.lock:
            self.config.data[INTERRUPT_LINE] = gsi
            self._enable_intx()

    # -- INTx (on whenever neither MSI nor MSI-X is)
    def _disable_intx(self) -> None:
        if not self._intx_on:
            return
        irqs_off(self.device, abi.PciIrq.INTX)
        self._intx_on = False

    def _enable_intx(self) -> None:
        if self._intx_fds is None or self._intx_on:
            return
        if (self.msi is not None and self.msi.active) or (
            self.msix is not None and self.msix.active
        ):
            return
        trigger, resample = self._intx_fds
        try:
            self.device.set_irqs(abi.PciIrq.INTX, abi.IrqSetFlag.ACTION_TRIGGER, eventfds=[trigger])
            # KVM signals `resample` when the guest EOIs the level interrupt; VFIO then
            # unmasks the line (it masked it when it fired) and re-raises it if still high.
            self.device.set_irqs(abi.PciIrq.INTX, abi.IrqSetFlag.ACTION_UNMASK, eventfds=[resample])
            self._intx_on = True
        except OSError as err:
            glog.warning("%s: enabling INTx failed: %s", self.name, err)

    # -- configuration space (offsets and lengths from the guest)
    def _device_command(self) -> int:
        try:
            data = self.device.pread(self.config_region.offset + COMMAND, 2)
        except OSError:
            return 0
        return int.from_bytes(data, "little")

    def _forward(self, offset: int, data: bytes | bytearray) -> None:
        try:
            self.device.pwrite(self.config_region.offset + offset, data)
        except OSError as err:
            glog.debug("%s: config write %#x+%d refused: %s", self.name, offset, len(data), err)

    def config_read(self, offset: int, length: int) -> int:
        if length not in (1, 2, 4) or offset < 0 or offset + length > CONFIG_SIZE:
            return (1 << (8 * length)) - 1 if 0 < length <= 8 else 0
        with self.lock:
            try:
                raw = bytearray(self.device.pread(self.config_region.offset + offset, length))
            except OSError:
                raw = bytearray(b"\xff" * length)
            if self.msi is not None and self.msi.maskable:
                if offset < self.msi.pending_at + 4 and offset + length > self.msi.pending_at:
                    self.msi.refresh_pending()
            for i in range(length):
                if self.emulated[offset + i]:
                    raw[i] = self.config.data[offset + i]
            return int.from_bytes(raw, "little")

    def config_write(self, offset: int, length: int, value: int) -> None:
        if length not in (1, 2, 4) or offset < 0 or offset + length > CONFIG_SIZE:
            return
        end = offset + length

        def touches(start: int, size: int) -> bool:
            return offset < start + size and end > start

        raw = bytearray((value & ((1 << (8 * length)) - 1)).to_bytes(length, "little"))
        with self.lock:
            flr = False
            if self.flr_byte is not None and touches(self.flr_byte, 1):
                i = self.flr_byte - offset
                flr = bool(raw[i] & 0x80)
                raw[i] &= 0x7F  # kvmkit resets the function itself (below)
            if touches(COMMAND, 1) and not raw[COMMAND - offset] & COMMAND_MEMORY:
                # Decoding about to go off: take the BAR mappings out of the guest first, or a
                # vCPU could touch pages VFIO has already revoked (a fault KVM cannot serve).
                self._set_mapped([])
            i = 0
            while i < length:
                j = i
                emulated = self.emulated[offset + i]
                while j < length and self.emulated[offset + j] == emulated:
                    j += 1
                if emulated:
                    for k in range(i, j):
                        self.config.write(offset + k, 1, raw[k])
                else:
                    self._forward(offset + i, raw[i:j])
                i = j
            if self.msi is not None and self.msi.covers(offset, length):
                self.msi.written()
            if self.msix is not None and touches(self.msix.cap_offset + abi.PCI_MSIX_FLAGS, 2):
                self.msix.control_written()
            if touches(COMMAND, 2) or touches(BAR0, 4 * BAR_COUNT) or touches(ROM_ADDRESS, 4):
                self.remap()
            if flr:
                self.function_reset(flr=True)

    def function_reset(self, *, flr: bool = False) -> None:
        """VFIO_DEVICE_RESET and the emulated registers as after a reset: MSI and MSI-X off;
        after a guest FLR also the BARs cleared (the guest's driver restores them, as Linux's
        pci_reset_function does)."""
        with self.lock:
            if self.msix is not None:
                self.msix.reset()
            if self.msi is not None:
                self.msi.reset()
            if self.can_reset:
                try:
                    self.device.reset()
                except OSError as err:
                    glog.warning("%s: VFIO_DEVICE_RESET failed: %s", self.name, err)
            if flr:
                for bar in self.bars.values():
                    self._set_bar_register(bar.spec, 0)
                struct.pack_into("<I", self.config.data, ROM_ADDRESS, 0)
            self.remap()

    # -- BAR placement
    def _bar_address(self, spec: BarSpec) -> int:
        reg = BAR0 + 4 * spec.index
        if spec.kind == MEM64:
            return int(struct.unpack_from("<Q", self.config.data, reg)[0]) & ~0xF
        low = int(struct.unpack_from("<I", self.config.data, reg)[0])
        return low & ~0x3 if spec.kind == IO else low & ~0xF

    def remap(self) -> None:
        """Which BARs answer where: memory BARs inside the root's window with memory
        decoding on, I/O BARs with I/O decoding on, the ROM when enabled too."""
        command = self._device_command()
        base, size = self.window
        mapped: list[tuple[int, int, int]] = []
        io_mapped: list[tuple[int, int, int]] = []
        for bar in self.bars.values():
            addr = self._bar_address(bar.spec)
            if bar.spec.kind == IO:
                if command & COMMAND_IO and 0 < addr and addr + bar.spec.size <= 0x10000:
                    io_mapped.append((addr, bar.spec.size, bar.spec.index))
            elif command & COMMAND_MEMORY and base <= addr and addr + bar.spec.size <= base + size:
                mapped.append((addr, bar.spec.size, bar.spec.index))
        rom = struct.unpack_from("<I", self.config.data, ROM_ADDRESS)[0]
        if self.rom is not None and rom & abi.PCI_ROM_ADDRESS_ENABLE and command & COMMAND_MEMORY:
            addr = rom & ROM_ADDRESS_MASK
            if base <= addr and addr + self.rom_size <= base + size:
                mapped.append((addr, self.rom_size, ROM_BAR))
        self.io_mapped = io_mapped
        self._set_mapped(mapped)

    def _set_mapped(self, mapped: list[tuple[int, int, int]]) -> None:
        old = self.mapped
        if mapped == old:
            return
        self.mapped = mapped
        for entry in old:
            if entry not in mapped and entry[2] in self.bars:
                self._unmap_bar(self.bars[entry[2]])
        for entry in mapped:
            if entry not in old and entry[2] in self.bars:
                self._map_bar(self.bars[entry[2]], entry[0])

    def _map_bar(self, bar: _Bar, addr: int) -> None:
        for (offset, size), m in zip(bar.segments, bar.maps, strict=True):
            try:
                bar.slots.append(self.platform.map_mmio(addr + offset, size, host_address(m)))
            except OSError as err:
                # Overlapping another mapping (a guest that placed two BARs on each other):
                # this part is served by exits instead.
                glog.info("%s BAR%d at %#x: not mapped (%s)", self.name, bar.spec.index,
                            addr + offset, err)  # fmt: skip

    def _unmap_bar(self, bar: _Bar) -> None:
        for handle in bar.slots:
            try:
                self.platform.unmap_mmio(handle)
            except OSError as err:
                glog.warning("%s BAR%d: unmapping failed (%s)", self.name, bar.spec.index, err)
        bar.slots.clear()

    # -- trapped BAR accesses (offsets relative to the BAR; from the guest)
    def _region_for(self, bar: int, offset: int, length: int) -> int | None:
        """The device-file offset for an access, or None when outside the BAR."""
        if bar == ROM_BAR:
            if self.rom is None or offset < 0 or offset + length > self.rom.size:
                return None
            return self.rom.offset + offset
        b = self.bars.get(bar)
        if b is None or offset < 0 or offset + length > min(b.spec.size, b.region.size):
            return None
        return b.region.offset + offset

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        msix = self.msix
        if msix is not None and (msix.in_table(bar, offset) or msix.in_pba(bar, offset)):
            msix.bar_read(bar, offset, data)
            return
        at = self._region_for(bar, offset, len(data))
        if at is not None:
            try:
                data[:] = self.device.pread(at, len(data))
                return
            except OSError:
                pass
        data[:] = b"\xff" * len(data)

    def bar_write(self, bar: int, offset: int, data: memoryview) -> None:
        msix = self.msix
        if msix is not None and (msix.in_table(bar, offset) or msix.in_pba(bar, offset)):
            msix.bar_write(bar, offset, data)
            return
        if bar == ROM_BAR:
            return  # read-only
        at = self._region_for(bar, offset, len(data))
        if at is None:
            return
        try:
            self.device.pwrite(at, data)
        except OSError as err:
            glog.debug("%s BAR%d write at %#x refused: %s", self.name, bar, offset, err)

    # -- life cycle
    def close(self) -> None:
        """Release everything (idempotent): mappings, interrupts, the device fd."""
        with self.lock:
            for bar in getattr(self, "bars", {}).values():
                self._unmap_bar(bar)
                for m in bar.maps:
                    m.close()
                bar.maps.clear()
            self.mapped = []
            if self.msix is not None:
                self.msix.close()
                self.msix = None
            if self.msi is not None:
                self.msi.close()
                self.msi = None
            if self._intx_fds is not None:
                self._disable_intx()
                trigger, resample = self._intx_fds
                if self.intx_gsi is not None:
                    try:
                        self.platform.irqfd(trigger, self.intx_gsi, deassign=True)
                    except OSError:
                        pass
                os.close(trigger)
                os.close(resample)
                self._intx_fds = None
            self.device.close()
