"""The transport-independent part of a virtio device (virtio 1.2 §2, §3).

A device is written once as a `VirtioDevice` subclass; a transport (virtio-mmio today,
see docs/virtio.md) maps its registers onto the state kept here:

- feature bits (§2.2) offered by the device and accepted by the driver, FEATURES_OK (§3.1.1);
- the device status (§2.1) with reset, DRIVER_OK (activation) and NEEDS_RESET;
- the queues (`SplitQueue`) and their notification eventfds: a driver's notify write is a
  KVM ioeventfd, so it reaches the `VirtioWorker` thread without a vCPU exit;
- interrupts through the transport's `Interrupt` (an irqfd: one write(2), no vCPU exit);
- the device-specific configuration space (`config_read`/`config_write`).

A subclass sets DEVICE_ID, `queue_sizes`, `features` and implements `process_queue(index)`
(runs on the worker thread, holding `self.lock`) and optionally `config_bytes`,
`config_write`, `activate`, `reset_device`, and for snapshots `quiesce`, `save_device`,
`check_device_state`, `restore_device`, `restored` and `held_chains`.

Snapshots (docs/snapshot.md): `save()` returns the device's state as a `VirtioState`
(status, features, config generation, every queue's registers and indexes, and the
subclass's own part); `VirtioState.from_dict()` checks such data from a file without
touching anything, and `restore()` takes it over as is, without a reset: the driver in the
restored guest carries on with its rings. The state is transport-independent; a transport
saves its own registers (selectors, interrupt status) beside it.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from kvmkit.devices.virtio.queue import QueueError, QueueState, SplitQueue
from kvmkit.errors import UserError
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


class FdWatcher(Protocol):
    """How a device has host file descriptors of its own (a tap, Unix sockets) watched by the
    worker thread; `callback(events)` then runs there, like `process_queue`."""

    def watch(self, device: VirtioDevice, fd: int, events: int,
              callback: Callable[[int], None]) -> None:  # fmt: skip
        """Watch `fd` for `events` (selectors.EVENT_READ/EVENT_WRITE), replacing any
        earlier watch of it."""

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (no-op if it is not watched); call before closing it."""


class VirtioDevice:
    DEVICE_ID: ClassVar[int] = 0

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
        self.lock = threading.RLock()
        # One eventfd per queue: the transport registers it as an ioeventfd on its notify
        # register (or writes it itself when there is no VM, e.g. in tests).
        self.notify_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in queue_sizes]
        self.errors: list[str] = []
        # Set by `VirtioWorker.add`: devices with host fds of their own watch them here.
        self.watcher: FdWatcher | None = None

    # -- hooks for subclasses
    def config_bytes(self) -> bytes:
        """The device-specific configuration space, little-endian (§2.5)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space (ignored unless overridden)."""

    def activate(self) -> None:
        """Called once at DRIVER_OK, the queues validated (and by `restored`)."""

    def process_queue(self, index: int) -> None:
        """Take and complete the available chains of queue `index` (worker thread)."""
        raise NotImplementedError

    def reset_device(self) -> None:
        """Device-specific part of a reset (§2.4)."""

    def quiesce(self) -> None:
        """The VM is pausing and the worker is parked: make what the device did durable
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

    def held_chains(self) -> dict[int, int]:
        """{queue: count} of the chains the device took most recently and holds unused (rx
        buffers waiting for data). A snapshot saves them as not taken yet, so the restored
        device takes them again instead of losing them with this process."""
        return {}

    # -- snapshots
    def save(self) -> VirtioState:
        """The device's state. Call with the worker paused (no chain in progress): then the
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
        with self.lock:
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

    def stop_host_io(self) -> None:
        """Stop watching host fds (the device left the live state: NEEDS_RESET, reset).
        A level-triggered fd left watched would wake the worker in a loop."""

    # -- used by transports
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features & bit)

    def read_config(self, offset: int, length: int) -> bytes:
        raw = self.config_bytes()
        if offset < 0 or offset + length > len(raw):
            return bytes(length)  # outside the config space: reads as zeros
        return raw[offset : offset + length]

    def write_driver_features(self, select: int, value: int) -> None:
        """§3.1.1 step 5: features may only be written before FEATURES_OK."""
        if self.status & STATUS_FEATURES_OK or select > 1:
            return
        shift = 32 * select
        mask = 0xFFFFFFFF << shift
        self.driver_features = (self.driver_features & ~mask) | ((value << shift) & mask)

    def set_status(self, value: int) -> None:
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            old = self.status
            if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                # §3.1.1 step 6: the device refuses features it did not offer, and a modern
                # transport needs VIRTIO_F_VERSION_1 (§6.1): FEATURES_OK then reads back 0.
                accepted = self.driver_features & ~self.device_features == 0
                if not accepted or not self.has_feature(VIRTIO_F_VERSION_1):
                    value &= ~STATUS_FEATURES_OK
            # NEEDS_RESET is set by the device only; the driver cannot clear it but by reset.
            self.status = (value & ~STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET)
            if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
                self._activate()

    def _activate(self) -> None:
        if self.mem is None or not self.status & STATUS_FEATURES_OK:
            self.device_error("DRIVER_OK without FEATURES_OK")
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
        self.activated = True
        self.activate()
        # Chains the driver queued before DRIVER_OK (allowed for some devices) get served.
        for fd in self.notify_fds:
            os.eventfd_write(fd, 1)

    def reset(self) -> None:
        """§2.4: back to the initial state; the driver reads status 0 when it completed."""
        with self.lock:
            self.status = 0
            self.driver_features = 0
            self.activated = False
            for q in self.queues:
                q.reset()
            self.reset_device()

    def device_error(self, message: str) -> None:
        """§2.1.2: the device entered an error state; set NEEDS_RESET and, when DRIVER_OK
        is set, tell the driver with a configuration change notification."""
        log.warning("virtio %s: %s: needs reset", self.name, message)
        self.errors.append(message)
        with self.lock:
            self.activated = False
            self.stop_host_io()
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK and self.interrupt is not None:
                self.interrupt.signal(INT_CONFIG)

    def notified(self, index: int) -> None:
        """The worker saw the queue's notify eventfd: serve the queue."""
        with self.lock:
            if not self.activated or self.mem is None:
                return
            queue = self.queues[index]
            if not queue.ready:
                return
            try:
                self.process_queue(index)
            except QueueError as err:
                self.device_error(f"queue {index}: {err}")

    def host_event(self, callback: Callable[[int], None], events: int) -> None:
        """The worker saw a watched host fd ready: run the device's callback under the
        device lock, only while the device is live."""
        with self.lock:
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

    def close(self) -> None:
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []


