"""VFIO passthrough of QEMU's `edu` device (PCI 1234:11e8, docs/specs/edu.rst) to a Linux
guest, in a lane booted with `kvmkit lane --device edu ...` (the lane puts the devices
behind QEMU's emulated VT-d and binds them to vfio-pci; scripts/hwvirt_tests.py boots one
lane for this module, see the `lane_devices` marker).

One guest boot does everything a user of the devices would. A virtio-rng passed through is
driven by the guest's virtio_pci over MSI-X and gives 4 KiB of entropy; the guest resets it
with a function-level reset (kvmkit's VFIO_DEVICE_RESET: the device status reads 0 after it)
and its driver takes it again. QEMU's pci-testdev answers through its I/O BAR (port exits
served by VFIO region reads and writes) and its expansion ROM. The edu: the guest
finds it in sysfs with its IDs and BAR0, reads the ID register and the liveness register
with busybox `devmem`, has it compute 5!, reads BAR0 200,000 times without a vCPU exit (the
BAR is a KVM memory slot), copies 2 KiB through the device and back by DMA (through the
IOMMU's mapping of guest RAM), receives its factorial interrupt as MSI and as INTx (counted
in /proc/interrupts), has it DMA outside guest RAM (the lane's IOMMU blocks it) and writes
nonsense to its configuration space and BAR0 - and kvmkit stays up and reports the
command's status.

The other tests need no guest: the refusals (one line, exit status 2) and that a failed
start leaves no VFIO file descriptor open.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit import guestlog
from kvmkit.lane import assets

EDU = ("0x1234", "0x11e8")
# The lane of this module: a single-function edu in its own IOMMU group; QEMU's virtio-rng
# (a device with MSI-X and a 64-bit BAR, its DMA through the IOMMU: iommu_platform=on) behind
# a PCI Express root port of its own, which makes it a PCIe endpoint with function-level
# reset; QEMU's pci-testdev (an I/O BAR) with an option ROM (iPXE's, a dependency of Debian's
# qemu-system-x86); and a two-function edu in slot 0x1e (one group: no ACS between the
# functions) for the group-viability refusal.
ROM_FILE = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")
pytestmark = [
    pytest.mark.hwvirt,
    pytest.mark.lane_devices(
        "edu", "virtio-rng-pci,iommu_platform=on,disable-legacy=on,root-port=on",
        f"pci-testdev,romfile={ROM_FILE}", "edu,addr=0x1e.0,multifunction=on",
        "edu,addr=0x1e.1", modules=("uio_pci_generic",),
    ),
]  # fmt: skip
SOLO = "0000:00:10.0"  # the lane gives devices without addr= slots 0x10, 0x11, ...
RNG_PORT = "0000:00:11.0"  # the rng is the first function behind this root port
TESTDEV = "0000:00:12.0"
PAIR = ("0000:00:1e.0", "0000:00:1e.1")
SYSFS = Path("/sys/bus/pci/devices")
MSI_VECTOR = 0xF5  # unused by Linux 6.1 (irq_vectors.h): counted as SPU, logged as spurious
OUTSIDE_RAM = 0xC000000  # 192 MiB: past the guest's 128 MiB, inside edu's 28-bit DMA mask

GUEST_SCRIPT = r"""
B=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor) $(cat $d/device)" = "0x1234 0x11e8" ] && B=${d##*/}
done
D=/sys/bus/pci/devices/$B
echo "DEV $B $(cat $D/vendor) $(cat $D/device) $(cat $D/class)"
echo "RES0 $(head -1 $D/resource)"
bar=$(head -1 $D/resource | cut -d' ' -f1)
echo "ID $(devmem $bar 32)"
devmem $((bar + 4)) 32 0x12345678
echo "LIVE $(devmem $((bar + 4)) 32)"
devmem $((bar + 8)) 32 5
while [ $(($(devmem $((bar + 0x20)) 32) & 1)) = 1 ]; do :; done
echo "FACT $(devmem $((bar + 8)) 32)"
P=/tmp/p/vfio_probe
$P $B spin 200000
R=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor) $(cat $d/device)" = "0x1af4 0x1044" ] && R=${d##*/}
done
echo "RNGDEV $R $(basename $(readlink /sys/bus/pci/devices/$R/driver))"
echo "RNG $(head -c 4096 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNGMSI $(cat /sys/bus/pci/devices/$R/msi_irqs/* | sort -u)"
grep -- '-input' /proc/interrupts | sed 's/^/RNGIRQ /'
echo $R > /sys/bus/pci/devices/$R/driver/unbind
echo "RESETMETHOD $(cat /sys/bus/pci/devices/$R/reset_method)"
$P $R virtio-flr
echo $R > /sys/bus/pci/drivers_probe
echo "RNGAGAIN $(head -c 512 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
T=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor) $(cat $d/device)" = "0x1b36 0x0005" ] && T=${d##*/}
done
echo "TESTDEV $T $(sed -n 2p /sys/bus/pci/devices/$T/resource)"
$P $T portio 5
echo 1 > /sys/bus/pci/devices/$T/rom
echo "ROM $(dd if=/sys/bus/pci/devices/$T/rom bs=2 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')\
 $(dd if=/sys/bus/pci/devices/$T/rom bs=512 skip=1 count=1 2>/dev/null | sha256sum)"
