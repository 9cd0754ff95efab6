"""The per-bitmap state machine: rebuild every dirty bitmap from the stream's records.

The reconstruction follows QEMU's loader: a BITS buffer is the hbitmap's last
level, 64-bit little-endian words, one bit per granule, written starting at word
first_granule / 64 (hbitmap_deserialize_part). The hash is the one QMP
`x-debug-block-dirty-bitmap-sha256` prints: SHA-256 over ceil(granules / 64)
words.
"""

from __future__ import annotations

import bisect
import hashlib
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from migshark.analyzer import findings
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Fields, Finding, Record
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import BITMAP_KINDS, Kind

if TYPE_CHECKING:  # only for --bitmap-mapping, loaded by the CLI when given
    from migshark.analyzer.mapping import BitmapMapping

# The largest bitmap reconstructed and hashed: 64 MiB of words holds a 256 GiB disk
# at 512-byte granularity or 32 TiB at 64 KiB. Larger claims are reported, not hashed.
MAX_BITMAP_BYTES = 64 << 20

SECTOR = g.SECTOR_SIZE
# The node or bitmap name of records whose naming record the capture missed.
NOT_CAPTURED = "(not captured)"
# BITS records held for a bitmap whose START is missing, until its granularity is
# known: a million chunks is a 4 TiB disk at 512-byte granularity.
MAX_STARTLESS_CHUNKS = 1 << 20
_EOS = int(g.BitmapFlag.EOS)  # a plain int: IntFlag arithmetic per record adds up


class PagedWords:
    """A bitmap's serialised words, stored in small pages only where BITS data landed.

    Memory follows the buffer bytes actually received, never the offsets a stream
    claims: a hostile BITS record for the far end of a huge disk costs one page.
    Reads (slices) see zeroes wherever nothing was written, like a bytearray that
    was zero-extended.
    """

    PAGE = 512

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def write(self, offset: int, data: bytes | memoryview) -> None:
        page_size = self.PAGE
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, page_size)
            take = min(page_size - within, len(data) - pos)
            page = self._pages.get(index)
            if page is None:
                if not any(data[pos : pos + take]):
                    pos += take
                    continue  # zeroes over nothing: nothing to store
                page = self._pages[index] = bytearray(page_size)
            page[within : within + take] = data[pos : pos + take]
            pos += take
        self._length = max(self._length, offset + len(data))

    def zero(self, start: int, end: int) -> None:
        """Clear [start, end) where pages exist; the length does not grow."""
        end = min(end, self._length)
        page_size = self.PAGE
        pos = start
        while pos < end:
            index, within = divmod(pos, page_size)
            take = min(page_size - within, end - pos)
            page = self._pages.get(index)
            if page is not None:
                page[within : within + take] = bytes(take)
            pos += take

    def __getitem__(self, key: slice) -> bytes:
        start, stop, step = key.indices(self._length)
        if step != 1 or stop <= start:
            return bytes(max(0, stop - start)) if step == 1 else b""
        return b"".join(self.iter_bytes(start, stop))

    def iter_bytes(self, start: int, stop: int):  # noqa: ANN201 - Iterator[bytes]
        """[start, stop) as consecutive pieces, zero-filled beyond what was written."""
        page_size = self.PAGE
        zeroes = bytes(page_size)
        pos = start
        while pos < stop:
            index, within = divmod(pos, page_size)
            take = min(page_size - within, stop - pos)
            page = self._pages.get(index)
            if page is None:
                yield zeroes[:take] if take < page_size else zeroes
            else:
                yield bytes(page[within : within + take])
            pos += take

    def bit_count(self, stop: int) -> int:
        count = 0
        for index, page in self._pages.items():
            base = index * self.PAGE
            if base >= stop:
                continue
            count += int.from_bytes(page[: stop - base], "little").bit_count()
        return count


class DestinationContext(Fields):
    """What the destination already has (from its query-block / query-named-block-nodes).

    `nodes` holds node names, `devices` maps a BlockBackend (device) name to the node
    name of its root, `bitmaps` maps (node name, bitmap name) to granularity and
    `sizes` a node name to its virtual size in bytes, when known.
    """

    _fields = ("nodes", "bitmaps", "devices", "sizes")

    def __init__(self, nodes: set[str] | None = None,
                 bitmaps: dict[tuple[str, str], int] | None = None,
                 devices: dict[str, str] | None = None,
                 sizes: dict[str, int] | None = None) -> None:
        self.nodes: set[str] = set() if nodes is None else nodes
        self.bitmaps: dict[tuple[str, str], int] = {} if bitmaps is None else bitmaps
        self.devices: dict[str, str] = {} if devices is None else devices
        self.sizes: dict[str, int] = {} if sizes is None else sizes

    def resolve(self, name: str, *, node_only: bool = False) -> str | None:
        """The node a DEVICE_NAME finds, as bdrv_lookup_bs(name, name) does: a device
        (BlockBackend) name first, then a node name. With block-bitmap-mapping QEMU
        looks up node names only."""
        if not node_only and name in self.devices:
            return self.devices[name]
        return name if name in self.nodes else None


