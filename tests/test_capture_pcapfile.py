"""pcap / pcapng reader: formats, byte orders, resolutions, truncation, corruption."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, wrpcap

from migshark.analyzer.capture import (
    CaptureFormatError,
    CaptureReader,
    Frame,
    iter_frames,
    parse_frame,
    sniff_format,
)
from testkit.pcapfiles import block, epb, idb, opb, pcap_bytes, shb, spb


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def read_all(path: Path) -> list[Frame]:
    # Copy out the data so the assertions do not depend on the mapping.
    return [f._replace(data=memoryview(bytes(f.data))) for f in iter_frames(path)]


def tcp_frame(payload: bytes = b"hello", sport: int = 1234, seq: int = 1000) -> bytes:
    return bytes(
        Ether(src="00:00:00:00:00:01", dst="00:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=sport, dport=4444, seq=seq, flags="PA")
        / payload
    )


# -- sniffing ---------------------------------------------------------------


def test_sniff_format(tmp_path: Path) -> None:
    assert sniff_format(write(tmp_path, "a", pcap_bytes([]))) == "pcap"
    assert sniff_format(write(tmp_path, "b", pcap_bytes([], order=">", nano=True))) == "pcap"
    assert sniff_format(write(tmp_path, "c", shb(">") + idb(1, ">"))) == "pcapng"
    assert sniff_format(write(tmp_path, "d", b"QEVM\x00\x00\x00\x03")) == "raw"
    assert sniff_format(write(tmp_path, "e", b"\xa1")) == "raw"


# -- classic pcap -----------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcap_byte_orders(tmp_path: Path, order: str) -> None:
    f1, f2 = tcp_frame(b"one"), tcp_frame(b"two!")
    p = write(
        tmp_path,
        "x.pcap",
        pcap_bytes([(10, 250000, f1), (11, 5, f2)], order=order, orig_lens=[len(f1), 9000]),
    )
    frames = read_all(p)
    assert [bytes(f.data) for f in frames] == [f1, f2]
    assert frames[0].timestamp == pytest.approx(10.25, abs=1e-9)
    assert frames[1].timestamp == pytest.approx(11.000005, abs=1e-9)
    assert [f.linktype for f in frames] == [1, 1]
    assert [f.interface_id for f in frames] == [0, 0]
    assert frames[1].original_length == 9000


def test_pcap_nanosecond(tmp_path: Path) -> None:
    p = write(tmp_path, "n.pcap", pcap_bytes([(5, 123456789, b"\x00" * 20)], nano=True))
    (frame,) = read_all(p)
    assert frame.timestamp == pytest.approx(5.123456789, abs=1e-9)


def test_pcap_linktype_fcs_bits_masked(tmp_path: Path) -> None:
    # Bits 26-31 of the link-type field carry FCS info, not the link type.
    p = write(tmp_path, "f.pcap", pcap_bytes([(0, 0, b"\0" * 14)], linktype=(1 << 28) | 1))
    assert read_all(p)[0].linktype == 1


def test_pcap_65549_byte_loopback_frame(tmp_path: Path) -> None:
    # Linux loopback GSO frames exceed 65535 bytes (and the advertised snaplen).
    payload_len = 65549 - 14 - 20 - 20
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 65535, 0, 0x4000, 64, 6, 0, b"\x7f\0\0\1", b"\x7f\0\0\1"
    )
    tcp = struct.pack("!HHIIBBHHH", 5000, 6000, 1, 0, 0x50, 0x18, 100, 0, 0)
    frame = (
        b"\0" * 12
        + b"\x08\x00"
        + ip
        + tcp
        + bytes(range(256)) * 255
        + b"x" * (payload_len - 256 * 255)
    )
    assert len(frame) == 65549
    small = tcp_frame()
    p = write(tmp_path, "lo.pcap", pcap_bytes([(1, 0, frame), (2, 0, small)], snaplen=65535))
    frames = list(iter_frames(p))
    assert [len(f.data) for f in frames] == [65549, len(small)]
    seg = parse_frame(frames[0].linktype, frames[0].data, frames[0].timestamp)
    assert seg is not None
    assert len(seg.payload) == payload_len
    assert bytes(seg.payload[-1:]) == b"x"


def test_pcap_zero_copy(tmp_path: Path) -> None:
    p = write(tmp_path, "z.pcap", pcap_bytes([(0, 0, tcp_frame())]))
    with CaptureReader(p) as reader:
        (frame,) = list(reader)
        assert isinstance(frame.data, memoryview)
        assert isinstance(frame.data.obj, mmap.mmap)
        # Closing with a live view must not raise (the mapping outlives it).
    assert bytes(frame.data) == tcp_frame()


def test_modified_pcap_magic(tmp_path: Path) -> None:
    data = tcp_frame()
    content = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    content += struct.pack("<IIII", 3, 0, len(data), len(data)) + b"\0" * 8 + data
    (frame,) = read_all(write(tmp_path, "k.pcap", content))
    assert bytes(frame.data) == data


def test_scapy_wrpcap_roundtrip(tmp_path: Path) -> None:
    pkts = [Ether(tcp_frame(bytes([i]) * i)) for i in range(1, 6)]
    for i, pkt in enumerate(pkts):
        pkt.time = 100 + i / 4
    p = tmp_path / "s.pcap"
    wrpcap(str(p), pkts)
    frames = read_all(p)
    assert [bytes(f.data) for f in frames] == [bytes(x) for x in pkts]
    assert [f.timestamp for f in frames] == pytest.approx([100, 100.25, 100.5, 100.75, 101])


# -- pcapng -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_two_interfaces_tsresol(tmp_path: Path, order: str) -> None:
    eth = tcp_frame(b"eth")
    raw = tcp_frame(b"raw")[14:]
    content = (
        shb(order)
        + idb(1, order, tsresol=9, name="lo")  # nanoseconds
        + idb(101, order, tsresol=0x80 | 10)  # 2^-10 seconds
        + epb(0, 1_500_000_000_123_456_789, eth, order)
        + epb(1, 3 * 1024 + 512, raw, order)
    )
    with CaptureReader(write(tmp_path, "two.pcapng", content)) as reader:
        frames = list(reader)
        assert [i.linktype for i in reader.interfaces] == [1, 101]
        assert reader.interfaces[0].name == "lo"
    assert [(f.linktype, f.interface_id) for f in frames] == [(1, 0), (101, 1)]
    assert [bytes(f.data) for f in frames] == [eth, raw]
    assert frames[0].timestamp == pytest.approx(1_500_000_000.123456789, abs=1e-6)
    assert frames[1].timestamp == 3.5
    seg = parse_frame(frames[1].linktype, frames[1].data, frames[1].timestamp)
    assert seg is not None and bytes(seg.payload) == b"raw"


def test_pcapng_default_resolution_and_tsoffset(tmp_path: Path) -> None:
    content = shb() + idb(1, tsoffset=1000) + epb(0, 2_500_000, b"\0" * 14)
    (frame,) = read_all(write(tmp_path, "o.pcapng", content))
    assert frame.timestamp == pytest.approx(1002.5)


def test_pcapng_sections_reset_interfaces(tmp_path: Path) -> None:
    content = (
        shb("<")
        + idb(1, "<")
        + epb(0, 1_000_000, b"A" * 14, "<")
        + shb(">")
        + idb(113, ">")
        + epb(0, 2_000_000, b"B" * 16, ">")
    )
    with CaptureReader(write(tmp_path, "sec.pcapng", content)) as reader:
        frames = [(f.linktype, bytes(f.data), f.timestamp) for f in reader]
        assert reader.sections == 2
    assert frames == [(1, b"A" * 14, 1.0), (113, b"B" * 16, 2.0)]


def test_pcapng_spb_opb_and_unknown_blocks(tmp_path: Path) -> None:
    content = (
        shb()
        + idb(1, snaplen=0)
        + block(4, b"\x00\x00\x00\x00")  # name resolution block
        + epb(0, 7_000_000, b"E" * 15)
        + spb(b"S" * 17)  # padded to 20 in the file
        + block(0x00000BAD, b"custom stuff")
        + opb(0, 9_000_000, b"O" * 14)
        + block(5, b"\0" * 12)  # interface statistics
    )
    frames = read_all(write(tmp_path, "mix.pcapng", content))
    assert [bytes(f.data) for f in frames] == [b"E" * 15, b"S" * 17, b"O" * 14]
    # SPBs have no timestamp: they inherit the previous one.
    assert [f.timestamp for f in frames] == [7.0, 7.0, 9.0]


def test_pcapng_spb_cut_at_snaplen(tmp_path: Path) -> None:
    content = shb() + idb(1, snaplen=18) + spb(b"s" * 18, orig=100)
    (frame,) = read_all(write(tmp_path, "snap.pcapng", content))
    assert bytes(frame.data) == b"s" * 18
    assert frame.original_length == 100


def test_pcapng_65549_byte_frame(tmp_path: Path) -> None:
    big = bytes(65549)
    content = shb() + idb(1, snaplen=65535) + epb(0, 0, big) + epb(0, 1, b"\1" * 14)
    frames = read_all(write(tmp_path, "big.pcapng", content))
    assert [len(f.data) for f in frames] == [65549, 14]


def test_scapy_pcapng_writer_two_interfaces(tmp_path: Path) -> None:
    p = tmp_path / "scapy.pcapng"
    w = PcapNgWriter(str(p))
    a = Ether(tcp_frame(b"first"))
    a.time = 50.0
    a.sniffed_on = "eth0"
    b = IP(tcp_frame(b"second")[14:])
    b.time = 51.5
    b.sniffed_on = "tun0"
    w.write(a)
    w.write(b)
    w.close()
    frames = read_all(p)
    assert [bytes(f.data) for f in frames] == [bytes(a), bytes(b)]
    linktypes = [f.linktype for f in frames]
    assert linktypes[0] == 1 and linktypes[1] in (101, 228)
    assert frames[0].interface_id != frames[1].interface_id
    assert [f.timestamp for f in frames] == pytest.approx([50.0, 51.5])


# -- truncation and corruption -----------------------------------------------


def _truncated_case(content: bytes, cut: int, tmp_path: Path) -> tuple[list[bytes], int | None]:
    p = write(tmp_path, "t", content[:cut])
    seen: list[tuple[int, str]] = []
    reader = CaptureReader(p, on_truncated=lambda off, why: seen.append((off, why)))
    frames = [bytes(f.data) for f in reader]
    reader.close()
    if reader.truncated_at is not None:
        assert seen == [(reader.truncated_at, reader.truncated_reason)]
    else:
        assert seen == []
    return frames, reader.truncated_at


def test_pcap_truncated_last_record(tmp_path: Path) -> None:
    f1, f2 = tcp_frame(b"a"), tcp_frame(b"bb")
    content = pcap_bytes([(0, 0, f1), (1, 0, f2)])
    second = 24 + 16 + len(f1)
    for cut in (second + 3, second + 16, len(content) - 1):
        frames, at = _truncated_case(content, cut, tmp_path)
        assert frames == [f1]
        assert at == second
    frames, at = _truncated_case(content, len(content), tmp_path)
    assert frames == [f1, f2] and at is None


def test_pcapng_truncated_last_block(tmp_path: Path) -> None:
    head = shb() + idb(1)
    first = epb(0, 0, b"1" * 20)
    content = head + first + epb(0, 1, b"2" * 20)
    for cut in (len(head) + len(first) + 5, len(content) - 4, len(content) - 1):
        frames, at = _truncated_case(content, cut, tmp_path)
        assert frames == [b"1" * 20]
        assert at == len(head) + len(first)


def test_truncated_or_empty_headers_raise(tmp_path: Path) -> None:
    with pytest.raises(CaptureFormatError, match="empty"):
        CaptureReader(write(tmp_path, "e", b""))
    with pytest.raises(CaptureFormatError, match="truncated pcap file header"):
        CaptureReader(write(tmp_path, "h", pcap_bytes([])[:20]))
    with pytest.raises(CaptureFormatError, match="not a pcap"):
        CaptureReader(write(tmp_path, "r", b"QEVM\0\0\0\3" * 4))


@pytest.mark.parametrize(
    "content, message",
    [
        (shb() + idb(1) + block(6, b"\0" * 6)[:-4] + b"\0\0\0\0", "length"),
        (shb() + idb(1) + epb(3, 0, b"x" * 14), "unknown interface 3"),
        (shb() + epb(0, 0, b"x" * 14), "unknown interface 0"),
        (shb() + spb(b"x" * 14), "before any interface"),
        (shb()[:8] + b"\x11\x22\x33\x44" + shb()[12:], "byte-order magic"),
        (shb(major=2), "version 2"),
        (idb(1), "not a pcap or pcapng file"),
        (shb() + struct.pack("<II", 1, 13) + b"\0" * 12, "invalid block length 13"),
        (shb() + idb(1)[:-4] + struct.pack("<I", 99), "trailer"),
    ],
)
def test_pcapng_corruption_raises_format_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    p = write(tmp_path, "bad.pcapng", content)
    with pytest.raises(CaptureFormatError, match=message) as info:
        list(iter_frames(p))
    assert "\n" not in str(info.value)


def test_epb_caplen_beyond_block_is_format_error(tmp_path: Path) -> None:
    good = epb(0, 0, b"x" * 16)
    bad = good[:20] + struct.pack("<I", 4000) + good[24:]
    with pytest.raises(CaptureFormatError, match="exceeds its block"):
        list(iter_frames(write(tmp_path, "c.pcapng", shb() + idb(1) + bad)))


def test_reader_can_iterate_twice_and_close_is_idempotent(tmp_path: Path) -> None:
    reader = CaptureReader(write(tmp_path, "x.pcap", pcap_bytes([(0, 0, b"q" * 14)] * 3)))
    assert len(list(reader)) == 3
    assert len(list(reader)) == 3
    reader.close()
    reader.close()
    with pytest.raises(ValueError):
        list(reader)


# -- fuzzing: nothing but CaptureFormatError, ever -----------------------------

_SEED_PCAP = pcap_bytes([(1, 2, tcp_frame(b"x" * 30)), (3, 4, tcp_frame(b"y"))])
_SEED_PCAPNG = (
    shb()
    + idb(1, tsresol=0x85, name="eth0")
    + epb(0, 99, tcp_frame(b"z"))
    + spb(tcp_frame())
    + opb(0, 5, tcp_frame(b"w"))
    + shb(">")
    + idb(113, ">", tsresol=3)
    + epb(0, 5, b"\0" * 40, ">")
)


def _consume(path: Path) -> None:
    try:
        reader = CaptureReader(path)
    except CaptureFormatError:
        return
    try:
        for frame in reader:
            assert len(frame.data) >= 0
            parse_frame(frame.linktype, frame.data, frame.timestamp)
    except CaptureFormatError as exc:
        assert "\n" not in str(exc)
    finally:
        reader.close()


_fuzz_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fuzz_settings
@given(data=st.binary(min_size=1, max_size=400))
def test_fuzz_garbage(tmp_path: Path, data: bytes) -> None:
    for prefix in (b"", _SEED_PCAP[:4], _SEED_PCAPNG[:12]):
        _consume(write(tmp_path, "g", prefix + data))


@_fuzz_settings
@given(
    seed=st.sampled_from([_SEED_PCAP, _SEED_PCAPNG]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated(tmp_path: Path, seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(seed)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    _consume(write(tmp_path, "m", bytes(buf[: max(1, cut % (len(buf) + 1))])))


def test_pages_released_behind_the_reader_stay_readable(tmp_path: Path) -> None:
    # Past 32 MiB the reader hands consumed pages back to the OS to bound RSS;
    # a view kept from before must still read the right bytes (re-faulted).
    frames = [bytes([i % 251]) * 60000 for i in range(700)]  # ~42 MB
    p = write(tmp_path, "big.pcap", pcap_bytes([(i, 0, f) for i, f in enumerate(frames)]))
    with CaptureReader(p) as reader:
        it = iter(reader)
        first = next(it)
        count = 1 + sum(1 for _ in it)
        assert count == 700
        assert bytes(first.data) == frames[0]