echo 0 > /sys/bus/pci/devices/$T/rom
$P $B dma
spu() { awk '$1 == "SPU:" { print $2 }' /proc/interrupts; }
S0=$(spu)
$P $B msi VECTOR 3
echo "SPU $S0 $(spu) $(dmesg | grep -c 'Spurious interrupt (vector VECTOR)')"
insmod /tmp/p/uio.ko && insmod /tmp/p/uio_pci_generic.ko
echo uio_pci_generic > $D/driver_override
echo $B > /sys/bus/pci/drivers_probe
echo "DRIVER $(basename $(readlink $D/driver))"
$P $B intx 3
grep uio_pci_generic /proc/interrupts | sed 's/^/IRQ /'
echo $B > $D/driver/unbind
$P $B dma-out OUTSIDE
$P $B garbage 7
echo SURVIVED
""".replace("VECTOR", f"{MSI_VECTOR:#x}").replace("OUTSIDE", f"{OUTSIDE_RAM:#x}")


def _driver(bdf: str) -> str | None:
    link = SYSFS / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def _behind(port: str) -> str:
    """The BDF of the function the lane put behind root port `port` (`root-port=on`): the
    first function of the port's secondary bus, whose number the lane's kernel chose."""
    found = sorted(p.name for p in (SYSFS / port).glob("0000:*:00.0"))
    assert found, f"nothing behind the root port {port}"
    return found[0]


def _group(bdf: str) -> int:
    return int(os.path.basename(os.readlink(SYSFS / bdf / "iommu_group")))


def _bind(bdf: str, driver: str) -> None:
    """Rebind as the lane's init does (driver_override + drivers_probe)."""
    if _driver(bdf) is not None:
        (SYSFS / bdf / "driver" / "unbind").write_text(bdf)
    (SYSFS / bdf / "driver_override").write_text(driver)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    assert _driver(bdf) == driver


def _kvmkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


# The guest's command: the script is too long for the kernel command line kvmkit passes a
# command on, so it travels in the drive with the probe.
GUEST_COMMAND = "mkdir /tmp/p && tar -x -f /dev/vda -C /tmp/p && sh /tmp/p/run.sh"


