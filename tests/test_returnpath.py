"""Return-path decoder on crafted bytes, in every chunking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migshark.analyzer.records import Finding, Record
from migshark.analyzer.returnpath import (
    RECV_BITMAP_ENDING,
    ReturnPathDecoder,
    ReturnPathMessage,
    build_message,
    build_recv_bitmap,
)
from testkit.events import decode_pieces, pieces_every

M = ReturnPathMessage


def _req_pages_id(start: int, length: int, block: str) -> bytes:
    name = block.encode()
    return build_message(M.REQ_PAGES_ID,
                         struct.pack(">QI", start, length) + bytes([len(name)]) + name)


STREAM = b"".join([
    build_message(M.PONG, struct.pack(">I", 7)),
    _req_pages_id(0x2000, 4096, "pc.ram"),
    build_message(M.REQ_PAGES, struct.pack(">QI", 0x5000, 8192)),
    build_recv_bitmap("pc.ram", bytes([0b1011, 0, 0, 0, 0, 0, 0, 0x80])),
    build_message(M.RESUME_ACK, struct.pack(">I", 1)),
    build_message(M.SWITCHOVER_ACK),
    build_message(M.SHUT, struct.pack(">I", 0)),
])


def _decode(data: bytes, chunk: int) -> list[Record | Finding]:
    return decode_pieces(ReturnPathDecoder(), pieces_every(data, chunk))


@pytest.mark.parametrize("chunk", [1, 3, 7, len(STREAM)])
def test_every_message_type_decodes_in_any_chunking(chunk: int) -> None:
    events = _decode(STREAM, chunk)
    assert all(isinstance(e, Record) for e in events), events
    assert [e.fields.get("message", e.kind) for e in events] == [
        "PONG", "REQ_PAGES_ID", "REQ_PAGES", "RECV_BITMAP", "rp-recv-bitmap", "RESUME_ACK",
        "SWITCHOVER_ACK", "SHUT"]
    assert {e.section for e in events} == {"return-path"}
    pong, req_id, req, _, bitmap, resume, _, shut = events
    assert pong.fields["value"] == 7
    assert (req_id.fields["start"], req_id.fields["page_bytes"], req_id.fields["block"]) == (
        0x2000, 4096, "pc.ram")
    # REQ_PAGES reuses the block of the previous REQ_PAGES_ID
    assert (req.fields["start"], req.fields["block"]) == (0x5000, "pc.ram")
    assert bitmap.fields["received_pages"] == 4
    assert bitmap.fields["size"] == 8
    assert resume.fields["value"] == 1 and shut.fields["value"] == 0
    # records tile the stream exactly
    assert events[0].offset == 0
    for a, b in zip(events, events[1:], strict=False):
        assert a.offset + a.length == b.offset
    assert events[-1].offset + events[-1].length == len(STREAM)


def test_wrong_length_unknown_type_and_error_shut_are_findings() -> None:
    data = (build_message(M.PONG, b"\0\0")
            + build_message(42, b"xyz")
            + build_message(M.SHUT, struct.pack(">I", 5))
            + build_message(M.PONG, struct.pack(">I", 9)))
    events = _decode(data, 2)
    codes = [e.code for e in events if isinstance(e, Finding)]
    assert codes == ["bad-return-path", "bad-return-path", "return-path-error"]
    records = [e for e in events if isinstance(e, Record)]
    assert records[1].fields["message"] == "UNKNOWN(42)"
    # framing survives a bad message: the PONG after it still decodes
    assert records[-1].fields == {"message": "PONG", "message_number": 2, "length": 4,
                                  "value": 9}


def test_bad_bitmap_ending_truncation_and_gap() -> None:
    bad = build_recv_bitmap("b", b"\xff" * 8)[:-8] + struct.pack(">Q", RECV_BITMAP_ENDING ^ 1)
    codes = [e.code for e in _decode(bad, 5) if isinstance(e, Finding)]
    assert codes == ["bad-return-path"]
    cut = build_message(M.PONG, struct.pack(">I", 1))[:-1]
    codes = [e.code for e in _decode(cut, 100) if isinstance(e, Finding)]
    assert codes == ["capture-truncated"]
    decoder = ReturnPathDecoder()
    decoder.feed(b"\x00")
    gap = decoder.gap(10)
    assert [(e.code, e.offset, e.length) for e in gap] == [("capture-gap", 1, 10)]
    assert decoder.feed(build_message(M.PONG, b"\0\0\0\1")) == []
    assert decoder.finish() == []


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), chunk=st.integers(min_value=1, max_value=64))
def test_any_bytes_decode_without_exceptions_and_records_tile(data: bytes, chunk: int) -> None:
    events = _decode(data, chunk)
    records = [e for e in events if isinstance(e, Record)]
    position = 0
    for record in records:
        assert record.offset == position
        position = record.end
    assert position <= len(data)
    # whatever is left over is reported, never silently dropped
    codes = [e.code for e in events if isinstance(e, Finding)]
    if position < len(data) and "capture-truncated" not in codes:
        assert "bad-return-path" in codes


def test_garbage_through_the_proxy_analysis_is_findings_not_exceptions() -> None:
    from migshark.analyzer.analysis import AnalysisOptions
    from migshark.analyzer.connections import BACKWARD, FORWARD, Connection

    analysis = Connection("garbage", AnalysisOptions(), claim=True)  # as the proxy opens it
    analysis.data(FORWARD, b"GET / HTTP/1.1\r\n\r\n" * 10)
    analysis.data(BACKWARD, b"\x00\x2a\x00\x01X" * 8)  # type 42: unknown to QEMU
    analysis.end()
    result = analysis.result("test", "proxy")
    assert result is not None
    codes = {f["code"] for f in result["migrations"][0]["findings"]}
    assert "bad-magic" in codes and "bad-return-path" in codes
