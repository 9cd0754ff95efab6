"""Dump every event the decoder emits for every bundled capture, for equivalence checks.

Usage: PYTHONPATH=. python3 bench/dump_events.py OUT.txt [--spans]

Captures (pcap, pcapng, .bin) go through analyze_path with a sink, as `migshark dump`
does; the raw .bin streams are also fed straight to StreamDecoder in chunkings of 1, 7
and 4096 bytes and whole. Spans are left out unless --spans is given, so that output
from before and after spans were added can be compared.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.decoder import StreamDecoder
from migshark.analyzer.records import Event, Finding, Record

ROOT = Path(__file__).resolve().parent.parent
CHUNKINGS = (1, 7, 4096, 0)  # 0: the whole stream in one feed


def describe(event: Event, with_spans: bool) -> str:
    if isinstance(event, Record):
        fields: dict[str, Any] = {key: (value.hex() if isinstance(value, bytes) else value)
                                  for key, value in event.fields.items()}
        text = (f"R {event.offset} {event.length} {event.kind} {event.section} "
                f"{event.section_id} {fields!r} {event.depth} {event.node} {event.bitmap}")
        if with_spans:
            text += f" spans={event.spans!r}"
        return text
    assert isinstance(event, Finding)
    return (f"F {event.code} {event.severity.label} {event.offset} {event.length} "
            f"{event.section} {event.node} {event.bitmap} {event.message!r}")


def captures() -> list[Path]:
    found = []
    for folder in ("captures/real", "captures/generated"):
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix in (".bin", ".pcap", ".pcapng"):
                found.append(path)
    return found


def decode_chunked(data: bytes, size: int) -> list[Event]:
    decoder = StreamDecoder()
    events: list[Event] = []
    if size == 0:
        events += decoder.feed(data)
    else:
        for start in range(0, len(data), size):
            events += decoder.feed(data[start : start + size])
    return events + decoder.finish()


def dump(out: Any, with_spans: bool) -> None:
    for path in captures():
        name = path.relative_to(ROOT)
        lines: list[str] = []

        def sink(stream: MigrationStream, event: Event, lines: list[str] = lines) -> None:
            lines.append(f"{stream.name} {describe(event, with_spans)}")

        result = analyze_path(path, AnalysisOptions(), sink)
        out.write(f"== {name} analyze\n")
        out.writelines(line + "\n" for line in lines)
        for finding in result.input_findings:
            out.write(f"input {describe(finding, with_spans)}\n")
        if path.suffix != ".bin":
            continue
        data = path.read_bytes()
        for size in CHUNKINGS:
            # Byte-at-a-time over megabytes takes minutes: cut long streams for size 1.
            stream = data if size != 1 or len(data) < 300_000 else data[:300_000]
            out.write(f"== {name} chunk={size} bytes={len(stream)}\n")
            out.writelines(describe(event, with_spans) + "\n"
                           for event in decode_chunked(stream, size))


if __name__ == "__main__":
    with open(sys.argv[1], "w") as handle:
        dump(handle, "--spans" in sys.argv[2:])
