"""Recovery, never a guess: captures with a gap in the idle iterations, and captures
that began after the migration did (issue 12, item 7).

The inputs are the bundled real captures, rewritten: the pcap records that carry the
chosen bytes of the migration flow are dropped, everything else is kept byte for byte.
The truth is QEMU's own hashes, in the JSON beside each capture.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.bitmaps import (
    NOT_CAPTURED,
    DestinationContext,
    describe_fits,
    granularities_fitting,
)
from migshark.analyzer.decode.resync import find_migration_records
from migshark.analyzer.records import Record
from testkit.paths import CAPTURES
from testkit.pcapfiles import write_pcap
from testkit.tcpflows import Conn

REAL = CAPTURES / "real"
PCAPS = ["precopy", "flags", "mapping", "postcopy", "postcopy-1node", "qemu10-postcopy-1node"]
LATE = 64 << 10

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_SYN = 0x02


def _truth(name: str) -> list[dict[str, Any]]:
    bitmaps: list[dict[str, Any]] = json.loads((REAL / f"{name}.json").read_text())["bitmaps"]
    return bitmaps


def _port(name: str) -> int:
    port: int = json.loads((REAL / f"{name}.json").read_text())["port"]
    return port


def _tcp(frame: bytes) -> tuple[int, int, int, bytes] | None:
    """(destination port, sequence number, flags, payload) of an Ethernet/IPv4/TCP
    frame. The payload runs to the end of the frame: loopback GSO frames carry more
    than the IPv4 total length field can say."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ip_len = (frame[14] & 0x0F) * 4
    tcp = 14 + ip_len
    if len(frame) < tcp + 20:
        return None
    dport, seq = struct.unpack_from(">HI", frame, tcp + 2)
    data_offset = (frame[tcp + 12] >> 4) * 4
    return dport, seq, frame[tcp + 13], frame[tcp + data_offset :]


def drop_flow_bytes(source: Path, target: Path, port: int, lo: int, hi: int) -> int:
    """Copy a classic pcap, leaving out every record whose client->server payload on
    `port` touches flow bytes [lo, hi) (and the SYN when lo is 0, as if the capture
    began later). Returns the first flow offset kept after the cut."""
    data = source.read_bytes()
    magic = _GLOBAL.unpack_from(data)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), "little-endian classic pcap expected"
    out = bytearray(data[: _GLOBAL.size])
    pos = _GLOBAL.size
    isn: int | None = None
    resumed = hi
    while pos + _RECORD.size <= len(data):
        caplen = _RECORD.unpack_from(data, pos)[2]
        end = pos + _RECORD.size + caplen
        frame = data[pos + _RECORD.size : end]
        keep = True
        parsed = _tcp(frame)
        if parsed is not None and parsed[0] == port:
            _, seq, flags, payload = parsed
            if flags & _SYN:
                isn = seq
                keep = lo > 0
            elif payload and isn is not None:
                offset = (seq - isn - 1) & 0xFFFFFFFF
                if offset < hi and offset + len(payload) > lo:
                    keep = False
                    resumed = max(resumed, offset + len(payload))
        if keep:
            out += data[pos:end]
        pos = end
    target.write_bytes(bytes(out))
    return resumed


def _analyze(path: Path, **options: Any) -> dict[str, Any]:
    result = analyze_path(path, AnalysisOptions(**options)).as_json()
    assert isinstance(result, dict)
    return result


def _matching_truth(bitmap: dict[str, Any], truth: list[dict[str, Any]]) -> set[str]:
    """QEMU's hashes a rebuilt bitmap may be: by name, and by node when the capture
    still named it."""
    return {t["sha256"] for t in truth if t["name"] == bitmap["name"]
            and bitmap["node"] in (NOT_CAPTURED, t["node"])}


def _codes(result: dict[str, Any]) -> list[str]:
    return [f["code"] for f in result["findings"]]


# --- a capture that began after the migration did -------------------------------------


