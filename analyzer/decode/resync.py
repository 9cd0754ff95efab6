"""Resynchronisation: stepping over bytes the decoder cannot place, to a plausible item.

After garbage, a capture gap or an element it could not read, the decoder no longer
knows where the next item starts. It scans forward for one that looks real: a PART or
END header of a section it knows whose payload's first record its dissector finds
plausible, a FULL/START header with a printable idstr and small numbers, or the final
EOF + VMDESCRIPTION. The guesses here are also used by the device-state footer scan.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from migshark.analyzer import findings
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
# A candidate still undecided this far from the end of the data is stepped over one
# byte at a time rather than waited for (a long counted name of garbage).
_WAIT_AT_MOST = 600


def printable(name: bytes) -> bool:
    return bool(name) and all(0x20 < b < 0x7F for b in name)


def plausible_name_at(buf: bytearray, pos: int, limit: int) -> bool | None:
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
            return False
        return self.machine.dissector_for(section.idstr).plausible_start(buf, pos + 5, end)
