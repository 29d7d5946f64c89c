"""The x86-64 target description kvmkit's stub gives GDB, and the register layout behind it.

GDB numbers remote registers as the target description says (`regnum`), and the `g` packet is
every register in that order, each in target byte order (little endian). The description
follows GDB's own features (GDB manual, "i386 Features"): org.gnu.gdb.i386.core (general
registers, rip, eflags, segment selectors, x87), org.gnu.gdb.i386.sse (xmm0-15, mxcsr),
org.gnu.gdb.i386.linux (orig_rax), org.gnu.gdb.i386.segments (fs_base, gs_base), plus one
feature of kvmkit's own, org.kvmkit.x86.cr, with the control registers and EFER.

Registers come from three KVM structures: `kvm_regs`, `kvm_sregs` and `kvm_fpu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvmkit.abi import structs

Part = Literal["regs", "sregs", "fpu", "none"]


@dataclass(frozen=True)
class RegDef:
    name: str
    bits: int
    type: str
    group: str
    feature: str
    part: Part


_GPR = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
_SEGS = ["cs", "ss", "ds", "es", "fs", "gs"]
_X87_CTRL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
_CRS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
LINUX = "org.gnu.gdb.i386.linux"
SEGMENTS = "org.gnu.gdb.i386.segments"
CONTROL = "org.kvmkit.x86.cr"


def _build() -> list[RegDef]:
    regs: list[RegDef] = []
    for name in _GPR:
        ptr = {"rbp": "data_ptr", "rsp": "data_ptr"}.get(name, "int64")
        regs.append(RegDef(name, 64, ptr, "general", CORE, "regs"))
    regs.append(RegDef("rip", 64, "code_ptr", "general", CORE, "regs"))
    regs.append(RegDef("eflags", 32, "i386_eflags", "general", CORE, "regs"))
    regs += [RegDef(s, 32, "int32", "general", CORE, "sregs") for s in _SEGS]
    regs += [RegDef(f"st{i}", 80, "i387_ext", "float", CORE, "fpu") for i in range(8)]
    regs += [RegDef(n, 32, "int", "float", CORE, "fpu") for n in _X87_CTRL]
    regs += [RegDef(f"xmm{i}", 128, "vec128", "vector", SSE, "fpu") for i in range(16)]
    regs.append(RegDef("mxcsr", 32, "i386_mxcsr", "vector", SSE, "fpu"))
    regs.append(RegDef("orig_rax", 64, "int", "system", LINUX, "none"))
    regs += [RegDef(n, 64, "int", "system", SEGMENTS, "sregs") for n in ("fs_base", "gs_base")]
    regs += [RegDef(n, 64, "int", "system", CONTROL, "sregs") for n in _CRS]
    return regs


REGISTERS: list[RegDef] = _build()
REGNUM: dict[str, int] = {r.name: i for i, r in enumerate(REGISTERS)}
NUM_REGISTERS = len(REGISTERS)
G_PACKET_BYTES = sum(r.bits // 8 for r in REGISTERS)
RIP, RSP, CR3 = REGNUM["rip"], REGNUM["rsp"], REGNUM["cr3"]

_EFLAGS_FIELDS = [
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
]  # fmt: skip
_MXCSR_FIELDS = [
    "IE",
    "DE",
    "ZE",
    "OE",
    "UE",
    "PE",
    "DAZ",
    "IM",
    "DM",
    "ZM",
    "OM",
    "UM",
    "PM",
    "FZ",
]


def _feature_types(feature: str) -> str:
    if feature == CORE:
        fields = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS_FIELDS)
        return f'<flags id="i386_eflags" size="4">{fields}</flags>'
    if feature == SSE:
        vecs = (
            '<vector id="v4f" type="ieee_single" count="4"/>'
            '<vector id="v2d" type="ieee_double" count="2"/>'
            '<vector id="v16i8" type="int8" count="16"/>'
            '<vector id="v8i16" type="int16" count="8"/>'
            '<vector id="v4i32" type="int32" count="4"/>'
            '<vector id="v2i64" type="int64" count="2"/>'
            '<union id="vec128"><field name="v4_float" type="v4f"/>'
            '<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>'
            '<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>'
            '<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/>'
            "</union>"
        )
        fields = "".join(
            f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in enumerate(_MXCSR_FIELDS)
        )
        return vecs + f'<flags id="i386_mxcsr" size="4">{fields}</flags>'
    return ""


def target_xml() -> bytes:
    """The whole description (one document, features inline)."""
    parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">',
             '<target version="1.0"><architecture>i386:x86-64</architecture>']  # fmt: skip
    feature = ""
    for num, reg in enumerate(REGISTERS):
        if reg.feature != feature:
            if feature:
                parts.append("</feature>")
            feature = reg.feature
            parts.append(f'<feature name="{feature}">{_feature_types(feature)}')
        parts.append(
            f'<reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
            f'group="{reg.group}" regnum="{num}"/>'
        )
    parts.append("</feature></target>")
    return "".join(parts).encode("ascii")


TARGET_XML = target_xml()


@dataclass
class RegisterState:
    """One vCPU's registers as fetched at a stop (written back by part when changed)."""

    regs: structs.kvm_regs
    sregs: structs.kvm_sregs
    fpu: structs.kvm_fpu