@pytest.mark.parametrize("name", PCAPS)
def test_late_start_is_found_without_port_and_hashes_only_what_is_pinned_down(
        name: str, tmp_path: Path) -> None:
    late = tmp_path / f"{name}-late.pcap"
    drop_flow_bytes(REAL / f"{name}.pcap", late, _port(name), 0, LATE)
    result = _analyze(late)
    truth = _truth(name)
    assert len(result["migrations"]) == 1
    assert "missed-start" in _codes(result)
    hashed = 0
    for bitmap in result["bitmaps"]:
        assert bitmap["start_missed"] is True
        assert bitmap["enabled"] is None and bitmap["persistent"] is None
        if bitmap["granularity"] is None:
            # Not pinned down: no hash, and the reason lists what fits.
            assert bitmap["sha256"] is None and bitmap["status"] == "incomplete"
            assert len(bitmap["granularity_fits"]) > 1
            assert describe_fits(bitmap["granularity_fits"]) in bitmap["reason"]
        else:
            assert bitmap["granularity_fits"] == [bitmap["granularity"]]
            assert bitmap["sha256"] in _matching_truth(bitmap, truth), bitmap
            hashed += 1
    assert hashed >= 2  # every capture has bitmaps with several chunks or a fitting buffer
    assert {b["name"] for b in result["bitmaps"]} == {t["name"] for t in truth}


def test_late_start_finds_the_bytes_the_old_reader_ignored(tmp_path: Path) -> None:
    """Before, such a capture had no migration without --port; with --port the
    decoder resynchronised over the whole rest and found 0 bitmaps."""
    late = tmp_path / "late.pcap"
    drop_flow_bytes(REAL / "precopy.pcap", late, _port("precopy"), 0, LATE)
    with_port = _analyze(late, port=_port("precopy"))
    without = _analyze(late)
    assert [b["sha256"] for b in with_port["bitmaps"]] == [
        b["sha256"] for b in without["bitmaps"]]
    assert sum(b["sha256"] is not None for b in without["bitmaps"]) == 4


def test_destination_pins_the_granularity_the_chunks_cannot(tmp_path: Path) -> None:
    late = tmp_path / "late.pcap"
    drop_flow_bytes(REAL / "precopy.pcap", late, _port("precopy"), 0, LATE)
    truth = _truth("precopy")
    destination = DestinationContext(
        nodes={t["node"] for t in truth},
        bitmaps={(t["node"], t["name"]): t["granularity"] for t in truth})
    result = _analyze(late, destination=destination)
    by_name = {t["name"]: t for t in truth}
    for bitmap in result["bitmaps"]:
        assert bitmap["granularity"] == by_name[bitmap["name"]]["granularity"]
        assert bitmap["sha256"] == by_name[bitmap["name"]]["sha256"]
        assert bitmap["dirty_bytes"] == by_name[bitmap["name"]]["dirty_bytes"]


def test_destination_granularity_that_does_not_fit_is_not_taken(tmp_path: Path) -> None:
    late = tmp_path / "late.pcap"
    drop_flow_bytes(REAL / "precopy.pcap", late, _port("precopy"), 0, LATE)
    destination = DestinationContext(nodes={"drive0", "drive1"},
                                     bitmaps={("drive0", "scatter-512"): 65536})
    result = _analyze(late, destination=destination)
    scatter = next(b for b in result["bitmaps"] if b["name"] == "scatter-512")
    assert scatter["granularity"] == 512  # the chunks allow only 512


def test_raw_stream_cut_after_its_start(tmp_path: Path) -> None:
    cut = tmp_path / "exec-late.bin"
    cut.write_bytes((REAL / "exec.bin").read_bytes()[LATE:])
    result = _analyze(cut)
    truth = {t["name"]: t for t in _truth("exec")}
    assert result["format"] == "raw"
    assert "missed-start" in _codes(result)
    assert "bad-magic" not in _codes(result)
    assert {b["name"]: b["sha256"] for b in result["bitmaps"]} == {
        name: t["sha256"] for name, t in truth.items()}
    # The device was named before the cut (QEMU names it only when it changes).
    assert {b["node"] for b in result["bitmaps"]} == {NOT_CAPTURED}


