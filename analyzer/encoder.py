"""The reference encoder: turn a Scenario into the byte stream QEMU 7.2 would send.

Every record is built through `dissectors.grammar`. What QEMU does, and where
(migration/savevm.c, ram.c, block-dirty-bitmap.c as of 7.2, checked against the
real captures in captures/real/):

- header QEVM v3, CONFIGURATION (machine type), POSTCOPY_ADVISE with no data
  (the dirty-bitmaps capability makes migrate_postcopy() true);
- SECTION_START "ram" (id 2, version 4): MEM_SIZE + EOS; SECTION_START
  "dirty-bitmap" (id 3, version 1): one START per bitmap, EOS. Section ids are
  the registration order of a `pc` machine: timer 0, block 1 (inactive), ram 2,
  dirty-bitmap 3, then the devices;
- a footer after every section payload;
- per iteration a RAM PART (the pages in the first one: ZERO + fill byte for zero
  pages, PAGE otherwise, CONTINUE while the block does not change) and a
  dirty-bitmap PART holding only EOS;
- precopy completion: RAM END (EOS), dirty-bitmap END with the BITS chunks
  (CHUNK_SIZE * 8 granules each, ZEROES when the serialised chunk is all zero,
  buffers padded to 32 bytes), one COMPLETE per bitmap and EOS, the FULL device
  sections, EOF, VMDESCRIPTION;
- postcopy: RAM END, PACKAGED(LISTEN, FULL sections, RUN), a dirty-bitmap PART with
  the BITS chunks, RAM END again (complete_postcopy), dirty-bitmap END with the
  COMPLETE records, EOF; no VMDESCRIPTION.

send_bitmap_header() adds DEVICE_NAME / BITMAP_NAME only when the node or bitmap
differs from the previous record's; that memory lives for the whole migration,
across sections, and `_NameMemory` reproduces it.

Faults (analyzer.scenario.STREAM_FAULTS) bend one thing each; the expected
result records which finding the analyzer must report and at which offset.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migshark.analyzer.findings import Code
from migshark.analyzer.scenario import BitmapSpec, Fault, NodeSpec, Scenario, ScenarioError
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import Kind

TIMER_SECTION_ID = 0
RAM_SECTION_ID = 2
DIRTY_BITMAP_SECTION_ID = 3
PAGE_SIZE = g.DEFAULT_TARGET_PAGE_SIZE

# Name of the bitmap the bits-unknown-bitmap fault sends BITS for.
UNKNOWN_BITMAP_NAME = "never-started"


@dataclass(frozen=True)
class FakeDevice:
    """A vmstate device section with a fixed payload, as a pc-i440fx-7.2 sends it."""

    idstr: str
    section_id: int
    version: int
    fields: tuple[tuple[str, str, int], ...]  # (name, vmstate type, size)
    payload: bytes

    def description(self) -> dict[str, Any]:
        return {
            "name": self.idstr, "instance_id": 0, "vmsd_name": self.idstr,
            "version": self.version,
            "fields": [{"name": n, "type": t, "size": s} for n, t, s in self.fields],
        }


# Payloads and ids as in captures/real (QEMU 7.2, paused pc machine).
FAKE_DEVICES: tuple[FakeDevice, ...] = (
    FakeDevice("timer", 0, 2, (("cpu_ticks_offset", "int64", 8), ("unused", "unused_buffer", 8),
                               ("cpu_clock_offset", "int64", 8)), bytes(24)),
    FakeDevice("cpu_common", 4, 1, (("halted", "uint32", 4), ("interrupt_request", "uint32", 4)),
               bytes.fromhex("0000000000000010")),
    FakeDevice("pcspk", 21, 1, (("data_on", "uint8", 1), ("dummy_refresh_clock", "uint8", 1)),
               bytes(2)),
    FakeDevice("port92", 27, 1, (("outport", "uint8", 1),), bytes(1)),
    FakeDevice("i2c_bus", 29, 1, (("saved_address", "uint8", 1),), b"\xff"),
    FakeDevice("globalstate", 40, 1, (("size", "uint32", 4), ("runstate", "buffer", 100)),
               b"\x00\x00\x00\x0a" + b"prelaunch".ljust(100, b"\x00")),
)


# --- bitmaps ----------------------------------------------------------------------


@dataclass
class BitmapPlan:
    """One bitmap as the source holds it: its bits, serialised like hbitmap does."""

    node: NodeSpec
    spec: BitmapSpec
    words: bytes  # LSB-first bits in 64-bit little-endian words, ceil(granules/64) words

    @property
    def granularity(self) -> int:
        return self.spec.granularity

    @property
    def total_sectors(self) -> int:
        return self.node.size // g.SECTOR_SIZE

    @property
    def sectors_per_chunk(self) -> int:
        return g.BITMAP_GRANULES_PER_CHUNK * (self.granularity // g.SECTOR_SIZE)

    @property
    def start_flags(self) -> int:
        flags = g.BitmapStartFlag.ENABLED if self.spec.enabled else 0
        if self.spec.persistent:
            flags |= g.BitmapStartFlag.PERSISTENT
        return int(flags)

    def chunks(self) -> list[tuple[int, int, bytes | None]]:
        """(first sector, sector count, padded buffer or None for ZEROES), as
        bulk_phase_send_chunk() / send_bitmap_bits() produce them."""
        out = []
        cur = 0
        while cur < self.total_sectors:
            count = min(self.total_sectors - cur, self.sectors_per_chunk)
            buffer = self.serialize_part(cur, count)
            out.append((cur, count, None if not any(buffer) else buffer))
            cur += count
        return out

    def serialization_size(self, first_sector: int, count: int) -> int:
        first_byte = first_sector * g.SECTOR_SIZE
        last_byte = first_byte + count * g.SECTOR_SIZE - 1
        first_word = first_byte // self.granularity // 64
        last_word = last_byte // self.granularity // 64
        return (last_word - first_word + 1) * 8

    def serialize_part(self, first_sector: int, count: int) -> bytes:
        size = self.serialization_size(first_sector, count)
        start = first_sector * g.SECTOR_SIZE // self.granularity // 64 * 8
        data = self.words[start : start + size]
        padded = -(-size // g.BITMAP_BUFFER_ALIGN) * g.BITMAP_BUFFER_ALIGN
        return data + bytes(padded - len(data))

    def expected(self) -> dict[str, Any]:
        return {
            "node": self.node.wire_name,
            "name": self.spec.wire_name,
            "real_node": self.node.name,
            "real_name": self.spec.name,
            "granularity": self.granularity,
            "enabled": self.spec.enabled,
            "persistent": self.spec.persistent,
            "disk_size": self.node.size,
            "dirty_bytes": int.from_bytes(self.words, "little").bit_count() * self.granularity,
            "sha256": hashlib.sha256(self.words).hexdigest(),
            "status": "reconstructed",
        }


def plan_bitmap(node: NodeSpec, spec: BitmapSpec, scenario_seed: int, index: int) -> BitmapPlan:
    gran = spec.granularity
    granules = -(-node.size // gran)
    bits = 0
    for offset, length in spec.dirty:
        first, last = offset // gran, (offset + length - 1) // gran
        bits |= ((1 << (last - first + 1)) - 1) << first
    if spec.density > 0:
        rng = random.Random(spec.seed if spec.seed is not None else scenario_seed * 7919 + index)
        for granule in range(granules):
            if rng.random() < spec.density:
                bits |= 1 << granule
    size = -(-granules // 64) * 8
    return BitmapPlan(node, spec, bits.to_bytes(size, "little"))


# --- the stream -------------------------------------------------------------------


@dataclass
class Mark:
    """Where one element of the generated stream lies: for expected offsets and for
    the TCP gap fault, which must drop bytes inside RAM page data."""

    kind: str
    offset: int
    length: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class EncodedStream:
    data: bytes
    marks: list[Mark]
    expected: dict[str, Any]

    def page_data_ranges(self) -> list[tuple[int, int]]:
        return [(m.offset + m.info["data_offset"], m.end) for m in self.marks
                if m.kind == Kind.RAM_PAGE]


class _Out:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0
        self.marks: list[Mark] = []

    def add(self, data: bytes, kind: str | None = None, **info: Any) -> int:
        start = self.offset
        self.parts.append(data)
        self.offset += len(data)
        if kind is not None:
            self.marks.append(Mark(kind, start, len(data), info))
        return start

    def data(self) -> bytes:
        return b"".join(self.parts)

    def data_slice(self, mark: Mark) -> bytes:
        """The bytes of a mark added last-but-few (only recent parts are searched)."""
        end = self.offset
        for part in reversed(self.parts):
            start = end - len(part)
            if start == mark.offset and len(part) == mark.length:
                return part
            end = start
        raise ValueError("mark is not one added part")


class _NameMemory:
    """send_bitmap_header()'s prev_bs / prev_bitmap, kept for the whole migration."""

    def __init__(self) -> None:
        self.node: object | None = None
        self.bitmap: object | None = None

    def names(self, node: NodeSpec, bitmap: object, bitmap_name: str
              ) -> tuple[str | None, str | None]:
        device = bitmap_alias = None
        if node is not self.node:
            self.node = node
            device = node.wire_name
        if bitmap is not self.bitmap:
            self.bitmap = bitmap
            bitmap_alias = bitmap_name
        return device, bitmap_alias


