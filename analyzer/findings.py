"""The catalogue of finding codes: severity, meaning, and what a QEMU destination does.

Every finding the analyzer emits is made through `make()`, so a code cannot be
used without an entry here; docs/findings.md is generated from this table. The codes
are the registered names of `Code`: product code writes `Code.MISSING_EOS`, never the
string, so that a misspelt code fails at import (and in mypy) instead of at the one
moment the finding would have been made. `Code` and CATALOGUE are checked against
each other when this module loads.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NoReturn

from migshark.analyzer.records import Fields, Finding, Severity


class Code(StrEnum):
    """Every finding code. A StrEnum, so it equals, hashes and serialises as its string
    (JSON output, `--json` consumers and `code == "phase"` elsewhere see no change)."""

    BAD_MAGIC = "bad-magic"
    BAD_VERSION = "bad-version"
    UNKNOWN_ITEM = "unknown-item"
    TRUNCATED = "truncated"
    FOOTER_MISMATCH = "footer-mismatch"
    UNKNOWN_SECTION = "unknown-section"
    BAD_SECTION_VERSION = "bad-section-version"
    MISSING_EOS = "missing-eos"
    UNKNOWN_BITMAP = "unknown-bitmap"
    GRANULARITY_MISMATCH = "granularity-mismatch"
    INVALID_GRANULARITY = "invalid-granularity"
    BITMAP_EXISTS = "bitmap-exists"
    UNKNOWN_NODE = "unknown-node"
    NO_DEVICE_NAME = "no-device-name"
    NO_BITMAP_NAME = "no-bitmap-name"
    RESERVED_START_FLAGS = "reserved-start-flags"
    BUFFER_TOO_LARGE = "buffer-too-large"
    COMPLETE_WITHOUT_START = "complete-without-start"
    BITS_AFTER_COMPLETE = "bits-after-complete"
    INCOMPLETE_BITMAP = "incomplete-bitmap"
    BITMAP_RANGE_INVALID = "bitmap-range-invalid"
    BAD_PACKAGED = "bad-packaged"
    BAD_COMMAND = "bad-command"
    CAPTURE_GAP = "capture-gap"
    PEER_RESET = "peer-reset"
    KERNEL_DROPS = "kernel-drops"
    BAD_RETURN_PATH = "bad-return-path"
    RETURN_PATH_ERROR = "return-path-error"
    MULTIFD_CHANNEL = "multifd-channel"
    TRAILING_DATA = "trailing-data"
    CAPTURE_TRUNCATED = "capture-truncated"
    COVERAGE_GAP = "coverage-gap"
    OVERLAPPING_CHUNKS = "overlapping-chunks"
    CHUNK_BEYOND_DISK = "chunk-beyond-disk"
    UNKNOWN_FLAGS = "unknown-flags"
    MULTIBYTE_FLAGS = "multibyte-flags"
    VMDESC_MISMATCH = "vmdesc-mismatch"
    AUTOLOAD_FLAG = "autoload-flag"
    PHASE = "phase"
    RESYNCHRONISED = "resynchronised"
    MISSED_START = "missed-start"
    BITMAP_WITHOUT_START = "bitmap-without-start"
    NO_FOOTER_WALK = "no-footer-walk"


class FindingKind(Fields):
    """One catalogue entry; immutable and hashable, like the frozen dataclass it was."""

    __slots__ = _fields = ("code", "severity", "meaning", "qemu", "message")
    code: Code
    severity: Severity
    meaning: str
    qemu: str  # what QEMU's loader does
    message: str  # what QEMU prints (error_report), when it prints something

    def __init__(self, code: Code, severity: Severity, meaning: str, qemu: str,
                 message: str = "") -> None:
        for name, value in zip(self._fields, (code, severity, meaning, qemu, message),
                               strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise _frozen(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise _frozen(f"cannot delete field {name!r}")

    def __hash__(self) -> int:  # type: ignore[override]  # Fields makes records unhashable
        return hash(self._astuple())

    def __reduce__(self) -> tuple[type[FindingKind], tuple[Any, ...]]:
        # The default reduce restores slots with setattr, which is refused here.
        return (self.__class__, self._astuple())


def _frozen(message: str) -> AttributeError:
    # What a frozen dataclass raises; imported only here, dataclasses is slow to import.
    from dataclasses import FrozenInstanceError

    return FrozenInstanceError(message)


E, W, N = Severity.ERROR, Severity.WARNING, Severity.NOTE

CATALOGUE: dict[Code, FindingKind] = {
    k.code: k
    for k in [
        FindingKind(Code.BAD_MAGIC, E, "The stream does not start with QEVM.",
                    "qemu_loadvm_state_header() refuses the stream; the load fails.",
                    "Not a migration stream"),
        FindingKind(Code.BAD_VERSION, E, "The stream header version is not 3.",
                    "qemu_loadvm_state_header() refuses the stream; the load fails.",
                    "Unsupported migration stream version (version 2: 'SaveVM v2 format "
                    "is obsolete and don't work anymore')"),
        FindingKind(Code.UNKNOWN_ITEM, E, "An item type byte without a meaning.",
                    "qemu_loadvm_state_main() stops; the load fails.",
                    "Unknown savevm section type %d"),
        FindingKind(Code.TRUNCATED, E, "The data ends inside an item or record.",
                    "The read hits the end of the stream; the load fails with an I/O "
                    "error.", "load of migration failed: Input/output error"),
        FindingKind(Code.FOOTER_MISMATCH, E,
                    "A section footer is missing or names another section id.",
                    "check_section_footer() refuses it; the load fails.",
                    "Missing section footer for %s / Mismatched section id in footer for "
                    "%s - read 0x%x expected 0x%x"),
        FindingKind(Code.UNKNOWN_SECTION, E, "PART/END for a section id never started.",
                    "qemu_loadvm_section_part_end() refuses it; the load fails.",
                    "Unknown savevm section %d"),
        FindingKind(Code.BAD_SECTION_VERSION, E, "dirty-bitmap section version other than 1.",
                    "A version above 1 is refused by qemu_loadvm_section_start_full(); "
                    "version 0 reaches dirty_bitmap_load(), which cancels the bitmaps and "
                    "returns -EINVAL. Either way the load fails.",
                    "savevm: unsupported version %d for 'dirty-bitmap' v1 / error while "
                    "loading state for instance 0x0 of device 'dirty-bitmap'"),
        FindingKind(Code.MISSING_EOS, E,
                    "A dirty-bitmap section payload ends (at its footer, the next item or "
                    "the end of data) without an EOS record.",
                    "dirty_bitmap_load() keeps reading records until EOS, so it parses the "
                    "footer or next item as a bitmap record; the stream desynchronises and "
                    "the load fails.", ""),
        FindingKind(Code.UNKNOWN_BITMAP, E,
                    "BITS or COMPLETE for a bitmap with no START in this stream and none on "
                    "the destination, or a BITMAP_NAME that is not an alias of the "
                    "block-bitmap-mapping.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps (reads and "
                    "ignores the rest); RAM and device state migrate on.",
                    "Error: unknown dirty bitmap '%s' for block device '%s' / Error: "
                    "Unknown bitmap alias '%s' on node '%s' (alias '%s')"),
        FindingKind(Code.GRANULARITY_MISMATCH, E,
                    "A BITS buffer size that does not fit the bitmap's granularity (needed "
                    "> size or size > needed rounded up to 32 bytes), or, in the 2017 "
                    "dialect, a START granularity that differs from the destination's "
                    "existing bitmap.",
                    "dirty_bitmap_load_bits() cancels the incoming bitmaps; migration goes "
                    "on. The 2017 draft refused the START (-EINVAL, the load fails).",
                    "Migrated bitmap granularity doesn't match the destination bitmap '%s' "
                    "granularity"),
        FindingKind(Code.INVALID_GRANULARITY, E,
                    "START granularity not a power of two or below 512 (a be32 power of two "
                    "is at most 2^31).",
                    "bdrv_create_dirty_bitmap() asserts is_power_of_2(granularity) && "
                    "granularity >= 512: the destination aborts.",
                    "Assertion `is_power_of_2(granularity) && granularity >= "
                    "BDRV_SECTOR_SIZE' failed"),
        FindingKind(Code.BITMAP_EXISTS, E,
                    "START for a bitmap the destination already has (or a second START for "
                    "one this stream already started).",
                    "dirty_bitmap_load_start() returns -EINVAL; the load fails. (The 2017 "
                    "draft reused a bitmap of the same granularity instead.)",
                    "Bitmap with the same name ('%s') already exists on destination"),
        FindingKind(Code.UNKNOWN_NODE, E,
                    "A DEVICE_NAME the destination cannot resolve: not a device or node "
                    "name there, or not a node alias of the block-bitmap-mapping.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps; migration "
                    "goes on.",
                    "Cannot find device='%s' nor node-name='%s' / Error: Unknown node alias "
                    "'%s'"),
        FindingKind(Code.NO_DEVICE_NAME, E,
                    "A record other than a bare EOS before any record carried DEVICE_NAME.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps.",
                    "Error: block device name is not set"),
        FindingKind(Code.NO_BITMAP_NAME, E,
                    "A record other than a bare EOS before any record carried BITMAP_NAME.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps (the message "
                    "says device, sic).", "Error: block device name is not set"),
        FindingKind(Code.RESERVED_START_FLAGS, E, "START bitmap flags use reserved bits 0xf8.",
                    "dirty_bitmap_load_start() returns -EINVAL after creating the bitmap; "
                    "the load fails.", "Unknown flags in migrated dirty bitmap header: %x"),
        FindingKind(Code.BUFFER_TOO_LARGE, E, "A BITS buffer size over 10 * 1024 bytes.",
                    "dirty_bitmap_load_bits() returns -EIO before reading the buffer; the "
                    "load fails.",
                    "Bitmap migration stream buffer allocation request is too large"),
        FindingKind(Code.COMPLETE_WITHOUT_START, E,
                    "COMPLETE for a bitmap this stream never started.",
                    "With a bitmap of that name already on the destination QEMU finishes it "
                    "silently; otherwise the header check reports an unknown bitmap.", ""),
        FindingKind(Code.BITS_AFTER_COMPLETE, E,
                    "BITS (or a second COMPLETE) for a bitmap already completed.",
                    "QEMU deserialises the bits into the finished bitmap without a word, so "
                    "the destination's bitmap is not what the source completed.", ""),
        FindingKind(Code.INCOMPLETE_BITMAP, E,
                    "The data ended before the bitmap's COMPLETE record.",
                    "No message: the bitmap stays busy (or frozen with a successor) on the "
                    "destination, without all of its data.", ""),
        FindingKind(Code.BITMAP_RANGE_INVALID, E,
                    "A BITS chunk that does not start on a 64-granule boundary, which "
                    "QEMU's hbitmap cannot deserialise.",
                    "serialization_chunk() asserts: the destination aborts.",
                    "Assertion `(start & (gran - 1)) == 0' failed"),
        FindingKind(Code.BAD_PACKAGED, E, "A PACKAGED command with an impossible length.",
                    "'Unreasonably large packaged state'; load fails."),
        FindingKind(Code.BAD_COMMAND, E, "A command with a length its type does not allow.",
                    "'%s received with bad length'; load fails."),
        FindingKind(Code.CAPTURE_GAP, E,
                    "Bytes of the stream are missing from the capture (lost segments).",
                    "Not a QEMU error: the capture, not the migration, lost them."),
        FindingKind(Code.PEER_RESET, W, "The connection was reset (TCP RST).",
                    "The migration fails on the side that saw the reset."),
        FindingKind(Code.KERNEL_DROPS, E,
                    "The kernel dropped packets before live capture could read them "
                    "(PACKET_STATISTICS).",
                    "Not a QEMU error: the capture, not the migration, lost them."),
        FindingKind(Code.BAD_RETURN_PATH, E,
                    "A return-path message of an unknown type or with a wrong length.",
                    "source_return_path_thread(): 'Received invalid message' or 'with "
                    "incorrect length'; the source marks the migration failed."),
        FindingKind(Code.RETURN_PATH_ERROR, E,
                    "The destination shut the return path with a non-zero error code.",
                    "The destination failed to load; the source's migration fails."),
        FindingKind(Code.MULTIFD_CHANNEL, N,
                    "A multifd channel (magic 0x11223344): its pages are skipped.", "-"),
        FindingKind(Code.TRAILING_DATA, W, "Bytes after the end of the stream.",
                    "Ignored: the loader stops at EOF."),
        FindingKind(Code.CAPTURE_TRUNCATED, W, "The capture file ends inside a record.",
                    "Not a QEMU error."),
        FindingKind(Code.COVERAGE_GAP, W, "COMPLETE while some sectors never arrived.",
                    "QEMU finishes the bitmap; the ranges never sent keep what the new "
                    "bitmap had (clean).", ""),
        FindingKind(Code.OVERLAPPING_CHUNKS, W, "A BITS chunk overlaps one already received.",
                    "QEMU overwrites the earlier bits with the later ones.", ""),
        FindingKind(Code.CHUNK_BEYOND_DISK, W,
                    "A BITS chunk reaches past the disk end: the destination's disk size "
                    "when known, else the end of the short last chunk the sender makes.",
                    "Past the real disk end serialization_chunk() asserts and the "
                    "destination aborts.", "Assertion `(last >> hb->granularity) < "
                    "hb->size' failed"),
        FindingKind(Code.UNKNOWN_FLAGS, W,
                    "Flag bits without a meaning: bit 0x80 in the last byte of dirty-bitmap "
                    "flags, a 2017 enabled byte other than 0/1, or invalid RAM flags.",
                    "Dirty-bitmap flags: ignored. RAM flags: ram_load refuses the record and "
                    "the load fails.", "Unknown combination of migration flags (RAM)"),
        FindingKind(Code.MULTIBYTE_FLAGS, W,
                    "Record flags written in 2 or 4 bytes: legal by the format, but only "
                    "the last byte reaches QEMU's loader.",
                    "qemu_get_bitmap_flags() keeps the flags in a uint8_t, so each extension "
                    "shifts the earlier bytes out; the destination acts on the last byte.",
                    ""),
        FindingKind(Code.VMDESC_MISMATCH, W,
                    "A device section's size differs from what VMDESCRIPTION describes.",
                    "Not checked by QEMU (VMDESCRIPTION is for debugging)."),
        FindingKind(Code.AUTOLOAD_FLAG, N, "START carries the old 0x04 autoload flag.",
                    "Ignored since QEMU 4.0 (not a reserved bit).", ""),
        FindingKind(Code.PHASE, N,
                    "The migration entered a new phase: setup, iteration, completion, "
                    "postcopy-listen or postcopy-run.", "-", ""),
        FindingKind(Code.MISSED_START, W,
                    "The capture began after the migration did: the stream header and the "
                    "records before the first one recognised are not in it.",
                    "Not a QEMU error: the capture, not the migration, missed them."),
        FindingKind(Code.BITMAP_WITHOUT_START, W,
                    "A bitmap's START record is not in the capture; it is rebuilt from its "
                    "BITS and COMPLETE with the granularity the chunk sizes (or the "
                    "destination) allow, and no hash when more than one fits. Its enabled "
                    "and persistent flags are unknown.",
                    "Not a QEMU error: the capture, not the migration, missed START."),
        FindingKind(Code.RESYNCHRONISED, N,
                    "The decoder skipped N bytes to find the next recognisable item.",
                    "-", ""),
        FindingKind(Code.NO_FOOTER_WALK, N,
                    "A device section was delimited by its footer, without VMDESCRIPTION.",
                    "-"),
    ]
}


def _check_catalogue() -> None:
    """Each Code has exactly one entry and each entry a Code (run at import)."""
    missing = [code.value for code in Code if code not in CATALOGUE]
    stray = [code for code in CATALOGUE if not isinstance(code, Code)]
    if missing or stray:
        raise RuntimeError(f"finding codes without a catalogue entry: {missing}; "
                           f"catalogue entries that are not a Code: {stray}")


_check_catalogue()


def make(
    code: Code,
    message: str,
    offset: int,
    *,
    section: str | None = None,
    node: str | None = None,
    bitmap: str | None = None,
    length: int = 0,
    fields: dict[str, Any] | None = None,
) -> Finding:
    """A finding of a catalogued code; `fields` carries its data for programs.

    A string that is not a registered code is refused (ValueError), whatever the
    caller's annotations said.
    """
    kind = CATALOGUE.get(code)
    if kind is None:
        raise ValueError(f"{code!r} is not a registered finding code (findings.Code)")
    return Finding(kind.code, kind.severity, message, offset, section, node, bitmap, length,
                   None, fields)