def test_garbage_raw_file_is_still_refused(tmp_path: Path) -> None:
    from migshark.analyzer.analysis import InputError

    junk = tmp_path / "junk.bin"
    junk.write_bytes(random.Random(7).randbytes(1 << 20))
    with pytest.raises(InputError, match="neither a pcap"):
        analyze_path(junk)


def test_the_record_heuristic_ignores_random_bytes() -> None:
    rng = random.Random(12)
    for _ in range(20):
        assert find_migration_records(rng.randbytes(256 << 10)) is None


# --- granularity from the chunk sizes ---------------------------------------------


def _bits(first: int, count: int, size: int | None) -> Record:
    fields: dict[str, Any] = {"first_sector": first, "sector_count": count}
    if size is None:
        fields["zeroes"] = True
    else:
        fields["buffer_size"] = size
    return Record(0, 0, "bitmap-bits", "dirty-bitmap", 3, fields, 0, "d", "b", None, None)


def test_full_chunks_pin_the_granularity() -> None:
    # 64 MiB at 512 bytes: 16 full chunks of 8192 sectors, 1 KiB buffers.
    chunks = [_bits(i * 8192, 8192, 1024) for i in range(16)]
    assert granularities_fitting(chunks) == [512]


def test_a_single_short_chunk_leaves_a_range() -> None:
    # 64 granules of 1 MiB in one 32-byte buffer: any granularity from 256 KiB fits.
    fits = granularities_fitting([_bits(0, 131072, 32)])
    assert fits[0] == 256 << 10 and fits[-1] == 1 << 31 and len(fits) == 14
    assert describe_fits(fits) == "every power of two from 262144 to 2147483648"


def test_a_buffer_that_fits_no_granularity() -> None:
    assert granularities_fitting([_bits(0, 8192, 1000)]) == []
    assert granularities_fitting([_bits(3, 8192, 1024)]) == []  # not on a chunk start


def test_two_short_chunks_cannot_both_be_last() -> None:
    chunks = [_bits(0, 8192, 1024), _bits(16384, 8192, 1024)]
    assert 1024 not in granularities_fitting(chunks)
    assert granularities_fitting(chunks) == [512]


# --- a gap in the idle iterations -----------------------------------------------------


def _flow_offsets(name: str) -> list[tuple[int, int]]:
    """(flow offset, payload length) of every client->server data record."""
    data = (REAL / f"{name}.pcap").read_bytes()
    port = _port(name)
    pos = _GLOBAL.size
    isn = None
    out = []
    while pos + _RECORD.size <= len(data):
        caplen = _RECORD.unpack_from(data, pos)[2]
        parsed = _tcp(data[pos + _RECORD.size : pos + _RECORD.size + caplen])
        pos += _RECORD.size + caplen
        if parsed is None or parsed[0] != port:
            continue
        if parsed[2] & _SYN:
            isn = parsed[1]
        elif parsed[3] and isn is not None:
            out.append(((parsed[1] - isn - 1) & 0xFFFFFFFF, len(parsed[3])))
    return out


def _idle_range(name: str) -> tuple[int, int]:
    """Two consecutive data records inside the idle iterations: after the first
    iteration's pages, before the END section that carries the BITS."""
    offsets = _flow_offsets(name)
    parts, end = _idle_bounds(name)
    inside = [(o, n) for o, n in offsets if parts < o and o + n < end]
    assert len(inside) >= 3
    first, second = inside[1], inside[2]
    return first[0], second[0] + second[1]


