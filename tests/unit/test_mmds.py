"""The MMDS in pure code: the data store (Firecracker's size limit, JSON Merge Patch, JSON
Pointer lookups, IMDS text), V2 tokens, the guest's HTTP subset, and the ARP/IPv4/TCP
endpoint driven by crafted guest frames (mmds_guest.py), hostile ones included."""

from __future__ import annotations

import struct

import pytest
from mmds_guest import (
    ACK,
    FIN,
    GUEST_IP,
    GUEST_MAC,
    MMDS_IP,
    PSH,
    RST,
    SYN,
    Guest,
    arp_request,
    ipv4,
    parse,
    tcp,
)

from kvmkit.mmds import http, stack, store
from kvmkit.mmds.store import Mmds, MmdsConfig, MmdsError

DATA = {
    "latest": {
        "meta-data": {
            "ami-id": "ami-87654321",
            "reservation-id": "r-79054aef",
            "network": {"mac": "02:29"},
            "count": 3,
            "list": ["a", "b"],
        }
    },
    "a/b": {"~x": "escaped"},
}


def mmds(version: str = "V1", imds_compat: bool = False) -> Mmds:
    m = Mmds()
    m.config = MmdsConfig(["eth0"], version, imds_compat=imds_compat)
    m.put(DATA)
    return m


# -- the store
def test_put_patch_get_and_the_limit() -> None:
    m = Mmds(limit=40)
    assert m.get() == {}
    with pytest.raises(MmdsError, match="not initialized") as err:
        m.patch({"a": "1"})
    assert err.value.status == 400
    m.put({"a": "1", "b": {"c": "2"}})
    m.patch({"b": {"c": None, "d": "4"}, "e": "5"})  # RFC 7396: null removes
    assert m.get() == {"a": "1", "b": {"d": "4"}, "e": "5"}
    with pytest.raises(MmdsError, match="doesn't fit") as err:
        m.patch({"f": "x" * 40})
    assert err.value.status == 413
    assert m.get() == {"a": "1", "b": {"d": "4"}, "e": "5"}  # unchanged
    with pytest.raises(MmdsError, match="doesn't fit"):
        m.put({"k": "é" * 20})  # counted in UTF-8 bytes, as serde_json writes them
    m.put({"k": "e" * 32})  # 40 bytes compact: exactly the limit
    m.patch(["not", "an", "object"])  # RFC 7396: a non-object patch replaces the target
    assert m.get() == ["not", "an", "object"]


def test_lookup_json_and_imds() -> None:
    m = mmds()
    assert m.lookup("/latest/meta-data/ami-id", False) == "ami-87654321"
    assert m.lookup("/latest/meta-data/ami-id", True) == '"ami-87654321"'
    assert m.lookup("/latest/meta-data/", False).split("\n") == [
        "ami-id",
        "reservation-id",
        "network/",
        "count",
        "list",
    ]
    assert m.lookup("/latest", False) == "meta-data/"
    assert m.lookup("//latest//meta-data/network", True) == '{"mac":"02:29"}'
    assert m.lookup("/latest/meta-data/list/1", False) == "b"
    assert m.lookup("/a~1b/~0x", False) == "escaped"
    assert m.lookup("/", True).startswith('{"latest":')
    for bad in (
        "/nope",
        "/latest/meta-data/list/01",
        "/latest/meta-data/list/2",
        "/latest/meta-data/ami-id/x",
        "/latest/meta-data/list/٣",
    ):
        with pytest.raises(store.NotFound):
            m.lookup(bad, False)
    for unsupported in ("/latest/meta-data/count", "/latest/meta-data/list"):
        with pytest.raises(store.UnsupportedType):
            m.lookup(unsupported, False)
    assert m.lookup("/latest/meta-data/count", True) == "3"
    with pytest.raises(store.NotFound):
        Mmds().lookup("/", True)  # nothing put yet


