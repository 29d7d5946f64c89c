"""Compare kvmkit's ctypes ABI with the system's kernel headers.

A C program compiled against `<linux/kvm.h>` prints `sizeof`/`offsetof` of every structure and
field kvmkit defines, every ioctl number, capability and exit reason; any mismatch fails. The
same for the VFIO ABI (`<linux/vfio.h>`, `<linux/pci_regs.h>`).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmkit.abi import constants, ioctls, structs, vfio

HEADER = Path("/usr/include/linux/kvm.h")
VFIO_HEADER = Path("/usr/include/linux/vfio.h")

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(),
    reason="needs gcc and the kernel uapi headers (linux-libc-dev)",
)


def walk(cls: Any, prefix: str = "", base: int = 0) -> Iterator[tuple[str, int, int]]:
    """Yield (C member path, offset, size) for every named member, depth first."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        if len(entry) == 3:  # bit-field: offsetof() is not defined for it in C
            continue
        desc = getattr(cls, name)
        offset = base + desc.offset
        if name in anonymous:
            yield from walk(ftype, prefix, offset)
            continue
        path = prefix + name
        yield path, offset, ctypes.sizeof(ftype)
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure | ctypes.Union):
            yield from walk(ftype, path + ".", offset)


FLEX = [
    (structs.kvm_msrs, "entries", structs.kvm_msr_entry, structs.msrs_type),
    (structs.kvm_msr_list, "indices", ctypes.c_uint32, structs.msr_list_type),
    (structs.kvm_cpuid2, "entries", structs.kvm_cpuid_entry2, structs.cpuid2_type),
    (structs.kvm_irq_routing, "entries", structs.kvm_irq_routing_entry, structs.irq_routing_type),
]


def struct_lines(classes: tuple[type[structs.KvmStruct], ...]) -> dict[str, int]:
    want: dict[str, int] = {}
    for cls in classes:
        want[f"sizeof {cls._c_name_}"] = ctypes.sizeof(cls)
        for path, offset, size in walk(cls):
            want[f"offsetof {cls._c_name_} {path}"] = offset
            want[f"sizeof {cls._c_name_} {path}"] = size
    return want


def expected_lines() -> dict[str, int]:
    want = struct_lines(structs.ALL_STRUCTS)
    for base, field, entry, factory in FLEX:
        sized = factory(3)
        want[f"offsetof {base._c_name_} {field}"] = getattr(sized, field).offset
        want[f"sizeof {base._c_name_} {field}[0]"] = ctypes.sizeof(entry)
    for name, value in ioctls.ALL_IOCTLS.items():
        want[f"ioctl {name}"] = value
    for cap in constants.Cap:
        want[f"const KVM_CAP_{cap.name}"] = int(cap)
    for name in ("KVM_COALESCED_MMIO_PAGE_OFFSET", "KVM_PIT_SPEAKER_DUMMY",
                 "KVM_STATE_NESTED_FORMAT_VMX", "KVM_STATE_NESTED_FORMAT_SVM",
                 "KVM_STATE_NESTED_GUEST_MODE", "KVM_STATE_NESTED_RUN_PENDING",
                 "KVM_STATE_NESTED_EVMCS", "KVM_STATE_NESTED_MTF_PENDING",
                 "KVM_STATE_NESTED_GIF_SET", "KVM_EXIT_HYPERV_SYNIC", "KVM_EXIT_HYPERV_HCALL",
                 "KVM_EXIT_HYPERV_SYNDBG",
                 "KVM_DEV_TYPE_VFIO", "KVM_DEV_VFIO_GROUP", "KVM_DEV_VFIO_GROUP_ADD",
                 "KVM_DEV_VFIO_GROUP_DEL",
                 "KVM_VCPU_TSC_CTRL", "KVM_VCPU_TSC_OFFSET"):
        want[f"const {name}"] = getattr(constants, name)
    for flag in constants.DirtyLogFlag:
        want[f"const KVM_DIRTY_LOG_{flag.name}"] = int(flag)
    for reason in constants.ExitReason:
        want[f"const KVM_EXIT_{reason.name}"] = int(reason)
    return want


