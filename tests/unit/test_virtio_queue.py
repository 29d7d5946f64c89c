"""Split virtqueues (virtio 1.2 §2.7) against a mock driver in real guest memory, and
hostile descriptor tables: every violation is a QueueError, never another exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_mock import AVAIL_BASE, DESC_BASE, MEM_SIZE, USED_BASE, MockDriver, new_memory

from kvmkit.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueArea,
    QueueError,
    SplitQueue,
    vring_need_event,
)


def setup(size: int = 16, **kw: bool) -> tuple[SplitQueue, MockDriver]:
    mem = new_memory()
    q = SplitQueue(size)
    drv = MockDriver(mem, size)
    drv.setup(q, **kw)
    return q, drv


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_buffers_and_used_ring(indirect: bool) -> None:
    q, drv = setup()
    head = drv.add_chain([b"hdr!", b"payload"], [100, 1], indirect=indirect)
    chain = q.pop(drv.mem)
    assert chain is not None and chain.head == head
    assert [drv.mem.read(b.addr, b.length) for b in chain.readable] == [b"hdr!", b"payload"]
    assert [b.length for b in chain.writable] == [100, 1]
    assert q.pop(drv.mem) is None
    q.push(drv.mem, chain.head, 42)
    assert drv.used() == [(head, 42)]


def test_many_chains_wrap_the_rings() -> None:
    q, drv = setup(size=4)
    for round_ in range(40):  # indexes wrap around the ring ten times
        head = drv.add_chain([bytes([round_])], [8])
        chain = q.pop(drv.mem)
        assert chain is not None and chain.head == head
        assert drv.mem.read(chain.readable[0].addr, 1) == bytes([round_])
        q.push(drv.mem, head, 8)
        assert drv.used() == [(head, 8)]


def test_batches_take_and_return_chains_in_ring_order_across_the_wrap() -> None:
    """pop_batch gives what pop would, in order and at most `limit`; push_batch publishes
    its elements in order with one used.idx; both across the rings' wrap."""
    q, drv = setup(size=8, event_idx=True)
    for round_ in range(6):  # 5 chains a round in a ring of 8: most rounds wrap
        heads = [drv.add_chain([bytes([round_, i])], [4], indirect=True) for i in range(5)]
        first = q.pop_batch(drv.mem, 3)
        rest = q.pop_batch(drv.mem, 8)
        assert [c.head for c in first] == heads[:3] and [c.head for c in rest] == heads[3:]
        assert [drv.mem.read(c.readable[0].addr, 2) for c in first + rest] == [
            bytes([round_, i]) for i in range(5)
        ]
        assert q.pop_batch(drv.mem, 8) == []  # empty: re-armed at the driver's index
        assert drv.avail_event() == drv.avail_idx
        q.push_batch(drv.mem, [(c.head, 4 + i) for i, c in enumerate(first + rest)])
        assert drv.used() == [(h, 4 + i) for i, h in enumerate(heads)]
    assert q.pop_batch(drv.mem, 0) == []
    with pytest.raises(QueueError):
        q.push_batch(drv.mem, [(0, 0)] * 9)  # more than the ring holds


