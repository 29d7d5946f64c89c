"""Write the fuzz targets' seed corpora (corpus/<target>/seed-*): small real inputs made by
kvmkit itself and by the test suite's mock driver. Run once (`python tests/fuzz/make_seeds.py`,
needs /dev/kvm for the snapshot and migration seeds); the files are committed, and
`crash-*` files beside them are regression inputs, never rewritten here.

    virtqueue, virtio_*  rings and chains laid out by tests/unit/virtio_mock.MockDriver
                         (direct and indirect chains; real blk, net, vsock, rng requests)
    snapshot             the state file of a tiny-guest Machine with a drive and an rng
                         (virtio-mmio and virtio-pci), written by snapshot_machine
    migration            the stream a real migration of that machine sends (its PAGES
                         frames cut down to a few pages)
    mmds                 requests as curl and wget send them to the MMDS (V1, V2 tokens)
    api_http, api_json   requests as tests/kvm/test_api.py sends them
    gdb_rsp              packets as gdb sends them
    loader               a PVH ELF built by kvmkit.testing.pvh, a bzImage header
    cpio, acpi           the image builder's kinds of members; machine configurations
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "tests" / "unit")]

from common import DEVICE_HEADER, LOW_SIZE, QUEUE_HEADER  # noqa: E402
from virtio_mock import MockDriver  # noqa: E402

from kvmkit.memory import GuestMemory  # noqa: E402

CORPUS = HERE / "corpus"
QUEUE_SIZE = 16


def save(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def rings(i: int) -> tuple[int, int, int]:
    """Queue i's areas: table 256 B, avail 38 B, used 134 B, in the first 4 KiB."""
    base = 0x400 * i
    return base, base + 0x100, base + 0x200


def driver(mem: GuestMemory, i: int) -> MockDriver:
    return MockDriver(mem, QUEUE_SIZE, rings=rings(i), data_base=0x1000 + 0x800 * i,
                      data_end=0x1000 + 0x800 * (i + 1))  # fmt: skip


def device_input(queues: int, flags: int, fill: dict[int, list[tuple[list[bytes], list[int],
                                                                       bool]]]) -> bytes:
    """common.setup_device's input: the header, then the memory image holding the chains
    `fill` makes available per queue: (readable buffers, writable sizes, indirect)."""
    mem = GuestMemory()
    mem.add_anonymous(0, LOW_SIZE)
    head = DEVICE_HEADER.pack(flags, QUEUE_SIZE.bit_length() - 1)
    for i in range(queues):
        head += QUEUE_HEADER.pack(*rings(i), 0, 0)
        drv = driver(mem, i)
        for readable, writable, indirect in fill.get(i, []):
            drv.add_chain(readable, writable, indirect=indirect)
    end = 0x1000 + 0x800 * queues
    return head + mem.read(0, end)