class Dialect(StrEnum):
    """Which loader the destination runs: QEMU as merged (2.12+) or the 2017 draft."""

    QEMU = "qemu"
    DRAFT_2017 = "2017"


class BitmapState(Fields):
    _fields = ("node", "name", "first_offset", "granularity", "bitmap_flags", "started_at",
               "completed_at", "words", "coverage", "chunks", "zero_chunks", "unusable",
               "real_node", "real_name", "disk_end", "disk_end_source", "gap_reason",
               "coverage_since_gap", "startless_chunks", "granularity_fits")

    def __init__(self, node: str, name: str, first_offset: int, granularity: int | None = None,
                 bitmap_flags: int | None = None, started_at: int | None = None,
                 completed_at: int | None = None, words: PagedWords | None = None,
                 coverage: list[list[int]] | None = None, chunks: int = 0, zero_chunks: int = 0,
                 unusable: str | None = None, real_node: str | None = None,
                 real_name: str | None = None, disk_end: int | None = None,
                 disk_end_source: str = "") -> None:
        self.node = node
        self.name = name
        self.first_offset = first_offset
        self.granularity = granularity
        self.bitmap_flags = bitmap_flags
        self.started_at = started_at
        self.completed_at = completed_at
        self.words = PagedWords() if words is None else words
        # merged [start, end) sectors
        self.coverage: list[list[int]] = [] if coverage is None else coverage
        self.chunks = chunks
        self.zero_chunks = zero_chunks
        self.unusable = unusable  # why no hash can be trusted
        self.real_node = real_node
        self.real_name = real_name
        self.disk_end = disk_end  # sectors, once known
        self.disk_end_source = disk_end_source
        # A capture gap while the bitmap was in transit; cleared in effect when the
        # chunks received after it cover the whole disk (docs/capture.md).
        self.gap_reason: str | None = None
        self.coverage_since_gap: list[list[int]] = []
        # A bitmap whose START the capture missed: its BITS records, kept until its
        # granularity can be inferred from them (None: it had a START).
        self.startless_chunks: list[Record | None] | None = None
        self.granularity_fits: list[int] = []

    @property
    def end_sector(self) -> int:
        return self.coverage[-1][1] if self.coverage else 0

    def covered_from_zero(self) -> bool:
        return len(self.coverage) == 1 and self.coverage[0][0] == 0

    def add_coverage(self, start: int, end: int) -> bool:
        """Merge [start, end); returns True when it overlapped what was there."""
        if self.gap_reason is not None:
            _merge(self.coverage_since_gap, start, end)
        return _merge(self.coverage, start, end)

    def gap_recovered(self) -> bool:
        """Whether the chunks received since the last gap rewrote every word: they
        cover sector 0 to the end of every chunk seen (and of the disk, when known)."""
        since = self.coverage_since_gap
        end = max(self.end_sector, self.disk_end or 0)
        return len(since) == 1 and since[0][0] == 0 and since[0][1] >= end

    def granules(self) -> int:
        assert self.granularity
        disk = self.end_sector * SECTOR
        return -(-disk // self.granularity)

    def serialized_size(self) -> int:
        return -(-self.granules() // 64) * 8

    def serialized(self) -> bytes:
        size = self.serialized_size()
        return b"".join(self.words.iter_bytes(0, size))

    def result(self) -> dict[str, Any]:
        flags = self.bitmap_flags or 0
        complete = self.completed_at is not None
        covered = self.covered_from_zero()
        sha = dirty = None
        reason = self.unusable
        startless = self.startless_chunks is not None
        if reason is None:
            if self.started_at is None and not startless:
                reason = "no START record"
            elif not complete:
                reason = "no COMPLETE record"
            elif not self.coverage:
                reason = "no BITS records, so the disk size is unknown"
            elif not covered:
                reason = "some sectors never arrived"
            elif self.gap_reason is not None and not self.gap_recovered():
                reason = (f"{self.gap_reason}, and the chunks received after it do not "
                          "cover the whole disk")
            elif self.granularity is None:
                reason = ("the capture missed its START and the chunk sizes do not pin "
                          "the granularity down (values that fit: "
                          f"{describe_fits(self.granularity_fits)})")
        if reason is None and self.granularity:
            size = self.serialized_size()
            if size > MAX_BITMAP_BYTES:
                reason = f"bitmap larger than {MAX_BITMAP_BYTES} bytes, not hashed"
            else:
                digest = hashlib.sha256()
                for piece in self.words.iter_bytes(0, size):
                    digest.update(piece)
                sha = digest.hexdigest()
                dirty = self.words.bit_count(size) * self.granularity
        result: dict[str, Any] = {
            "node": self.node,
            "name": self.name,
            "real_node": self.real_node or self.node,
            "real_name": self.real_name or self.name,
            "granularity": self.granularity,
            # Only START carries the flags: without it they are unknown (null).
            "enabled": None if startless else bool(flags & g.BitmapStartFlag.ENABLED),
            "persistent": None if startless else bool(flags & g.BitmapStartFlag.PERSISTENT),
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
        if startless:
            # Keys only a START-less bitmap has, so other results stay as they were.
            result["start_missed"] = True
            result["granularity_fits"] = list(self.granularity_fits)
        return result


class BitmapTracker:
    """Consumes decoder events; keeps one BitmapState per (node, bitmap) on the wire."""

    def __init__(self, destination: DestinationContext | None = None,
                 aliases: dict[tuple[str, str], tuple[str, str]] | None = None,
                 *, mapping: BitmapMapping | None = None,
                 dialect: Dialect = Dialect.QEMU) -> None:
        self.bitmaps: dict[tuple[str, str], BitmapState] = {}
        self.destination = destination
        self.mapping = mapping
        self.dialect = Dialect(dialect)
        self.aliases = dict(aliases or {})
        if mapping is not None:
            self.aliases.update(mapping.aliases())
        # QEMU reports each of these once and then ignores the bitmap stream, so a
        # name that is wrong in every record is reported where it first appears.
        self._reported: set[tuple[str, str, str]] = set()
        # What the capture missed (its start, or bytes in a gap), once it has: from
        # then on BITS or COMPLETE without a START is a bitmap to rebuild, not an error.
        self._missed: str | None = None
        # Buffer bytes held per START-less bitmap, bounded like a reconstruction.
        self._startless_bytes: dict[tuple[str, str], int] = {}
        # Where a destination's dirty_bitmap_load() fails for good: no bitmap that was
        # not complete by then reaches it, whatever the source sends afterwards.
        self._load_failed: str | None = None

    def consume(self, event: Event) -> list[Finding]:
        if isinstance(event, Finding):
            # A gap the decoder stepped over exactly (inside page data) or one inside
            # another section's payload harms no bitmap: a lost dirty-bitmap item would
            # need its header in the hole, and then the resynchronisation skips its
            # records, which coverage checks report. A hole inside the dirty-bitmap
            # payload itself, or where the decoder did not know its place, may have
            # swallowed records of any bitmap in transit.
            lost = event.code == Code.CAPTURE_GAP and not event.fields.get(
                "inside_skipped_data", False)
            if event.code == Code.MISSED_START or lost:
                self._missed = self._missed or f"{event.code} at {event.offset:#x}"
            if lost and event.section in (None, g.DIRTY_BITMAP_SECTION_IDSTR):
                self._damage(f"{event.code} at {event.offset:#x} while it was in transit")
            if (event.code == Code.MISSING_EOS and self._load_failed is None
                    and event.fields.get("ended_at") != "end of data"):
                # Without EOS QEMU reads the footer (or the next item) as the next
                # record's flags and fails the load there ("Unable to read node alias
                # string"). At the end of the data the stream is simply cut: the
                # bitmaps' own reasons (no COMPLETE) say more.
                self._load_failed = (f"{event.code} at {event.offset:#x}: a destination "
                                     "fails the load there")
                for state in self.bitmaps.values():
                    if state.completed_at is None and state.unusable is None:
                        state.unusable = self._load_failed
            return []
        kind = event.kind
        if kind not in BITMAP_KINDS:
            return []
        flags = event.fields.get("flags", 0)
        # dirty_bitmap_load_header(): only a record whose flags are EOS alone (or
        # nothing at all) may come before any device and bitmap name.
        nothing = flags == flags & _EOS
        found: list[Finding] = []
        if "device_name" in event.fields:
            found += self._check_node(event)
        if "bitmap_name" in event.fields and event.node is not None:
            found += self._check_bitmap_alias(event)
        if nothing:
            return found
        node, bitmap = event.node, event.bitmap
        if self._missed is not None:
            # The record that named them may be what the capture missed (QEMU names a
            # device only when it changes, even across sections).
            node = NOT_CAPTURED if node is None else node
            bitmap = NOT_CAPTURED if bitmap is None else bitmap
        if node is None:
            found += self._once(Code.NO_DEVICE_NAME, "", event,
                                f"{kind} record (flags {flags:#04x}) before any record named "
                                "a device; QEMU: 'Error: block device name is not set'")
            return found
        if bitmap is None:
            found += self._once(Code.NO_BITMAP_NAME, node, event,
                                f"{kind} record (flags {flags:#04x}) before any record named "
                                "a bitmap; QEMU: 'Error: block device name is not set' (sic)")
            return found
        if kind in (Kind.BITMAP_EOS, Kind.BITMAP_EMPTY):
            return found
        key = (node, bitmap)
        if kind == Kind.BITMAP_START:
            found += self._start(key, event)
        elif kind == Kind.BITMAP_BITS:
            found += self._bits(key, event)
        elif kind == Kind.BITMAP_COMPLETE:
            found += self._complete(key, event)
        return found

    def finish(self, end_offset: int) -> list[Finding]:
        found = []
        for state in self.bitmaps.values():
            if state.startless_chunks is not None and state.completed_at is None:
                found += self._rebuild_startless(state, None)
            if state.started_at is not None and state.completed_at is None:
                found.append(findings.make(
                    Code.INCOMPLETE_BITMAP,
                    f"bitmap {state.node}/{state.name} never received COMPLETE; the data "
                    f"ended at {end_offset:#x}", state.started_at, section="dirty-bitmap",
                    node=state.node, bitmap=state.name))
        return found

    def results(self) -> list[dict[str, Any]]:
        return [state.result() for state in self.bitmaps.values()]

    # --- record handlers ------------------------------------------------------

    def _finding(self, code: Code, record: Record, message: str) -> Finding:
        return findings.make(code, message, record.offset, section=record.section,
                             node=record.node, bitmap=record.bitmap, length=record.length)

    def _once(self, code: Code, subject: str, record: Record, message: str) -> list[Finding]:
        key = (code, subject, record.bitmap or "" if code == Code.UNKNOWN_BITMAP else "")
        if key in self._reported:
            return []
        self._reported.add(key)
        return [self._finding(code, record, message)]

    def _damage(self, why: str) -> None:
        """A gap may have swallowed records of every bitmap in transit: each one is
        exact again only if the chunks that follow rewrite all of it."""
        for state in self.bitmaps.values():
            in_transit = state.started_at is not None or state.startless_chunks is not None
            if in_transit and state.completed_at is None and not state.unusable:
                if state.startless_chunks is not None:
                    # Replayed in order once the granularity is known: mark the place.
                    state.startless_chunks.append(None)
                state.gap_reason = why
                state.coverage_since_gap = []

    def _state(self, key: tuple[str, str], record: Record) -> BitmapState:
        state = self.bitmaps.get(key)
        if state is None:
            state = BitmapState(node=key[0], name=key[1], first_offset=record.offset,
                                unusable=self._load_failed)
            real = self.aliases.get(key)
            if real:
                state.real_node, state.real_name = real
            self.bitmaps[key] = state
        return state

    def _real_node(self, wire_node: str) -> str | None:
        """The destination node a wire DEVICE_NAME selects (None: not known)."""
        if self.mapping is not None:
            node = self.mapping.node(wire_node)
            if node is None:
                return None
            wire_node = node.node_name
        if self.destination is None:
            return wire_node
        return self.destination.resolve(wire_node, node_only=self.mapping is not None)

    def _real_name(self, key: tuple[str, str]) -> str:
        """The bitmap name QEMU looks up: the mapping's real name for an alias."""
        return self.aliases.get(key, key)[1]

    def _destination_has(self, key: tuple[str, str]) -> int | None:
        """Granularity of the destination's existing bitmap for a wire (node, name)."""
        if self.destination is None:
            return None
        node = self._real_node(key[0])
        if node is None:
            return None
        name = self.aliases.get(key, key)[1]
        return self.destination.bitmaps.get((node, name))

    def _check_node(self, record: Record) -> list[Finding]:
        name = record.fields["device_name"]
        if self.mapping is not None:
            node = self.mapping.node(name)
            if node is None:
                return self._once(
                    Code.UNKNOWN_NODE, name, record,
                    f"DEVICE_NAME '{name}' is not a node alias of the block-bitmap-mapping; "
                    f"QEMU: \"Error: Unknown node alias '{name}'\"")
            if self.destination is not None and self.destination.resolve(
                    node.node_name, node_only=True) is None:
                return self._once(
                    Code.UNKNOWN_NODE, name, record,
                    f"node alias '{name}' maps to node '{node.node_name}', which the "
                    f"destination does not have; QEMU: \"Cannot find device='' nor "
                    f"node-name='{node.node_name}'\"")
            return []
        if self.destination is not None and self.destination.resolve(name) is None:
            return self._once(
                Code.UNKNOWN_NODE, name, record,
                f"DEVICE_NAME '{name}' is neither a device nor a node name on the "
                f"destination; QEMU: \"Cannot find device='{name}' nor node-name='{name}'\"")
        return []

    def _check_bitmap_alias(self, record: Record) -> list[Finding]:
        if self.mapping is None or record.node is None:
            return []
        node = self.mapping.node(record.node)
        alias = record.fields["bitmap_name"]
        if node is None or alias in node.bitmaps:
            return []  # an unknown node was reported already; QEMU stops there
        return self._once(
            Code.UNKNOWN_BITMAP, record.node, record,
            f"BITMAP_NAME '{alias}' is not a bitmap alias of node alias '{record.node}'; "
            f"QEMU: \"Error: Unknown bitmap alias '{alias}' on node '{node.node_name}' "
            f"(alias '{record.node}')\"")

    def _start(self, key: tuple[str, str], record: Record) -> list[Finding]:
        found: list[Finding] = []
        granularity = record.fields["granularity"]
        flags = record.fields["bitmap_flags"]
        label = f"{key[0]}/{key[1]}"
        draft = self.dialect is Dialect.DRAFT_2017
        existing = self.bitmaps.get(key)
        if existing is not None and existing.started_at is not None:
            if not draft:
                found.append(self._finding(
                    Code.BITMAP_EXISTS, record,
                    f"second START for {label} (first at {existing.started_at:#x}); the "
                    "first one created it, so QEMU: \"Bitmap with the same name "
                    f"('{key[1]}') already exists on destination\""))
            elif existing.granularity is not None and existing.granularity != granularity:
                found.append(self._finding(
                    Code.GRANULARITY_MISMATCH, record,
                    f"second START for {label} with granularity {granularity}, the first "
                    f"(at {existing.started_at:#x}) had {existing.granularity}"))
            return found
        dest_granularity = self._destination_has(key)
        if dest_granularity is not None:
            if not draft:
                found.append(self._finding(
                    Code.BITMAP_EXISTS, record,
                    f"the destination already has bitmap {label} (granularity "
                    f"{dest_granularity}); QEMU: \"Bitmap with the same name ('{key[1]}') "
                    "already exists on destination\""))
            elif dest_granularity != granularity:
                # The 2017 draft reused an existing bitmap when the granularities agree.
                found.append(self._finding(
                    Code.GRANULARITY_MISMATCH, record,
                    f"START granularity {granularity} for {label}, the destination's "
                    f"bitmap has {dest_granularity}; the 2017 loader: \"Error: Migrated "
                    f"bitmap granularity ({granularity}) doesn't match the destination "
                    f"bitmap '{key[1]}' granularity ({dest_granularity})\""))
        state = self._state(key, record)
        state.started_at = record.offset
        # The 2017 byte is a bool (any non-zero enables); there is no persistence bit.
        state.bitmap_flags = (g.BitmapStartFlag.ENABLED if flags else 0) if draft else flags
        if not _valid_granularity(granularity):
            found.append(self._finding(
                Code.INVALID_GRANULARITY, record,
                f"granularity {granularity} for {label} is not a power of two between "
                f"{g.MIN_GRANULARITY} and 2^31; QEMU's bdrv_create_dirty_bitmap() asserts"))
            state.unusable = f"invalid granularity {granularity}"
        else:
            state.granularity = granularity
        if draft:
            if flags not in (0, 1):
                found.append(self._finding(
                    Code.UNKNOWN_FLAGS, record,
                    f"START for {label} carries enabled byte {flags:#04x}; the 2017 format "
                    "defines only 0 and 1 (the draft loader reads any non-zero as enabled)"))
            return found
        if flags & g.BitmapStartFlag.RESERVED_MASK:
            found.append(self._finding(
                Code.RESERVED_START_FLAGS, record,
                f"START flags {flags:#04x} for {label} use reserved bits "
                f"{flags & g.BitmapStartFlag.RESERVED_MASK:#04x}; QEMU: 'Unknown flags in "
                f"migrated dirty bitmap header: {flags:x}'"))
        if flags & g.BitmapStartFlag.AUTOLOAD:
            found.append(self._finding(
                Code.AUTOLOAD_FLAG, record,
                f"START for {label} carries the old autoload flag 0x04, which QEMU ignores"))
        return found

    def _bits(self, key: tuple[str, str], record: Record) -> list[Finding]:
        found: list[Finding] = []
        label = f"{key[0]}/{key[1]}"
        state = self.bitmaps.get(key)
        if self._missed is not None and (state is None or state.startless_chunks is not None):
            return self._keep_startless(key, record)
        if state is None or state.started_at is None:
            # On a node QEMU could not find it stopped there (unknown-node); there is
            # no bitmap lookup to fail.
            if self._destination_has(key) is None and self._real_node(key[0]) is not None:
                found += self._once(
                    Code.UNKNOWN_BITMAP, key[0], record,
                    f"BITS for {label}, which has no START in this stream"
                    + (" and does not exist on the destination" if self.destination else "")
                    + f"; QEMU: \"Error: unknown dirty bitmap '{self._real_name(key)}' for "
                    f"block device '{self._real_node(key[0])}'\"")
            return found
        if state.completed_at is not None:
            found.append(self._finding(
                Code.BITS_AFTER_COMPLETE, record,
                f"BITS for {label} after its COMPLETE at {state.completed_at:#x}"))
        return found + self._apply_bits(state, record)

    def _apply_bits(self, state: BitmapState, record: Record) -> list[Finding]:
        """Write one BITS record into a bitmap whose granularity is known."""
        found: list[Finding] = []
        key = (state.node, state.name)
        label = f"{key[0]}/{key[1]}"
        if state.granularity is None:
            return found
        first = record.fields["first_sector"]
        count = record.fields["sector_count"]
        state.chunks += 1
        granularity = state.granularity
        first_byte = first * SECTOR
        nr_bytes = count * SECTOR
        needed = 0
        first_word = word_count = 0
        if count:
            # hbitmap_serialization_size(): whole 64-bit words from the first granule's
            # word to the last granule's word; nothing at all for an empty range.
            first_granule = first_byte // granularity
            last_granule = (first_byte + nr_bytes - 1) // granularity
            first_word = first_granule // 64
            word_count = last_granule // 64 - first_word + 1
            needed = word_count * 8
            if first_byte % (64 * granularity):
                found.append(self._finding(
                    Code.BITMAP_RANGE_INVALID, record,
                    f"BITS for {label} start at sector {first}, not on a 64-granule "
                    f"boundary ({64 * granularity} bytes); QEMU's hbitmap asserts"))
                state.unusable = "a chunk QEMU cannot deserialise"
            found += self._check_disk_end(state, record, first, count, label)
            if state.add_coverage(first, first + count):
                found.append(self._finding(
                    Code.OVERLAPPING_CHUNKS, record,
                    f"BITS for {label} sectors {first}..{first + count} overlap earlier "
                    "chunks; QEMU overwrites the earlier bits"))
        if record.fields.get("zeroes"):
            state.zero_chunks += 1
            if word_count:
                state.words.zero(first_word * 8, (first_word + word_count) * 8)
            return found
        size = record.fields["buffer_size"]
        if size > g.BITMAP_MAX_BUFFER_SIZE:
            # The decoder reported buffer-too-large; QEMU fails there, before any check
            # of the size against the granularity.
            state.unusable = "a BITS buffer too large for QEMU"
            return found
        padded = _align_up(needed, g.BITMAP_BUFFER_ALIGN)
        if needed > size or size > padded:
            found.append(self._finding(
                Code.GRANULARITY_MISMATCH, record,
                f"BITS buffer of {size} bytes for {label}: {count} sectors at granularity "
                f"{granularity} need {needed} (at most {padded} padded); QEMU: \"Migrated "
                f"bitmap granularity doesn't match the destination bitmap '{key[1]}' "
                "granularity\""))
            state.unusable = "a BITS buffer that does not fit the granularity"
            return found
        if not count:
            return found
        buffer = record.fields.get("buffer")
        if buffer is None:
            state.unusable = "a BITS buffer that was not kept"
            return found
        end = (first_word + word_count) * 8
        if end > MAX_BITMAP_BYTES:
            state.unusable = f"bitmap larger than {MAX_BITMAP_BYTES} bytes"
            return found
        state.words.write(first_word * 8, buffer[:needed])
        return found

    def _keep_startless(self, key: tuple[str, str], record: Record) -> list[Finding]:
        """Hold a BITS record of a bitmap whose START the capture missed: what it
        means depends on the granularity, inferred once all its chunks are in."""
        state = self.bitmaps.get(key)
        if state is None:
            state = self._state(key, record)
            state.startless_chunks = []
        chunks = state.startless_chunks
        assert chunks is not None
        if state.completed_at is not None:
            return [self._finding(
                Code.BITS_AFTER_COMPLETE, record,
                f"BITS for {key[0]}/{key[1]} after its COMPLETE at {state.completed_at:#x}")]
        if len(chunks) >= MAX_STARTLESS_CHUNKS:
            state.unusable = f"more than {MAX_STARTLESS_CHUNKS} chunks held without START"
            return []
        buffer = record.fields.get("buffer")
        if buffer is not None:
            kept = self._startless_bytes.get(key, 0) + len(buffer)
            if kept > MAX_BITMAP_BYTES:
                state.unusable = f"bitmap larger than {MAX_BITMAP_BYTES} bytes"
                return []
            self._startless_bytes[key] = kept
        # The decoder's record may point into a capture mapping that moves on.
        fields = dict(record.fields)
        if buffer is not None:
            fields["buffer"] = bytes(buffer)
        chunks.append(Record(record.offset, record.length, record.kind, record.section,
                             record.section_id, fields, record.depth, record.node,
                             record.bitmap, record.timestamp, None))
        return []

    def _rebuild_startless(self, state: BitmapState, complete: Record | None) -> list[Finding]:
        """Infer the granularity of a START-less bitmap from its chunks, then replay
        them as if START had said so; the finding says what the capture missed."""
        chunks = state.startless_chunks or []
        fits = granularities_fitting([chunk for chunk in chunks if chunk is not None])
        known = self._destination_has((state.node, state.name))
        label = f"{state.node}/{state.name}"
        if known is not None and (known in fits or not fits):
            fits, source = [known], "the destination's bitmap"
        else:
            source = "the chunk sizes"
        state.granularity_fits = fits
        offset = complete.offset if complete is not None else state.first_offset
        found = [findings.make(
            Code.BITMAP_WITHOUT_START,
            f"the capture has no START for {label} ({self._missed}); "
            + (f"granularity {fits[0]} from {source}" if len(fits) == 1 else
               f"the chunk sizes fit granularities {describe_fits(fits)}, so no hash is given")
            + "; its enabled and persistent flags are unknown",
            offset, section=g.DIRTY_BITMAP_SECTION_IDSTR, node=state.node, bitmap=state.name,
            fields={"granularity_fits": fits})]
        if len(fits) != 1:
            # The sectors a chunk covers do not depend on the granularity: the disk
            # size and the coverage are still known.
            for chunk in chunks:
                if chunk is not None and chunk.fields["sector_count"]:
                    first = chunk.fields["first_sector"]
                    state.add_coverage(first, first + chunk.fields["sector_count"])
            return found
        state.granularity = fits[0]
        gap_reason = state.gap_reason
        state.gap_reason = None
        for chunk in chunks:
            if chunk is None:
                state.gap_reason = gap_reason
                state.coverage_since_gap = []
                continue
            found += self._apply_bits(state, chunk)
        if complete is not None and state.coverage and not state.covered_from_zero():
            found.append(self._coverage_gap(state, complete, label))
        return found

    def _check_disk_end(self, state: BitmapState, record: Record, first: int, count: int,
                        label: str) -> list[Finding]:
        """Where the disk ends: the destination's node size when known, else the end of
        the one chunk the sender made shorter than CHUNK_SIZE * 8 granules (the last)."""
        assert state.granularity is not None
        end = first + count
        full_chunk = g.BITMAP_GRANULES_PER_CHUNK * state.granularity // SECTOR
        if state.disk_end is None:
            node = self._real_node(state.node) if self.destination is not None else None
            size = self.destination.sizes.get(node) if self.destination and node else None
            if size is not None:
                state.disk_end = -(-size // SECTOR)
                state.disk_end_source = "the destination's disk size"
            elif count < full_chunk:
                state.disk_end = end
                state.disk_end_source = f"the short last chunk at {record.offset:#x}"
                if state.coverage and state.end_sector > end:
                    return [self._finding(
                        Code.CHUNK_BEYOND_DISK, record,
                        f"BITS for {label} end at sector {end}, the short chunk that ends "
                        f"a disk, but earlier chunks reach sector {state.end_sector}")]
        if state.disk_end is not None and end > state.disk_end:
            return [self._finding(
                Code.CHUNK_BEYOND_DISK, record,
                f"BITS for {label} sectors {first}..{end} reach past sector "
                f"{state.disk_end}, the disk end given by {state.disk_end_source}")]
        return []

    def _complete(self, key: tuple[str, str], record: Record) -> list[Finding]:
        label = f"{key[0]}/{key[1]}"
        state = self.bitmaps.get(key)
        if self._missed is not None and (state is None or state.startless_chunks is not None):
            if state is None:
                state = self._state(key, record)
                state.startless_chunks = []
            if state.completed_at is not None:
                return [self._finding(
                    Code.BITS_AFTER_COMPLETE, record,
                    f"second COMPLETE for {label} (first at {state.completed_at:#x})")]
            state.completed_at = record.offset
            return self._rebuild_startless(state, record)
        if state is None or state.started_at is None:
            if self._real_node(key[0]) is None:
                return []  # reported as unknown-node where the name appeared
            if self.destination is not None and self._destination_has(key) is None:
                return self._once(
                    Code.UNKNOWN_BITMAP, key[0], record,
                    f"COMPLETE for {label}, which neither this stream nor the destination "
                    f"has; QEMU: \"Error: unknown dirty bitmap '{self._real_name(key)}' for "
                    f"block device '{self._real_node(key[0])}'\"")
            return [self._finding(
                Code.COMPLETE_WITHOUT_START, record,
                f"COMPLETE for {label}, which has no START in this stream")]
        found = []
        if state.completed_at is not None:
            found.append(self._finding(
                Code.BITS_AFTER_COMPLETE, record,
                f"second COMPLETE for {label} (first at {state.completed_at:#x})"))
            return found
        state.completed_at = record.offset
        if state.coverage and not state.covered_from_zero():
            found.append(self._coverage_gap(state, record, label))
        return found

    def _coverage_gap(self, state: BitmapState, complete: Record, label: str) -> Finding:
        holes = _holes(state.coverage)
        return self._finding(
            Code.COVERAGE_GAP, complete,
            f"COMPLETE for {label} while sectors never arrived: "
            + ", ".join(f"{lo}..{hi}" for lo, hi in holes[:5])
            + (" ..." if len(holes) > 5 else ""))


def describe_fits(fits: list[int]) -> str:
    """Granularities for a message: a run of consecutive powers of two as a range."""
    if not fits:
        return "none"
    if len(fits) > 2 and all(b == 2 * a for a, b in zip(fits, fits[1:], strict=False)):
        return f"every power of two from {fits[0]} to {fits[-1]}"
    return ", ".join(str(value) for value in fits)


def granularities_fitting(chunks: list[Record]) -> list[int]:
    """The granularities a bitmap's BITS records allow, as QEMU's sender makes them:
    chunks of 8192 granules starting at multiples of that, the last one (only) shorter,
    each buffer the serialisation size of its range rounded up to 32 bytes."""
    ranged = [chunk for chunk in chunks if chunk.fields["sector_count"]]
    if not ranged:
        return []
    last_first = max(chunk.fields["first_sector"] for chunk in ranged)
    fits = []
    granularity = g.MIN_GRANULARITY
    while granularity <= g.MAX_GRANULARITY:
        full = g.BITMAP_GRANULES_PER_CHUNK * granularity // SECTOR
        for chunk in ranged:
            first, count = chunk.fields["first_sector"], chunk.fields["sector_count"]
            if first % full or count > full or (count < full and first != last_first):
                break
            if not chunk.fields.get("zeroes"):
                first_granule = first * SECTOR // granularity
                last_granule = ((first + count) * SECTOR - 1) // granularity
                needed = (last_granule // 64 - first_granule // 64 + 1) * 8
                size = chunk.fields["buffer_size"]
                if needed > size or size > _align_up(needed, g.BITMAP_BUFFER_ALIGN):
                    break
        else:
            fits.append(granularity)
        granularity <<= 1
    return fits


def _merge(coverage: list[list[int]], start: int, end: int) -> bool:
    """Merge [start, end) into sorted disjoint spans; True when it overlapped them.

    Binary search keeps a hostile stream of many scattered chunks from turning
    this into quadratic work."""
    # The first span that could touch [start, end): its end is >= start.
    lo_index = bisect.bisect_left(coverage, start, key=lambda span: span[1])
    hi_index = lo_index
    overlapped = False
    while hi_index < len(coverage) and coverage[hi_index][0] <= end:
        lo, hi = coverage[hi_index]
        if lo < end and start < hi:
            overlapped = True
        start, end = min(lo, start), max(hi, end)
        hi_index += 1
    coverage[lo_index:hi_index] = [[start, end]]
    return overlapped


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