def test_no_interrupt_flag_without_event_idx() -> None:
    q, drv = setup()
    drv.add_chain([b"x"], [])
    chain = q.pop(drv.mem)
    assert chain is not None
    q.push(drv.mem, chain.head, 0)
    assert q.needs_interrupt(drv.mem)
    drv.mem.write_u16(AVAIL_BASE, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push(drv.mem, chain.head, 0)
    assert not q.needs_interrupt(drv.mem)


def test_event_idx_suppresses_interrupts_and_rearms_notifications() -> None:
    q, drv = setup(event_idx=True)
    for _ in range(3):
        drv.add_chain([b"x"], [4])
    heads = []
    while (chain := q.pop(drv.mem)) is not None:
        heads.append(chain.head)
    assert len(heads) == 3
    # The queue ran dry: the device asks to be notified at the next avail index (§2.7.10).
    assert drv.avail_event() == 3
    q.push(drv.mem, heads[0], 4)
    assert q.needs_interrupt(drv.mem)  # first decision: always
    drv.set_used_event(2)  # the driver wants an interrupt once used.idx passes 2
    q.push(drv.mem, heads[1], 4)  # used.idx 2: event 2 not yet passed
    assert not q.needs_interrupt(drv.mem)
    q.push(drv.mem, heads[2], 4)  # used.idx 3: passed
    assert q.needs_interrupt(drv.mem)


def test_vring_need_event_wraps() -> None:
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not vring_need_event(5, 3, 1)
    assert vring_need_event(1, 3, 1)


# -- hostile drivers
def hostile(write: callable, size: int = 8) -> QueueError:  # type: ignore[valid-type]
    q, drv = setup(size)
    write(drv)
    with pytest.raises(QueueError) as info:
        while q.pop(drv.mem) is not None:
            pass
    return info.value


def test_descriptor_loop_is_an_error() -> None:
    def loop(drv: MockDriver) -> None:
        drv.write_desc(DESC_BASE, 0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 1)
        drv.write_desc(DESC_BASE, 1, 0x20000, 4, VIRTQ_DESC_F_NEXT, 0)
        drv.publish(0)

    assert "longer" in str(hostile(loop))


@pytest.mark.parametrize(
    ("what", "desc"),
    [
        ("head", None),
        ("next", (0x20000, 4, VIRTQ_DESC_F_NEXT, 99)),
        ("outside", (MEM_SIZE - 2, 4, 0, 0)),
        # An empty buffer outside guest memory (found by tests/fuzz: devices read it as
        # given, and GuestMemory refuses even a zero-length access there).
        ("empty outside", (MEM_SIZE + 0x1000, 0, 0, 0)),
        ("readable after", None),
        ("indirect+next", (0x20000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)),
        ("indirect len", (0x20000, 17, VIRTQ_DESC_F_INDIRECT, 0)),
        ("indirect outside", (MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)),
    ],
)
def test_bad_descriptors_are_errors(what: str, desc: tuple[int, int, int, int] | None) -> None:
    def write(drv: MockDriver) -> None:
        if what == "head":
            drv.publish(8)  # past the table of 8
        elif what == "readable after":
            drv.write_desc(DESC_BASE, 0, 0x20000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
            drv.write_desc(DESC_BASE, 1, 0x20000, 4, 0, 0)
            drv.publish(0)
        else:
            assert desc is not None
            drv.write_desc(DESC_BASE, 0, *desc)
            drv.publish(0)

    hostile(write)


def test_nested_indirect_is_an_error() -> None:
    def write(drv: MockDriver) -> None:
        drv.write_desc(0x20000, 0, 0x20100, 16, VIRTQ_DESC_F_INDIRECT, 0)
        drv.write_desc(DESC_BASE, 0, 0x20000, 16, VIRTQ_DESC_F_INDIRECT, 0)
        drv.publish(0)

    assert "inside an indirect" in str(hostile(write))


def test_avail_index_too_far_ahead_is_an_error() -> None:
    def write(drv: MockDriver) -> None:
        drv.mem.write_u16(AVAIL_BASE + 2, 9)  # 9 new entries in a queue of 8

    assert "ahead" in str(hostile(write))


def test_validate_rejects_bad_layout() -> None:
    mem = new_memory()
    q = SplitQueue(16)
    q.desc_addr, q.avail_addr, q.used_addr = DESC_BASE + 8, AVAIL_BASE, USED_BASE
    with pytest.raises(QueueError, match="aligned"):
        q.validate(mem)
    q.desc_addr, q.used_addr = DESC_BASE, MEM_SIZE - 16
    with pytest.raises(QueueError, match="outside"):
        q.validate(mem)
    q.used_addr, q.size = USED_BASE, 12
    with pytest.raises(QueueError, match="power of 2"):
        q.validate(mem)


descriptors = st.tuples(
    st.one_of(st.just(0x30000), st.integers(0, MEM_SIZE + 64), st.integers(0, 2**64 - 1)),
    st.one_of(st.sampled_from([16, 32, 96]), st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
)


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(descriptors, min_size=8, max_size=8),
    indirect=st.lists(descriptors, min_size=0, max_size=6),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    event_idx=st.booleans(),
)
def test_random_descriptor_tables_never_escape(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    event_idx: bool,
) -> None:
    """Whatever the driver writes, the queue either yields chains whose every buffer lies in
    guest memory, in readable-then-writable order and no longer than allowed, or raises
    QueueError."""
    q, drv = setup(8, event_idx=event_idx)
    for i, d in enumerate(table):
        drv.write_desc(DESC_BASE, i, *d)
    for i, d in enumerate(indirect):
        drv.write_desc(0x30000, i, *d)
    for i, h in enumerate(heads):
        drv.mem.write_u16(AVAIL_BASE + 4 + 2 * i, h)
    drv.mem.write_u16(AVAIL_BASE + 2, avail_idx)
    popped = 0
    try:
        while (chain := q.pop(drv.mem)) is not None:
            popped += 1
            assert popped <= 8
            assert chain.head < 8
            assert len(chain.readable) + len(chain.writable) <= 4096
            for buf in chain.readable + chain.writable:
                assert buf.length == 0 or drv.mem.is_valid(buf.addr, buf.length)
            q.push(drv.mem, chain.head, chain.writable_length & 0xFFFFFFFF)
    except QueueError:
        return
    used_idx = drv.mem.read_u16(USED_BASE + 2)
    assert used_idx == popped
    assert struct.unpack("<H", drv.mem.read(AVAIL_BASE + 2, 2))[0] == avail_idx


def test_queue_set_up_setters_splice_halves_and_refuse_a_live_queue() -> None:
    """What both transports use for the driver's queue registers (§4.2.2 QueueDescLow/High,
    §4.1.3.1 64-bit fields as two dwords): halves and whole addresses land in their area;
    a ready queue keeps its layout (§4.2.2.3, §4.1.4.3.2)."""
    mem = new_memory()
    q = SplitQueue(16)
    assert q.set_address(QueueArea.DESC, 0x1234_5000, width=32)
    assert q.set_address(QueueArea.DESC, 0x9, shift=32, width=32)
    assert q.address(QueueArea.DESC) == 0x9_1234_5000
    assert q.set_address(QueueArea.DESC, DESC_BASE)
    assert q.set_address(QueueArea.DRIVER, AVAIL_BASE)
    assert q.set_address(QueueArea.DEVICE, USED_BASE)
    assert not q.set_address(QueueArea.DESC, 0, shift=16, width=32)  # not a half
    assert q.set_size(8)
    q.enable(mem)
    assert q.ready and q.size == 8
    assert not q.set_size(4) and not q.set_address(QueueArea.DRIVER, 0x40)
    assert (q.size, q.avail_addr) == (8, AVAIL_BASE)
    q.disable()
    assert q.set_size(4) and q.size == 4


@pytest.mark.parametrize(
    ("size", "desc"), [(3, DESC_BASE), (64, DESC_BASE), (16, DESC_BASE + 8), (16, MEM_SIZE)]
)
def test_enabling_a_bad_layout_is_refused_and_the_queue_stays_off(size: int, desc: int) -> None:
    """§2.7: size a power of 2 up to the maximum, areas aligned and in guest memory; checked
    before a live device's queue is used."""
    mem = new_memory()
    q = SplitQueue(32)
    q.set_size(size)
    for area, addr in ((QueueArea.DESC, desc), (QueueArea.DRIVER, AVAIL_BASE),
                       (QueueArea.DEVICE, USED_BASE)):  # fmt: skip
        q.set_address(area, addr)
    with pytest.raises(QueueError):
        q.enable(mem)
    assert not q.ready
    q.enable(None)  # before DRIVER_OK the check waits for activation
    assert q.ready