def test_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    m = mmds("V2")
    token = m.new_token(10)
    assert m.token_valid(token)
    assert not Mmds().token_valid(token)  # another store's key
    assert not m.token_valid(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    assert not m.token_valid("x" * 500) and not m.token_valid("!!") and not m.token_valid("")
    now = store.time.monotonic()
    monkeypatch.setattr(store.time, "monotonic", lambda: now + 10.5)
    assert not m.token_valid(token)  # expired


def test_ipv4_check() -> None:
    assert store.check_ipv4("169.254.170.2") == "169.254.170.2"
    for bad in ("10.0.0.1", "169.254.0.1", "169.254.255.1", "169.254.1", "x", "169.254.1.256"):
        with pytest.raises(ValueError, match="not link local"):
            store.check_ipv4(bad)


# -- HTTP
def answer(m: Mmds, text: str) -> http.Response:
    parsed = http.parse(text.encode())
    assert parsed is not None
    return http.respond(m, parsed[0])


def test_http_parse() -> None:
    assert http.parse(b"GET / HTTP/1.1\r\nHost: x\r\n") is None  # not whole yet
    head = b"GET http://169.254.169.254/latest?x=1 HTTP/1.0\r\nAccept: application/json\r\n"
    req, used = http.parse(head + b"X-A:  b \r\n\r\nnext")
    assert (req.method, req.path, req.version) == ("GET", "/latest", "HTTP/1.0")
    assert used == len(head) + 12  # up to the blank line, not the next request's bytes
    assert req.headers == {"accept": "application/json", "x-a": "b"}
    assert http.parse(b"PUT /t HTTP/1.1\r\nContent-Length: 4\r\n\r\nab") is None
    assert http.parse(b"PUT /t HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")[1] == 42
    for bad, status in (
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 65 + b"\r\n", 400),
    ):
        with pytest.raises(http.HttpError) as err:
            http.parse(bad)
        assert err.value.status == status, bad
    with pytest.raises(http.TooLarge):
        http.parse(b"GET /" + b"a" * http.MAX_REQUEST)
    with pytest.raises(http.TooLarge):
        http.parse(b"PUT / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")


