"""The kinds of thread a kvmkit VMM runs, and one way to start them.

A VMM process has few kinds of thread, each with one job; naming them makes them visible
(`/proc/PID/task/*/comm`, py-spy, gdb's `info threads`) and gives per-thread policies (a
seccomp filter per kind) one place to hook in:

- `vcpu`, one per vCPU (vmm/vcpu.py; Python name `vcpuN`, kernel name `vcpu-N`): KVM_RUN,
  exits to the port/MMIO buses and so the devices' registers, its run state (pause, debug
  stop, stop);
- `virtio`, one per virtio queue group (devices/virtio/worker.py): serves a device's queues
  and the host fds it watches (disk, tap, sockets);
- `console`, one per machine (vmm/console.py): hands guest console output to its readers;
- `drain`, one per machine with the coalesced ring (kvm/coalesced.py): delivers serial
  writes that no exit picked up;
- `watch`, one per machine running a command (vmm/machine.py): ends the VM after the
  command reported its status;
- `input`, one for an interactive console (cli/run.py): the terminal's input to the UART;

plus the main thread, and the API server, gdb stub and metrics threads where those are on.
`start_thread` starts a daemon thread whose Python name is `kind:name` and whose kernel name
(comm, 15 bytes) is `kind-name` truncated.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable
from typing import Any

PR_SET_NAME = 15  # <linux/prctl.h>
_libc: ctypes.CDLL | None = None


class ThreadKind(enum.Enum):
    VCPU = "vcpu"
    VIRTIO = "virtio"
    CONSOLE = "console"
    DRAIN = "drain"
    WATCH = "watch"
    INPUT = "input"


def _set_comm(name: str) -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass  # only a name


def name_thread(kind: ThreadKind, name: str) -> None:
    """Give the calling thread the kernel name `kind-name` (for threads started elsewhere:
    the vCPU threads, whose Thread objects exist before they start)."""
    _set_comm(f"{kind.value}-{name}")


def start_thread(kind: ThreadKind, name: str, target: Callable[..., Any], *args: Any
                 ) -> threading.Thread:  # fmt: skip
    """Start `target(*args)` on a daemon thread of `kind` named `name`."""

    def body() -> None:
        name_thread(kind, name)
        target(*args)

    thread = threading.Thread(target=body, name=f"{kind.value}:{name}", daemon=True)
    thread.start()
    return thread
