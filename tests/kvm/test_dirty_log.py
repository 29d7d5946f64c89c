"""Dirty-page tracking for migration (kvmkit.memory.dirty.DirtyLog) on real /dev/kvm.

A CPL3 tiny guest writes one page per step (the host lets it run to its next `out`), so the
test knows exactly which pages the guest dirtied when:

- with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the log keeps a page's bit across collects until
  the page is re-protected (KVM_CLEAR_DIRTY_LOG), and a write after that is caught again;
  without it a collect takes the bits at once;
- the VMM's own writes are in the log, a write through a view also once the view is gone
  (the write that lands after a round took the bits);
- stopping puts logging back as it was; after a failed migration a diff snapshot sees every
  page as dirty.
"""

from __future__ import annotations

import pytest

from kvmkit.abi.constants import Cap
from kvmkit.kvm import IoExit
from kvmkit.memory import PAGE_SIZE
from kvmkit.memory.dirty import DirtyLog, set_bits
from kvmkit.snapshot.memory import enable_dirty_log
from kvmkit.testing import TinyGuest

BASE = 0x200000
STEPS = 4
GUEST = f"""
    mov ${BASE}, %rsi
    mov ${STEPS}, %rcx
1:  movq $1, (%rsi)
    mov $0x2200, %dx
    out %al, %dx
    add $4096, %rsi
    dec %rcx
    jnz 1b
2:  jmp 2b
"""


def step(g: TinyGuest) -> None:
    """Run the guest to its next `out`: it has written one more page."""
    exit_ = g.vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.port == 0x2200, exit_.describe()


def dirty(log: DirtyLog) -> set[int]:
    out = set()
    for region, bitmap in log.collect():
        out |= {region.guest_phys_addr + i * PAGE_SIZE for i in set_bits(bitmap)}
    return out


def guest() -> TinyGuest:
    g = TinyGuest("long64", cpl=3, mem_size=8 << 20)
    g.load_asm(GUEST)
    return g


@pytest.mark.parametrize("manual", [True, False])
def test_guest_writes_are_logged_and_protection_is_per_chunk(manual: bool) -> None:
    with guest() as g:
        if manual and g.vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) <= 0:
            pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        log = DirtyLog(g.mem, g.vm, manual=manual)
        log.start()
        assert log.manual is manual
        step(g)
        first = dirty(log)
        assert BASE in first
        if manual:
            # The bit stays until the page is re-protected...
            assert BASE in dirty(log)
            region = g.mem.region_for(BASE)
            page = (BASE - region.guest_phys_addr) // PAGE_SIZE
            chunk = page - page % 64
            bits = bytearray(8)
            bits[(page - chunk) // 8] |= 1 << ((page - chunk) % 8)
            log.protect(region, chunk, bits, 64)
            assert BASE not in dirty(log)
        else:
            assert BASE not in dirty(log)  # GET_DIRTY_LOG took it
        step(g)  # the next page
        assert BASE + PAGE_SIZE in dirty(log)
        log.stop()
        assert not any(r.log_dirty or r.vmm_dirty for r in g.mem.regions)


def test_vmm_writes_are_logged_also_after_the_round_took_the_bits() -> None:
    with guest() as g:
        log = DirtyLog(g.mem, g.vm)
        log.start()
        g.mem.write_u32(0x300010, 7)
        view = g.mem.view(0x310000, 100, write=True)
        assert {0x300000, 0x310000} <= dirty(log)  # the round takes the bits here
        view[0:4] = b"late"  # a device's readv lands after that
        assert 0x310000 not in dirty(log)  # (nothing marks it while the view lives)
        del view  # the request is done: the view goes
        assert 0x310000 in dirty(log)
        log.stop()


def test_a_failed_migration_leaves_every_page_dirty_for_a_diff_snapshot() -> None:
    with guest() as g:
        enable_dirty_log(g.mem, g.vm)  # a full snapshot was taken: diffs from here
        list(g.mem.dirty_pages(g.vm))
        log = DirtyLog(g.mem, g.vm)
        log.start()
        step(g)
        dirty(log)  # a migration round consumed the log
        log.stop(everything_dirty=True)
        assert all(r.log_dirty and r.vmm_dirty for r in g.mem.regions)  # still on
        assert len(set(g.mem.dirty_pages(g.vm))) == g.mem.size // PAGE_SIZE