def test_http_v1_answers() -> None:
    m = mmds("V1")
    r = answer(m, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert (r.status, r.body, r.content_type) == (200, b"ami-87654321", "text/plain")
    wire = r.encode()
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 12\r\n" in wire
    assert wire.endswith(b"\r\n\r\nami-87654321") and b"Connection: close" in wire
    r = answer(m, "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n")
    assert (r.status, r.body, r.content_type) == (200, b'"ami-87654321"', "application/json")
    # V1 serves whatever token a GET carries (the guide: "not to break existing workloads").
    assert answer(m, "GET /latest HTTP/1.1\r\nX-metadata-token: junk\r\n\r\n").status == 200
    r = answer(m, "GET /nope HTTP/1.1\r\n\r\n")
    assert (r.status, r.body) == (404, b"Resource not found: /nope.")
    r = answer(m, "GET /latest/meta-data/count HTTP/1.1\r\n\r\n")
    assert (r.status, r.body) == (501, b"Cannot retrieve value. The value has an unsupported type.")
    r = answer(m, "POST /latest HTTP/1.1\r\n\r\n")
    assert (r.status, r.allow) == (405, "GET, PUT")
    assert b"Allow: GET, PUT\r\n" in r.encode()
    assert answer(m, "GET http://x HTTP/1.1\r\n\r\n").body == b"Invalid URI."
    # V1 also hands out tokens (the guide: to make moving to V2 easier).
    r = answer(m, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
    assert r.status == 200 and m.token_valid(r.body.decode())


def test_http_v2_tokens() -> None:
    m = mmds("V2")
    r = answer(m, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert (r.status, r.body.decode()) == (401, http.NO_TOKEN)
    r = answer(m, "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: nope\r\n\r\n")
    assert (r.status, r.body) == (401, b"MMDS token not valid.")
    for header in ("X-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token-ttl-seconds"):
        r = answer(m, f"PUT /latest/api/token HTTP/1.1\r\n{header}: 21600\r\n\r\n")
        assert r.status == 200 and r.content_type == "text/plain"
        token = r.body.decode()
        for name in ("X-metadata-token", "x-aws-ec2-metadata-token"):
            r = answer(m, f"GET /latest/meta-data/ami-id HTTP/1.1\r\n{name}: {token}\r\n\r\n")
            assert (r.status, r.body) == (200, b"ami-87654321")
    put = "PUT /latest/api/token HTTP/1.1\r\n"
    r = answer(m, put + "\r\n")
    assert (r.status, r.body.decode()) == (400, http.NO_TTL)
    for ttl in ("0", "21601"):
        r = answer(m, put + f"X-metadata-token-ttl-seconds: {ttl}\r\n\r\n")
        assert (
            r.status == 400
            and f"token: {ttl}. Please provide a value between 1 and 21600" in r.body.decode()
        )
    r = answer(m, put + "X-metadata-token-ttl-seconds: abc\r\n\r\n")
    assert r.status == 400 and b"Invalid value" in r.body
    r = answer(m, put + "X-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert r.status == 400 and b"X-Forwarded-For" in r.body
    r = answer(m, "PUT /latest/meta-data HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
    assert (r.status, r.body) == (404, b"Resource not found: /latest/meta-data.")


def test_http_imds_compat_ignores_accept() -> None:
    m = mmds("V1", imds_compat=True)
    r = answer(m, "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n")
    assert (r.body, r.content_type) == (b"ami-87654321", "text/plain")


# -- the ARP/IPv4/TCP endpoint
def new_stack(version: str = "V1") -> stack.MmdsStack:
    return stack.MmdsStack(mmds(version), "169.254.169.254")


def test_arp_request_answered_other_arp_passed() -> None:
    s = new_stack()
    assert s.intercept(arp_request())
    reply = s.next_frame()
    assert reply is not None and s.next_frame() is None
    assert reply[:6] == GUEST_MAC and reply[6:12] == stack.MMDS_MAC and reply[12:14] == b"\x08\x06"
    assert struct.unpack_from("!HHBBH", reply, 14) == (1, 0x0800, 6, 4, 2)
    assert reply[22:28] == stack.MMDS_MAC and reply[28:32] == MMDS_IP
    assert reply[32:38] == GUEST_MAC and reply[38:42] == GUEST_IP
    assert not s.intercept(arp_request(target=bytes([172, 16, 0, 1])))  # for the tap
    assert s.intercept(arp_request(op=2)) and s.next_frame() is None  # ours, but no request
    assert s.intercept(arp_request()[:40]) is False  # too short to name the MMDS address


def test_get_over_tcp_v1() -> None:
    s = new_stack()
    idle = Guest(s)
    synack = idle.connect()
    assert synack.options == struct.pack("!BBH", 2, 4, 1460)  # MSS only
    answer_bytes = Guest(s, port=40001).request(
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert answer_bytes.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer_bytes.endswith(b"\r\n\r\nami-87654321")
    # The first connection is still open (it sent nothing); the second is gone.
    assert list(s.conns) == [(GUEST_IP, 40000)]


def test_v2_token_flow_over_tcp() -> None:
    s = new_stack("V2")
    no_token = Guest(s, 40010).request("GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert no_token.startswith(b"HTTP/1.1 401 Unauthorized") and b"No MMDS token" in no_token
    token = (
        Guest(s, 40011)
        .request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
        .split(b"\r\n\r\n", 1)[1]
        .decode()
    )
    ok = Guest(s, 40012).request(
        f"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"
    )
    assert ok.endswith(b"\r\n\r\nami-87654321")
    assert not s.conns


def test_big_answer_respects_mss_and_window() -> None:
    m = Mmds(limit=100000)
    m.config = MmdsConfig(["eth0"])
    m.put({"big": "x" * 20000})
    s = stack.MmdsStack(m, "169.254.169.254")
    g = Guest(s)
    g.connect(window=3000, mss=1000)
    g.send(ACK | PSH, b"GET /big HTTP/1.1\r\n\r\n", window=3000)
    segs = g.frames()
    assert [len(x.payload) for x in segs if x.payload] == [1000, 1000, 1000]  # window full
    got = b"".join(x.payload for x in segs)
    g.ack += len(got)
    while True:
        g.send(ACK, window=3000)
        segs = g.frames()
        assert all(len(x.payload) <= 1000 for x in segs)
        assert sum(len(x.payload) for x in segs) <= 3000
        data = [x for x in segs if x.payload]
        for x in data:
            assert x.seq == g.ack
            got += x.payload
            g.ack += len(x.payload)
        if any(x.flags & FIN for x in segs):
            break
    assert got.endswith(b"x" * 20000) and b"Content-Length: 20000" in got


def test_duplicate_acks_send_again() -> None:
    m = Mmds()
    m.config = MmdsConfig(["eth0"])
    m.put({"v": "y" * 3000})
    s = stack.MmdsStack(m, "169.254.169.254")
    g = Guest(s)
    g.connect(mss=1000)
    g.send(ACK | PSH, b"GET /v HTTP/1.1\r\n\r\n")
    first = g.frames()
    assert len([x for x in first if x.payload]) >= 3
    start = first[0].seq
    for _ in range(3):  # the first segment was "lost": the guest repeats its ACK
        g.send(ACK)
    again = g.frames()
    assert again and again[0].seq == start and again[0].payload == first[0].payload


def test_out_of_order_and_retransmitted_data() -> None:
    s = new_stack()
    g = Guest(s)
    g.connect()
    req = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n"
    g.send(ACK, req[10:], seq=g.seq + 10)  # a gap: dropped, the ACK names what we expect
    (dup,) = g.frames()
    assert dup.ack == g.seq and not dup.payload
    g.send(ACK, req[:10], seq=g.seq)
    g.send(ACK, req[:20], seq=g.seq)  # overlaps the first 10: the new 10 are taken
    g.seq += 20
    g.send(ACK | PSH, req[20:])
    segs = g.frames()
    assert b"".join(x.payload for x in segs).endswith(b"ami-87654321")


def test_resets() -> None:
    s = new_stack()
    g = Guest(s, 40100)
    # A segment for no connection: RST with its ACK number as our sequence number.
    assert g.send(ACK, b"data", seq=500)
    (rst,) = g.frames()
    assert rst.flags == RST and rst.seq == g.ack
    # Another port: RST|ACK acknowledging the SYN.
    assert s.intercept(tcp(40101, 22, 77, 0, SYN))
    (rst,) = g.frames()
    assert rst.flags == RST | ACK and rst.ack == 78 and rst.dport == 40101
    assert s.intercept(tcp(40101, 22, 77, 0, RST)) and s.next_frame() is None  # no RST to RST
    # In SYN-RECEIVED, an ACK of something else: reset, connection gone.
    g.send(SYN)
    g.frames()
    g.send(ACK, seq=g.seq)  # g.ack is 0: not our SYN's number
    (rst,) = g.frames()
    assert rst.flags & RST and not s.conns
    # A guest RST at the expected number ends a connection; at another it is ignored.
    g2 = Guest(s, 40102)
    g2.connect()
    g2.send(RST, seq=g2.seq + 5)
    assert s.conns
    g2.send(RST)
    assert not s.conns


def test_request_too_large_resets() -> None:
    s = new_stack()
    g = Guest(s)
    g.connect()
    g.send(ACK, b"GET /" + b"a" * 3000)
    g.frames()
    g.send(ACK, b"b" * 3000)  # only the window's 4096 bytes are taken: no end of head
    segs = g.frames()
    assert any(x.flags & RST for x in segs) and not s.conns


def test_retransmitted_syn_and_port_reuse() -> None:
    s = new_stack()
    g = Guest(s)
    g.send(SYN)
    first = g.frames()[0]
    g.send(SYN, seq=g.seq - 1)  # the same SYN again
    (again,) = g.frames()
    assert again.flags == SYN | ACK and again.seq == first.seq
    g.send(SYN, seq=90000)  # a new SYN from the same port: a new connection
    (fresh,) = g.frames()
    assert fresh.flags == SYN | ACK and fresh.ack == 90001 and len(s.conns) == 1


def test_connection_limit_evicts_the_idlest() -> None:
    s = new_stack()
    for i in range(stack.MAX_CONNECTIONS):
        Guest(s, 41000 + i).send(SYN)
    s.intercept(tcp(41000, 80, 1000, 0, SYN))  # the first one is busy: not the idlest
    while s.next_frame() is not None:
        pass
    Guest(s, 42000).send(SYN)
    assert len(s.conns) == stack.MAX_CONNECTIONS
    assert (GUEST_IP, 41001) not in s.conns and (GUEST_IP, 42000) in s.conns
    frames = []
    while (f := s.next_frame()) is not None:
        frames.append(parse(f))
    assert any(x.flags & RST and x.dport == 41001 for x in frames)


def test_hostile_frames_are_dropped_not_fatal() -> None:
    s = new_stack()
    good = tcp(40000, 80, 1, 0, SYN)
    hostile = [
        ipv4(b"", total=10),  # total length below the header
        ipv4(b"x" * 20, total=200),  # total length beyond the frame
        ipv4(b"x" * 40, ihl=15),  # header longer than the packet
        ipv4(b"x" * 40, ihl=2),  # IHL below 5
        ipv4(good[34:], frag=0x2000),  # a fragment (MF)
        ipv4(good[34:], frag=0x0010),  # a fragment (offset)
        ipv4(b"\x08\x00" + bytes(30), proto=1),  # ICMP to the MMDS: dropped
        ipv4(b"x" * 10),  # shorter than a TCP header
        ipv4(good[34:46] + b"\x10" + good[47:]),  # data offset 4 words
        ipv4(good[34:46] + b"\xf0" + good[47:]),  # data offset 60 bytes > segment
        good[:-4],  # cut inside the TCP header
        arp_request()[:41],
    ]
    for frame in hostile:
        assert s.intercept(frame) in (True, False)
    assert not s.conns and s.next_frame() is None
    assert s.dropped >= 9
    # Frames for other addresses go to the tap.
    assert not s.intercept(tcp(40000, 80, 1, 0, SYN, dst=bytes([8, 8, 8, 8])))
    assert not s.intercept(b"\x00" * 13)
    # A SYN whose options are garbage still opens a connection (MSS: the default).
    s.intercept(tcp(40000, 80, 1, 0, SYN, options=b"\x02\x00\x05\x05"))
    (synack,) = [parse(f) for f in iter(s.next_frame, None)]
    assert synack.flags == SYN | ACK and s.conns[(GUEST_IP, 40000)].mss == stack.DEFAULT_MSS


def test_pending_control_frames_are_bounded() -> None:
    s = new_stack()
    for _ in range(stack.MAX_PENDING + 10):
        s.intercept(arp_request())
    assert len(s.pending) == stack.MAX_PENDING


def test_guest_closing_without_a_request() -> None:
    s = new_stack()
    g = Guest(s)
    g.connect()
    g.send(ACK | FIN)
    segs = g.frames()
    assert any(x.flags & FIN for x in segs)
    fin = next(x for x in segs if x.flags & FIN)
    assert fin.ack == g.seq
    g.ack = fin.seq + 1
    g.send(ACK)
    assert not s.conns


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 §3's example words 0001 f203 f4f5 f6f7 sum to ddf2: checksum 220d.
    assert stack.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert stack.checksum(b"\x01") == 0xFEFF
    assert MMDS_IP == bytes([169, 254, 169, 254]) and PSH == 0x08


def test_stack_counts_firecracker_mmds_metrics() -> None:
    s = new_stack()
    assert set(s.metrics()) == {
        "rx_accepted", "rx_accepted_err", "rx_accepted_unusual", "tx_frames", "tx_bytes",
        "tx_errors", "connections_created", "connections_destroyed",
    }  # fmt: skip
    assert not any(s.metrics().values())
    answer_bytes = Guest(s).request("GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer_bytes.endswith(b"ami-87654321")
    Guest(s, port=40001).connect()  # left open
    s.intercept(ipv4(b"\x08\x00" + bytes(30), proto=1))  # ICMP: unusual
    s.intercept(ipv4(b"x" * 40, ihl=2))  # malformed
    for _ in range(stack.MAX_PENDING + 3):  # ARP replies beyond the queue: lost
        s.intercept(arp_request())
    m = s.metrics()
    assert m["connections_created"] == 2 and m["connections_destroyed"] == 1, m
    assert m["rx_accepted_unusual"] == 1 and m["rx_accepted_err"] == 1, m
    assert m["tx_errors"] == 3, m
    sent = list(iter(s.next_frame, None))
    after = s.metrics()
    assert after["tx_frames"] == m["tx_frames"] + len(sent) == m["tx_frames"] + stack.MAX_PENDING
    assert after["tx_bytes"] == m["tx_bytes"] + sum(map(len, sent))
    # Every frame the guest sent the MMDS counts: the request's segments, the SYN, the ICMP,
    # the malformed one and the ARP requests.
    assert after["rx_accepted"] >= 4 + 1 + 2 + stack.MAX_PENDING + 3, after
