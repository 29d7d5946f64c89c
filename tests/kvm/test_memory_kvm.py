"""Guest memory as the guest sees it: slots, dirty logging, file-backed regions."""

from __future__ import annotations

from pathlib import Path

from kvmkit.memory import PAGE_SIZE, file_region
from kvmkit.testing import TinyGuest

WRITER = """
    movabs $0x200000, %rax
    movq $1, (%rax)
    movabs $0x305000, %rax
    movq $2, (%rax)
    xor %eax, %eax
    mov $0x1000, %dx
    out %eax, %dx
"""


def test_dirty_log_reports_pages_the_guest_wrote() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm(WRITER)
        region = g.mem.regions[0]
        region.log_dirty = True
        g.mem.register(g.vm, log_dirty=True)
        list(g.mem.dirty_pages(g.vm))  # clear what set-up wrote
        g.run()
        dirty = set(g.mem.dirty_pages(g.vm))
        assert {0x200000, 0x305000} <= dirty
        assert 0x204000 not in dirty
        assert set(g.mem.dirty_pages(g.vm)).isdisjoint({0x200000, 0x305000})


def test_vmm_writes_are_tracked_for_migration() -> None:
    with TinyGuest("long64") as g:
        g.mem.start_vmm_dirty_tracking()
        g.mem.write_u32(0x250010, 1)
        with g.mem.view(0x260000, 2 * PAGE_SIZE, write=True) as view:
            view[0] = 1
        assert set(g.mem.dirty_pages(g.vm)) == {0x250000, 0x260000, 0x261000}


def test_private_file_region_is_seen_by_the_guest_and_left_unchanged(tmp_path: Path) -> None:
    image = tmp_path / "mem.img"
    data = bytearray(2 << 20)
    data[0x1000:0x1008] = (0x1122334455667788).to_bytes(8, "little")
    image.write_bytes(bytes(data))
    with TinyGuest("long64", cpl=3) as g:
        g.mem.add(file_region(0x4000_0000, 2 << 20, image, private=True))
        g.load_asm(
            """
            movabs $0x40001000, %rbx
            mov (%rbx), %rax
            mov $0x1002, %dx
            out %eax, %dx
            movq $0, (%rbx)
            xor %eax, %eax
            mov $0x1000, %dx
            out %eax, %dx
            """
        )
        out = g.run()
        assert out.reports == [0x55667788]
        assert g.mem.read_u64(0x4000_1000) == 0  # the guest's write is visible to the VMM
    assert image.read_bytes()[0x1000:0x1008] == (0x1122334455667788).to_bytes(8, "little")