def _reassembled(name: str) -> bytes:
    flow = bytearray()
    data = (REAL / f"{name}.pcap").read_bytes()
    pos = _GLOBAL.size
    isn = None
    while pos + _RECORD.size <= len(data):
        caplen = _RECORD.unpack_from(data, pos)[2]
        parsed = _tcp(data[pos + _RECORD.size : pos + _RECORD.size + caplen])
        pos += _RECORD.size + caplen
        if parsed is None or parsed[0] != _port(name):
            continue
        if parsed[2] & _SYN:
            isn = parsed[1]
        elif parsed[3] and isn is not None:
            offset = (parsed[1] - isn - 1) & 0xFFFFFFFF
            if offset + len(parsed[3]) > len(flow):
                flow[offset:] = parsed[3][len(flow) - offset :] if offset <= len(flow) else b""
    return bytes(flow)


def _idle_bounds(name: str) -> tuple[int, int]:
    """Where the second RAM iteration starts and the dirty-bitmap END begins."""
    from migshark.analyzer.decode.stream import decode_bytes

    events = decode_bytes(_reassembled(name))
    parts = [e.offset for e in events if isinstance(e, Record) and e.kind == "section-part"
             and e.section == "ram"]
    ends = [e.offset for e in events if isinstance(e, Record) and e.kind == "section-end"
            and e.section == "dirty-bitmap"]
    return parts[1], ends[0]


@pytest.mark.parametrize("name", ["precopy", "flags", "mapping"])
def test_gap_in_idle_iterations_keeps_bitmaps_exact(name: str, tmp_path: Path) -> None:
    lo, hi = _idle_range(name)
    gapped = tmp_path / f"{name}-gap.pcap"
    drop_flow_bytes(REAL / f"{name}.pcap", gapped, _port(name), lo, hi)
    result = _analyze(gapped)
    assert "capture-gap" in _codes(result)
    truth = {(t["node"], t["name"]): t for t in _truth(name)}
    for bitmap in result["bitmaps"]:
        expected = truth[(bitmap["node"], bitmap["name"])]
        assert bitmap["status"] == "reconstructed", bitmap["reason"]
        assert bitmap["sha256"] == expected["sha256"]
        assert bitmap["dirty_bytes"] == expected["dirty_bytes"]


def _resent_with_hole(stream: bytes, lo: int, hi: int, port: int) -> list[bytes]:
    """The stream on a fresh TCP connection, in 1448-byte segments, with bytes
    [lo, hi) never sent: a hole that may begin anywhere, even inside an item."""
    conn = Conn("127.0.0.1", 50000, "127.0.0.1", port)
    frames = conn.handshake()
    for start, stop in ((0, lo), (hi, len(stream))):
        for pos in range(start, stop, 1448):
            frames.append(conn.send(True, stream[pos : min(pos + 1448, stop)]))
        if stop == lo:
            conn.next[True] = (conn.next[True] + hi - lo) & 0xFFFFFFFF
    return frames


