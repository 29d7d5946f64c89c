"""The threads that serve virtio queues: one `QueueWorker` per queue group of each device
(by default one per queue; see `VirtioDevice.worker_groups`), so device work never runs on
a vCPU thread and one busy queue never delays another.

A worker waits (selectors, epoll) on its queues' notify eventfds (KVM ioeventfds: a driver's
notification wakes it without a vCPU exit), on the host fds its device watches (`FdWatcher`:
net's tap on the rx worker, vsock's sockets) and on a wake-up eventfd. Each ready fd gets one
pass under the group's serve lock (`VirtioDevice.serve_locks`): at most QUEUE_BUDGET chains
per queue (`Budget`), after which the queue's eventfd is written again and the worker comes
back to it after its other fds. Between passes it parks when a pause is asked for, so a pause
never lands inside a chain and waits for at most one chain per worker.

Why a worker per queue, not one event loop for all: a slow disk request or a queue the guest
keeps full then costs only its own queue; the queues of several devices and the rx/tx queues
of one NIC run side by side on a multi-core host (each thread leaves the GIL in its
syscalls: preadv, writev, recvmsg); and it is the shape multi-queue virtio-blk (a worker per
queue), several requests in flight per queue and vhost-net (which takes a NIC's queues out
of the VMM) fit. The price is a thread per queue: a few MiB of virtual memory each and
nothing when idle.

`VirtioWorkers` is a machine's set of them: add devices, start, pause/resume all (snapshots),
stop with a bounded join.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from kvmkit.devices.virtio.device import Budget, VirtioDevice
from kvmkit.threads import ThreadKind, start_thread

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds a stopping worker may take to finish the chain it serves


class QueueWorker:
    """One thread serving `queues` of `device` (one group) and the host fds it watches."""

    def __init__(self, device: VirtioDevice, group: int, queues: list[int]) -> None:
        self.device = device
        self.group = group
        self.queues = queues
        self.name = f"{device.name}/{'+'.join(map(str, queues))}"
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        for index in queues:
            self._sel.register(device.notify_fds[index], selectors.EVENT_READ, index)
        # watch/unwatch come from this thread (callbacks) and from vCPU threads (DRIVER_OK,
        # reset): the selector's table changes under this lock; epoll itself takes changes
        # while another thread waits in it.
        self._sel_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._pause_requested = False
        self._parked = False
        self._stuck = False  # did not stop in time: its fds stay open for it

    # -- pause (snapshots): park between passes, never inside a chain
    @property
    def parked(self) -> bool:
        with self._cond:
            thread = self._thread
            return self._parked or thread is None or not thread.is_alive()

    def request_pause(self) -> None:
        with self._cond:
            self._pause_requested = True
        self._wake_up()

    def wait_parked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._parked or self._thread is None or not self._thread.is_alive(),
                max(0.0, timeout),
            )

    def resume(self) -> None:
        # Not parked from here on (the thread may take a moment to wake): a pause asked
        # right after waits for it to park again, which the loop below does.
        with self._cond:
            self._pause_requested = False
            self._parked = False
            self._cond.notify_all()

    def _halted(self) -> bool:
        """Cut the pass short: a pause or stop is asked for, or the device went down."""
        return self._pause_requested or self._stop or not self.device.activated

    def _park_if_asked(self) -> None:
        with self._cond:
            if not self._pause_requested:
                return
            while self._pause_requested and not self._stop:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait()
            self._parked = False

    # -- FdWatcher
    def watch(self, device: VirtioDevice, fd: int, events: int,
              callback: Callable[[int], None]) -> None:  # fmt: skip
        data = _Watch(callback)
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

    # -- the thread
    def start(self) -> None:
        if self._thread is None:
            self._thread = start_thread(ThreadKind.VIRTIO, self.name, self._run)

    def _run(self) -> None:
        device, serve_lock = self.device, self.device.serve_locks[self.group]
        while not self._stop:
            self._park_if_asked()
            for key, events in self._sel.select():
                data = key.data
                if data is None:
                    _drain_eventfd(key.fd)
                    continue
                if self._pause_requested or self._stop:
                    break  # park first; the fd stays readable and is served after
                if isinstance(data, int):
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
                        continue
                    except OSError:
                        # The device was closed under the worker (its eventfds are gone):
                        # forget the fd rather than let the thread die with EBADF.
                        self.unwatch(key.fd)
                        continue
                    budget = Budget(halt=self._halted)
                    with serve_lock:
                        _guarded(device, device.serve_queue, data, budget)
                    if budget.cut and device.activated:
                        os.eventfd_write(key.fd, 1)  # more to do: come back after the rest
                    continue
                # A callback earlier in this batch may have unwatched (and closed) this fd,
                # or watched a new fd under the same number: only a current watch runs.
                with self._sel_lock:
                    current = self._sel.get_map().get(key.fd)
                if current is None or current.data is not data:
                    continue
                with serve_lock:
                    _guarded(device, device.host_event, data.callback, events)

    def describe(self) -> str:
        thread = self._thread
        state = ("parked" if self._parked else "stopped" if thread is None or not
                 thread.is_alive() else "running")  # fmt: skip
        try:
            fds = len(self._sel.get_map())
        except RuntimeError:
            fds = 0
        return f"worker {self.name}: {state}, {fds} fds watched"

    def request_stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Ask the thread to end and wait at most `timeout` s; False if it is still inside
        the device (a request stuck in the kernel: a hung disk). It is a daemon thread."""
        self.request_stop()
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        if thread.is_alive():
            self._stuck = True
            log.warning("virtio worker %s did not stop within %.1f s", self.name, timeout)
            return False
        return True

    def close(self) -> None:
        """After `stop`. A worker that did not stop keeps its selector and eventfd (it may
        still use them); the process ends soon after."""
        if not self._stuck and self._wake >= 0:
            self._sel.close()
            os.close(self._wake)
            self._wake = -1


