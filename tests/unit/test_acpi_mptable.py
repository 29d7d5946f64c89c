"""ACPI tables and the MP table: checksums, lengths, the RSDP -> XSDT -> FADT -> DSDT chain,
MADT and MP entries; `iasl` (Debian acpica-tools) disassembles the DSDT when installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmkit.arch.x86_64 import acpi, layout
from kvmkit.arch.x86_64.mptable import build_mptable, describes, mptable_size, write_mptable
from kvmkit.devices.legacy.power import AcpiPower
from kvmkit.memory import GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    m.add_anonymous(0, 2 << 20)
    yield m
    m.close()


def table(mem: GuestMemory, addr: int) -> bytes:
    length = mem.read_u32(addr + 4)
    assert 36 <= length < 0x10000
    data = mem.read(addr, length)
    assert sum(data) & 0xFF == 0, f"{data[:4]!r} checksum"
    return data


def write(mem: GuestMemory, nvcpus: int = 2, **kw: Any) -> int:
    apic_ids = kw.pop("apic_ids", list(range(nvcpus)))
    return acpi.write_acpi_tables(
        mem, apic_ids, pm_port=AcpiPower.PM1_EVT_PORT, reset_port=AcpiPower.RESET_PORT, **kw
    )


def chain(mem: GuestMemory, rsdp: int) -> dict[bytes, bytes]:
    raw = mem.read(rsdp, 36)
    assert raw[:8] == b"RSD PTR "
    assert sum(raw[:20]) & 0xFF == 0 and sum(raw) & 0xFF == 0
    assert raw[15] == 2 and struct.unpack_from("<I", raw, 20)[0] == 36
    xsdt_addr = struct.unpack_from("<Q", raw, 24)[0]
    xsdt = table(mem, xsdt_addr)
    assert xsdt[:4] == b"XSDT" and (len(xsdt) - 36) % 8 == 0
    tables = {b"XSDT": xsdt}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(mem, addr)
        tables[t[:4]] = t
    fadt = tables[b"FACP"]
    x_dsdt = struct.unpack_from("<Q", fadt, 140)[0]
    assert struct.unpack_from("<I", fadt, 40)[0] == x_dsdt
    tables[b"DSDT"] = table(mem, x_dsdt)
    for addr in [xsdt_addr, x_dsdt, *(a for (a,) in struct.iter_unpack("<Q", xsdt[36:]))]:
        assert layout.ACPI_ADDR <= addr < layout.ACPI_END
    return tables


def test_rsdp_at_acpi_addr_and_chain(mem: GuestMemory) -> None:
    rsdp = write(mem)
    assert rsdp == layout.ACPI_ADDR
    tables = chain(mem, rsdp)
    assert set(tables) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    facs_addr = struct.unpack_from("<I", tables[b"FACP"], 36)[0]
    assert facs_addr % 64 == 0 and mem.read(facs_addr, 8) == b"FACS" + (64).to_bytes(4, "little")
    for t in tables.values():
        assert t[10:16] == b"KVMKIT"


def test_fadt_pm1_blocks_and_reset_register(mem: GuestMemory) -> None:
    fadt = chain(mem, write(mem))[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 10)  # RESET_REG_SUP
    assert not flags & (1 << 20)  # not hardware-reduced: Linux keeps the ISA IRQ mapping
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<I", fadt, 56)[0] == AcpiPower.PM1_EVT_PORT
    assert struct.unpack_from("<I", fadt, 64)[0] == AcpiPower.PM1_CNT_PORT
    assert (fadt[88], fadt[89]) == (4, 2)

    def gas(offset: int) -> tuple[int, int, int, int, int]:
        return struct.unpack_from("<BBBBQ", fadt, offset)  # type: ignore[return-value]

    assert gas(116) == (1, 8, 0, 1, AcpiPower.RESET_PORT)
    assert fadt[128] == 0x01
    assert struct.unpack_from("<H", fadt, 109)[0] & 0x2 == 0  # no 8042 by default
    assert fadt[108] == 0x32  # century register


def test_fadt_8042_flag_on_request(mem: GuestMemory) -> None:
    fadt = chain(mem, write(mem, i8042=True))[b"FACP"]
    assert struct.unpack_from("<H", fadt, 109)[0] & 0x2


def test_dsdt_s5_package_bytes(mem: GuestMemory) -> None:
    dsdt = chain(mem, write(mem))[b"DSDT"]
    # NameOp "_S5_" PackageOp PkgLength(8) NumElements(4) 5 5 0 0
    assert dsdt[36:] == bytes.fromhex("085f53355f1208040a050a050000")


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        assert length >= 2 and at + length <= len(madt)
        out.append((kind, madt[at : at + length]))
        at += length
    assert at == len(madt)
    return out


@pytest.mark.parametrize("nvcpus", [1, 2, 8, 254])
def test_madt_entries(mem: GuestMemory, nvcpus: int) -> None:
    madt = chain(mem, write(mem, nvcpus))[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    entries = madt_entries(madt)
    lapics = [e for k, e in entries if k == 0]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [
        (i, i, 1) for i in range(nvcpus)
    ]
    (ioapic,) = [e for k, e in entries if k == 1]
    assert ioapic[2] == nvcpus and struct.unpack_from("<II", ioapic, 4) == (layout.IOAPIC_ADDR, 0)
    overrides = [struct.unpack_from("<BBIH", e, 2) for k, e in entries if k == 2]
    assert overrides == [(0, 0, 2, 0), (0, 9, 9, 0xD)]
    assert [e for k, e in entries if k == 4] == [bytes([4, 6, 0xFF, 0, 0, 1])]
    assert len(entries) == nvcpus + 4


def test_acpi_bad_arguments(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        write(mem, 0)
    with pytest.raises(ValueError):
        write(mem, apic_ids=[0, 1, 1])
    with pytest.raises(ValueError):
        acpi.write_acpi_tables(mem, [0], pm_port=0xFFFF, reset_port=0x602)
    with pytest.raises(ValueError):
        acpi.write_acpi_tables(mem, [0], pm_port=0x600, reset_port=0x608, addr=0xE0008)


def test_aml_pkg_length_encodings() -> None:
    assert acpi.aml_pkg_length(7) == bytes([8])
    assert acpi.aml_pkg_length(62) == bytes([63])
    # 63 content bytes + 2 length bytes = 65 = 0x41: lead 0x41 (1 extra byte, low nibble 1)
    assert acpi.aml_pkg_length(63) == bytes([0x41, 0x04])
    assert acpi.aml_pkg_length(0x1000) == bytes([0x83, 0x00, 0x01])  # 0x1003 total
    with pytest.raises(ValueError):
        acpi.aml_name_seg("s5")


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl not installed (acpica-tools)")
def test_iasl_disassembles_the_tables(mem: GuestMemory, tmp_path: Path) -> None:
    tables = chain(mem, write(mem, 2))
    for sig, data in tables.items():
        path = tmp_path / f"{sig.decode().lower()}.dat"
        path.write_bytes(data)
        proc = subprocess.run(
            ["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'DefinitionBlock ("", "DSDT", 2, "KVMKIT"' in dsl
    assert "Name (_S5, Package (0x04)" in dsl
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 0" in facp
    assert "PM1A Event Block Address : 00000600" in facp
    assert "PM1A Control Block Address : 00000604" in facp
    # Re-assembling the disassembled DSDT proves the AML round-trips through the compiler.
    proc = subprocess.run(["iasl", str(tmp_path / "dsdt.dsl")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "dsdt.aml").read_bytes()[36:] == tables[b"DSDT"][36:]


# -- MP table (Intel MP spec 1.4)
def test_mptable_floating_pointer_and_header(mem: GuestMemory) -> None:
    end = write_mptable(mem, [0, 1])
    base = layout.MPTABLE_ADDR
    assert end == base + mptable_size(2) <= layout.LOW_RAM_END
    fp = mem.read(base, 16)
    assert fp[:4] == b"_MP_" and sum(fp) & 0xFF == 0
    assert fp[8] == 1 and fp[9] == 4 and fp[11:16] == bytes(5)
    cfg_addr = struct.unpack_from("<I", fp, 4)[0]
    assert cfg_addr == base + 16
    hdr = mem.read(cfg_addr, 44)
    assert hdr[:4] == b"PCMP" and hdr[6] == 4
    length, count = struct.unpack_from("<H", hdr, 4)[0], struct.unpack_from("<H", hdr, 34)[0]
    assert sum(mem.read(cfg_addr, length)) & 0xFF == 0
    assert struct.unpack_from("<I", hdr, 36)[0] == layout.LAPIC_ADDR
    assert cfg_addr + length == end and count == 2 + 1 + 1 + 15 + 2


def mp_entries(data: bytes) -> list[bytes]:
    at, out = 16 + 44, []
    while at < len(data):
        size = 20 if data[at] == 0 else 8
        out.append(data[at : at + size])
        at += size
    return out


@pytest.mark.parametrize("apic_ids", [[0], [0, 1, 2], list(range(40)), [0, 1, 2, 4, 5, 6]])
def test_mptable_entries(apic_ids: list[int]) -> None:
    entries = mp_entries(build_mptable(apic_ids))
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(0, 3)] + [(i, 1) for i in apic_ids[1:]]
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus[2:8] == b"ISA   "
    (ioapic,) = [e for e in entries if e[0] == 2]
    ioapic_id = max(apic_ids) + 1
    assert ioapic[1] == ioapic_id and ioapic[3] == 1
    assert struct.unpack_from("<I", ioapic, 4)[0] == layout.IOAPIC_ADDR
    irqs = {e[5]: e[7] for e in entries if e[0] == 3}
    assert all(e[6] == ioapic_id and e[1] == 0 for e in entries if e[0] == 3)
    assert irqs == {0: 2, **{i: i for i in range(1, 16) if i != 2}}
    lints = [(e[1], e[6], e[7]) for e in entries if e[0] == 4]
    assert lints == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_mptable_too_big_for_the_ebda_is_refused(mem: GuestMemory) -> None:
    assert describes(list(range(40))) is None
    assert "more than fit" in str(describes(list(range(41))))
    with pytest.raises(ValueError, match="does not fit"):
        write_mptable(mem, list(range(41)))
    assert write_mptable(mem, list(range(100)), addr=0x9F000) <= layout.LOW_RAM_END
    with pytest.raises(ValueError):
        build_mptable([])


def test_mptable_cannot_name_x2apic_ids() -> None:
    # 8-bit APIC IDs, and the IOAPIC takes the one after the highest: 253 is the last that fits.
    assert describes([0, 253]) is None
    assert "x2APIC" in str(describes([0, 254]))
    assert "x2APIC" in str(describes([0, 300]))
    with pytest.raises(ValueError):
        build_mptable([0, 300])
