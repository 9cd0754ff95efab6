"""Crafted dirty-bitmap streams for the findings and fuzz tests, built through the grammar.

`StreamBuilder` remembers where each piece lands, so that a test can assert the
exact byte offset of a finding without counting bytes by hand.
"""

from __future__ import annotations

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream
from migshark.analyzer.records import Finding, Record
from migshark.dissectors import grammar as g

F = g.BitmapFlag
BITMAP_ID = 7
DEVICE_ID = 9
GRAN = 65536
# One full chunk at 64 KiB granularity: 8192 granules = 1 KiB of bits, 2^20 sectors.
FULL_CHUNK = g.BITMAP_GRANULES_PER_CHUNK * GRAN // g.SECTOR_SIZE
CHUNK_BITS = b"\x01" + bytes(1023)


class StreamBuilder:
    def __init__(self, *, header: bool = True) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        if header:
            self.add(g.build_file_header())

    def add(self, data: bytes) -> int:
        """Append and return the offset where the data starts."""
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        return offset

    def section(self, item: g.ItemType = g.ItemType.SECTION_START, version: int = 1,
                section_id: int = BITMAP_ID) -> int:
        if item in (g.ItemType.SECTION_START, g.ItemType.SECTION_FULL):
            return self.add(g.build_section_start(item, section_id, "dirty-bitmap", 0,
                                                  version))
        return self.add(g.build_section_part(item, section_id))

    def record(self, flags: int, **fields: object) -> int:
        return self.add(g.bitmap_record(flags, **fields))  # type: ignore[arg-type]

    def eos(self) -> int:
        return self.record(F.EOS)

    def footer(self, section_id: int = BITMAP_ID) -> int:
        return self.add(g.build_footer(section_id))

    def eof(self) -> int:
        return self.add(g.build_eof())

    def data(self) -> bytes:
        return b"".join(self.parts)


def started(node: str = "drive0", name: str = "b0", granularity: int = GRAN,
            bitmap_flags: int = 1) -> StreamBuilder:
    """Header + a setup section with one START and EOS + the END section header."""
    s = StreamBuilder()
    s.section()
    s.record(F.START, device_name=node, bitmap_name=name, granularity=granularity,
             bitmap_flags=bitmap_flags)
    s.eos()
    s.footer()
    s.section(g.ItemType.SECTION_END)
    return s


def finish_ok(s: StreamBuilder) -> None:
    s.eos()
    s.footer()
    s.eof()


def run(data: bytes, options: AnalysisOptions | None = None, chunk: int | None = None
        ) -> tuple[list[Record], list[Finding]]:
    """Decoder + bitmap tracker over the data, as `migshark analyze` runs them."""
    records: list[Record] = []

    def sink(stream: MigrationStream, event: object) -> None:
        if isinstance(event, Record):
            records.append(event)

    stream = MigrationStream("test", options or AnalysisOptions(), sink)
    if chunk is None:
        stream.feed(data)
    else:
        for start in range(0, len(data), chunk):
            stream.feed(data[start : start + chunk])
    stream.finish()
    return records, stream.findings


def findings_of(data: bytes, options: AnalysisOptions | None = None) -> list[Finding]:
    return run(data, options)[1]


def codes(found: list[Finding]) -> list[str]:
    return [f.code for f in found if f.code != "phase"]