class Encoder:
    def __init__(self, scenario: Scenario, faults: list[Fault] | None = None) -> None:
        self.scenario = scenario
        self.faults = {f.name: f for f in (scenario.faults if faults is None else faults)
                       if not f.tcp_level}
        self.plans = [plan_bitmap(node, spec, scenario.seed, i)
                      for i, (node, spec) in enumerate(scenario.bitmaps())]
        self.out = _Out()
        self.names = _NameMemory()
        self.findings: list[dict[str, Any]] = []
        self.damaged: set[int] = set()  # indexes of plans the analyzer cannot rebuild
        self._fault_target = self._pick_fault_target()
        self._multibyte_bits_done = False

    # -- public ----------------------------------------------------------------

    def encode(self) -> EncodedStream:
        s = self.scenario
        out = self.out
        out.add(g.build_file_header(), Kind.FILE_HEADER)
        out.add(g.build_configuration(s.machine_type), Kind.CONFIGURATION)
        out.add(g.build_command(g.Command.POSTCOPY_ADVISE), Kind.COMMAND)
        self._section_start("ram", RAM_SECTION_ID, g.RAM_SECTION_VERSION)
        out.add(g.build_ram_mem_size([(b.name, b.size) for b in s.ram]), Kind.RAM_MEM_SIZE)
        out.add(g.build_ram_eos(), Kind.RAM_EOS)
        self._footer(RAM_SECTION_ID)
        self._bitmap_setup()
        self._section_part(g.ItemType.SECTION_PART, RAM_SECTION_ID)
        self._ram_pages()
        out.add(g.build_ram_eos(), Kind.RAM_EOS)
        self._footer(RAM_SECTION_ID)
        if self.plans:
            self._idle_bitmap_part()
        if s.iterations > 1:
            # Later iterations are byte-identical (a paused source has nothing new to
            # send), so one is built through the grammar and repeated.
            first = len(out.marks)
            self._idle_ram_part()
            if self.plans:
                self._idle_bitmap_part()
            template = [(m.kind, out.data_slice(m), m.info) for m in out.marks[first:]]
            for _ in range(s.iterations - 2):
                for kind, data, info in template:
                    out.add(data, kind, **info)
        self._ram_end()
        if s.mode == "precopy":
            if self.plans:
                self._section_part(g.ItemType.SECTION_END, DIRTY_BITMAP_SECTION_ID)
                self._bitmap_bulk()
                self._bitmap_completes()
                self._bitmap_eos()
                self._footer(DIRTY_BITMAP_SECTION_ID)
            self._devices()
            out.add(g.build_eof(), Kind.EOF)
            devices = FAKE_DEVICES if s.devices else ()
            desc = {"page_size": PAGE_SIZE, "devices": [d.description() for d in devices]}
            out.add(g.build_vmdescription(json.dumps(desc).encode()), Kind.VMDESCRIPTION)
        else:
            self._postcopy_package()
            if self.plans:
                self._section_part(g.ItemType.SECTION_PART, DIRTY_BITMAP_SECTION_ID)
                self._bitmap_bulk()
                self._bitmap_eos()
                self._footer(DIRTY_BITMAP_SECTION_ID)
            self._ram_end()
            if self.plans:
                self._section_part(g.ItemType.SECTION_END, DIRTY_BITMAP_SECTION_ID)
                self._bitmap_completes()
                self._bitmap_eos()
                self._footer(DIRTY_BITMAP_SECTION_ID)
            out.add(g.build_eof(), Kind.EOF)
        data = out.data()
        complete = True
        truncate = self.faults.get("truncate-at")
        if truncate is not None:
            data, complete = self._truncate(data, truncate.value or 0)
        return EncodedStream(data, out.marks, self._expected(data, complete))

    # -- sections ----------------------------------------------------------------

    def _section_start(self, idstr: str, section_id: int, version: int,
                       item: g.ItemType = g.ItemType.SECTION_START) -> int:
        return self.out.add(g.build_section_start(item, section_id, idstr, 0, version),
                            Kind.SECTION_START if item == g.ItemType.SECTION_START
                            else Kind.SECTION_FULL, section_id=section_id, idstr=idstr)

    def _section_part(self, item: g.ItemType, section_id: int) -> int:
        kind = Kind.SECTION_PART if item == g.ItemType.SECTION_PART else Kind.SECTION_END
        return self.out.add(g.build_section_part(item, section_id), kind,
                            section_id=section_id)

    def _footer(self, section_id: int, wire_id: int | None = None) -> int:
        return self.out.add(g.build_footer(section_id if wire_id is None else wire_id),
                            Kind.FOOTER, section_id=section_id)

    def _idle_ram_part(self) -> None:
        self._section_part(g.ItemType.SECTION_PART, RAM_SECTION_ID)
        self.out.add(g.build_ram_eos(), Kind.RAM_EOS)
        self._footer(RAM_SECTION_ID)

    def _idle_bitmap_part(self) -> None:
        self._section_part(g.ItemType.SECTION_PART, DIRTY_BITMAP_SECTION_ID)
        self._bitmap_eos()
        self._footer(DIRTY_BITMAP_SECTION_ID)

    def _ram_end(self) -> None:
        self._section_part(g.ItemType.SECTION_END, RAM_SECTION_ID)
        self.out.add(g.build_ram_eos(), Kind.RAM_EOS)
        self._footer(RAM_SECTION_ID)

    def _ram_pages(self) -> None:
        rng = random.Random(self.scenario.seed)
        for block in self.scenario.ram:
            first = True
            for addr in range(0, block.size, PAGE_SIZE):
                name = block.name if first else None
                first = False
                data_offset = 8 + (1 + len(name.encode()) if name else 0)
                if rng.random() < block.data_fraction:
                    page = rng.randbytes(PAGE_SIZE)
                    self.out.add(g.build_ram_page(addr, name, page), Kind.RAM_PAGE,
                                 block=block.name, addr=addr, data_offset=data_offset)
                else:
                    self.out.add(g.build_ram_page(addr, name, b"", zero_fill=0), Kind.RAM_ZERO,
                                 block=block.name, addr=addr)

    def _devices(self) -> None:
        if not self.scenario.devices:
            return
        for device in FAKE_DEVICES:
            self._section_start(device.idstr, device.section_id, device.version,
                                g.ItemType.SECTION_FULL)
            self.out.add(device.payload, Kind.DEVICE_STATE, idstr=device.idstr)
            self._footer(device.section_id)

    def _postcopy_package(self) -> None:
        inner = _Out()
        inner.add(g.build_command(g.Command.POSTCOPY_LISTEN))
        if self.scenario.devices:
            for device in FAKE_DEVICES:
                inner.add(g.build_section_start(g.ItemType.SECTION_FULL, device.section_id,
                                                device.idstr, 0, device.version))
                inner.add(device.payload)
                inner.add(g.build_footer(device.section_id))
        inner.add(g.build_command(g.Command.POSTCOPY_RUN))
        self.out.add(g.build_packaged(inner.data()), "packaged")

    # -- dirty-bitmap records --------------------------------------------------------

    def _bitmap_setup(self) -> None:
        version = g.DIRTY_BITMAP_SECTION_VERSION
        if "bad-section-version" in self.faults:
            version += 1
        start = self._section_start(g.DIRTY_BITMAP_SECTION_IDSTR, DIRTY_BITMAP_SECTION_ID,
                                    version)
        if "bad-section-version" in self.faults:
            self._expect(Code.BAD_SECTION_VERSION, start)
        for index, plan in enumerate(self.plans):
            granularity = plan.granularity
            flags = plan.start_flags
            width = 1
            target = index == 0
            if target and "reserved-start-flags" in self.faults:
                flags |= 0x08
            if target and "multibyte-flags" in self.faults:
                width = 2
            if index == self._fault_target and "wrong-granularity-start" in self.faults:
                granularity = self._wrong_granularity(plan)
            device, name = self.names.names(plan.node, plan.spec, plan.spec.wire_name)
            offset = self.out.add(g.bitmap_record(
                g.BitmapFlag.START, device_name=device, bitmap_name=name,
                granularity=granularity, bitmap_flags=flags, flags_width=width),
                Kind.BITMAP_START, node=plan.node.wire_name, bitmap=plan.spec.wire_name)
            if target and "reserved-start-flags" in self.faults:
                self._expect(Code.RESERVED_START_FLAGS, offset, plan)
            if target and "multibyte-flags" in self.faults:
                self._expect(Code.MULTIBYTE_FLAGS, offset, plan)
        if "drop-eos" in self.faults:
            # The footer (or whatever follows) is where the loader looks for a record.
            self._expect(Code.MISSING_EOS, self.out.offset)
            self.damaged.update(range(len(self.plans)))
        else:
            self._bitmap_eos()
        footer_id = DIRTY_BITMAP_SECTION_ID
        if "footer-mismatch" in self.faults:
            footer_id = RAM_SECTION_ID
            self._expect(Code.FOOTER_MISMATCH, self.out.offset)
        self._footer(DIRTY_BITMAP_SECTION_ID, footer_id)

    def _bitmap_eos(self) -> None:
        self.out.add(g.bitmap_record(g.BitmapFlag.EOS), Kind.BITMAP_EOS)

    def _bitmap_bulk(self) -> None:
        if "bits-unknown-bitmap" in self.faults and self.plans:
            self._unknown_bits()
        for index, plan in enumerate(self.plans):
            for first, count, buffer in plan.chunks():
                self._bits(index, plan, first, count, buffer)

    def _unknown_bits(self) -> None:
        node = self.plans[0].node
        ghost = object()
        device, name = self.names.names(node, ghost, UNKNOWN_BITMAP_NAME)
        count = min(node.size // g.SECTOR_SIZE, self.plans[0].sectors_per_chunk)
        offset = self.out.add(g.bitmap_record(
            g.BitmapFlag.BITS | g.BitmapFlag.ZEROES, device_name=device, bitmap_name=name,
            first_sector=0, sector_count=count), Kind.BITMAP_BITS, node=node.wire_name,
            bitmap=UNKNOWN_BITMAP_NAME)
        self._expect(Code.UNKNOWN_BITMAP, offset, bitmap_name=UNKNOWN_BITMAP_NAME,
                     node_name=node.wire_name)

    def _bits(self, index: int, plan: BitmapPlan, first: int, count: int,
              buffer: bytes | None) -> None:
        flags = g.BitmapFlag.BITS
        width = 1
        expect: Code | None = None
        if buffer is None:
            flags |= g.BitmapFlag.ZEROES
        elif index == self._fault_target and index not in self.damaged:
            if "wrong-granularity-start" in self.faults:
                expect = Code.GRANULARITY_MISMATCH
            elif "wrong-buffer-size" in self.faults:
                needed = plan.serialization_size(first, count)
                buffer = buffer[: max(needed - 8, 0)]
                expect = Code.GRANULARITY_MISMATCH
            elif "oversized-buffer" in self.faults:
                buffer = buffer + bytes(g.BITMAP_MAX_BUFFER_SIZE + 32 - len(buffer))
                expect = Code.BUFFER_TOO_LARGE
        if "multibyte-flags" in self.faults and not self._multibyte_bits_done:
            width = 4
        device, name = self.names.names(plan.node, plan.spec, plan.spec.wire_name)
        offset = self.out.add(g.bitmap_record(
            flags, device_name=device, bitmap_name=name, first_sector=first,
            sector_count=count, buffer=buffer, flags_width=width),
            Kind.BITMAP_BITS, node=plan.node.wire_name, bitmap=plan.spec.wire_name)
        if width == 4:
            self._multibyte_bits_done = True
            self._expect(Code.MULTIBYTE_FLAGS, offset, plan)
        if expect is not None:
            self._expect(expect, offset, plan)
            self.damaged.add(index)

    def _bitmap_completes(self) -> None:
        for plan in self.plans:
            device, name = self.names.names(plan.node, plan.spec, plan.spec.wire_name)
            self.out.add(g.bitmap_record(g.BitmapFlag.COMPLETE, device_name=device,
                                         bitmap_name=name), Kind.BITMAP_COMPLETE,
                         node=plan.node.wire_name, bitmap=plan.spec.wire_name)

    # -- faults and expectations --------------------------------------------------------

    def _pick_fault_target(self) -> int | None:
        """The bitmap whose first non-zero chunk the buffer faults bend."""
        needs_bitmap = {"reserved-start-flags", "multibyte-flags", "bits-unknown-bitmap"}
        if needs_bitmap & set(self.faults) and not self.plans:
            raise ScenarioError(f"faults {', '.join(sorted(needs_bitmap & set(self.faults)))} "
                                "need at least one bitmap")
        wanted = {"wrong-granularity-start", "wrong-buffer-size", "oversized-buffer"}
        chosen = wanted & set(self.faults)
        if not chosen:
            return None
        if len(chosen) > 1:
            raise ScenarioError(f"faults {', '.join(sorted(chosen))} all bend the same chunk; "
                                "choose one")
        for index, plan in enumerate(self.plans):
            if any(plan.words):
                return index
        raise ScenarioError(f"fault {chosen.pop()} needs a bitmap with at least one dirty "
                            "granule")

    def _wrong_granularity(self, plan: BitmapPlan) -> int:
        """A granularity for which the first non-zero chunk's buffer has the wrong
        size: a short last chunk may fit a neighbouring granularity's padding."""
        first, count, buffer = next(c for c in plan.chunks() if c[2] is not None)
        assert buffer is not None
        for shift in (1, -1, 2, -2, 3, -3, 4, -4, 6, -6, 8, -8):
            wrong = plan.granularity << shift if shift > 0 else plan.granularity >> -shift
            if not g.MIN_GRANULARITY <= wrong <= g.MAX_GRANULARITY:
                continue
            probe = BitmapPlan(plan.node, BitmapSpec(plan.spec.name, wrong), b"")
            needed = probe.serialization_size(first, count)
            padded = -(-needed // g.BITMAP_BUFFER_ALIGN) * g.BITMAP_BUFFER_ALIGN
            if needed > len(buffer) or len(buffer) > padded:
                return wrong
        raise ScenarioError("wrong-granularity-start: no granularity makes the first "
                            "dirty chunk's buffer size wrong; use a bigger dirty node")

    def _expect(self, code: Code, offset: int, plan: BitmapPlan | None = None, *,
                node_name: str | None = None, bitmap_name: str | None = None) -> None:
        self.findings.append({
            "code": code, "offset": offset,
            "node": plan.node.wire_name if plan else node_name,
            "bitmap": plan.spec.wire_name if plan else bitmap_name,
        })

    def _truncate(self, data: bytes, at: int) -> tuple[bytes, bool]:
        if not 0 <= at < len(data):
            raise ScenarioError(f"truncate-at={at}: the stream is {len(data)} bytes long")
        inside = [m for m in self.out.marks if m.offset < at < m.end]
        # The decoder names the innermost element the data ended in; between elements
        # it names the cut itself.
        where = min(inside, key=lambda m: m.length).offset if inside else at
        self._expect(Code.TRUNCATED, where)
        for index, plan in enumerate(self.plans):
            completes = [m for m in self.out.marks if m.kind == Kind.BITMAP_COMPLETE
                         and m.info["node"] == plan.node.wire_name
                         and m.info["bitmap"] == plan.spec.wire_name]
            if not completes or completes[0].end > at:
                self.damaged.add(index)
        return data[:at], False

    def _expected(self, data: bytes, complete: bool) -> dict[str, Any]:
        bitmaps = []
        for index, plan in enumerate(self.plans):
            entry = plan.expected()
            if index in self.damaged:
                entry.update(sha256=None, dirty_bytes=None, status="incomplete")
            bitmaps.append(entry)
        return {
            "scenario": self.scenario.name,
            "mode": self.scenario.mode,
            "machine_type": self.scenario.machine_type,
            "stream_bytes": len(data),
            "complete": complete,
            "faults": [str(f) for f in self.faults.values()],
            "bitmaps": bitmaps,
            "findings": sorted(self.findings, key=lambda f: f["offset"]),
        }


def encode(scenario: Scenario, faults: list[Fault] | None = None) -> EncodedStream:
    """Encode `scenario` with its own faults, or with `faults` instead when given."""
    return Encoder(scenario, faults).encode()


def expected_path(out: str | Path) -> Path:
    """Where `generate` writes the expected result for the output `out`."""
    out = Path(out)
    return out.with_name(out.name + ".expected.json")


def output_format(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    return {".pcap": "pcap", ".pcapng": "pcapng"}.get(suffix, "raw")


def generate(scenario: Scenario, out: str | Path, faults: list[Fault] | None = None
             ) -> dict[str, Any]:
    """Write the stream (raw, pcap or pcapng by `out`'s suffix) and its expected
    result next to it; returns the expected result."""
    from migshark.analyzer.pcapwriter import write_capture

    faults = list(scenario.faults) if faults is None else faults
    fmt = output_format(out)
    tcp = [f for f in faults if f.tcp_level]
    if tcp and fmt == "raw":
        raise ScenarioError(f"TCP faults ({', '.join(str(f) for f in tcp)}) need a .pcap or "
                            ".pcapng output")
    encoded = encode(scenario, faults)
    expected = encoded.expected
    if fmt == "raw":
        Path(out).write_bytes(encoded.data)
    else:
        expected["findings"] += write_capture(out, encoded.data, scenario.transport, tcp,
                                              encoded.page_data_ranges(), fmt)
        expected["findings"].sort(key=lambda f: f["offset"])
    expected["format"] = fmt
    expected["faults"] = [str(f) for f in faults]
    expected_path(out).write_text(json.dumps(expected, indent=2) + "\n")
    if scenario.uses_mapping:
        mapping_path(out).write_text(json.dumps(
            {"block-bitmap-mapping": bitmap_mapping(scenario)}, indent=2) + "\n")
    return expected


def mapping_path(out: str | Path) -> Path:
    """Where `generate` writes the block-bitmap-mapping of a scenario with aliases
    (for `migshark analyze --bitmap-mapping` and the destination's
    migrate-set-parameters)."""
    out = Path(out)
    return out.with_name(out.name + ".mapping.json")


def bitmap_mapping(scenario: Scenario) -> list[dict[str, Any]]:
    """The block-bitmap-mapping parameter that makes QEMU send the scenario's aliases."""
    return [{"node-name": node.name, "alias": node.wire_name,
             "bitmaps": [{"name": b.name, "alias": b.wire_name} for b in node.bitmaps]}
            for node in scenario.nodes if node.bitmaps]


# --- the `migshark generate` subcommand (arguments declared in analyzer.cli) ---------


def cmd_generate(args: Any) -> int:
    import sys

    from migshark.analyzer.scenario import load_scenario, parse_fault

    try:
        scenario = load_scenario(args.scenario)
        faults = [] if args.no_scenario_faults else list(scenario.faults)
        faults += [parse_fault(text) for text in args.fault]
        expected = generate(scenario, args.output, faults)
    except ScenarioError as error:
        print(f"migshark generate: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"migshark generate: {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {expected['format']}, {expected['stream_bytes']} stream bytes, "
          f"{len(expected['bitmaps'])} bitmap(s), expected findings: "
          f"{', '.join(f['code'] for f in expected['findings']) or 'none'}")
    print(f"{expected_path(args.output)}: expected result")
    return 0


# --- `analyze --export-scenario`: a scenario that regenerates a capture's bitmaps ------


def scenario_from_stream(migration: Any, ram_blocks: list[dict[str, Any]],
                         ram_pages: tuple[int, int], bitmap_parts: int) -> dict[str, Any]:
    """A scenario dict for one analysed MigrationStream: its bitmaps in wire order
    with the wire names (aliases stay aliases), granularity, flags, node size and
    exact dirty granules (as byte extents)."""
    summary = migration.result()
    mode = "postcopy" if "postcopy-listen" in summary["phases"] else "precopy"
    nodes: dict[str, dict[str, Any]] = {}
    for state in migration.tracker.bitmaps.values():
        if state.granularity is None or state.started_at is None or not state.coverage:
            continue
        size = state.end_sector * g.SECTOR_SIZE
        node = nodes.setdefault(state.node, {"name": state.node, "size": size, "bitmaps": []})
        node["size"] = max(node["size"], size)
        flags = state.bitmap_flags or 0
        node["bitmaps"].append({
            "name": state.name,
            "granularity": state.granularity,
            "enabled": bool(flags & g.BitmapStartFlag.ENABLED),
            "persistent": bool(flags & g.BitmapStartFlag.PERSISTENT),
            "dirty": _extents(state.serialized(), state.granularity, size),
        })
    pages, zero_pages = ram_pages
    blocks = [{"name": b["idstr"], "size": b["used_length"],
               "data_fraction": round(pages / max(pages + zero_pages, 1), 4)}
              for b in ram_blocks if b["used_length"] % PAGE_SIZE == 0 and b["used_length"]]
    scenario: dict[str, Any] = {
        "name": "exported",
        "machine_type": summary["machine_type"] or "pc-i440fx-7.2",
        "mode": mode,
        "iterations": max(bitmap_parts, 1),
    }
    if blocks:
        scenario["ram"] = {"blocks": blocks}
    scenario["nodes"] = list(nodes.values())
    return scenario


def _extents(words: bytes, granularity: int, size: int) -> list[list[int]]:
    """Runs of set bits as [offset, length] byte extents, clipped to the node.

    Walks 64-bit words so that clean and fully dirty stretches cost one comparison
    per word, whatever the bitmap's size."""
    runs: list[list[int]] = []
    start: int | None = None
    full = (1 << 64) - 1
    for index in range(len(words) // 8):
        word = int.from_bytes(words[index * 8 : index * 8 + 8], "little")
        if word == (full if start is not None else 0):
            continue
        for bit in range(64):
            dirty = word >> bit & 1
            if dirty and start is None:
                start = index * 64 + bit
            elif not dirty and start is not None:
                runs.append([start, index * 64 + bit])
                start = None
    if start is not None:
        runs.append([start, len(words) // 8 * 64])
    return [[lo * granularity, min(hi * granularity, size) - lo * granularity]
            for lo, hi in runs]


class ScenarioExporter:
    """Collects, as an analysis runs (its `sink`), what a scenario needs beyond the
    bitmaps: RAM blocks and page counts, and how many iterations went by."""

    def __init__(self) -> None:
        self._facts: dict[int, dict[str, Any]] = {}

    def sink(self, stream: Any, event: Any) -> None:
        seen = self._facts.setdefault(id(stream), {"blocks": [], "pages": 0, "zero": 0,
                                                   "parts": 0, "done": False})
        kind = getattr(event, "kind", None)
        if kind == Kind.RAM_MEM_SIZE and not seen["blocks"]:
            seen["blocks"] = event.fields.get("blocks", [])
        elif kind == Kind.RAM_PAGES:
            seen["pages"] += event.fields.get("pages", 0)
            seen["zero"] += event.fields.get("zero_pages", 0)
        elif kind == Kind.SECTION_END:
            seen["done"] = True
        elif (kind == Kind.SECTION_PART and event.section == g.DIRTY_BITMAP_SECTION_IDSTR
              and not seen["done"]):
            seen["parts"] += 1

    def scenarios(self, result: Any) -> list[dict[str, Any]]:
        """One scenario dict per migration stream of the analysis result."""
        out = []
        for migration in result.migrations:
            seen = self._facts.get(id(migration), {"blocks": [], "pages": 0, "zero": 0,
                                                   "parts": 0})
            out.append(scenario_from_stream(migration, seen["blocks"],
                                            (seen["pages"], seen["zero"]), seen["parts"]))
        return out

    def write(self, result: Any, path: str | Path) -> int:
        """Write the first migration's scenario as TOML; returns how many there were."""
        from migshark.analyzer.scenario import scenario_to_toml

        scenarios = self.scenarios(result)
        if scenarios:
            header = (f"# Exported by migshark analyze --export-scenario from {result.path}\n"
                      "# Bitmaps in wire order, with the names (or aliases) on the wire.\n")
            Path(path).write_text(header + scenario_to_toml(scenarios[0]))
        return len(scenarios)


def export_scenario(path: str, options: Any = None) -> list[dict[str, Any]]:
    """One scenario dict per migration stream in the capture at `path`."""
    from migshark.analyzer.analysis import AnalysisOptions, analyze_path

    exporter = ScenarioExporter()
    result = analyze_path(path, options or AnalysisOptions(), exporter.sink)
    return exporter.scenarios(result)
