"""A destination (`receive_vm` with the Machine sink, as `kvmkit restore --incoming` runs
it) fed crafted streams over a real socket, on this host's /dev/kvm (the destination opens
it and sets up the VM while the pages arrive).

Every malformed, corrupted, truncated or out-of-range stream ends in one MigrationError
naming the problem, the source is told why (an ERROR frame) where the stream still allows
it, and no guest runs.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from kvmkit.memory import PAGE_SIZE
from kvmkit.migration.machine import MachineSink
from kvmkit.migration.receive import receive_vm
from kvmkit.migration.stream import (
    MAGIC,
    PREAMBLE,
    Channel,
    Kind,
    MigrationError,
    PageBatch,
)
from kvmkit.snapshot.format import encode
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import SETUP
from kvmkit.vmm.persist import config_to_dict


def frame(kind: int, payload: bytes, *, crc: int | None = None) -> bytes:
    head = struct.pack("<HHI", kind, 0, len(payload))
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def setup_payload(mem_mib: int = 32) -> dict[str, Any]:
    from kvmkit.arch.x86_64 import layout

    config = MachineConfig(mem_mib=mem_mib, command=["true"])
    return {"kind": "kvmkit-machine", "config": config_to_dict(config, ()),
            "memory": [[s, n] for s, n in layout.ram_ranges(mem_mib << 20)],
            "handover": False, "vm_setup": SETUP.to_dict()}  # fmt: skip


def feed(script: Callable[[Channel], None]) -> tuple[str, str | None]:
    """Run `receive_vm` with a Machine sink against `script` (the source side); the error
    the destination raised, and the reason the source was sent (ERROR frame), if any."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0kvmkit-test-migration-" + str(threading.get_ident()))
    listener.listen(1)
    told: dict[str, str | None] = {"reason": None}

    def source() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(listener.getsockname())
        ch = Channel(sock, "the destination", timeout=10)
        try:
            script(ch)
            ch.recv([Kind.ACK])
        except MigrationError as err:
            told["reason"] = str(err) if err.remote else None
        finally:
            ch.close()

    t = threading.Thread(target=source)
    t.start()
    try:
        receive_vm(listener, MachineSink(command_output=None, kvm_device="/dev/kvm"),
                   accept_timeout=10)  # fmt: skip
    except MigrationError as err:
        error = str(err)
    else:
        error = ""
    finally:
        listener.close()
    t.join(10)
    return error, told["reason"]


def hello(ch: Channel, version: int = 1) -> None:
    ch.sock.sendall(PREAMBLE.pack(MAGIC, version, b"x86_64\0\0"))
    ch.read_preamble()
    if version != 1:
        ch.recv([])  # the destination's ERROR frame


def test_a_good_start_then_a_corrupted_page_frame() -> None:
    def script(ch: Channel) -> None:
        hello(ch)
        ch.send_json(Kind.SETUP, setup_payload())
        ch.recv_json(Kind.READY)
        good = bytes(b"".join(one_page_batch(0x1000).parts()))
        ch.sock.sendall(frame(Kind.PAGES, good))
        ch.sock.sendall(frame(Kind.PAGES, good, crc=zlib.crc32(good) ^ 1))

    error, told = feed(script)
    assert "PAGES frame checksum mismatch" in error
    assert told is not None and "checksum mismatch" in told


def one_page_batch(gpa: int) -> PageBatch:
    b = PageBatch()
    b.add(gpa, b"\x5a" * PAGE_SIZE)
    return b


@pytest.mark.parametrize(
    ("step", "message"),
    [("version", "speaks migration protocol 7"),
     ("magic", "does not speak kvmkit's migration protocol"),
     ("setup-kind", "not a kvmkit machine"),
     ("setup-layout", "not the memory map"),
     ("setup-handover", "SETUP.handover"),
     ("setup-drive", "missing"),
     ("page-outside", "outside this guest's memory"),
     ("truncated", "closed the connection in the middle of a frame"),
     ("state-corrupt", "migration state: checksum mismatch"),
     ("state-truncated", "migration state: truncated"),
     ("state-malformed", "state.vcpus must be a list"),
     ("pages-after-nothing", "closed the connection")],
)  # fmt: skip
def test_malformed_streams_are_refused(step: str, message: str, tmp_path: Any) -> None:
    def script(ch: Channel) -> None:
        if step == "version":
            hello(ch, version=7)
            return
        if step == "magic":
            ch.sock.sendall(PREAMBLE.pack(b"NOTKVMKT", 1, b"x86_64\0\0"))
            ch.read_preamble()
            return
        hello(ch)
        setup = setup_payload()
        if step == "setup-kind":
            setup["kind"] = "kvmkit-bare-vm"
        elif step == "setup-layout":
            setup["memory"] = [[0, 1 << 30]]
        elif step == "setup-handover":
            setup["handover"] = "yes"
        elif step == "setup-drive":
            setup["config"]["drives"] = [{"path": str(tmp_path / "gone.img"), "size": 4096,
                                          "read_only": False, "serial": ""}]  # fmt: skip
        ch.send_json(Kind.SETUP, setup)
        ch.recv_json(Kind.READY)
        if step == "page-outside":
            ch.send(Kind.PAGES, *one_page_batch(64 << 20).parts())
        elif step == "truncated":
            whole = frame(Kind.PAGES, b"".join(one_page_batch(0x1000).parts()))
            ch.sock.sendall(whole[: len(whole) // 2])
            ch.sock.shutdown(socket.SHUT_WR)
        elif step.startswith("state"):
            state = encode({"kind": "kvmkit-vm", "vcpus": "nope"})
            if step == "state-corrupt":
                state = state[:40] + bytes([state[40] ^ 1]) + state[41:]
            elif step == "state-truncated":
                state = state[:20]
            ch.send(Kind.STATE, state)
        else:
            ch.sock.shutdown(socket.SHUT_WR)

    error, told = feed(script)
    assert message in error, error
    if step not in ("truncated", "pages-after-nothing", "magic"):
        assert told is not None and message.split(":")[-1].strip() in told, told