def virtio_seeds() -> None:
    # virtqueue: flags, log2 size, desc/avail/used, last_avail, next_used, then memory.
    mem = GuestMemory()
    mem.add_anonymous(0, LOW_SIZE)
    drv = driver(mem, 0)
    drv.add_chain([b"header-16-bytes!", b"data"], [512, 1])
    drv.add_chain([b"x" * 16], [64, 1], indirect=True)
    drv.add_chain([], [4096])
    head = struct.pack("<BBHHHHH", 3, 4, *rings(0), 0, 0)
    save("virtqueue", "direct-indirect", head + mem.read(0, 0x1800))

    # virtio-blk: IN, OUT, FLUSH, GET_ID and DISCARD requests (§5.2.6).
    blk = struct.Struct("<IIQ")
    save("virtio_blk", "requests", device_input(1, 3, {0: [
        ([blk.pack(0, 0, 2)], [512, 1], False),
        ([blk.pack(1, 0, 4), b"w" * 512], [1], True),
        ([blk.pack(4, 0, 0)], [1], False),
        ([blk.pack(8, 0, 0)], [20, 1], False),
        ([blk.pack(11, 0, 0), struct.pack("<QII", 8, 8, 0)], [1], False),
    ]}))
    # virtio-balloon: inflate PFNs inside guest RAM, one outside it, then a deflate (§5.5.6).
    pfns = struct.Struct("<4I")
    save("virtio_balloon", "inflate-deflate", device_input(2, 3, {
        0: [([pfns.pack(8, 9, 10, 12)], [], False), ([struct.pack("<I", 0x90000)], [], False)],
        1: [([pfns.pack(8, 9, 10, 12)], [], True)],
    }))
    save("virtio_rng", "requests", device_input(1, 3, {0: [([], [64], False),
                                                          ([], [16, 16], True)]}))

    # virtio-net: rx buffers; tx: an ARP request and a TCP SYN for the MMDS (§5.1.6).
    hdr = bytes(12)
    mac, mmds_ip, ip = bytes.fromhex("06000a000002"), bytes([169, 254, 169, 254]), bytes(
        [10, 0, 0, 2])
    arp = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac
           + ip + bytes(6) + mmds_ip)  # fmt: skip
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    ipv4 = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, ip, mmds_ip)
    syn = b"\x06\x00\x0a\x00\x00\x01" + mac + b"\x08\x00" + ipv4 + tcp
    host_frame = hdr + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(46)
    net_input = device_input(2, 3, {0: [([], [1526], False)] * 4,
                                    1: [([hdr + arp], [], False), ([hdr, syn], [], True)]})
    save("virtio_net", "arp-syn-rx", struct.pack("<H", len(host_frame)) + host_frame + net_input)

    # virtio-vsock: REQUEST to host port 1234, RW, CREDIT_REQUEST, SHUTDOWN (§5.10.6);
    # rx and event buffers.
    vhdr = struct.Struct("<QQIIIHHIII")

    def pkt(op: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return vhdr.pack(3, 2, 50000, 1234, len(payload), 1, op, flags, 65536, 0) + payload

    save("virtio_vsock", "connect-rw-shutdown", device_input(3, 3, {
        0: [([], [4096], False)] * 4,
        1: [([pkt(1)], [], False), ([pkt(5, b"hello")], [], False), ([pkt(7)], [], True),
            ([pkt(4, flags=3)], [], False)],
        2: [([], [8], False)],
    }))


def mmds_seeds() -> None:
    from mmds import _frame

    save("mmds", "v1-get", b"\x00\x40GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254"
                          b"\r\nAccept: */*\r\n\r\n")
    save("mmds", "v2-token", b"\x01\x40PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254"
                            b"\r\nX-metadata-token-ttl-seconds: 21600\r\n\r\n")
    save("mmds", "v2-get-json", b"\x01\x20GET /latest/meta-data HTTP/1.1\r\nAccept: "
                               b"application/json\r\nX-metadata-token: @TOKEN@\r\n\r\n")
    mac, ip, mmds_ip = bytes.fromhex("06000a000002"), bytes([10, 0, 0, 2]), bytes([169, 254, 169,
                                                                                   254])
    arp = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac
           + ip + bytes(6) + mmds_ip)  # fmt: skip
    frames = [arp, _frame(5, 0, 0x02), _frame(6, 1, 0x10, b"GET / HTTP/1.0\r\n\r\n")]
    save("mmds", "raw-frames", b"\x04\x00" + b"".join(struct.pack("<H", len(f)) + f
                                                     for f in frames))


