"""The catalogue of finding codes: severity, meaning, and what a QEMU destination does.

Every finding the analyzer emits is made through `make()`, so a code cannot be
used without an entry here; docs/findings.md is generated from this table.
"""

from __future__ import annotations

from typing import Any, NoReturn

from migshark.analyzer.records import Fields, Finding, Severity


class FindingKind(Fields):
    """One catalogue entry; immutable and hashable, like the frozen dataclass it was."""

    __slots__ = _fields = ("code", "severity", "meaning", "qemu", "message")
    code: str
    severity: Severity
    meaning: str
    qemu: str  # what QEMU's loader does
    message: str  # what QEMU prints (error_report), when it prints something

    def __init__(self, code: str, severity: Severity, meaning: str, qemu: str,
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

CATALOGUE: dict[str, FindingKind] = {
    k.code: k
    for k in [
        FindingKind("bad-magic", E, "The stream does not start with QEVM.",
                    "qemu_loadvm_state_header() refuses the stream; the load fails.",
                    "Not a migration stream"),
        FindingKind("bad-version", E, "The stream header version is not 3.",
                    "qemu_loadvm_state_header() refuses the stream; the load fails.",
                    "Unsupported migration stream version (version 2: 'SaveVM v2 format "
                    "is obsolete and don't work anymore')"),
        FindingKind("unknown-item", E, "An item type byte without a meaning.",
                    "qemu_loadvm_state_main() stops; the load fails.",
                    "Unknown savevm section type %d"),
        FindingKind("truncated", E, "The data ends inside an item or record.",
                    "The read hits the end of the stream; the load fails with an I/O "
                    "error.", "load of migration failed: Input/output error"),
        FindingKind("footer-mismatch", E,
                    "A section footer is missing or names another section id.",
                    "check_section_footer() refuses it; the load fails.",
                    "Missing section footer for %s / Mismatched section id in footer for "
                    "%s - read 0x%x expected 0x%x"),
        FindingKind("unknown-section", E, "PART/END for a section id never started.",
                    "qemu_loadvm_section_part_end() refuses it; the load fails.",
                    "Unknown savevm section %d"),
        FindingKind("bad-section-version", E, "dirty-bitmap section version other than 1.",
                    "A version above 1 is refused by qemu_loadvm_section_start_full(); "
                    "version 0 reaches dirty_bitmap_load(), which cancels the bitmaps and "
                    "returns -EINVAL. Either way the load fails.",
                    "savevm: unsupported version %d for 'dirty-bitmap' v1 / error while "
                    "loading state for instance 0x0 of device 'dirty-bitmap'"),
        FindingKind("missing-eos", E,
                    "A dirty-bitmap section payload ends (at its footer, the next item or "
                    "the end of data) without an EOS record.",
                    "dirty_bitmap_load() keeps reading records until EOS, so it parses the "
                    "footer or next item as a bitmap record; the stream desynchronises and "
                    "the load fails.", ""),
        FindingKind("unknown-bitmap", E,
                    "BITS or COMPLETE for a bitmap with no START in this stream and none on "
                    "the destination, or a BITMAP_NAME that is not an alias of the "
                    "block-bitmap-mapping.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps (reads and "
                    "ignores the rest); RAM and device state migrate on.",
                    "Error: unknown dirty bitmap '%s' for block device '%s' / Error: "
                    "Unknown bitmap alias '%s' on node '%s' (alias '%s')"),
        FindingKind("granularity-mismatch", E,
                    "A BITS buffer size that does not fit the bitmap's granularity (needed "
                    "> size or size > needed rounded up to 32 bytes), or, in the 2017 "
                    "dialect, a START granularity that differs from the destination's "
                    "existing bitmap.",
                    "dirty_bitmap_load_bits() cancels the incoming bitmaps; migration goes "
                    "on. The 2017 draft refused the START (-EINVAL, the load fails).",
                    "Migrated bitmap granularity doesn't match the destination bitmap '%s' "
                    "granularity"),
        FindingKind("invalid-granularity", E,
                    "START granularity not a power of two or below 512 (a be32 power of two "
                    "is at most 2^31).",
                    "bdrv_create_dirty_bitmap() asserts is_power_of_2(granularity) && "
                    "granularity >= 512: the destination aborts.",
                    "Assertion `is_power_of_2(granularity) && granularity >= "
                    "BDRV_SECTOR_SIZE' failed"),
        FindingKind("bitmap-exists", E,
                    "START for a bitmap the destination already has (or a second START for "
                    "one this stream already started).",
                    "dirty_bitmap_load_start() returns -EINVAL; the load fails. (The 2017 "
                    "draft reused a bitmap of the same granularity instead.)",
                    "Bitmap with the same name ('%s') already exists on destination"),
        FindingKind("unknown-node", E,
                    "A DEVICE_NAME the destination cannot resolve: not a device or node "
                    "name there, or not a node alias of the block-bitmap-mapping.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps; migration "
                    "goes on.",
                    "Cannot find device='%s' nor node-name='%s' / Error: Unknown node alias "
                    "'%s'"),
        FindingKind("no-device-name", E,
                    "A record other than a bare EOS before any record carried DEVICE_NAME.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps.",
                    "Error: block device name is not set"),
        FindingKind("no-bitmap-name", E,
                    "A record other than a bare EOS before any record carried BITMAP_NAME.",
                    "dirty_bitmap_load_header() cancels the incoming bitmaps (the message "
                    "says device, sic).", "Error: block device name is not set"),
        FindingKind("reserved-start-flags", E, "START bitmap flags use reserved bits 0xf8.",
                    "dirty_bitmap_load_start() returns -EINVAL after creating the bitmap; "
                    "the load fails.", "Unknown flags in migrated dirty bitmap header: %x"),
        FindingKind("buffer-too-large", E, "A BITS buffer size over 10 * 1024 bytes.",
                    "dirty_bitmap_load_bits() returns -EIO before reading the buffer; the "
                    "load fails.",
                    "Bitmap migration stream buffer allocation request is too large"),
        FindingKind("complete-without-start", E,
                    "COMPLETE for a bitmap this stream never started.",
                    "With a bitmap of that name already on the destination QEMU finishes it "
                    "silently; otherwise the header check reports an unknown bitmap.", ""),
        FindingKind("bits-after-complete", E,
                    "BITS (or a second COMPLETE) for a bitmap already completed.",
                    "QEMU deserialises the bits into the finished bitmap without a word, so "
                    "the destination's bitmap is not what the source completed.", ""),
        FindingKind("incomplete-bitmap", E,
                    "The data ended before the bitmap's COMPLETE record.",
                    "No message: the bitmap stays busy (or frozen with a successor) on the "
                    "destination, without all of its data.", ""),
        FindingKind("bitmap-range-invalid", E,
                    "A BITS chunk that does not start on a 64-granule boundary, which "
                    "QEMU's hbitmap cannot deserialise.",
                    "serialization_chunk() asserts: the destination aborts.",
                    "Assertion `(start & (gran - 1)) == 0' failed"),
        FindingKind("bad-packaged", E, "A PACKAGED command with an impossible length.",
                    "'Unreasonably large packaged state'; load fails."),
        FindingKind("bad-command", E, "A command with a length its type does not allow.",
                    "'%s received with bad length'; load fails."),
        FindingKind("capture-gap", E,
                    "Bytes of the stream are missing from the capture (lost segments).",
                    "Not a QEMU error: the capture, not the migration, lost them."),
        FindingKind("peer-reset", W, "The connection was reset (TCP RST).",
                    "The migration fails on the side that saw the reset."),
        FindingKind("kernel-drops", E,
                    "The kernel dropped packets before live capture could read them "
                    "(PACKET_STATISTICS).",
                    "Not a QEMU error: the capture, not the migration, lost them."),
        FindingKind("bad-return-path", E,
                    "A return-path message of an unknown type or with a wrong length.",
                    "source_return_path_thread(): 'Received invalid message' or 'with "
                    "incorrect length'; the source marks the migration failed."),
        FindingKind("return-path-error", E,
                    "The destination shut the return path with a non-zero error code.",
                    "The destination failed to load; the source's migration fails."),
        FindingKind("multifd-channel", N,
                    "A multifd channel (magic 0x11223344): its pages are skipped.", "-"),
        FindingKind("trailing-data", W, "Bytes after the end of the stream.",
                    "Ignored: the loader stops at EOF."),
        FindingKind("capture-truncated", W, "The capture file ends inside a record.",
                    "Not a QEMU error."),
        FindingKind("coverage-gap", W, "COMPLETE while some sectors never arrived.",
                    "QEMU finishes the bitmap; the ranges never sent keep what the new "
                    "bitmap had (clean).", ""),
        FindingKind("overlapping-chunks", W, "A BITS chunk overlaps one already received.",
                    "QEMU overwrites the earlier bits with the later ones.", ""),
        FindingKind("chunk-beyond-disk", W,
                    "A BITS chunk reaches past the disk end: the destination's disk size "
                    "when known, else the end of the short last chunk the sender makes.",
                    "Past the real disk end serialization_chunk() asserts and the "
                    "destination aborts.", "Assertion `(last >> hb->granularity) < "
                    "hb->size' failed"),
        FindingKind("unknown-flags", W,
                    "Flag bits without a meaning: bit 0x80 in the last byte of dirty-bitmap "
                    "flags, a 2017 enabled byte other than 0/1, or invalid RAM flags.",
                    "Dirty-bitmap flags: ignored. RAM flags: ram_load refuses the record and "
                    "the load fails.", "Unknown combination of migration flags (RAM)"),
        FindingKind("multibyte-flags", W,
                    "Record flags written in 2 or 4 bytes: legal by the format, but only "
                    "the last byte reaches QEMU's loader.",
                    "qemu_get_bitmap_flags() keeps the flags in a uint8_t, so each extension "
                    "shifts the earlier bytes out; the destination acts on the last byte.",
                    ""),
        FindingKind("vmdesc-mismatch", W,
                    "A device section's size differs from what VMDESCRIPTION describes.",
                    "Not checked by QEMU (VMDESCRIPTION is for debugging)."),
        FindingKind("autoload-flag", N, "START carries the old 0x04 autoload flag.",
                    "Ignored since QEMU 4.0 (not a reserved bit).", ""),
        FindingKind("phase", N,
                    "The migration entered a new phase: setup, iteration, completion, "
                    "postcopy-listen or postcopy-run.", "-", ""),
        FindingKind("missed-start", W,
                    "The capture began after the migration did: the stream header and the "
                    "records before the first one recognised are not in it.",
                    "Not a QEMU error: the capture, not the migration, missed them."),
        FindingKind("bitmap-without-start", W,
                    "A bitmap's START record is not in the capture; it is rebuilt from its "
                    "BITS and COMPLETE with the granularity the chunk sizes (or the "
                    "destination) allow, and no hash when more than one fits. Its enabled "
                    "and persistent flags are unknown.",
                    "Not a QEMU error: the capture, not the migration, missed START."),
        FindingKind("resynchronised", N,
                    "The decoder skipped N bytes to find the next recognisable item.",
                    "-", ""),
        FindingKind("no-footer-walk", N,
                    "A device section was delimited by its footer, without VMDESCRIPTION.",
                    "-"),
    ]
}


def make(
    code: str,
    message: str,
    offset: int,
    *,
    section: str | None = None,
    node: str | None = None,
    bitmap: str | None = None,
    length: int = 0,
    fields: dict[str, Any] | None = None,
) -> Finding:
    """A finding of a catalogued code; `fields` carries its data for programs."""
    kind = CATALOGUE[code]
    return Finding(code, kind.severity, message, offset, section, node, bitmap, length,
                   None, fields)