def _abridged_to_full_tag(ftwx: int, fpu: structs.kvm_fpu, fsw: int) -> int:
    """FXSAVE keeps one "not empty" bit per physical x87 register; GDB wants the 2-bit tags
    (0 valid, 1 zero, 2 special, 3 empty). Physical register i is st((i - TOP) mod 8)."""
    top = (fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        if not ftwx & (1 << phys):
            t = 3
        else:
            raw = bytes(fpu.fpr[(phys - top) & 7])[:10]
            exponent = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mantissa = int.from_bytes(raw[:8], "little")
            if exponent == 0x7FFF:
                t = 2
            elif exponent == 0:
                t = 1 if mantissa == 0 else 2
            else:
                t = 0 if mantissa >> 63 else 2
        tag |= t << (2 * phys)
    return tag


def _full_to_abridged_tag(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


def read_register(state: RegisterState, num: int) -> bytes:
    """Register `num` in target byte order; ValueError for a number outside the layout."""
    if not 0 <= num < NUM_REGISTERS:
        raise ValueError(f"no register {num}")
    reg = REGISTERS[num]
    name, size = reg.name, reg.bits // 8
    value: int
    if name in _GPR or name == "rip":
        value = getattr(state.regs, name)
    elif name == "eflags":
        value = state.regs.rflags & 0xFFFFFFFF
    elif name in _SEGS:
        value = getattr(state.sregs, name).selector
    elif name.startswith("st"):
        return bytes(state.fpu.fpr[int(name[2:])])[:10]
    elif name.startswith("xmm"):
        return bytes(state.fpu.xmm[int(name[3:])])
    elif name in _X87_CTRL:
        fpu = state.fpu
        value = {
            "fctrl": fpu.fcw,
            "fstat": fpu.fsw,
            "ftag": _abridged_to_full_tag(fpu.ftwx, fpu, fpu.fsw),
            "fiseg": 0,
            "fioff": fpu.last_ip & 0xFFFFFFFF,
            "foseg": 0,
            "fooff": fpu.last_dp & 0xFFFFFFFF,
            "fop": fpu.last_opcode,
        }[name]
    elif name == "mxcsr":
        value = state.fpu.mxcsr
    elif name == "orig_rax":
        value = (1 << 64) - 1  # no system call in progress
    elif name in ("fs_base", "gs_base"):
        value = getattr(state.sregs, name[:2]).base
    else:
        value = getattr(state.sregs, name)
    return (value & ((1 << reg.bits) - 1)).to_bytes(size, "little")


def write_register(state: RegisterState, num: int, data: bytes) -> Part:
    """Store `data` (target byte order, exactly the register's size) into `state`; returns
    which structure changed. Segment selectors change only the selector (not the cached
    descriptor); orig_rax is accepted and ignored."""
    if not 0 <= num < NUM_REGISTERS:
        raise ValueError(f"no register {num}")
    reg = REGISTERS[num]
    if len(data) != reg.bits // 8:
        raise ValueError(f"register {reg.name} takes {reg.bits // 8} bytes, not {len(data)}")
    name = reg.name
    value = int.from_bytes(data, "little")
    if name in _GPR or name == "rip":
        setattr(state.regs, name, value)
    elif name == "eflags":
        state.regs.rflags = (state.regs.rflags & ~0xFFFFFFFF) | value
    elif name in _SEGS:
        getattr(state.sregs, name).selector = value & 0xFFFF
    elif name.startswith("st"):
        dst = state.fpu.fpr[int(name[2:])]
        for i, b in enumerate(data):
            dst[i] = b
    elif name.startswith("xmm"):
        dst = state.fpu.xmm[int(name[3:])]
        for i, b in enumerate(data):
            dst[i] = b
    elif name in _X87_CTRL:
        fpu = state.fpu
        if name == "fctrl":
            fpu.fcw = value & 0xFFFF
        elif name == "fstat":
            fpu.fsw = value & 0xFFFF
        elif name == "ftag":
            fpu.ftwx = _full_to_abridged_tag(value)
        elif name == "fioff":
            fpu.last_ip = value
        elif name == "fooff":
            fpu.last_dp = value
        elif name == "fop":
            fpu.last_opcode = value & 0x7FF
        # fiseg/foseg: not kept by FXSAVE in 64-bit mode
    elif name == "mxcsr":
        state.fpu.mxcsr = value
    elif name == "orig_rax":
        return "none"
    elif name in ("fs_base", "gs_base"):
        getattr(state.sregs, name[:2]).base = value
    else:
        setattr(state.sregs, name, value)
    return reg.part


def read_all(state: RegisterState) -> bytes:
    return b"".join(read_register(state, n) for n in range(NUM_REGISTERS))


def write_all(state: RegisterState, data: bytes) -> set[Part]:
    """The `G` packet: every register in order. A shorter packet sets the first registers
    only (GDB may send fewer); a longer one or a cut register is an error."""
    if len(data) > G_PACKET_BYTES:
        raise ValueError(f"G packet of {len(data)} bytes, the layout has {G_PACKET_BYTES}")
    parts: set[Part] = set()
    at = 0
    for num, reg in enumerate(REGISTERS):
        size = reg.bits // 8
        if at == len(data):
            break
        if at + size > len(data):
            raise ValueError(f"G packet ends inside register {reg.name}")
        before = read_register(state, num)
        chunk = data[at : at + size]
        if chunk != before:
            parts.add(write_register(state, num, chunk))
        at += size
    parts.discard("none")
    return parts