def snapshot_and_migration_seeds() -> None:
    from kvmkit.devices.virtio.blk import DriveConfig
    from kvmkit.kvm.kick import install_kick_handler
    from kvmkit.migration.stream import FRAME, PREAMBLE, Channel, Kind, PageBatch
    from kvmkit.testing import pvh
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine
    from kvmkit.vmm.snapshot import snapshot_machine

    install_kick_handler()
    tmp = Path(tempfile.mkdtemp(prefix="kvmkit-seeds-"))
    kernel = pvh.build(pvh.HALT, tmp / "halt.elf")
    img = tmp / "disk.img"
    img.write_bytes(bytes(1 << 20))
    for transport in ("mmio", "pci"):
        cfg = MachineConfig(kernel=kernel, cmdline="", mem_mib=64, rng=True,
                            drives=[DriveConfig(img, serial="d0")],
                            virtio_transport=transport)  # fmt: skip
        with Machine(cfg) as m:
            m.start()
            m.pause()
            snapshot_machine(m, tmp / "vm.state", tmp / "vm.mem")
        # Mode byte 0: the file without its CRC32 (the harness appends it); mode 1: as is.
        state = (tmp / "vm.state").read_bytes()
        save("snapshot", f"machine-{transport}", b"\0" + state[:-4])
        save("snapshot", f"machine-{transport}-raw", b"\1" + state)

    # A real migration to a recording destination (it answers as receive_vm does).
    recorded = bytearray()

    class Recorder(Channel):
        def _recv_exact(self, n: int) -> bytearray:
            data = super()._recv_exact(n)
            recorded.extend(data)
            return data

    path = str(tmp / "mig.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def destination() -> None:
        conn, _ = listener.accept()
        ch = Recorder(conn, "source")
        ch.read_preamble()
        ch.send_preamble()
        setup = ch.recv_json(Kind.SETUP)
        ch.send_json(Kind.READY, {})
        while ch.recv([Kind.PAGES, Kind.ROUND, Kind.STATE])[0] is not Kind.STATE:
            pass
        if setup.get("handover"):
            ch.send_json(Kind.PREPARED, {})
            ch.recv_json(Kind.HANDOVER)
        ch.send_json(Kind.ACK, {})
        ch.close()

    t = threading.Thread(target=destination)
    t.start()
    cfg = MachineConfig(kernel=kernel, cmdline="", mem_mib=64, rng=True,
                        drives=[DriveConfig(img, serial="d0")])  # fmt: skip
    with Machine(cfg) as m:
        m.start()
        m.migrate(f"unix:{path}")
    t.join()
    # Keep the preamble and every frame but PAGES; of those, one with its first 3 pages.
    out = bytearray(recorded[: PREAMBLE.size])
    at, pages_kept = PREAMBLE.size, False
    while at < len(recorded):
        kind, _, length, _ = FRAME.unpack_from(recorded, at)
        payload = bytes(recorded[at + FRAME.size : at + FRAME.size + length])
        at += FRAME.size + length
        if kind == Kind.PAGES:
            if pages_kept:
                continue
            pages_kept = True
            count = struct.unpack_from("<I", payload)[0]
            addrs = struct.unpack_from(f"<{count}Q", payload, 4)
            batch, data_at = PageBatch(), 4 + 8 * count
            for a in addrs[:3]:
                if a & 1:
                    batch.add_zero(a & ~0xFFF)
                else:
                    batch.add(a, payload[data_at : data_at + 4096])
                    data_at += 4096
            payload = b"".join(batch.parts())
        out += struct.pack("<HHII", kind, 0, len(payload), 0) + payload
    save("migration", "machine", b"\0" + bytes(out))  # mode 0: the harness sets the CRCs


def api_seeds() -> None:
    def http(method: str, path: str, body: object | None = None) -> bytes:
        raw = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
        return head.encode() + b"\r\n" + raw

    requests: list[tuple[str, str, object | None]] = [
        ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}),
        ("PUT", "/boot-source", {"kernel_image_path": "/bin/true",
                                 "boot_args": "console=ttyS0 reboot=k panic=1"}),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/bin/true",
                                   "is_root_device": True, "is_read_only": True}),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                             "guest_mac": "06:00:AC:10:00:02"}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
        ("PUT", "/entropy", {"rate_limiter": {"bandwidth": {"size": 1000,
                                                            "refill_time": 100}}}),
        ("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
        ("PUT", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-12345678"}}}),
        ("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": None}}}),
        ("PUT", "/logger", {"level": "Info", "show_level": True}),
        ("GET", "/", None),
        ("GET", "/machine-config", None),
        ("GET", "/vm/config", None),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "/tmp/s",
                                     "mem_file_path": "/tmp/m"}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s", "mem_backend": {
            "backend_type": "File", "backend_path": "/tmp/m"}, "resume_vm": True}),
        ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/tmp/b.ext4"}),
        ("PUT", "/migration", {"destination_url": "unix:/tmp/m.sock"}),
    ]
    save("api_http", "configure-and-start", b"".join(http(*r) for r in requests[:14]))
    save("api_http", "post-boot", b"".join(http(*r) for r in requests[14:]))
    save("api_http", "bad-length", b"PUT /vsock HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{}")
    save("api_json", "configure-and-start", b"\0".join(
        f"{m} {p}\n".encode() + (b"" if b is None else json.dumps(b).encode())
        for m, p, b in requests
    ))
    save("api_json", "config-file", b"CONFIG\n" + json.dumps({
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "boot-source": {"kernel_image_path": "/bin/true"},
        "drives": [], "network-interfaces": [], "logger": {"level": "Debug"},
    }).encode())


