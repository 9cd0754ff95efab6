"""The sans-IO decoder: chunking independence, reconstruction, truncation."""

from __future__ import annotations

import hashlib
import random

import pytest

from migshark.analyzer.bitmaps import BitmapTracker
from migshark.analyzer.decoder import StreamDecoder, decode_bytes
from migshark.analyzer.records import Finding, Record, Severity
from testkit import synthetic
from testkit.events import decode_pieces, event_signature, pieces_every, pieces_of_sizes


def _bitmaps(events):
    tracker = BitmapTracker()
    extra = []
    for event in events:
        extra += tracker.consume(event)
    extra += tracker.finish(0)
    return {(b["node"], b["name"]): b for b in tracker.results()}, extra


@pytest.mark.parametrize("ram_detail", [False, True])
def test_one_byte_at_a_time_equals_whole(ram_detail):
    data = synthetic.precopy_stream()
    whole = decode_bytes(data, ram_detail=ram_detail)
    bytewise = decode_pieces(StreamDecoder(ram_detail=ram_detail), pieces_every(data, 1))
    assert event_signature(bytewise) == event_signature(whole)


def test_random_chunking_equals_whole():
    data = synthetic.precopy_stream()
    whole = event_signature(decode_bytes(data))
    rng = random.Random(7)
    for _ in range(20):
        sizes = [rng.choice([1, 2, 3, 7, 8, 9, 100, 4095, 4096, 4097, 65536])
                 for _ in range(len(data))]
        chunked = decode_pieces(StreamDecoder(), pieces_of_sizes(data, sizes))
        assert event_signature(chunked) == whole


def test_clean_stream_has_no_problems_and_records_cover_it():
    data = synthetic.precopy_stream()
    events = decode_bytes(data)
    problems = [e for e in events if isinstance(e, Finding) and e.severity > Severity.NOTE]
    assert problems == []
    records = [e for e in events if isinstance(e, Record)]
    # Records are disjoint and, end to end, cover every byte of the stream.
    position = 0
    for record in sorted(records, key=lambda r: (r.offset, r.length)):
        if record.length == 0:
            continue
        assert record.offset == position, record
        position = record.end
    assert position == len(data)


def test_bitmaps_reconstructed_exactly():
    events = decode_bytes(synthetic.precopy_stream())
    bitmaps, extra = _bitmaps(events)
    assert extra == []
    inc0 = bitmaps[("drive0", "inc0")]
    disk = 2 * 8192 * 128 * 512
    words0 = synthetic.bitmap_chunk_bits(0x8000_0000_0000_0001) + bytes(1024)
    assert inc0["disk_size"] == disk
    assert inc0["granularity"] == 65536
    assert (inc0["enabled"], inc0["persistent"]) == (True, False)
    assert inc0["sha256"] == hashlib.sha256(words0).hexdigest()
    assert inc0["dirty_bytes"] == 2 * 128 * 65536
    inc1 = bitmaps[("drive0", "inc1")]
    words1 = synthetic.expected_inc1_words()
    assert inc1["sha256"] == hashlib.sha256(words1).hexdigest()
    assert inc1["dirty_bytes"] == int.from_bytes(words1, "little").bit_count() * 512
    assert (inc1["enabled"], inc1["persistent"], inc1["complete"]) == (True, True, True)


def test_device_sections_walked_with_vmdesc_or_footer():
    data = synthetic.precopy_stream()
    by_footer = [e for e in decode_bytes(data) if isinstance(e, Record)
                 and e.kind == "device-state"]
    assert [r.fields["method"] for r in by_footer] == ["footer"]
    by_vmdesc = [e for e in decode_bytes(data, vmdesc=synthetic.VMDESC)
                 if isinstance(e, Record) and e.kind == "device-state"]
    assert [r.fields["method"] for r in by_vmdesc] == ["vmdesc"]
    assert by_vmdesc[0].length == by_footer[0].length == len(synthetic.DEVICE_PAYLOAD)


def test_late_vmdesc_disagreeing_with_footer_is_reported():
    import json

    desc = json.loads(json.dumps(synthetic.VMDESC))
    desc["devices"][0]["fields"][0]["size"] = 4
    data = synthetic.precopy_stream(with_vmdesc=False)
    from migshark.dissectors import grammar as g

    data += g.build_vmdescription(json.dumps(desc).encode())
    codes = [e.code for e in decode_bytes(data) if isinstance(e, Finding)]
    assert "vmdesc-mismatch" in codes


def test_truncation_anywhere_gives_clean_truncated_finding():
    data = synthetic.precopy_stream(with_vmdesc=False)
    for cut in sorted(set(random.Random(3).sample(range(1, len(data)), 300))):
        events = decode_bytes(data[:cut])
        truncated = [e for e in events if isinstance(e, Finding) and e.code == "truncated"]
        assert len(truncated) == 1, (cut, [e.code for e in events if isinstance(e, Finding)])
        assert 0 <= truncated[0].offset <= cut
        for event in events:
            if isinstance(event, Record):
                assert event.end <= cut, (cut, event)


def test_gap_inside_page_data_keeps_decoding_exact():
    data = synthetic.precopy_stream()
    # The first PAGE record of the first iteration: its data starts after header+name.
    marker = (0 | 0x08).to_bytes(8, "big") + b"\x06pc.ram"
    page_data = data.index(marker) + len(marker)
    decoder = StreamDecoder()
    events = decoder.feed(data[: page_data + 100])
    events += decoder.gap(1000)
    events += decoder.feed(data[page_data + 1100 :])
    events += decoder.finish()
    codes = [e.code for e in events if isinstance(e, Finding)]
    assert codes.count("capture-gap") == 1
    assert "resynchronised" not in codes and "truncated" not in codes
    bitmaps, _ = _bitmaps(events)
    assert all(b["sha256"] for b in bitmaps.values())


def test_gap_in_framing_resynchronises_and_later_bitmaps_survive():
    data = synthetic.precopy_stream()
    # Lose bytes across the ram setup section, before the dirty-bitmap START.
    start = data.index(b"\x01\x00\x00\x00\x02\x03ram")
    decoder = StreamDecoder()
    events = decoder.feed(data[: start + 10])
    events += decoder.gap(20)
    events += decoder.feed(data[start + 30 :])
    events += decoder.finish()
    codes = [e.code for e in events if isinstance(e, Finding)]
    assert "capture-gap" in codes and "resynchronised" in codes
    bitmaps, _ = _bitmaps(events)
    assert bitmaps[("drive0", "inc0")]["sha256"] is not None


def test_bad_magic_and_garbage_never_raise():
    for blob in [b"", b"Q", b"QEVX\0\0\0\3", b"\xff" * 5000, bytes(range(256)) * 40]:
        events = decode_bytes(blob)
        assert any(isinstance(e, Finding) and e.severity == Severity.ERROR for e in events)