def vfio_expected_lines() -> dict[str, int]:
    want = struct_lines(vfio.ALL_STRUCTS)
    for name, value in vfio.ALL_IOCTLS.items():
        want[f"ioctl {name}"] = value
    for name, value in {**vfio.CONSTANTS, **vfio.PCI_CONSTANTS}.items():
        want[f"const {name}"] = int(value)
    # `data` is __u8[] in C; eventfds are s32s stored in it from the same offset.
    for base, field, entry, factory in (
        (vfio.vfio_irq_set, "data", ctypes.c_uint8, vfio.irq_set_bools_type),
    ):
        want[f"offsetof {base._c_name_} {field}"] = getattr(factory(3), field).offset
        want[f"sizeof {base._c_name_} {field}[0]"] = ctypes.sizeof(entry)
    assert vfio.irq_set_eventfds_type(3).data.offset == ctypes.sizeof(vfio.vfio_irq_set)
    return want


def c_program(keys: list[str], header: str = "linux/kvm.h", *, guard: bool = True) -> str:
    """The C program printing every key. `guard`: constants missing from the header print -1
    (KVM guards some capabilities with #ifdef); without it a missing one fails to compile
    (VFIO's region and IRQ indexes are enum members, which #ifdef cannot see)."""
    out = ["#include <stddef.h>", "#include <stdio.h>", f"#include <{header}>"]
    if header == "linux/vfio.h":
        out.append("#include <linux/pci_regs.h>")
    out.append("int main(void) {")
    for key in keys:
        kind, rest = key.split(" ", 1)
        if kind == "ioctl":
            expr = f"(unsigned long long)({rest})"
        elif kind == "const" and not guard:
            expr = f"(unsigned long long)({rest})"
        elif kind == "const":
            # Some capabilities are guarded by #ifdef in the header; print -1 when absent.
            out.append(f"#ifdef {rest}")
            out.append(f'printf("%s %lld\\n", "{key}", (long long)({rest}));')
            out.append("#else")
            out.append(f'printf("%s %lld\\n", "{key}", -1LL);')
            out.append("#endif")
            continue
        elif kind == "sizeof" and rest.count(" ") == 1:
            ctype = rest
            expr = f"(unsigned long long)sizeof({ctype})"
        else:
            words = rest.split(" ")
            ctype, path = " ".join(words[:2]), words[2]
            if kind == "offsetof":
                expr = f"(unsigned long long)offsetof({ctype}, {path})"
            else:
                expr = f"(unsigned long long)sizeof((({ctype} *)0)->{path})"
        out.append(f'printf("%s %llu\\n", "{key}", {expr});')
    out.append("return 0; }")
    return "\n".join(out)


def compare(tmp_path: Path, want: dict[str, int], header: str, guard: bool = True) -> list[str]:
    """Compile and run the C program for `want`; the keys whose values differ."""
    keys = sorted(want)
    src = tmp_path / "layout.c"
    src.write_text(c_program(keys, header, guard=guard))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True)
    got: dict[str, int] = {}
    proc = subprocess.run([str(exe)], check=True, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        got[key] = int(value)
    return [
        f"{key}: kvmkit {want[key]:#x}, kernel headers {got.get(key, 'missing')}"
        for key in keys
        if got.get(key) != want[key] and not (key.startswith("const") and got.get(key) == -1)
    ]


def test_abi_matches_kernel_headers(tmp_path: Path) -> None:
    want = expected_lines()
    mismatches = compare(tmp_path, want, "linux/kvm.h")
    assert not mismatches, "\n".join(mismatches)
    # The test must have checked a meaningful amount: every struct and its fields.
    assert len(want) > 400


@pytest.mark.skipif(not VFIO_HEADER.exists(), reason="needs <linux/vfio.h>")
def test_vfio_abi_matches_kernel_headers(tmp_path: Path) -> None:
    want = vfio_expected_lines()
    # Unguarded: a constant the headers lack fails to compile instead of passing as -1.
    mismatches = compare(tmp_path, want, "linux/vfio.h", guard=False)
    assert not mismatches, "\n".join(mismatches)
    assert len(want) > 150


def test_layout_walk_sees_nested_and_anonymous_members() -> None:
    paths = {p for p, _, _ in walk(structs.kvm_run)}
    assert "io.port" in paths  # member of the anonymous exit union
    assert "s.regs.sregs.cr3" in paths
    assert "u" not in paths