@pytest.mark.parametrize("name", ["precopy", "flags"])
def test_gap_starting_inside_an_idle_dirty_bitmap_part(name: str, tmp_path: Path) -> None:
    """The decoder is inside a dirty-bitmap payload when the hole begins, so it cannot
    rule out lost bitmap records: yet every chunk arrives after it, so all is exact."""
    stream = _reassembled(name)
    from migshark.analyzer.decode.stream import decode_bytes

    events = decode_bytes(stream)
    low, end = _idle_bounds(name)
    idle_bitmap_eos = [e.offset for e in events if isinstance(e, Record)
                       and e.kind == "bitmap-eos" and low < e.offset < end]
    lo = idle_bitmap_eos[len(idle_bitmap_eos) // 2]
    hi = lo + 30_000
    assert hi < end
    gapped = write_pcap(tmp_path / "gap.pcap", _resent_with_hole(stream, lo, hi, 4444))
    result = _analyze(gapped)
    gap = next(f for f in result["findings"] if f["code"] == "capture-gap")
    assert gap["section"] == "dirty-bitmap"
    truth = {(t["node"], t["name"]): t["sha256"] for t in _truth(name)}
    assert {(b["node"], b["name"]): b["sha256"] for b in result["bitmaps"]} == truth


def test_gap_inside_the_bits_keeps_only_what_followed_it(tmp_path: Path) -> None:
    """A hole inside the END section that carries the BITS: the decoder loses its
    place, so nothing after it in that payload is read; no bitmap claims a hash."""
    stream = _reassembled("precopy")
    from migshark.analyzer.decode.stream import decode_bytes

    events = decode_bytes(stream)
    bits = [e for e in events if isinstance(e, Record) and e.kind == "bitmap-bits"]
    scatter = [e.offset for e in bits if e.bitmap == "scatter-512"]
    lo, hi = scatter[2], scatter[4]
    gapped = write_pcap(tmp_path / "gap.pcap", _resent_with_hole(stream, lo, hi, 4444))
    result = _analyze(gapped)
    assert result["bitmaps"]
    for bitmap in result["bitmaps"]:
        assert bitmap["sha256"] is None
        assert bitmap["status"] == "incomplete" and bitmap["reason"]
    # The COMPLETE records were in the payload the decoder could not re-enter.
    assert {b["reason"] for b in result["bitmaps"]} == {"no COMPLETE record"}
    assert "incomplete-bitmap" in _codes(result)


def test_mutated_late_streams_never_crash() -> None:
    """Bad input: flipped bytes in a START-less stream end in findings, not errors,
    and nothing allocates by a length from the wire."""
    stream = (REAL / "exec.bin").read_bytes()[LATE:]
    base = find_migration_records(stream)
    assert base is not None
    rng = random.Random(99)
    for _ in range(8):
        data = bytearray(stream)
        for _ in range(40):
            data[rng.randrange(base, len(data))] = rng.randrange(256)
        migration = MigrationStream("fuzz", AnalysisOptions())
        migration.decoder.start_mid_stream()
        migration.feed(bytes(data))
        migration.finish()
        result = migration.result()
        assert any(f["code"] == "missed-start" for f in result["findings"])
        for bitmap in result["bitmaps"]:
            assert bitmap["sha256"] is None or bitmap["granularity"] is not None


# --- the rule, on the tracker alone ---------------------------------------------------


def _record(offset: int, kind: str, **fields: Any) -> Record:
    flags = {"bitmap-start": 0x1C, "bitmap-bits": 0x4C, "bitmap-complete": 0x2C}[kind]
    return Record(offset, 1, kind, "dirty-bitmap", 3, dict(fields, flags=flags), 0,
                  "drive0", "b", None, None)


def _chunk(offset: int, first: int, count: int, fill: int) -> Record:
    granules = count  # 512-byte granularity: one granule a sector
    needed = -(-granules // 64) * 8
    size = -(-needed // 32) * 32
    return _record(offset, "bitmap-bits", first_sector=first, sector_count=count,
                   buffer_size=size, buffer=bytes([fill]) * needed + bytes(size - needed))


def _gap(offset: int) -> Any:
    from migshark.analyzer import findings

    return findings.make("capture-gap", "lost", offset, section="dirty-bitmap",
                         fields={"inside_skipped_data": False})


def _run(events: list[Any]) -> dict[str, Any]:
    from migshark.analyzer.bitmaps import BitmapTracker

    tracker = BitmapTracker()
    for event in events:
        tracker.consume(event)
    tracker.finish(10_000)
    (result,) = tracker.results()
    return result


CHUNKS = [(10, 0, 8192, 0xFF), (20, 8192, 8192, 0x0F), (30, 16384, 100, 0x01)]


def _events(gap_before: int | None) -> list[Any]:
    events: list[Any] = [_record(1, "bitmap-start", granularity=512, bitmap_flags=1)]
    for index, chunk in enumerate(CHUNKS):
        if index == gap_before:
            events.append(_gap(chunk[0] - 1))
        events.append(_chunk(*chunk))
    if gap_before == len(CHUNKS):
        events.append(_gap(35))
    events.append(_record(40, "bitmap-complete"))
    return events


def test_gap_before_every_chunk_is_exact() -> None:
    clean = _run(_events(None))
    after_gap = _run(_events(0))
    assert clean["sha256"] is not None
    assert after_gap["sha256"] == clean["sha256"]
    assert after_gap["dirty_bytes"] == clean["dirty_bytes"]


@pytest.mark.parametrize("gap_before", [1, 2, 3])
def test_gap_after_some_chunks_stays_incomplete(gap_before: int) -> None:
    result = _run(_events(gap_before))
    assert result["sha256"] is None and result["status"] == "incomplete"
    assert "capture-gap" in result["reason"]
    assert "do not cover the whole disk" in result["reason"]


def test_gap_that_swallowed_the_start_section(tmp_path: Path) -> None:
    """The hole holds the setup dirty-bitmap section (its header and every START):
    its id is learned from the idle iterations and the bitmaps are rebuilt without
    START, hashed where the chunks pin the granularity down."""
    from migshark.analyzer.decode.stream import decode_bytes

    stream = _reassembled("precopy")
    events = decode_bytes(stream)
    setup = next(e for e in events if isinstance(e, Record) and e.kind == "section-start"
                 and e.section == "dirty-bitmap")
    footer = next(e for e in events if isinstance(e, Record) and e.kind == "footer"
                  and e.offset > setup.offset)
    gapped = write_pcap(tmp_path / "gap.pcap", _resent_with_hole(
        stream, setup.offset, footer.offset + footer.length, 4444))
    result = _analyze(gapped)
    assert "unknown-section" not in _codes(result)
    truth = _truth("precopy")
    hashed = [b for b in result["bitmaps"] if b["sha256"] is not None]
    assert len(hashed) == 4
    for bitmap in hashed:
        assert bitmap["start_missed"] and bitmap["sha256"] in _matching_truth(bitmap, truth)


# --- a fresh real migration ----------------------------------------------------------


@pytest.mark.qemu
def test_fresh_qemu10_capture_late_start_and_idle_gap(tmp_path: Path) -> None:
    """The same two cuts on a capture the suite makes itself with QEMU 10.0."""
    from testkit.realqemu.harness import PRESETS, run_migration
    from testkit.require import require_qemu, require_root, require_tools

    require_tools("tcpdump")
    require_root()
    build = require_qemu("10.0")
    result = run_migration(PRESETS["precopy"], tmp_path, source=build, dest=build)
    assert result.pcap is not None and result.port is not None
    truth = result.ground_truth["bitmaps"]
    late = tmp_path / "late.pcap"
    drop_flow_bytes(result.pcap, late, result.port, 0, LATE)
    rebuilt = _analyze(late)
    assert "missed-start" in _codes(rebuilt)
    hashed = [b for b in rebuilt["bitmaps"] if b["granularity"] is not None]
    assert len(hashed) >= 2
    for bitmap in rebuilt["bitmaps"]:
        if bitmap["granularity"] is None:
            assert bitmap["sha256"] is None
        else:
            assert bitmap["sha256"] in _matching_truth(bitmap, truth)
    # A hole in the idle iterations: after the second RAM part, before the BITS.
    from migshark.analyzer.decode.stream import decode_bytes
    from testkit.realqemu.harness import read_tcp_flow

    stream = read_tcp_flow(result.pcap, result.port).to_server
    events = decode_bytes(stream)
    low = [e.offset for e in events if isinstance(e, Record) and e.kind == "section-part"
           and e.section == "ram"][1]
    end = next(e.offset for e in events if isinstance(e, Record) and e.kind == "section-end"
               and e.section == "dirty-bitmap")
    idle = [e.offset for e in events if isinstance(e, Record) and e.kind == "bitmap-eos"
            and low < e.offset < end]
    lo, hi = idle[len(idle) // 3], idle[2 * len(idle) // 3]
    gapped = write_pcap(tmp_path / "gap.pcap", _resent_with_hole(stream, lo, hi, 4444))
    exact = _analyze(gapped)
    assert "capture-gap" in _codes(exact)
    assert {(b["node"], b["name"]): b["sha256"] for b in exact["bitmaps"]} == {
        (t["node"], t["name"]): t["sha256"] for t in truth}
