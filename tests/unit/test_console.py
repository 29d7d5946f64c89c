"""The console protocol: command output between markers, exit status, markers split anywhere."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.vmm.console import BUFFER, SLACK, CommandOutput, ConsoleStream


def run_stream(stream: bytes, cuts: list[int], nonce: str = "0123abcd") -> tuple[bytes, int | None]:
    out = bytearray()
    parser = CommandOutput(nonce, out.extend)
    pos = 0
    for cut in sorted(set(cuts)):
        parser.feed(stream[pos:cut])
        pos = cut
    parser.feed(stream[pos:])
    parser.flush()
    return bytes(out), parser.status


@settings(max_examples=300)
@given(
    payload=st.binary(max_size=400),
    status=st.integers(0, 255),
    cuts=st.lists(st.integers(0, 600), max_size=30),
)
def test_output_and_status_survive_any_split(payload: bytes, status: int, cuts: list[int]) -> None:
    stream = (
        b"[    0.1] kernel noise\ninit noise\nKVMKIT-0123abcd-BEGIN\n"
        + payload
        + f"\nKVMKIT-0123abcd-EXIT {status}\n".encode()
        + b"reboot: Power down\n"
    )
    out, got = run_stream(stream, [c for c in cuts if c <= len(stream)])
    assert (out, got) == (payload, status)


def test_marker_with_another_nonce_is_output() -> None:
    fake = b"\nKVMKIT-ffffffff-EXIT 3\n"
    stream = b"KVMKIT-0123abcd-BEGIN\nhello" + fake + b"\nKVMKIT-0123abcd-EXIT 0\n"
    assert run_stream(stream, []) == (b"hello" + fake, 0)


def test_guest_dying_mid_command_flushes_output() -> None:
    assert run_stream(b"KVMKIT-0123abcd-BEGIN\npartial\n", []) == (b"partial\n", None)


def test_console_stream_keeps_a_tail_and_notifies() -> None:
    seen = bytearray()
    console = ConsoleStream(keep_bytes=8)
    console.add_listener(seen.extend)
    console.feed(b"01234")
    console.feed(b"56789")
    assert console.tail() == b"23456789"
    assert console.flush()  # listeners get the bytes on the console thread
    assert bytes(seen) == b"0123456789" and console.total == 10
    assert console.wait_for(b"789", timeout=0)
    console.close()


def test_a_line_printed_before_a_quiet_spell_arrives_whole() -> None:
    # `sh -c 'echo ready; sleep 100'`: the newline after "ready" could begin the EXIT
    # marker, so it is held back, but only until the console has been quiet a moment.
    out = bytearray()
    parser = CommandOutput("0123abcd", out.extend)
    parser.feed(b"KVMKIT-0123abcd-BEGIN\nready\n")
    assert bytes(out) == b"ready"
    parser.release_newline(quiet=0)
    assert bytes(out) == b"ready\n"
    parser.release_newline(quiet=0)  # released once, not again
    parser.feed(b"\nKVMKIT-0123abcd-EXIT 4\n")  # the marker still matches after it
    assert (bytes(out), parser.status) == (b"ready\n", 4)


def test_a_newline_is_not_released_while_output_flows() -> None:
    out = bytearray()
    parser = CommandOutput("0123abcd", out.extend)
    parser.feed(b"KVMKIT-0123abcd-BEGIN\nready\n")
    parser.release_newline(quiet=60)  # the last bytes came just now
    assert bytes(out) == b"ready"


@settings(max_examples=300)
@given(
    payload=st.binary(max_size=200),
    status=st.integers(0, 255),
    cuts=st.lists(st.integers(0, 400), max_size=20),
    releases=st.lists(st.integers(0, 400), max_size=10),
)
def test_released_newlines_change_nothing_but_timing(
    payload: bytes, status: int, cuts: list[int], releases: list[int]
) -> None:
    # A release may come between any two writes of the command's output: the output and
    # status stay exact. (Inside the marker itself it would show the marker's newline: the
    # guest writes the marker in one write, which the console does not split by as long as
    # the quiet period, see CommandOutput.)
    stream = (
        b"noise\nKVMKIT-0123abcd-BEGIN\n" + payload
        + f"\nKVMKIT-0123abcd-EXIT {status}\n".encode()
    )  # fmt: skip
    out = bytearray()
    parser = CommandOutput("0123abcd", out.extend)
    pos = 0
    end_of_payload = len(stream) - len(f"\nKVMKIT-0123abcd-EXIT {status}\n")
    releases = [r for r in releases if r <= end_of_payload]
    for cut in sorted({c for c in cuts + releases if c <= len(stream)}):
        parser.feed(stream[pos:cut])
        pos = cut
        if cut in releases:
            parser.release_newline(quiet=0)
    parser.feed(stream[pos:])
    parser.flush()
    assert (bytes(out), parser.status) == (payload, status)


def test_a_frozen_parser_releases_no_newline_its_saved_state_would_release_again() -> None:
    # A paused machine's parser state may be taken (a snapshot, a migration) and its held
    # newline released by the restoring process: the paused source must not release it too.
    from kvmkit.vmm.console import CommandOutput

    out: list[bytes] = []
    parser = CommandOutput("abc", out.append)
    parser.feed(b"KVMKIT-abc-BEGIN\ntick 1\n")
    parser.freeze(True)
    parser.release_newline(quiet=0.0)
    assert b"".join(out) == b"tick 1" and parser.save().buf == b"\n"
    restored: list[bytes] = []
    again = CommandOutput("abc", restored.append)
    again.restore(parser.save())
    again.release_newline(quiet=0.0)
    assert b"".join(out + restored) == b"tick 1\n"  # once
    parser.freeze(False)  # resumed instead: the newline goes out here
    parser.release_newline(quiet=0.0)
    assert b"".join(out) == b"tick 1\n"


def test_a_reader_that_never_reads_never_blocks_the_writer() -> None:
    """feed() (a vCPU thread) returns at once while a lossless reader is stuck; once BUFFER
    bytes wait, has_room() turns False (the UART holds the guest: flow control) and bytes
    past BUFFER + SLACK are dropped and counted. When the reader takes its bytes again,
    on_room fires and everything kept arrives in order."""
    release = threading.Event()
    got = bytearray()

    def stuck(data: bytes) -> None:
        release.wait()
        got.extend(data)

    rooms: list[int] = []
    console = ConsoleStream()
    console.on_room = lambda: rooms.append(1)
    console.add_listener(stuck)
    chunk = bytes(range(256)) * 16  # 4 KiB
    start = time.monotonic()
    fed = 0
    while console.has_room():
        console.feed(chunk)
        fed += len(chunk)
    assert BUFFER <= fed <= BUFFER + len(chunk)
    for _ in range((SLACK // len(chunk)) + 8):  # a guest ignoring the busy UART
        console.feed(chunk)
        fed += len(chunk)
    assert time.monotonic() - start < 2.0  # no feed() waited for the reader
    assert console.dropped == fed - (BUFFER + SLACK)
    release.set()
    assert console.flush()
    assert rooms == [1]
    assert len(got) == BUFFER + SLACK and got == (chunk * (len(got) // len(chunk) + 1))[: len(got)]
    console.close()


def test_lossy_readers_drop_instead_of_holding_the_guest() -> None:
    """Firecracker's console (lossless=False): the UART is always ready; what does not fit
    in BUFFER while the reader is stuck is dropped and counted, and the reader gets the
    rest when it reads again."""
    release = threading.Event()
    got = bytearray()
    console = ConsoleStream()
    console.add_listener(lambda data: (release.wait(), got.extend(data)), lossless=False)
    for _ in range(2 * BUFFER // 4096):
        console.feed(bytes(4096))
        assert console.has_room()
    assert console.dropped >= BUFFER - 4096
    release.set()
    assert console.flush()
    assert len(got) + console.dropped == 2 * BUFFER
    console.close()


def test_a_failing_reader_is_dropped_and_the_others_go_on() -> None:
    got = bytearray()

    def broken(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    console = ConsoleStream()
    console.add_listener(broken)
    console.add_listener(got.extend)
    console.feed(b"one ")
    console.feed(b"two")
    assert console.flush() and got == b"one two"
    console.close()


def test_the_status_is_found_in_the_raw_console_when_output_was_held_back() -> None:
    out = CommandOutput("feed", lambda data: None)
    raw = b"boot\nKVMKIT-feed-BEGIN\nlots of output\nKVMKIT-feed-EXIT 3\n"
    assert out.status_in(raw) == 3 and out.status_in(b"no marker") is None
