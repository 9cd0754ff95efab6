"""The catalogue of finding codes: severity, meaning, and what a QEMU destination does.

Every finding the analyzer emits is made through `make()`, so a code cannot be
used without an entry here; docs/findings.md is generated from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from analyzer.records import Finding, Severity


@dataclass(frozen=True, slots=True)
class FindingKind:
    code: str
    severity: Severity
    meaning: str
    qemu: str


E, W, N = Severity.ERROR, Severity.WARNING, Severity.NOTE

CATALOGUE: dict[str, FindingKind] = {
    k.code: k
    for k in [
        FindingKind("bad-magic", E, "The stream does not start with QEVM.",
                    "qemu_loadvm_state(): 'Migration stream has wrong magic'; load fails."),
        FindingKind("bad-version", E, "The stream header version is not 3.",
                    "'Unsupported migration stream version'; load fails."),
        FindingKind("unknown-item", E, "An item type byte without a meaning.",
                    "'Unknown savevm section type N'; load fails."),
        FindingKind("truncated", E, "The data ends inside an item or record.",
                    "The read hits EOF; the load fails with an I/O error."),
        FindingKind("footer-mismatch", E,
                    "A section footer is missing or names another section id.",
                    "check_section_footer(): 'Missing section footer' or "
                    "'Mismatched section id in footer'; load fails."),
        FindingKind("unknown-section", E, "PART/END for a section id never started.",
                    "'Unknown savevm section'; load fails."),
        FindingKind("bad-section-version", E, "dirty-bitmap section version other than 1.",
                    "dirty_bitmap_load() returns -EINVAL and cancels the bitmaps."),
        FindingKind("missing-eos", E,
                    "A dirty-bitmap section payload ends without an EOS record.",
                    "The loader reads the next bytes as bitmap records; the stream "
                    "desynchronises and the load fails."),
        FindingKind("unknown-bitmap", E,
                    "BITS or COMPLETE for a bitmap with no START in this stream "
                    "(and none on the destination).",
                    "\"Error: unknown dirty bitmap 'B' for block device 'N'\"; "
                    "bitmap migration is cancelled, RAM migration goes on."),
        FindingKind("granularity-mismatch", E,
                    "A BITS buffer size that does not fit the bitmap's granularity, or a "
                    "START granularity that differs from the destination's bitmap.",
                    "\"Migrated bitmap granularity doesn't match the destination bitmap "
                    "'B' granularity\"; bitmap migration is cancelled."),
        FindingKind("invalid-granularity", E,
                    "START granularity not a power of two or outside 512..2^31.",
                    "bdrv_create_dirty_bitmap() asserts: the destination aborts."),
        FindingKind("bitmap-exists", E, "START for a bitmap the destination already has.",
                    "\"Bitmap with the same name ('B') already exists on destination\"; "
                    "load fails."),
        FindingKind("unknown-node", E, "A node name or alias the destination does not know.",
                    "'Cannot find device=N nor node_name=N' or \"Unknown node alias\"; "
                    "bitmap migration is cancelled."),
        FindingKind("no-device-name", E, "A record needs a device name before any was sent.",
                    "'Error: block device name is not set'; bitmap migration is cancelled."),
        FindingKind("no-bitmap-name", E, "A record needs a bitmap name before any was sent.",
                    "'Error: block device name is not set' (sic); bitmap migration is "
                    "cancelled."),
        FindingKind("reserved-start-flags", E, "START bitmap flags use reserved bits 0xf8.",
                    "'Unknown flags in migrated dirty bitmap header: %x'; load fails."),
        FindingKind("buffer-too-large", E, "A BITS buffer size over 10 * 1024 bytes.",
                    "'Bitmap migration stream buffer allocation request is too large'; "
                    "load fails."),
        FindingKind("complete-without-start", E, "COMPLETE for a bitmap never started.",
                    "With a bitmap of that name already on the destination, QEMU finishes "
                    "it; otherwise 'unknown dirty bitmap'."),
        FindingKind("bits-after-complete", E, "BITS for a bitmap already completed.",
                    "QEMU deserialises into a finished bitmap (hbitmap assertions may "
                    "fire)."),
        FindingKind("incomplete-bitmap", E,
                    "The data ended before the bitmap's COMPLETE record.",
                    "The bitmap stays a disabled successor; migration fails at its end."),
        FindingKind("bitmap-range-invalid", E,
                    "A BITS chunk that is not aligned to 64 granules or ends past the "
                    "disk, which QEMU's hbitmap cannot deserialise.",
                    "serialization_chunk() asserts: the destination aborts."),
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
                    "QEMU finishes the bitmap; the missing ranges keep whatever the "
                    "destination had (clean)."),
        FindingKind("overlapping-chunks", W, "A BITS chunk overlaps one already received.",
                    "QEMU overwrites the earlier bits."),
        FindingKind("chunk-beyond-disk", W,
                    "A BITS chunk reaches past the size other chunks imply.",
                    "hbitmap asserts if it is past the real disk end."),
        FindingKind("unknown-flags", W, "Flag bits without a meaning.",
                    "Ignored by the loader."),
        FindingKind("multibyte-flags", W,
                    "Record flags written in 2 or 4 bytes; QEMU keeps only the last byte.",
                    "qemu_get_bitmap_flags() stores flags in a uint8_t."),
        FindingKind("vmdesc-mismatch", W,
                    "A device section's size differs from what VMDESCRIPTION describes.",
                    "Not checked by QEMU (VMDESCRIPTION is for debugging)."),
        FindingKind("autoload-flag", N, "START carries the old 0x04 autoload flag.",
                    "Ignored."),
        FindingKind("phase", N, "The migration entered a new phase.", "-"),
        FindingKind("resynchronised", N,
                    "The decoder skipped bytes to find the next recognisable item.", "-"),
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
) -> Finding:
    kind = CATALOGUE[code]
    return Finding(code, kind.severity, message, offset, section, node, bitmap, length)
