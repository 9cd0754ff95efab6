"""Resynchronisation: stepping over bytes the decoder cannot place, to a plausible item.

After garbage, a capture gap or an element it could not read, the decoder no longer
knows where the next item starts. It scans forward for one that looks real: a PART or
END header of a section it knows whose payload's first record its dissector finds
plausible, a FULL/START header with a printable idstr and small numbers, or the final
EOF + VMDESCRIPTION. The guesses here are also used by the device-state footer scan.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from migshark.analyzer import findings
from migshark.analyzer.decode.state import Section
from migshark.analyzer.findings import Code
from migshark.dissectors import grammar as g

if TYPE_CHECKING:  # annotations only: framing imports this module
    from migshark.analyzer.decode.framing import FramingMachine, NeedMore

_SECTION_ID = struct.Struct(">" + g.fixed_format(g.SectionHeaderShort))
_COMMAND_NUMBER = struct.Struct(">" + g.field_format(g.CommandHeader, "command"))
_INSTANCE_VERSION = struct.Struct(">" + g.field_format(g.SectionHeaderFull, "instance_id",
                                                       "version_id"))
_EOF, _VMDESCRIPTION = int(g.ItemType.EOF), int(g.ItemType.VMDESCRIPTION)
_PART, _END = int(g.ItemType.SECTION_PART), int(g.ItemType.SECTION_END)
_FULL, _START = int(g.ItemType.SECTION_FULL), int(g.ItemType.SECTION_START)
_COMMAND = int(g.ItemType.COMMAND)
_CANDIDATE_TYPES = frozenset((_PART, _END, _FULL, _START, _EOF))
_RAM_HEADER = struct.Struct(g.RamRecordHeader.fmtstr)
_FOOTER = int(g.ItemType.SECTION_FOOTER)
_RAM_EOS = int(g.RamFlag.EOS)
_RAM_PAGE_OR_ZERO = int(g.RamFlag.PAGE | g.RamFlag.ZERO)
_RAM_CONTINUE = int(g.RamFlag.CONTINUE)
_BITMAP_EOS = int(g.BitmapFlag.EOS)
_BITMAP_NAMES = int(g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME)
_BITMAP_EXTRA = int(g.BitmapFlag.EXTRA_FLAGS)
# QEMU numbers sections from 0 in the order devices registered: a few hundred at most.
_MAX_GUESSED_SECTION_ID = 1 << 16
# A candidate still undecided this far from the end of the data is stepped over one
# byte at a time rather than waited for (a long counted name of garbage).
_WAIT_AT_MOST = 600


def printable(name: bytes) -> bool:
    return bool(name) and all(0x20 < b < 0x7F for b in name)


def plausible_name_at(buf: bytes | bytearray, pos: int, limit: int) -> bool | None:
    """Whether a counted idstr at pos looks like one QEMU writes (None: not enough
    bytes yet). Used where the decoder has to guess where the next item starts."""
    if pos >= limit:
        return None
    name_end = pos + 1 + buf[pos]
    if name_end > limit:
        return None
    return printable(bytes(buf[pos + 1 : name_end]))


def plausible_next_item(machine: FramingMachine, pos: int, limit: int) -> bool | None:
    """Whether an item can start at buffer index pos (None: not enough bytes to say)."""
    buf = machine.rb.data
    if machine.package_end is not None and machine.rb.absolute(pos) == machine.package_end:
        return True
    if pos >= limit:
        return None
    item = buf[pos]
    if item == _EOF:
        if machine.package_end is not None:
            return True
        if pos + 1 >= limit:
            return None
        return buf[pos + 1] == _VMDESCRIPTION
    if item in (_PART, _END):
        if pos + 5 > limit:
            return None
        return _SECTION_ID.unpack_from(buf, pos + 1)[0] in machine.sections
    if item in (_FULL, _START):
        return plausible_name_at(buf, pos + 5, limit)
    if item == _COMMAND:
        if pos + 3 > limit:
            return None
        return 0 < _COMMAND_NUMBER.unpack_from(buf, pos + 1)[0] <= 32
    return False


def _footer_at(buf: bytes | bytearray, pos: int, limit: int, section_id: int) -> bool | None:
    if pos + 5 > limit:
        return None
    return buf[pos] == _FOOTER and _SECTION_ID.unpack_from(buf, pos + 1)[0] == section_id


def _dirty_bitmap_payload(buf: bytes | bytearray, pos: int, limit: int,
                          section_id: int) -> bool | None:
    """Whether a dirty-bitmap payload starts at pos, in one of the two shapes QEMU
    sends first in a section: an empty iteration (EOS, then the footer), or a record
    naming its device and bitmap (a section's first record always names both)."""
    if pos >= limit:
        return None
    flags = buf[pos]
    if flags == _BITMAP_EOS:
        return _footer_at(buf, pos + 1, limit, section_id)
    if flags & _BITMAP_EXTRA or flags & _BITMAP_NAMES != _BITMAP_NAMES:
        return False
    device = plausible_name_at(buf, pos + 1, limit)
    if not device:
        return device
    return plausible_name_at(buf, pos + 2 + buf[pos + 1], limit)


def _ram_payload(buf: bytes | bytearray, pos: int, limit: int, section_id: int,
                 page_mask: int) -> bool | None:
    """Whether a RAM payload starts at pos: an empty iteration (EOS, then the footer)
    or a page that names its RAM block (a CONTINUE page needs a block it cannot say)."""
    if pos + 8 > limit:
        return None
    header = _RAM_HEADER.unpack_from(buf, pos)[0]
    if header == _RAM_EOS:
        return _footer_at(buf, pos + 8, limit, section_id)
    flags = header & page_mask
    if flags & ~_RAM_PAGE_OR_ZERO or not flags or flags & _RAM_CONTINUE:
        return False
    return plausible_name_at(buf, pos + 8, limit)


def guess_section(machine: FramingMachine, pos: int, limit: int) -> Section | bool | None:
    """The section a PART/END header at pos belongs to when no START in the capture
    named its id (a capture that began mid-stream), judged by the payload that
    follows: a dirty-bitmap or RAM section, learned as such. False: neither fits;
    None: not enough bytes to say."""
    buf = machine.rb.data
    if pos + 5 > limit:
        return None
    section_id = _SECTION_ID.unpack_from(buf, pos + 1)[0]
    if section_id >= _MAX_GUESSED_SECTION_ID:
        return False
    verdict = _dirty_bitmap_payload(buf, pos + 5, limit, section_id)
    if verdict:
        return Section(section_id, g.DIRTY_BITMAP_SECTION_IDSTR, 0,
                       g.DIRTY_BITMAP_SECTION_VERSION)
    ram = _ram_payload(buf, pos + 5, limit, section_id, machine.page_mask)
    if ram:
        return Section(section_id, g.RAM_SECTION_IDSTR, 0, g.RAM_SECTION_VERSION)
    if verdict is None or ram is None:
        return None
    return False


# Where a section payload QEMU sends first can start (guess_section's shapes), as a
# prefilter: PART/END, a section id below 2^16, then an empty dirty-bitmap or RAM
# iteration with its footer, or a dirty-bitmap record naming device and bitmap.
_MIGRATION_RECORDS = re.compile(
    rb"[\x02\x03]\x00\x00(..)(?:\x01\x7e\x00\x00\1|\x00{7}\x10\x7e\x00\x00\1"
    rb"|[\x1c\x2c\x4c\x4e][\x01-\x7f])", re.DOTALL)
# How far a match may need to look past its start to be judged (two counted names).
SIGNATURE_LOOKAHEAD = 5 + 1 + 2 * 256


def find_migration_records(data: bytes | bytearray | memoryview, page_mask: int = 0xFFF
                           ) -> int | None:
    """Index of the first place in data that looks like a dirty-bitmap or RAM section
    item of a migration stream whose start is missing (None: nowhere). Wireshark's
    heuristic dissectors judge a flow so; the pattern is specific enough (an id
    repeated in the footer, or two printable counted names) that other TCP payloads
    seldom match, and a false match only costs a resynchronisation."""
    # bytes and bytearray index and unpack alike; only a memoryview is copied.
    buf = bytes(data) if isinstance(data, memoryview) else data
    limit = len(buf)
    for match in _MIGRATION_RECORDS.finditer(buf):
        pos = match.start()
        section_id = _SECTION_ID.unpack_from(buf, pos + 1)[0]
        if (_dirty_bitmap_payload(buf, pos + 5, limit, section_id)
                or _ram_payload(buf, pos + 5, limit, section_id, page_mask)):
            return pos
    return None


class Resynchroniser:
    """The framing machine's reader in State.RESYNC."""

    def __init__(self, machine: FramingMachine) -> None:
        self.machine = machine
        self.rb = machine.rb
        self.resync_from: int | None = None  # stream offset where the scan began

    def start(self, from_offset: int) -> None:
        self.resync_from = from_offset

    def read(self) -> NeedMore | None:
        rb = self.rb
        buf = rb.data
        pos = max(rb.pos, (self.resync_from or 0) - rb.base)
        end = len(buf)
        while pos < end:
            verdict: bool | None = False
            if buf[pos] in _CANDIDATE_TYPES:
                verdict = self._candidate(pos, end)
            if verdict is None:
                rb.pos = pos
                return end - pos + 1 if end - pos < _WAIT_AT_MOST else 1
            if verdict:
                found = rb.absolute(pos)
                skipped = found - (self.resync_from or 0)
                self.machine.emit(findings.make(
                    Code.RESYNCHRONISED,
                    f"skipped {skipped} bytes from {self.resync_from:#x} to the next "
                    f"recognisable item at {found:#x}", self.resync_from or 0,
                    length=skipped, fields={"skipped": skipped, "resumed_at": found}))
                self.resync_from = None
                rb.pos = pos
                self.machine.resume_items()
                return None
            pos += 1
        rb.pos = end
        return 1

    def ended(self, end: int) -> None:
        """The data ended at stream offset `end` during the scan."""
        skipped = end - (self.resync_from if self.resync_from is not None else end)
        if skipped:
            self.machine.emit(findings.make(
                Code.RESYNCHRONISED,
                f"skipped {skipped} bytes to the end of data without finding an item",
                end - skipped, length=skipped, fields={"skipped": skipped, "resumed_at": None}))
        self.machine.emit(findings.make(
            Code.TRUNCATED, "the stream ended while resynchronising, before EOF", end,
            fields={"element": None}))

    def _candidate(self, pos: int, end: int) -> bool | None:
        buf = self.rb.data
        byte = buf[pos]
        if byte == _EOF:
            if pos + 6 > end:
                return None
            if buf[pos + 1] != _VMDESCRIPTION:
                return False
            return buf[pos + 6 : pos + 7] == b"{" if pos + 7 <= end else None
        if byte in (_FULL, _START):
            if pos + 6 > end:
                return None
            name_len = buf[pos + 5]
            if pos + 6 + name_len + 8 > end:
                return None
            if not printable(bytes(buf[pos + 6 : pos + 6 + name_len])):
                return False
            instance, version = _INSTANCE_VERSION.unpack_from(buf, pos + 6 + name_len)
            return instance < 4096 and version < 4096
        if pos + 5 > end:
            return None
        section = self.machine.sections.get(_SECTION_ID.unpack_from(buf, pos + 1)[0])
        if section is None:
            if not self.machine.learning:
                return False
            guessed = guess_section(self.machine, pos, end)
            if not isinstance(guessed, Section):
                return guessed
            self.machine.learn_section(guessed, self.rb.absolute(pos))
            return True
        return self.machine.dissector_for(section.idstr).plausible_start(buf, pos + 5, end)