class _Watch:
    """What the selector holds for a watched host fd (a notify eventfd holds its queue
    index, the wake-up eventfd None)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _guarded(device: VirtioDevice, call: Callable[..., None], *args: Any) -> None:
    """A bug in a device must not take its worker (and so its queues) down: it becomes a
    device error (NEEDS_RESET), the VM runs on."""
    try:
        call(*args)
    except Exception as err:
        device.glog.exception("virtio %s: device error", device.name)
        device.device_error(f"internal error: {err!r}")


class VirtioWorkers:
    """A machine's virtio worker threads: `add` each device (one worker per queue group)
    before `start`; `pause`/`resume` them all for snapshots; `close` stops them."""

    def __init__(self) -> None:
        self.workers: list[QueueWorker] = []
        self._started = False
        self._stopped = False

    def add(self, device: VirtioDevice) -> None:
        mine = [QueueWorker(device, g, queues) for g, queues in enumerate(device.worker_groups())]
        self.workers.extend(mine)
        device.watcher = mine[device.HOST_GROUP]
        if self._started:
            for w in mine:
                w.start()

    def start(self) -> None:
        self._started = True
        for w in self.workers:
            w.start()

    @property
    def paused(self) -> bool:
        """Every worker parked (or not running): no device code runs until `resume()`."""
        return all(w.parked for w in self.workers)

    def pause(self, timeout: float = 10.0) -> bool:
        """Ask every worker to park after the pass it is in; wait (`timeout` in all) until
        each did. Notifications arriving meanwhile stay counted in their eventfds."""
        for w in self.workers:
            w.request_pause()
        deadline = time.monotonic() + timeout
        return all(w.wait_parked(deadline - time.monotonic()) for w in self.workers)

    def resume(self) -> None:
        for w in self.workers:
            w.resume()

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop every worker, waiting `timeout` s in all (bounded: a worker stuck in a hung
        disk request is left behind, a daemon thread); False if one did not stop."""
        self._stopped = True
        for w in self.workers:
            w.request_stop()
        deadline = time.monotonic() + timeout
        return all([w.stop(max(0.0, deadline - time.monotonic())) for w in self.workers])

    def not_parked(self) -> list[str]:
        """The names of the workers still running (neither parked nor ended)."""
        return [w.name for w in self.workers if not w.parked]

    def describe(self) -> list[str]:
        return [w.describe() for w in self.workers]

    def close(self) -> None:
        """Stop (unless `stop` already ran: its bounded wait is not repeated) and release
        the workers' fds; a worker still stuck keeps its own."""
        if not self._stopped:
            self.stop()
        for w in self.workers:
            w.close()
