"""Kicking a vCPU thread out of KVM_RUN.

KVM_RUN returns with EINTR when a signal is delivered to the thread running it. kvmkit uses
one real-time signal for this (Firecracker does the same), with a handler that does nothing:
the point is only the interruption. `immediate_exit` covers the race where the signal arrives
just before KVM_RUN is entered.
"""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGRTMIN + 2
_installed = False


def _ignore(signum: int, frame: object) -> None:
    return None


def install_kick_handler() -> bool:
    """Install the no-op handler (only possible from the main thread). True if installed."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _ignore)
    # Restart interrupted system calls elsewhere in Python; KVM_RUN still returns EINTR.
    signal.siginterrupt(KICK_SIGNAL, False)
    _installed = True
    return True


def kick_handler_installed() -> bool:
    return _installed


def kick_thread(thread_ident: int) -> None:
    if not _installed:
        raise RuntimeError("install_kick_handler() must run in the main thread first")
    signal.pthread_kill(thread_ident, KICK_SIGNAL)
