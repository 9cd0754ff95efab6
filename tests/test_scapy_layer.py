"""The scapy layer agrees with the construct grammar, and dissects real QEMU records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.records import Event, Record
from migshark.dissectors import grammar as g
from migshark.dissectors.scapy_layer import (
    DirtyBitmapRecord,
    QemuCommand,
    QemuConfiguration,
    QemuEOF,
    QemuFileHeader,
    QemuMigration,
    QemuSectionFooter,
    QemuSectionPart,
    QemuSectionStart,
    bind_port,
    effective_flags,
    record_kind,
)
from testkit.paths import CAPTURES
from testkit.require import require_root, require_tools

F = g.BitmapFlag

RECORDS = {
    "start": g.bitmap_record(F.START, device_name="drive0", bitmap_name="b0",
                             granularity=65536, bitmap_flags=3),
    "bits": g.bitmap_record(F.BITS, first_sector=8192, sector_count=8192,
                            buffer=bytes(range(32)) * 4),
    "zeroes": g.bitmap_record(F.BITS | F.ZEROES, bitmap_name="b1", first_sector=0,
                              sector_count=1024),
    "complete": g.bitmap_record(F.COMPLETE, device_name="d", bitmap_name="b"),
    "eos": g.bitmap_record(F.EOS),
    "two-byte-flags": g.bitmap_record(F.COMPLETE, flags_width=2),
    "four-byte-flags": g.bitmap_record(F.BITS | F.ZEROES, first_sector=0, sector_count=8,
                                       flags_width=4),
    "start-and-bits": g.bitmap_record(F.START | F.BITS, granularity=512, bitmap_flags=0),
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_records_round_trip_and_agree_with_the_grammar(name: str) -> None:
    raw = RECORDS[name]
    pkt = DirtyBitmapRecord(raw)
    assert bytes(pkt) == raw
    assert not pkt.payload  # the record is consumed exactly
    parsed = g.BitmapRecord.parse(raw)
    assert effective_flags(pkt) == parsed.flags.value
    assert record_kind(pkt) == g.RecordKind(parsed.kind).label
    if parsed.device_name is not None:
        assert pkt.device_name.decode() == parsed.device_name
    if parsed.start is not None:
        assert (pkt.granularity, int(pkt.bitmap_flags)) == (parsed.start.granularity,
                                                            parsed.start.bitmap_flags)
    if parsed.bits is not None:
        assert (pkt.first_sector, pkt.sector_count) == (parsed.bits.first_sector,
                                                        parsed.bits.sector_count)
    if parsed.buffer is not None:
        assert pkt.buffer == parsed.buffer and pkt.buffer_size == len(parsed.buffer)
    assert record_kind(pkt).upper() in pkt.summary()


def test_building_from_fields_matches_the_grammar() -> None:
    built = DirtyBitmapRecord(flags="START+DEVICE_NAME+BITMAP_NAME", device_name=b"drive0",
                              bitmap_name=b"b0", granularity=65536,
                              bitmap_flags="enabled+persistent")
    assert bytes(built) == RECORDS["start"]
    bits = DirtyBitmapRecord(flags="BITS", first_sector=8192, sector_count=8192,
                             buffer=bytes(range(32)) * 4)
    assert bytes(bits) == RECORDS["bits"]
    header = QemuFileHeader() / QemuConfiguration(machine_type=b"pc-i440fx-7.2") / \
        QemuCommand(command="POSTCOPY_ADVISE") / QemuEOF()
    assert bytes(header) == (g.build_file_header() + g.build_configuration("pc-i440fx-7.2")
                             + g.build_command(g.Command.POSTCOPY_ADVISE) + g.build_eof())


def test_a_stream_prefix_dissects_item_by_item() -> None:
    data = (g.build_file_header() + g.build_configuration("pc-i440fx-7.2")
            + g.build_section_start(g.ItemType.SECTION_START, 3, "dirty-bitmap", 0, 1)
            + RECORDS["start"] + RECORDS["eos"] + g.build_footer(3)
            + g.build_section_part(g.ItemType.SECTION_PART, 2) + b"\x00" * 16)
    pkt = QemuMigration(data)
    layers = []
    layer = pkt
    while layer:
        layers.append(type(layer).__name__)
        layer = layer.payload
    assert layers == ["QemuFileHeader", "QemuConfiguration", "QemuSectionStart",
                      "DirtyBitmapRecord", "DirtyBitmapRecord", "QemuSectionFooter",
                      "QemuSectionPart", "Raw"]
    assert pkt[QemuSectionStart].idstr == b"dirty-bitmap"
    assert pkt[QemuSectionFooter].section_id == 3
    assert pkt[QemuSectionPart].section_id == 2
    assert bytes(pkt) == data


def test_bind_port_dissects_tcp_payloads() -> None:
    bind_port(45123)
    payload = g.build_section_start(g.ItemType.SECTION_START, 3, "dirty-bitmap", 0, 1) + \
        RECORDS["start"]
    frame = Ether(bytes(Ether() / IP() / TCP(sport=40000, dport=45123) / payload))
    assert frame.haslayer(DirtyBitmapRecord)
    assert frame[DirtyBitmapRecord].bitmap_name == b"b0"
    assert "DirtyBitmap START drive0/b0" in frame[DirtyBitmapRecord].summary()


def _real_capture(tmp_path: Path) -> tuple[Path, int, dict]:
    """A real postcopy capture (few RAM iterations, so it decodes fast), its port and
    QEMU's ground truth."""
    stored = CAPTURES / "real" / "postcopy.pcap"
    truth = stored.with_suffix(".json")
    if stored.exists() and truth.exists():
        ground_truth = json.loads(truth.read_text())
        return stored, ground_truth["port"], ground_truth
    require_root()
    require_tools("qemu-system-x86_64", "qemu-img", "tcpdump")
    from testkit.realqemu.harness import PRESETS, run_migration

    result = run_migration(PRESETS["postcopy"], tmp_path, timeout=30)
    assert result.pcap is not None and result.port is not None
    return result.pcap, result.port, result.ground_truth


