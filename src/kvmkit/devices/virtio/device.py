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
`config_write`, `activate` and `reset_device`.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Callable
from typing import ClassVar, Protocol

from kvmkit.devices.virtio.queue import QueueError, SplitQueue
from kvmkit.memory import GuestMemory

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


class Interrupt(Protocol):
    def signal(self, cause: int, queue: int = 0) -> None:
        """Raise a used-buffer (INT_VRING, for `queue`) or configuration-change interrupt."""


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
        """Called once at DRIVER_OK, the queues validated."""

    def process_queue(self, index: int) -> None:
        """Take and complete the available chains of queue `index` (worker thread)."""
        raise NotImplementedError

    def reset_device(self) -> None:
        """Device-specific part of a reset (§2.4)."""

    def quiesce(self) -> None:
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
            self.quiesce()
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
                self.quiesce()
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
            for key, events in self._sel.select():
                data = key.data
                if data is None:
                    _drain(self._wake_r)
                    continue
                if data.callback is None:
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
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
        self._stop = True
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