def gdb_seeds() -> None:
    from kvmkit.gdb.rsp import encode_packet, escape

    packets = [b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;xmlRegisters=i386",
               b"vMustReplyEmpty", b"QStartNoAckMode", b"Hg0",
               b"qXfer:features:read:target.xml:0,ffb",
               b"qfThreadInfo", b"?", b"g", b"m1000,40", b"M1000,4:90909090",
               b"X1000,4:" + escape(b"}$#*"), b"Z0,1000,1", b"z0,1000,1", b"p10",
               b"P10=0010000000000000", b"vCont;s:1", b"vCont?", b"c", b"D"]  # fmt: skip
    stream = b"+".join(encode_packet(p) for p in packets)
    save("gdb_rsp", "session", b"\x00" + stream + b"\x03")
    save("gdb_rsp", "rle", b"\x00" + encode_packet(b"0* 1*!"))


def loader_seeds() -> None:
    from test_boot_bzimage import make_bzimage

    from kvmkit.testing import pvh

    save("loader", "bzimage", make_bzimage())
    tmp = Path(tempfile.mkdtemp(prefix="kvmkit-seeds-"))
    save("loader", "pvh-elf", pvh.build(pvh.HALT, tmp / "halt.elf").read_bytes())


def writer_seeds() -> None:
    fields = struct.Struct("<BIIIIIB")

    def member(kind: int, mode: int, name: bytes, payload: bytes = b"", rdev: int = 0) -> bytes:
        return fields.pack(kind | len(payload) << 3, mode, 0, 0, 0, rdev, len(name)) + name + (
            payload)

    save("cpio", "initramfs", b"".join([
        member(4, 0, b"usr/lib/modules/virtio.ko"), member(0, 0o755, b"dev"),
        member(3, 0o600, b"dev/console", rdev=(5 << 20) | 1),
        member(1, 0o755, b"init", b"#!/bin/sh\nexec /bin/sh\n"),
        member(2, 0, b"bin/sh", b"busybox"),
    ]))
    save("acpi", "numa-smt", b"4 256 mmio 1 2 0\nsockets=1,cores=2,threads=2\n"
                             b"cpus=0-1,mem-mib=128\ncpus=2-3,mem-mib=128\n")
    save("acpi", "pci", b"2 512 pci 1 1 1\n-\n")
    save("acpi", "x2apic", b"300 1024 mmio 0 0 0\nsockets=2,cores=150\n")


def main() -> None:
    virtio_seeds()
    api_seeds()
    gdb_seeds()
    loader_seeds()
    writer_seeds()
    mmds_seeds()
    if "--no-kvm" not in sys.argv:
        snapshot_and_migration_seeds()


if __name__ == "__main__":
    main()