@pytest.mark.qemu
def test_real_qemu_records_dissect_identically(tmp_path: Path) -> None:
    path, port, _ = _real_capture(tmp_path)
    records: list[Record] = []

    eos_kept = [0]

    def keep(stream: MigrationStream, event: Event) -> None:
        if isinstance(event, Record) and event.kind.startswith("bitmap-"):
            # every iteration sends an EOS-only record: a few are enough
            if event.kind == "bitmap-eos":
                eos_kept[0] += 1
                if eos_kept[0] > 20:
                    return
            records.append(event)

    analyze_path(path, AnalysisOptions(keep_buffers=True), keep)
    from testkit.realqemu.harness import read_tcp_flow

    data = read_tcp_flow(path, port).to_server
    kinds = {r.kind for r in records}
    assert {"bitmap-start", "bitmap-bits", "bitmap-complete", "bitmap-eos"} <= kinds
    for record in records:
        raw = data[record.offset : record.end]
        pkt = DirtyBitmapRecord(raw)
        assert bytes(pkt) == raw
        assert "bitmap-" + record_kind(pkt) == record.kind
        for key in ("device_name", "bitmap_name"):
            if key in record.fields:
                assert getattr(pkt, key).decode() == record.fields[key]
        for key in ("granularity", "first_sector", "sector_count", "buffer_size"):
            if key in record.fields:
                assert getattr(pkt, key) == record.fields[key], key
        shown = pkt.show(dump=True)
        assert "dirty bitmap record" in shown
        if record.bitmap and record.fields.get("bitmap_name"):
            assert record.bitmap in shown


@pytest.mark.qemu
def test_scapy_users_see_bitmap_records_in_a_real_capture(tmp_path: Path) -> None:
    """What the module docstring promises: bind_port, read packets, find the records."""
    from scapy.utils import rdpcap

    path, port, truth = _real_capture(tmp_path)
    bind_port(port)
    starts = [pkt[DirtyBitmapRecord] for pkt in rdpcap(str(path))
              if pkt.haslayer(QemuSectionStart) and pkt.haslayer(DirtyBitmapRecord)]
    assert starts, "the setup segment carries the dirty-bitmap START section"
    names = set()
    record = starts[0]
    while isinstance(record, DirtyBitmapRecord) and record_kind(record) == "start":
        names.add(record.bitmap_name.decode())
        record = record.payload
    assert names == {b["name"] for b in truth["bitmaps"]}