def _probe_drive(tmp_path: Path) -> Path:
    """The guest script, the probe (built static) and the guest kernel's uio modules in a
    tar the guest unpacks from /dev/vda."""
    exe = tmp_path / "vfio_probe"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe),
                    str(Path(__file__).with_name("vfio_probe.c"))], check=True, timeout=120)
    kernel = assets.ensure_kernel()
    index = assets.module_index(kernel)
    tar = tmp_path / "probe.tar"
    script = tmp_path / "run.sh"
    script.write_text(GUEST_SCRIPT)
    with tarfile.open(tar, "w") as t:
        t.add(exe, "vfio_probe")
        t.add(script, "run.sh")
        for name in ("uio", "uio_pci_generic"):
            ko = tmp_path / f"{name}.ko"
            ko.write_bytes(assets.read_module(index[name]))
            t.add(ko, f"{name}.ko")
    raw = tar.read_bytes()
    tar.write_bytes(raw.ljust((len(raw) + 4095) // 4096 * 4096, b"\0"))
    return tar


@pytest.fixture
def lane_edu() -> Iterator[None]:
    if not (SYSFS / SOLO).exists() or _driver(SOLO) != "vfio-pci":
        pytest.fail(f"{SOLO} is not an edu bound to vfio-pci: run in `kvmkit lane --device edu`")
    yield


def test_edu_passthrough_to_linux(tmp_path: Path, lane_edu: None) -> None:
    drive = _probe_drive(tmp_path)
    rng = _behind(RNG_PORT)
    proc = _kvmkit(
        "--stats", "--mem-mib", "128", "--timeout", "500", "--vfio", SOLO, "--vfio", rng,
        "--vfio", TESTDEV, "--drive", f"{drive},ro", "--", "sh", "-c", GUEST_COMMAND,
        timeout=600,
    )  # fmt: skip
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    lines = [line.strip() for line in out.splitlines()]

    def value(key: str) -> str:
        found = [line[len(key) + 1 :] for line in lines if line.startswith(key + " ")]
        assert found, f"no {key} line in\n{out}\n{err}"
        return found[-1]

    # sysfs: the function, its IDs, class 00ff00 (edu is "other") and a 1 MiB BAR0 inside
    # kvmkit's PCI window.
    bdf, vendor, device, cls = value("DEV").split()
    assert bdf == "0000:00:01.0"  # slot 1 of kvmkit's bus, after the host bridge
    assert (vendor, device, cls) == (*EDU, "0x00ff00")
    start, end, flags = (int(x, 16) for x in value("RES0").split())
    assert end - start + 1 == 1 << 20 and 0xE0000000 <= start < 0xEF000000, value("RES0")
    assert flags & 0x200  # IORESOURCE_MEM
    # The registers through BAR0 (busybox devmem): ID, liveness (inverse), 5! = 120.
    assert value("ID") == "0x010000ED"
    assert value("LIVE") == "0xEDCBA987"
    assert int(value("FACT"), 16) == 120
    assert value("SPIN") == "200000 of 200000"
    # 200,000 reads of BAR0 and fewer exits than that in the whole run: BAR0 is mapped into
    # the guest (a KVM memory slot), not trapped.
    stats = re.search(r"(\d+) vCPU exits", err)
    assert stats and int(stats.group(1)) < 200000, err
    # virtio-rng, passed through: the guest's virtio_pci drives it over MSI-X (the table
    # trapped and emulated by kvmkit) and reads 4 KiB of entropy by DMA.
    assert value("RNGDEV") == "0000:00:02.0 virtio-pci"
    count, current = value("RNG").split()
    assert count == "4096" and current.startswith("virtio_rng"), value("RNG")
    assert value("RNGMSI") == "msix"
    rng_irq = value("RNGIRQ").split()
    assert int(rng_irq[1]) > 0 and "PCI-MSI" in " ".join(rng_irq), rng_irq
    # Function-level reset: the guest sees the rng's FLR capability (its PCI Express
    # capability is the device's), its reset through sysfs is an FLR, which kvmkit turns into
    # VFIO_DEVICE_RESET (the device never sees the guest's FLR bit): the virtio status the
    # probe set (ACKNOWLEDGE | DRIVER) is 0 afterwards. Linux restores the BARs and MSI-X
    # after the reset, and virtio_pci drives the device again.
    assert value("RESETMETHOD").split()[0] == "flr", value("RESETMETHOD")
    # The status before the probe's writes is not checked: Linux's virtio_dev_remove sets
    # ACKNOWLEDGE again after the driver's reset when virtio_pci lets go (seen: 1).
    _, set_status, after_flr = value("VIRTIOFLR").split()
    assert (set_status, after_flr) == ("3", "0"), value("VIRTIOFLR")
    count, current = value("RNGAGAIN").split()
    assert count == "512" and current.startswith("virtio_rng"), value("RNGAGAIN")
    # pci-testdev in slot 3: its I/O BAR (256 ports) in kvmkit's I/O window, and reads and
    # writes through it reach the device (port exits, VFIO region reads and writes).
    testdev, io_start, io_end, io_flags = value("TESTDEV").split()
    assert testdev == "0000:00:03.0"
    start = int(io_start, 16)
    assert 0xC000 <= start and int(io_end, 16) - start + 1 == 256, value("TESTDEV")
    assert int(io_flags, 16) & 0x100  # IORESOURCE_IO
    assert value("PORTIO") == "portio-no-eventfd 131 5"
    # Its expansion ROM (trapped, read through VFIO's ROM region): the option ROM's 55 AA
    # signature and the bytes of the file QEMU loaded.
    magic, digest = value("ROM").split()[:2]
    assert magic == "55aa"
    assert digest == hashlib.sha256(ROM_FILE.read_bytes()[512:1024]).hexdigest()
    # DMA both ways through the IOMMU mapping of guest RAM.
    assert value("DMA") == "ok 2048"
    # MSI: 3 factorial interrupts with vector 0xf5 reached the guest's LAPIC.
    assert value("MSI").startswith("sent 3 of 3"), out
    spu_before, spu_after, logged = (int(x) for x in value("SPU").split())
    assert spu_after - spu_before >= 3 and int(logged) >= 3, value("SPU")
    # INTx: through uio_pci_generic, a level-triggered IO-APIC line (the DSDT's _PRT).
    assert value("DRIVER") == "uio_pci_generic"
    assert value("INTX") == "got 3 of 3"
    irq = value("IRQ").split()
    assert int(irq[1]) >= 3 and "IO-APIC" in irq and irq[-1] == "uio_pci_generic", irq
    assert "fasteoi" in " ".join(irq)
    # DMA outside guest RAM is not mapped in the IOMMU: the lane's VT-d reports a fault.
    assert value("DMAOUT").startswith(f"{OUTSIDE_RAM:#x}")
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert re.search(rf"DMAR: .*fault addr (0x)?0*{OUTSIDE_RAM:x}", dmesg), dmesg[-3000:]
    # Nonsense in config space and BAR0 did not take kvmkit down: the command finished.
    assert "GARBAGE bar done" in out and "SURVIVED" in lines, out
    # Nor did it flood kvmkit's log: each kind of line a guest can cause is rate-limited
    # (kvmkit.guestlog: a burst, then one per interval).
    kinds = Counter(re.sub(r"0x[0-9a-f]+|\d+", "N", line) for line in err.splitlines())
    assert max(kinds.values(), default=0) <= guestlog.BURST + 1, err[-3000:]
    # Everything was released: the group can be opened again.
    for bdf in (SOLO, rng, TESTDEV):
        fd = os.open(f"/dev/vfio/{_group(bdf)}", os.O_RDWR)
        os.close(fd)


def test_refusals_are_one_line(lane_edu: None) -> None:
    def refused(*args: str) -> str:
        proc = _kvmkit(*args, "--", "true")
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return lines[0]

    assert "no such PCI device" in refused("--vfio", "0000:00:1d.7")
    # The lane's own virtio-serial function is bound to virtio-pci.
    other = next(p.name for p in SYSFS.iterdir() if _driver(p.name) == "virtio-pci")
    line = refused("--vfio", other)
    assert "bound to virtio-pci, not vfio-pci" in line and "driver_override" in line
    # A group with another device bound to a host driver: not viable, the other one named.
    assert _group(PAIR[0]) == _group(PAIR[1])
    _bind(PAIR[1], "uio_pci_generic")
    try:
        line = refused("--vfio", PAIR[0])
        assert f"IOMMU group {_group(PAIR[0])} is not viable" in line
        assert f"{PAIR[1]} (1234:11e8) is bound to uio_pci_generic" in line
    finally:
        _bind(PAIR[1], "vfio-pci")
    # A group another process holds.
    busy = os.open(f"/dev/vfio/{_group(SOLO)}", os.O_RDWR)
    try:
        line = refused("--vfio", SOLO)
    finally:
        os.close(busy)
    assert "in use by another process" in line, line


def test_failed_start_releases_every_vfio_fd(lane_edu: None) -> None:
    """In one process: the first device's group and the container are open when the second
    one's group turns out to be busy; the error leaves nothing open."""
    from kvmkit.errors import UserError
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine

    busy = os.open(f"/dev/vfio/{_group(PAIR[0])}", os.O_RDWR)
    before = set(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(UserError, match="in use by another process"):
            with Machine(MachineConfig(vfio=[SOLO, PAIR[0]], command=["true"])) as m:
                m.build()
    finally:
        os.close(busy)
    leaked = [
        os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - before
        if os.path.exists(f"/proc/self/fd/{fd}")
    ]  # fmt: skip
    assert not [p for p in leaked if "vfio" in p], leaked
    fd = os.open(f"/dev/vfio/{_group(SOLO)}", os.O_RDWR)  # not EBUSY: released
    os.close(fd)
