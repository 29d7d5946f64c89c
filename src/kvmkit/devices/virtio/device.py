"""The transport-independent part of a virtio device (virtio 1.2 §2, §3).

A device is written once as a `VirtioDevice` subclass; a transport (virtio-mmio or
virtio-pci, see docs/virtio.md) maps its registers onto the state kept here:

- feature bits (§2.2) offered by the device and accepted by the driver, FEATURES_OK (§3.1.1);
- the device status (§2.1) as a state machine with a transition table (`STATUS_ORDER`):
  reset, FEATURES_OK, DRIVER_OK (activation) and NEEDS_RESET;
- the queues (`SplitQueue`), set up through `queue_set_size`, `queue_set_address`,
  `queue_set_ready` (the transports only decode their registers), and their notification
  eventfds: a driver's notify write is a KVM ioeventfd, so it reaches the queue's worker
  thread (`kvmkit.devices.virtio.worker`) without a vCPU exit;
- interrupts through the transport's `Interrupt` (an irqfd: one write(2), no vCPU exit);
- the device-specific configuration space (`config_read`/`config_write`).

Threads and locks. vCPU threads touch the registers; worker threads serve the queues (one
per queue group, `worker_groups()`). Two kinds of lock keep them apart without making a
vCPU wait for device I/O:

- `lock`, the register lock: status, features, queue set-up, config space. Held briefly by
  a vCPU's register access, never across I/O.
- `serve_locks[g]`: held by group g's worker while it serves a chain or a host event (disk
  I/O, tap and socket I/O happen here, outside `lock`). A status change takes every serve
  lock first (so a reset waits for the chain in progress on each queue, at most one, and a
  worker never sees a half-reset device), then `lock`. A worker may take `lock` while it
  holds its serve lock (device_error); never the other way round.

A subclass sets DEVICE_ID, `queue_sizes`, `features` and implements `process_queue(index,
budget)` (runs on the queue's worker, holding its serve lock) and optionally `config_bytes`,
`config_write`, `activate`, `reset_device`, `worker_groups`, and for snapshots `quiesce`,
`save_device`, `check_device_state`, `restore_device`, `restored` and `held_chains`.

Snapshots (docs/snapshot.md): `save()` returns the device's state as a `VirtioState`
(status, features, config generation, every queue's registers and indexes, and the
subclass's own part); `VirtioState.from_dict()` checks such data from a file without
touching anything, and `restore()` takes it over as is, without a reset: the driver in the
restored guest carries on with its rings. The state is transport-independent; a transport
saves its own registers (selectors, interrupt status) beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from kvmkit.devices.virtio.queue import QueueArea, QueueError, QueueState, SplitQueue
from kvmkit.errors import UserError
from kvmkit.guestlog import ErrorRecord, GuestLog
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

# §2.1 Device Status Field
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# §6 Reserved Feature Bits
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33

# Interrupt causes (ISR status bits, §4.1.4.5 / §4.2.2 InterruptStatus)
INT_VRING = 1
INT_CONFIG = 2

# The device status state machine (§2.1, §3.1.1). The driver sets the bits in this order,
# each needing the ones before it (§3.1.1 steps 2-8; several may come in one write); a bit
# set out of order is refused: FEATURES_OK reads back clear (the driver sees the failure,
# §3.1.1 step 6), DRIVER_OK puts the device in NEEDS_RESET. FAILED (the driver gave up,
# §2.1) needs nothing. The driver never clears a bit but by writing 0, a reset (§2.1.2 "The
# driver MUST NOT clear a device status bit"; §2.4): a write without some set bit keeps it.
# NEEDS_RESET is the device's alone (§2.1.2): the driver cannot set or clear it.
STATUS_ORDER: tuple[tuple[int, int], ...] = (
    (STATUS_ACKNOWLEDGE, 0),
    (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
    (STATUS_FEATURES_OK, STATUS_ACKNOWLEDGE | STATUS_DRIVER),
    (STATUS_DRIVER_OK, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
    (STATUS_FAILED, 0),
)

# Chains one pass over a queue may take before its worker serves its other fds (and parks,
# if a pause is asked for); the queue's eventfd is written again so the next pass comes.
QUEUE_BUDGET = 64


# Version of the plain data `VirtioDevice.save()` returns; restore refuses any other.
STATE_VERSION = 1
MAX_QUEUES = 64  # more queues than any kvmkit device has; caps a list read from a file


class Interrupt(Protocol):
    def signal(self, cause: int, queue: int = 0) -> None:
        """Raise a used-buffer (INT_VRING, for `queue`) or configuration-change interrupt."""


@dataclass(frozen=True)
class VirtioState:
    """The transport-independent state of a device, checked by `from_dict`; `device` is the
    subclass's part, checked by the class's `check_device_state` when `from_dict` is given
    the class (a restore gives it: the configuration says which device each entry is)."""

    device_id: int
    status: int
    device_features: int
    driver_features: int
    config_generation: int
    activated: bool
    queues: list[QueueState]
    device: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "device_id": self.device_id, "status": self.status,
            "device_features": self.device_features, "driver_features": self.driver_features,
            "config_generation": self.config_generation, "activated": self.activated,
            "queues": [q.to_dict() for q in self.queues], "device": self.device,
        }  # fmt: skip

    @classmethod
    def from_dict(
        cls, obj: Any, path: str, device_class: type[VirtioDevice] | None = None
    ) -> VirtioState:
        """Check a device's saved state (types, ranges, consistency) without a device: a
        restore runs this over every device before it creates a VM."""
        f = Fields(obj, path)
        version = f.get_int("version", 0, 2**32 - 1)
        if version != STATE_VERSION:
            raise SnapshotError(
                f"snapshot state: {path} has virtio state version {version}, this kvmkit reads "
                f"{STATE_VERSION}"
            )
        status = f.get_int("status", 0, 0xFF)  # §2.1: the device status is one byte
        device_features = f.get_int("device_features")
        driver_features = f.get_int("driver_features")
        # §2.2: the driver accepts a subset of the offered features (set_status checks it at
        # FEATURES_OK; a file claiming otherwise is not one kvmkit wrote).
        if driver_features & ~device_features:
            raise SnapshotError(
                f"snapshot state: {path}: driver features the device did not offer"
            )
        activated = f.get_bool("activated")
        # A device serves its queues only after DRIVER_OK with FEATURES_OK (§3.1.1) and never
        # while it needs a reset (§2.1.2).
        live = STATUS_DRIVER_OK | STATUS_FEATURES_OK
        if activated and (status & live != live or status & (STATUS_NEEDS_RESET | STATUS_FAILED)):
            raise SnapshotError(f"snapshot state: {path}: active device with status {status:#x}")
        raw_queues = f.get_list("queues", MAX_QUEUES)
        queues = [QueueState.parse(q, f"{path}.queues[{i}]") for i, q in enumerate(raw_queues)]
        if activated:
            event_idx = bool(driver_features & VIRTIO_F_EVENT_IDX)
            indirect = bool(driver_features & VIRTIO_F_INDIRECT_DESC)
            for i, q in enumerate(queues):
                if (q.event_idx, q.indirect) != (event_idx, indirect):
                    raise SnapshotError(
                        f"snapshot state: {path}.queues[{i}]: ring features differ from the "
                        "negotiated ones"
                    )
        state = cls(
            device_id=f.get_int("device_id", 0, 0xFFFF), status=status,
            device_features=device_features, driver_features=driver_features,
            config_generation=f.get_int("config_generation", 0, 0xFFFFFFFF),
            activated=activated, queues=queues, device=f.get_obj("device").obj,
        )  # fmt: skip
        if device_class is not None:
            if state.device_id != device_class.DEVICE_ID:
                raise SnapshotError(f"snapshot state: {path} is not the configured device")
            device_class.check_device_state(state.device, f"{path}.device")
        return state


class Budget:
    """How much one pass over a queue may do: `grant(n)` gives up to n chains until
    QUEUE_BUDGET were given, or nothing once `halt()` says stop (a pause or the worker's
    stop was asked for, the device left the live state). `cut` tells the worker that the
    pass ended early, so the queue still has work: it comes back to it."""

    __slots__ = ("_halt", "cut", "left")

    def __init__(self, chains: int = QUEUE_BUDGET,
                 halt: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.left = chains
        self.cut = False
        self._halt = halt

    def grant(self, want: int = 1) -> int:
        if self.left <= 0 or (self._halt is not None and self._halt()):
            self.cut = True
            return 0
        n = min(want, self.left)
        self.left -= n
        return n

    def take(self) -> bool:
        """One more chain?"""
        return self.grant(1) == 1


class FdWatcher(Protocol):
    """How a device has host file descriptors of its own (a tap, Unix sockets) watched by a
    worker thread (the worker of the device's `HOST_GROUP`); `callback(events)` then runs
    there, under that group's serve lock, like `process_queue`."""

    def watch(self, device: VirtioDevice, fd: int, events: int,
              callback: Callable[[int], None]) -> None:  # fmt: skip
        """Watch `fd` for `events` (selectors.EVENT_READ/EVENT_WRITE), replacing any
        earlier watch of it."""

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (no-op if it is not watched); call before closing it."""


class VirtioDevice:
    DEVICE_ID: ClassVar[int] = 0
    # The queue group whose worker watches the device's host fds (see `worker_groups`).
    HOST_GROUP: ClassVar[int] = 0

    def __init__(self, name: str, queue_sizes: list[int], features: int) -> None:
        self.name = name
        self.queues = [SplitQueue(size) for size in queue_sizes]
        # Every device offers VERSION_1 (modern interface only), indirect descriptors and
        # event-index suppression (the queue code implements both).
        self.device_features = (
            features | VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
        )
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.mem: GuestMemory | None = None
        self.interrupt: Interrupt | None = None
        self.activated = False
        self.lock = threading.RLock()  # the register lock (module docstring)
        groups = self.worker_groups()
        if sorted(i for g in groups for i in g) != list(range(len(queue_sizes))):
            raise ValueError(f"virtio {name}: worker groups {groups} do not cover the queues")
        self.serve_locks = [threading.Lock() for _ in groups]
        # One eventfd per queue: the transport registers it as an ioeventfd on its notify
        # register (or writes it itself when there is no VM, e.g. in tests).
        self.notify_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in queue_sizes]
        # Bounded: a guest can make a device fail over and over (kvmkit.guestlog).
        self.errors = ErrorRecord()
        self.glog = GuestLog(log)
        # Set by `VirtioWorkers.add`: devices with host fds of their own watch them here.
        self.watcher: FdWatcher | None = None

    # -- hooks for subclasses
    def worker_groups(self) -> list[list[int]]:
        """Which queues share a worker thread: by default each queue has its own, so a busy
        queue never delays another and the queues of one device run in parallel. A device
        whose queues share state (vsock's connections) puts them in one group."""
        return [[i] for i in range(len(self.queues))]

    def config_bytes(self) -> bytes:
        """The device-specific configuration space, little-endian (§2.5)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space (ignored unless overridden)."""

    def activate(self) -> None:
        """Called once at DRIVER_OK, the queues validated (and by `restored`). An OSError
        (a host resource gone: the tap was deleted) puts the device in NEEDS_RESET."""

    def process_queue(self, index: int, budget: Budget) -> None:
        """Take and complete available chains of queue `index` while `budget.grant()` allows
        (worker thread, holding the queue's serve lock, not the register lock)."""
        raise NotImplementedError

    def reset_device(self) -> None:
        """Device-specific part of a reset (§2.4); every serve lock is held."""

    def quiesce(self) -> None:
        """The VM is pausing and the workers are parked: make what the device did durable
        (virtio-blk: fdatasync of its image)."""

    def save_device(self) -> dict[str, Any]:
        """The device-specific part of a snapshot, as plain data."""
        return {}

    @classmethod
    def check_device_state(cls, state: dict[str, Any], path: str) -> None:
        """Check `save_device()` data read from a file, without a device (types, ranges):
        a restore runs this over every device before it creates a VM. SnapshotError if
        it is malformed."""

    def restore_device(self, state: dict[str, Any], path: str) -> None:
        """Take over `save_device()` data, checked by `check_device_state`; raise
        SnapshotError if it does not fit this device (another image, another MAC...)."""

    def restored(self) -> None:
        """`restore()` took over a live (activated) state: take up the host side as at
        DRIVER_OK, since the driver will not negotiate again (net: the tap's offloads and
        its watch). Runs under the device lock; OSError fails the restore."""
        self.activate()

    def release_host(self) -> None:
        """A live migration's hand-over (the machine is paused): give up the host resources
        the destination's device opens by name (a tap, a listening socket). Most devices
        hold none: nothing to do."""

    def reacquire_host(self) -> None:
        """Undo `release_host` after a failed migration (OSError: the device goes into its
        error state)."""

    def held_chains(self) -> dict[int, int]:
        """{queue: count} of the chains the device took most recently and holds unused (rx
        buffers waiting for data). A snapshot saves them as not taken yet, so the restored
        device takes them again instead of losing them with this process."""
        return {}

    def stop_host_io(self) -> None:
        """Stop watching host fds (the device left the live state: NEEDS_RESET, reset).
        A level-triggered fd left watched would wake the worker in a loop. Called with the
        host group's serve lock held (by its worker, or by a reset that holds them all)."""

    # -- snapshots
    def save(self) -> VirtioState:
        """The device's state. Call with the workers paused (no chain in progress): then the
        queues' indexes match the rings in guest memory."""
        with self.lock:
            held = self.held_chains()
            return VirtioState(
                device_id=self.DEVICE_ID, status=self.status,
                device_features=self.device_features, driver_features=self.driver_features,
                config_generation=self.config_generation, activated=self.activated,
                queues=[q.save(held=held.get(i, 0)) for i, q in enumerate(self.queues)],
                device=self.save_device(),
            )  # fmt: skip

    def restore(self, st: VirtioState, path: str = "virtio") -> None:
        """Take over a checked state without a reset (the driver keeps its rings). Checks that
        it belongs to this kind of device, and that the ready queues of an active device lie
        in guest memory (so `mem` must be set), before anything changes; SnapshotError if
        not."""
        if st.device_id != self.DEVICE_ID:
            raise SnapshotError(
                f"snapshot state: {path} is virtio device {st.device_id}, not {self.DEVICE_ID}"
            )
        # The rebuilt device must offer what the saved one did, or the negotiated features
        # could name something this device does not do.
        if st.device_features != self.device_features:
            raise SnapshotError(
                f"snapshot state: {path}: the device offered features {st.device_features:#x}, "
                f"this one offers {self.device_features:#x} (other drive options, or a tap "
                "with other offloads?)"
            )
        if len(st.queues) != len(self.queues):
            raise SnapshotError(
                f"snapshot state: {path} has {len(st.queues)} queues, the device has "
                f"{len(self.queues)}"
            )
        for i, (q, qs) in enumerate(zip(self.queues, st.queues, strict=True)):
            if qs.size > q.max_size:
                raise SnapshotError(
                    f"snapshot state: {path}.queues[{i}].size {qs.size} exceeds {q.max_size}"
                )
        if st.activated:
            # §2.7: the layout checks a device makes at DRIVER_OK, now against this guest
            # memory, on scratch queues so that a failure changes nothing.
            for i, (q, qs) in enumerate(zip(self.queues, st.queues, strict=True)):
                if not qs.ready:
                    continue
                scratch = SplitQueue(q.max_size)
                scratch.restore(qs)
                try:
                    if self.mem is None:
                        raise QueueError("no guest memory")
                    scratch.validate(self.mem)
                except QueueError as err:
                    raise SnapshotError(f"snapshot state: {path}.queues[{i}]: {err}") from None
        self.check_device_state(st.device, f"{path}.device")
        with self._serving(), self.lock:
            self.restore_device(st.device, f"{path}.device")
            for q, qs in zip(self.queues, st.queues, strict=True):
                q.restore(qs)
            self.status = st.status
            self.driver_features = st.driver_features
            self.config_generation = st.config_generation
            self.activated = st.activated
            if self.activated:
                try:
                    self.restored()
                except OSError as err:
                    raise UserError(f"virtio {self.name}: {err}") from None

    def kick_ready_queues(self) -> None:
        """After a restore: serve each ready queue once, so chains the driver made available
        (and notified) before the pause are not lost with the old process's eventfds."""
        if not self.activated:
            return
        for q, fd in zip(self.queues, self.notify_fds, strict=True):
            if q.ready:
                os.eventfd_write(fd, 1)

    # -- used by transports (vCPU threads)
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features & bit)

    def read_config(self, offset: int, length: int) -> bytes:
        raw = self.config_bytes()
        if offset < 0 or offset + length > len(raw):
            return bytes(length)  # outside the config space: reads as zeros
        return raw[offset : offset + length]

    def write_driver_features(self, select: int, value: int) -> None:
        """§3.1.1 step 5: features may only be written before FEATURES_OK."""
        with self.lock:
            if self.status & STATUS_FEATURES_OK or select > 1:
                return
            shift = 32 * select
            mask = 0xFFFFFFFF << shift
            self.driver_features = (self.driver_features & ~mask) | ((value << shift) & mask)

    def queue_set_size(self, index: int, value: int) -> None:
        """virtio-mmio QueueNum / virtio-pci queue_size for queue `index` (ignored for a
        queue the device does not have or one that is ready, §4.2.2.3, §4.1.4.3.2)."""
        with self.lock:
            if 0 <= index < len(self.queues):
                self.queues[index].set_size(value)

    def queue_set_address(self, index: int, area: QueueArea, value: int, *, shift: int = 0,
                          width: int = 64) -> None:  # fmt: skip
        """A queue area's address, whole or one 32-bit half (SplitQueue.set_address)."""
        with self.lock:
            if 0 <= index < len(self.queues):
                self.queues[index].set_address(area, value, shift=shift, width=width)

    def queue_set_ready(self, index: int, ready: bool) -> None:
        """QueueReady / queue_enable. Enabling a queue of a live device checks its layout
        first (§2.7): a bad one is a device error (NEEDS_RESET), and the queue stays off."""
        with self.lock:
            if not 0 <= index < len(self.queues):
                return
            q = self.queues[index]
            if not ready:
                q.disable()
                return
            try:
                q.enable(self.mem if self.activated else None)
            except QueueError as err:
                self.device_error(f"queue {index}: {err}")

    def set_status(self, value: int) -> None:
        """A driver write of the device status (§2.1), through `STATUS_ORDER`."""
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        with self._serving(), self.lock:
            status = self.status
            for bit, needs in STATUS_ORDER:
                if not value & bit or status & bit:
                    continue
                if status & needs != needs:
                    if bit == STATUS_DRIVER_OK:
                        self.status = status
                        self.device_error("DRIVER_OK without FEATURES_OK")
                        status = self.status
                    continue  # refused: the bit stays clear
                if bit == STATUS_FEATURES_OK and not self._features_acceptable():
                    continue
                status |= bit
                if bit == STATUS_DRIVER_OK:
                    self.status = status
                    self._activate()
                    status = self.status
            self.status = status

    def _features_acceptable(self) -> bool:
        """§3.1.1 step 6: the device refuses features it did not offer, and a modern
        transport needs VIRTIO_F_VERSION_1 (§6.1): FEATURES_OK then reads back 0."""
        return (
            self.driver_features & ~self.device_features == 0
            and self.has_feature(VIRTIO_F_VERSION_1)
        )

    def _activate(self) -> None:
        """DRIVER_OK (every serve lock and the register lock held): check the ready queues'
        layout, take up the host side (`activate`), then serve. A layout error or a host
        error (OSError: a tap that vanished refuses TUNSETOFFLOAD) is not the end of the
        VM: the device enters NEEDS_RESET with a configuration change interrupt (§2.1.2)."""
        if self.mem is None:
            self.device_error("DRIVER_OK before the device has guest memory")
            return
        try:
            for q in self.queues:
                q.event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
                q.indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)
                if q.ready:
                    q.validate(self.mem)
        except QueueError as err:
            self.device_error(str(err))
            return
        try:
            self.activate()
        except OSError as err:
            self.stop_host_io()
            self.device_error(f"activation: {err.strerror or err}")
            return
        self.activated = True
        # Chains the driver queued before DRIVER_OK (allowed for some devices) get served.
        for fd in self.notify_fds:
            os.eventfd_write(fd, 1)

    def reset(self) -> None:
        """§2.4: back to the initial state; the driver reads status 0 when it completed. The
        workers stop after the chain each is serving (`activated` goes first), then the reset
        happens with all of them out of the device."""
        with self.lock:
            self.activated = False
        with self._serving(), self.lock:
            self.stop_host_io()
            self.status = 0
            self.driver_features = 0
            for q in self.queues:
                q.reset()
            self.reset_device()

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """Every serve lock, in order: no worker is inside the device meanwhile."""
        with contextlib.ExitStack() as stack:
            for lock in self.serve_locks:
                stack.enter_context(lock)
            yield

    def device_error(self, message: str) -> None:
        """§2.1.2: the device entered an error state; set NEEDS_RESET and, when DRIVER_OK
        is set, tell the driver with a configuration change notification. The device stops
        serving; its host fds are let go by their worker (`host_event`) or the reset."""
        self.glog.warning("virtio %s: %s: needs reset", self.name, message)
        with self.lock:
            self.errors.append(message)
            self.activated = False
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK and self.interrupt is not None:
                self.interrupt.signal(INT_CONFIG)

    # -- used by the worker threads (kvmkit.devices.virtio.worker)
    def serve_queue(self, index: int, budget: Budget) -> None:
        """The queue's notify eventfd fired: serve it (its worker, serve lock held)."""
        if not self.activated or self.mem is None or not self.queues[index].ready:
            return
        try:
            self.process_queue(index, budget)
        except QueueError as err:
            self.device_error(f"queue {index}: {err}")

    def host_event(self, callback: Callable[[int], None], events: int) -> None:
        """A watched host fd is ready: run the device's callback (host group's worker,
        serve lock held) while the device is live; otherwise let the host fds go."""
        if not self.activated or self.mem is None:
            self.stop_host_io()
            return
        try:
            callback(events)
        except QueueError as err:
            self.device_error(f"host event: {err}")

    def complete(self, index: int, head: int, written: int) -> None:
        """Helper for process_queue: return a chain; interrupt if the driver wants one."""
        assert self.mem is not None
        queue = self.queues[index]
        queue.push(self.mem, head, written)

    def signal_used(self, index: int) -> None:
        assert self.mem is not None
        if self.queues[index].needs_interrupt(self.mem) and self.interrupt is not None:
            self.interrupt.signal(INT_VRING, index)

    # -- diagnostics
    def describe_device(self) -> str:
        """One line of the subclass's own state for `describe` (empty: nothing to add)."""
        return ""

    def describe(self) -> list[str]:
        """The device's state as lines of text, for a stalled VM (`kvmkit run` prints it on
        SIGUSR1): status, each queue's indexes beside what the guest's rings say. Reads
        without locks: a snapshot that may be a moment inconsistent, never blocking."""
        lines = [
            f"virtio {self.name} (device {self.DEVICE_ID}): status {self.status:#x}"
            f"{' live' if self.activated else ''}, features {self.driver_features:#x}, "
            f"errors {self.errors.count}{': ' + self.errors[-1] if self.errors else ''}"
        ]
        mem = self.mem
        for i, q in enumerate(self.queues):
            guest = ""
            if q.ready and mem is not None:
                try:
                    guest = (
                        f" | guest avail.idx {mem.read_u16(q.avail_addr + 2)} "
                        f"flags {mem.read_u16(q.avail_addr)} used.idx "
                        f"{mem.read_u16(q.used_addr + 2)} used_event "
                        f"{mem.read_u16(q.avail_addr + 4 + 2 * q.size)} avail_event "
                        f"{mem.read_u16(q.used_addr + 4 + 8 * q.size)}"
                    )
                except Exception as err:  # a ring the guest placed badly
                    guest = f" | rings unreadable: {err}"
            lines.append(
                f"  q{i}: {'ready' if q.ready else 'off'} size {q.size} last_avail "
                f"{q.last_avail} next_used {q.next_used}{guest}"
            )
        extra = self.describe_device()
        if extra:
            lines.append(f"  {extra}")
        return lines

    def close(self) -> None:
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