class VirtioWorker:
    """The event loop that serves every virtio device: one thread waiting on the queues'
    notify eventfds and on the host fds devices watch (`FdWatcher`), so device work never
    runs on a vCPU thread."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._stop = False
        # Devices call watch/unwatch from the worker thread (inside callbacks) and from
        # vCPU threads (activate/reset through a register write): the selector's table is
        # changed under this lock; epoll itself takes changes while another thread waits.
        self._sel_lock = threading.Lock()
        # Pausing (snapshots): the thread parks between requests, never inside a chain.
        self._cond = threading.Condition()
        self._pause_requested = False
        self._parked = False

    @property
    def paused(self) -> bool:
        """Parked (or not running): no device code runs until `resume()`."""
        with self._cond:
            thread = self._thread
            return self._parked or thread is None or not thread.is_alive()

    def pause(self, timeout: float = 10.0) -> bool:
        """Ask the thread to park after the request it is serving; wait until it did.
        Notifications arriving meanwhile stay counted in their eventfds."""
        with self._cond:
            self._pause_requested = True
        os.write(self._wake_w, b"p")
        with self._cond:
            return self._cond.wait_for(
                lambda: self._parked or self._thread is None or not self._thread.is_alive(),
                timeout,
            )

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def _park_if_asked(self) -> None:
        with self._cond:
            if not self._pause_requested:
                return
            self._parked = True
            self._cond.notify_all()
            while self._pause_requested and not self._stop:
                self._cond.wait()
            self._parked = False

    def add(self, device: VirtioDevice) -> None:
        for index, fd in enumerate(device.notify_fds):
            self._sel.register(fd, selectors.EVENT_READ, _Watch(device, None, index))
        device.watcher = self

    # -- FdWatcher
    def watch(self, device: VirtioDevice, fd: int, events: int,
              callback: Callable[[int], None]) -> None:  # fmt: skip
        data = _Watch(device, callback, -1)
        with self._sel_lock:
            try:
                self._sel.modify(fd, events, data)
            except KeyError:
                self._sel.register(fd, events, data)

    def unwatch(self, fd: int) -> None:
        with self._sel_lock:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="virtio", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._park_if_asked()
            for key, events in self._sel.select():
                data = key.data
                if data is None:
                    _drain(self._wake_r)
                    continue
                if self._pause_requested or self._stop:
                    break  # park first; the fd stays readable and is served after
                if data.callback is None:
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
                        continue
                    except OSError:
                        # The device was closed under the worker (its eventfds are gone):
                        # forget the fd rather than let the thread die with EBADF.
                        self.unwatch(key.fd)
                        continue
                    _run_guarded(data.device, data.index)
                    continue
                # A callback earlier in this batch may have unwatched (and closed) this fd,
                # or watched a new fd under the same number: only a current watch runs.
                with self._sel_lock:
                    current = self._sel.get_map().get(key.fd)
                if current is None or current.data is not data:
                    continue
                _run_host_guarded(data.device, data.callback, events)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _Watch:
    """What the selector holds per fd: a queue's notify eventfd (`callback` None) or a
    device's host fd with its callback."""

    __slots__ = ("callback", "device", "index")

    def __init__(self, device: VirtioDevice, callback: Callable[[int], None] | None,
                 index: int) -> None:  # fmt: skip
        self.device = device
        self.callback = callback
        self.index = index


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _run_guarded(device: VirtioDevice, index: int) -> None:
    """A bug in a device must not take the worker (and every other device) down."""
    try:
        device.notified(index)
    except Exception as err:
        log.exception("virtio %s: device error", device.name)
        device.device_error(f"internal error: {err!r}")


def _run_host_guarded(device: VirtioDevice, callback: Callable[[int], None], events: int) -> None:
    try:
        device.host_event(callback, events)
    except Exception as err:
        log.exception("virtio %s: device error", device.name)
        device.device_error(f"internal error: {err!r}")
