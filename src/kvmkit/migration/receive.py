"""The destination side of a live migration: accept one stream, check everything, build.

    built = receive_vm(listener, sink)    # then run it (the source has ended its guest)

`sink` knows what is being migrated (a `Machine`: kvmkit.migration.machine; a bare KVM VM:
kvmkit.migration.bare). The stream is hostile input until proven otherwise: the preamble's
magic, version and architecture; SETUP checked by the sink before memory is allocated; each
PAGES frame checked whole (length, count, every address inside the memory built from
SETUP) before a byte is written; STATE decoded as a state file (caps, CRC32) and checked by
the sink completely before any VM exists. A refusal goes back to the source as an ERROR
frame with the reason (so it resumes its guest) and is raised here as MigrationError
(a UserError: one line, exit status 2); nothing has run.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from kvmkit.errors import UserError
from kvmkit.kvm import KvmError
from kvmkit.memory import GuestMemory
from kvmkit.migration.stream import (
    PROTOCOL_VERSION,
    Channel,
    Kind,
    MigrationError,
    PageSink,
    parse_json,
)
from kvmkit.snapshot.format import decode

T = TypeVar("T")
IDLE_TIMEOUT = 60.0  # the source may pause for this long between frames


class Sink(Protocol, Generic[T]):
    def prepare(self, setup: dict[str, Any]) -> GuestMemory:
        """Check SETUP (SnapshotError/UserError) and return the guest memory the pages go
        into: laid out as SETUP says, not registered with any VM."""
        ...

    def check(self, payload: dict[str, Any]) -> Any:
        """Check the whole state payload (SnapshotError) before anything is built; returns
        what `build` takes."""
        ...

    def build(self, checked: Any, memory: GuestMemory) -> T:
        """Build the guest from the checked state onto `memory` (which it then owns, also
        on failure), not running yet."""
        ...

    def discard(self, built: T) -> None:
        """The source went away after `build`: close what was built, run nothing."""
        ...

    def describe(self, built: T) -> str:
        """Details of the build for the destination's log (", kvm 3 ms, ..." or "")."""
        ...

    def abort(self) -> None:
        """The migration failed before `build`: release what `prepare` made besides the
        memory (the caller closes that)."""
        ...


def receive_vm(
    listener: socket.socket, sink: Sink[T], *, accept_timeout: float | None = None,
    idle_timeout: float = IDLE_TIMEOUT, log: Callable[[str], None] | None = None,
) -> T:  # fmt: skip
    """Accept one migration on `listener` and return what `sink` built from it, after the
    source was told (ACK) that the guest is ours. The caller starts it at once."""
    say = log or (lambda text: None)
    listener.settimeout(accept_timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise MigrationError(f"no migration arrived within {accept_timeout} s") from None
    except OSError as err:
        raise MigrationError(f"accepting the migration failed: {err.strerror or err}") from None
    ch = Channel(conn, "the source", idle_timeout)
    memory: GuestMemory | None = None
    built: T | None = None
    try:
        version = ch.read_preamble()
        ch.send_preamble()  # first, so a source of another version can read why it ends
        if version != PROTOCOL_VERSION:
            raise MigrationError(
                f"the source speaks migration protocol {version}, this kvmkit "
                f"{PROTOCOL_VERSION}"
            )
        setup = ch.recv_json(Kind.SETUP)
        memory = sink.prepare(setup)
        ch.send_json(Kind.READY, {})
        pages = PageSink(memory)
        t0 = time.monotonic()
        while True:
            kind, payload = ch.recv([Kind.PAGES, Kind.ROUND, Kind.STATE])
            if kind is Kind.PAGES:
                pages.apply(payload, ch.peer)
            elif kind is Kind.ROUND:
                info = parse_json(payload, "the source: ROUND")
                say(f"round {info.get('round')}: {pages.pages} pages received "
                    f"({pages.zero_pages} zero) in {time.monotonic() - t0:.1f} s")  # fmt: skip
            else:
                break
        t_state = time.monotonic()
        state = decode(bytes(payload), what="migration state")
        checked = sink.check(state)
        t_checked = time.monotonic()
        if setup.get("handover") is True:  # host devices change hands: wait for the source
            ch.send_json(Kind.PREPARED, {})
            ch.recv_json(Kind.HANDOVER)
        t_handover = time.monotonic()
        built = sink.build(checked, memory)
        memory = None  # the built guest owns it now
        ch.send_json(Kind.ACK, {})
        say(f"{pages.pages} pages received ({pages.zero_pages} zero); state checked in "
            f"{(t_checked - t_state) * 1e3:.0f} ms, machine built in "
            f"{(time.monotonic() - t_handover) * 1e3:.0f} ms{sink.describe(built)}")  # fmt: skip
    except BaseException as err:
        if not (isinstance(err, MigrationError) and err.remote):
            ch.send_error(str(err) if isinstance(err, UserError | KvmError) else repr(err))
        ch.close()
        if built is not None:
            sink.discard(built)
        else:
            sink.abort()
        if memory is not None:
            memory.close()
        if isinstance(err, MigrationError):
            raise
        if isinstance(err, UserError | KvmError | OSError):
            raise MigrationError(f"migration refused: {err}") from None
        raise
    ch.close()
    return built
