"""The per-bitmap state machine: rebuild every dirty bitmap from the stream's records.

The reconstruction follows QEMU's loader: a BITS buffer is the hbitmap's last
level, 64-bit little-endian words, one bit per granule, written starting at word
first_granule / 64 (hbitmap_deserialize_part). The hash is the one QMP
`x-debug-block-dirty-bitmap-sha256` prints: SHA-256 over ceil(granules / 64)
words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from analyzer import findings
from analyzer.records import Event, Finding, Record
from dissectors import grammar as g

# A dense copy of one bitmap's words; 64 MiB holds a 256 GiB disk at 512-byte
# granularity or 32 TiB at 64 KiB. Larger claims are reported, not allocated.
MAX_BITMAP_BYTES = 64 << 20

SECTOR = g.SECTOR_SIZE


@dataclass
class DestinationContext:
    """What the destination already has (from its query-block / query-named-block-nodes).

    `bitmaps` maps (node, bitmap name) to granularity; `nodes` lists every name a
    lookup by device or node name would find.
    """

    nodes: set[str] = field(default_factory=set)
    bitmaps: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class BitmapState:
    node: str
    name: str
    first_offset: int
    granularity: int | None = None
    bitmap_flags: int | None = None
    started_at: int | None = None
    completed_at: int | None = None
    words: bytearray = field(default_factory=bytearray)
    coverage: list[list[int]] = field(default_factory=list)  # merged [start, end) sectors
    chunks: int = 0
    zero_chunks: int = 0
    unusable: str | None = None  # why no hash can be trusted
    real_node: str | None = None
    real_name: str | None = None

    @property
    def end_sector(self) -> int:
        return self.coverage[-1][1] if self.coverage else 0

    def covered_from_zero(self) -> bool:
        return len(self.coverage) == 1 and self.coverage[0][0] == 0

    def add_coverage(self, start: int, end: int) -> bool:
        """Merge [start, end); returns True when it overlapped what was there."""
        overlapped = False
        merged: list[list[int]] = []
        placed = False
        for lo, hi in self.coverage:
            if hi < start or lo > end:
                if lo > end and not placed:
                    merged.append([start, end])
                    placed = True
                merged.append([lo, hi])
                continue
            if lo < end and start < hi:
                overlapped = True
            start, end = min(lo, start), max(hi, end)
        if not placed:
            merged.append([start, end])
        merged.sort()
        self.coverage = merged
        return overlapped

    def granules(self) -> int:
        assert self.granularity
        disk = self.end_sector * SECTOR
        return -(-disk // self.granularity)

    def serialized(self) -> bytes:
        size = -(-self.granules() // 64) * 8
        data = bytes(self.words[:size])
        return data + bytes(size - len(data))

    def result(self) -> dict[str, Any]:
        flags = self.bitmap_flags or 0
        complete = self.completed_at is not None
        covered = self.covered_from_zero()
        sha = dirty = None
        reason = self.unusable
        if reason is None:
            if self.started_at is None:
                reason = "no START record"
            elif not complete:
                reason = "no COMPLETE record"
            elif not self.coverage:
                reason = "no BITS records, so the disk size is unknown"
            elif not covered:
                reason = "some sectors never arrived"
        if reason is None and self.granularity:
            data = self.serialized()
            sha = hashlib.sha256(data).hexdigest()
            dirty = int.from_bytes(data, "little").bit_count() * self.granularity
        return {
            "node": self.node,
            "name": self.name,
            "real_node": self.real_node or self.node,
            "real_name": self.real_name or self.name,
            "granularity": self.granularity,
            "enabled": bool(flags & g.BitmapStartFlag.ENABLED),
            "persistent": bool(flags & g.BitmapStartFlag.PERSISTENT),
            "disk_size": self.end_sector * SECTOR if self.coverage else None,
            "dirty_bytes": dirty,
            "sha256": sha,
            "complete": complete,
            "covered": covered,
            "status": "reconstructed" if sha else "incomplete",
            "reason": reason,
            "chunks": self.chunks,
            "zero_chunks": self.zero_chunks,
            "start_offset": self.started_at,
            "complete_offset": self.completed_at,
        }


class BitmapTracker:
    """Consumes decoder events; keeps one BitmapState per (node, bitmap) on the wire."""

    def __init__(self, destination: DestinationContext | None = None,
                 aliases: dict[tuple[str, str], tuple[str, str]] | None = None) -> None:
        self.bitmaps: dict[tuple[str, str], BitmapState] = {}
        self.destination = destination
        self.aliases = aliases or {}

    def consume(self, event: Event) -> list[Finding]:
        if isinstance(event, Finding):
            # A gap the decoder stepped over exactly (inside page data) or one inside
            # another section's payload harms no bitmap: a lost dirty-bitmap item would
            # need its header in the hole, and then the resynchronisation skips its
            # records, which coverage checks report. A hole inside the dirty-bitmap
            # payload itself, or where the decoder did not know its place, may have
            # swallowed records of any bitmap in transit.
            if (event.code == "capture-gap" and "exactly" not in event.message
                    and event.section in (None, g.DIRTY_BITMAP_SECTION_IDSTR)):
                self._damage(f"{event.code} at {event.offset:#x} while it was in transit")
            return []
        kind = event.kind
        if not kind.startswith("bitmap-") or kind in ("bitmap-eos", "bitmap-empty"):
            return []
        found: list[Finding] = []
        if event.node is None:
            found.append(self._finding(
                "no-device-name", event,
                f"{kind} record before any record named a device (no DEVICE_NAME yet)"))
            return found
        if event.bitmap is None:
            found.append(self._finding(
                "no-bitmap-name", event,
                f"{kind} record before any record named a bitmap (no BITMAP_NAME yet)"))
            return found
        key = (event.node, event.bitmap)
        if kind == "bitmap-start":
            found += self._start(key, event)
        elif kind == "bitmap-bits":
            found += self._bits(key, event)
        elif kind == "bitmap-complete":
            found += self._complete(key, event)
        return found

    def finish(self, end_offset: int) -> list[Finding]:
        found = []
        for state in self.bitmaps.values():
            if state.started_at is not None and state.completed_at is None:
                found.append(findings.make(
                    "incomplete-bitmap",
                    f"bitmap {state.node}/{state.name} never received COMPLETE; the data "
                    f"ended at {end_offset:#x}", state.started_at, section="dirty-bitmap",
                    node=state.node, bitmap=state.name))
        return found

    def results(self) -> list[dict[str, Any]]:
        return [state.result() for state in self.bitmaps.values()]

    # --- record handlers ------------------------------------------------------

    def _finding(self, code: str, record: Record, message: str) -> Finding:
        return findings.make(code, message, record.offset, section=record.section,
                             node=record.node, bitmap=record.bitmap, length=record.length)

    def _damage(self, why: str) -> None:
        for state in self.bitmaps.values():
            if state.started_at is not None and state.completed_at is None and not state.unusable:
                state.unusable = why

    def _state(self, key: tuple[str, str], record: Record) -> BitmapState:
        state = self.bitmaps.get(key)
        if state is None:
            state = BitmapState(node=key[0], name=key[1], first_offset=record.offset)
            real = self.aliases.get(key)
            if real:
                state.real_node, state.real_name = real
            self.bitmaps[key] = state
        return state

    def _destination_has(self, key: tuple[str, str]) -> int | None:
        if self.destination is None:
            return None
        real = self.aliases.get(key, key)
        return self.destination.bitmaps.get(real)

    def _start(self, key: tuple[str, str], record: Record) -> list[Finding]:
        found = []
        granularity = record.fields["granularity"]
        flags = record.fields["bitmap_flags"]
        label = f"{key[0]}/{key[1]}"
        existing = self.bitmaps.get(key)
        if existing is not None and existing.started_at is not None:
            found.append(self._finding(
                "bitmap-exists", record,
                f"second START for {label} (first at {existing.started_at:#x}); QEMU: "
                f"\"Bitmap with the same name ('{key[1]}') already exists on destination\""))
            return found
        dest_granularity = self._destination_has(key)
        if dest_granularity is not None:
            found.append(self._finding(
                "bitmap-exists", record,
                f"the destination already has bitmap {label}; QEMU refuses the START"))
            if dest_granularity != granularity:
                found.append(self._finding(
                    "granularity-mismatch", record,
                    f"START granularity {granularity} for {label}, the destination's bitmap "
                    f"has {dest_granularity}"))
        state = self._state(key, record)
        state.started_at = record.offset
        state.bitmap_flags = flags
        if not _valid_granularity(granularity):
            found.append(self._finding(
                "invalid-granularity", record,
                f"granularity {granularity} for {label} is not a power of two between "
                f"{g.MIN_GRANULARITY} and 2^31; QEMU's bdrv_create_dirty_bitmap() asserts"))
            state.unusable = f"invalid granularity {granularity}"
        else:
            state.granularity = granularity
        if flags & g.BitmapStartFlag.RESERVED_MASK:
            found.append(self._finding(
                "reserved-start-flags", record,
                f"START flags {flags:#04x} for {label} use reserved bits "
                f"{flags & g.BitmapStartFlag.RESERVED_MASK:#04x}; QEMU: 'Unknown flags in "
                f"migrated dirty bitmap header: {flags:x}'"))
        if flags & g.BitmapStartFlag.AUTOLOAD:
            found.append(self._finding(
                "autoload-flag", record,
                f"START for {label} carries the old autoload flag 0x04, which QEMU ignores"))
        return found

    def _bits(self, key: tuple[str, str], record: Record) -> list[Finding]:
        found: list[Finding] = []
        label = f"{key[0]}/{key[1]}"
        state = self.bitmaps.get(key)
        if state is None or state.started_at is None:
            if self._destination_has(key) is None:
                found.append(self._finding(
                    "unknown-bitmap", record,
                    f"BITS for {label}, which has no START in this stream; QEMU: "
                    f"\"Error: unknown dirty bitmap '{key[1]}' for block device '{key[0]}'\""))
            return found
        if state.completed_at is not None:
            found.append(self._finding(
                "bits-after-complete", record,
                f"BITS for {label} after its COMPLETE at {state.completed_at:#x}"))
        if state.granularity is None:
            return found
        first = record.fields["first_sector"]
        count = record.fields["sector_count"]
        state.chunks += 1
        granularity = state.granularity
        first_byte = first * SECTOR
        nr_bytes = count * SECTOR
        if count == 0:
            return found
        first_granule = first_byte // granularity
        last_granule = (first_byte + nr_bytes - 1) // granularity
        first_word = first_granule // 64
        word_count = last_granule // 64 - first_word + 1
        needed = word_count * 8
        if first_byte % (64 * granularity):
            found.append(self._finding(
                "bitmap-range-invalid", record,
                f"BITS for {label} start at sector {first}, not on a 64-granule boundary "
                f"({64 * granularity} bytes); QEMU's hbitmap asserts"))
            state.unusable = "a chunk QEMU cannot deserialise"
        if state.add_coverage(first, first + count):
            found.append(self._finding(
                "overlapping-chunks", record,
                f"BITS for {label} sectors {first}..{first + count} overlap earlier chunks"))
        if record.fields.get("zeroes"):
            state.zero_chunks += 1
            end = min((first_word + word_count) * 8, len(state.words))
            if end > first_word * 8:
                state.words[first_word * 8 : end] = bytes(end - first_word * 8)
            return found
        size = record.fields["buffer_size"]
        if needed > size or size > _align_up(needed, g.BITMAP_BUFFER_ALIGN):
            found.append(self._finding(
                "granularity-mismatch", record,
                f"BITS buffer of {size} bytes for {label}: granularity {granularity} needs "
                f"{needed} (up to {_align_up(needed, g.BITMAP_BUFFER_ALIGN)} padded); QEMU: "
                "\"Migrated bitmap granularity doesn't match the destination bitmap "
                f"'{key[1]}' granularity\""))
            state.unusable = "a BITS buffer that does not fit the granularity"
            return found
        buffer = record.fields.get("buffer")
        if buffer is None:
            state.unusable = "a BITS buffer that was not kept"
            return found
        end = (first_word + word_count) * 8
        if end > MAX_BITMAP_BYTES:
            state.unusable = f"bitmap larger than {MAX_BITMAP_BYTES} bytes"
            found.append(self._finding(
                "chunk-beyond-disk", record,
                f"BITS for {label} reach sector {first + count}, a bitmap of {end} bytes; "
                "not reconstructed"))
            return found
        if len(state.words) < end:
            state.words.extend(bytes(end - len(state.words)))
        state.words[first_word * 8 : end] = buffer[:needed]
        return found

    def _complete(self, key: tuple[str, str], record: Record) -> list[Finding]:
        label = f"{key[0]}/{key[1]}"
        state = self.bitmaps.get(key)
        if state is None or state.started_at is None:
            if self.destination is not None and self._destination_has(key) is None:
                return [self._finding(
                    "unknown-bitmap", record,
                    f"COMPLETE for {label}, which neither this stream nor the destination "
                    "has")]
            return [self._finding(
                "complete-without-start", record,
                f"COMPLETE for {label}, which has no START in this stream")]
        found = []
        if state.completed_at is not None:
            found.append(self._finding(
                "bits-after-complete", record,
                f"second COMPLETE for {label} (first at {state.completed_at:#x})"))
            return found
        state.completed_at = record.offset
        if state.coverage and not state.covered_from_zero():
            holes = _holes(state.coverage)
            found.append(self._finding(
                "coverage-gap", record,
                f"COMPLETE for {label} while sectors never arrived: "
                + ", ".join(f"{lo}..{hi}" for lo, hi in holes[:5])
                + (" ..." if len(holes) > 5 else "")))
        return found


def _valid_granularity(value: int) -> bool:
    return g.MIN_GRANULARITY <= value <= g.MAX_GRANULARITY and value & (value - 1) == 0


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _holes(coverage: list[list[int]]) -> list[tuple[int, int]]:
    holes = []
    previous = 0
    for lo, hi in coverage:
        if lo > previous:
            holes.append((previous, lo))
        previous = hi
    return holes
