"""virtio-pci under the default Linux guest (needs VMX/SVM: runs in the lane here).

One boot with `--virtio-transport pci`: Debian's stock kernel finds the PCI root from the
DSDT's PNP0A03 host bridge, enumerates it through mechanism #1, binds virtio_pci to the
block and entropy functions, and the guest then reads and writes /dev/vda, uses /dev/hwrng,
and its virtio interrupts are MSI-X: "PCI-MSI" edge interrupts in /proc/interrupts (Linux
6.1 names MSI and MSI-X alike there), whose mode in /sys/bus/pci/devices/*/msi_irqs/ is
"msix".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.hwvirt

IMAGE_TEXT = b"kvmkit virtio-pci drive\n"
WRITTEN = b"written by the guest over virtio-pci\n"

GUEST_SCRIPT = r"""
echo "CMDLINE $(cat /proc/cmdline)"
echo "VDA $(readlink -f /sys/block/vda/device)"
for d in /sys/bus/pci/devices/*; do
    drv=$(readlink -f $d/driver)
    echo "PCIDEV ${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class) ${drv##*/}"
done
echo "READ $(head -c 23 /dev/vda)"
printf 'written by the guest over virtio-pci\n' |
    dd of=/dev/vda bs=512 seek=4 conv=fsync 2>/dev/null
echo "WROTE $?"
echo "RNG $(head -c 4096 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
for f in /sys/bus/pci/devices/*/msi_irqs/*; do
    echo "MSIMODE ${f#/sys/bus/pci/devices/} $(cat $f)"
done
grep 'virtio' /proc/interrupts | sed 's/^/IRQ /'
"""


def test_blk_and_rng_over_pci_with_msix(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE_TEXT.ljust(1 << 20, b"\0"))
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvmkit", "run", "--timeout", "400",
            "--virtio-transport", "pci", "--drive", str(image), "--rng",
            "--", "sh", "-c", GUEST_SCRIPT,
        ],
        capture_output=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    lines = [line.strip() for line in out.splitlines()]

    def values(key: str) -> list[str]:
        return [line[len(key) + 1 :] for line in lines if line.startswith(key + " ")]

    assert "pci=off" not in values("CMDLINE")[0]
    # /dev/vda is a virtio device whose parent is PCI function 0000:00:01.0.
    assert "/pci0000:00/0000:00:01.0/virtio" in values("VDA")[0], out
    devices = {fields.split()[0]: fields.split()[1:] for fields in values("PCIDEV")}
    assert devices["0000:00:00.0"][:3] == ["0x1b36", "0x0008", "0x060000"]
    assert devices["0000:00:01.0"] == ["0x1af4", "0x1042", "0x010000", "virtio-pci"]
    assert devices["0000:00:02.0"] == ["0x1af4", "0x1044", "0xff0000", "virtio-pci"]
    assert values("READ") == [IMAGE_TEXT.decode().strip()]
    assert values("WROTE") == ["0"]
    assert image.read_bytes()[4 * 512 : 4 * 512 + len(WRITTEN)] == WRITTEN
    count, current = values("RNG")[0].split()
    assert count == "4096" and current.startswith("virtio_rng")
    # Every virtio interrupt is a message-signalled one, and each is an MSI-X vector:
    # config + one per queue for each device (blk: req.0, rng: input).
    irqs = values("IRQ")
    assert len(irqs) == 4 and all("PCI-MSI" in line for line in irqs), out
    assert any(line.endswith("virtio0-req.0") for line in irqs), out
    modes: dict[str, list[str]] = {}
    for entry in values("MSIMODE"):
        path, mode = entry.split()
        modes.setdefault(path.split("/")[0], []).append(mode)
    assert modes == {"0000:00:01.0": ["msix", "msix"], "0000:00:02.0": ["msix", "msix"]}, out
