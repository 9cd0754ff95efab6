"""Inputs the capture reader cannot map as they are: stdin, pipes and compressed files.

The capture reader and the raw-stream reader mmap or seek their file (the VMDESCRIPTION
of a raw stream is found from its end), so a pipe or a compressed capture is first
spooled to a regular temporary file: bounded by the disk, not by memory, and deleted
when the analysis is done. Compression is recognised by content (its magic bytes), never
by the file name, as tshark does: `capture.pcap` may be gzip'd and `x.gz` may be plain.

gzip and xz come with Python. zstd does not: the `zstandard` module is used when it is
installed, else the `zstd` program when it is on PATH; migshark does not depend on
either (a pure-stdlib install stays a pure-stdlib install), and a zstd input without
both is refused with a one-line reason.

Every command imports this module (analysis does); what only spooling needs is
imported when an input is spooled, to keep start-up cheap.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

STDIN = "-"
SPOOL_CHUNK = 1 << 20


class Compression(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"


# The magic bytes each format starts with (RFC 1952, the xz file format, RFC 8878).
MAGICS = {Compression.GZIP: b"\x1f\x8b", Compression.XZ: b"\xfd7zXZ\x00",
          Compression.ZSTD: b"\x28\xb5\x2f\xfd"}
MAGIC_LENGTH = max(len(magic) for magic in MAGICS.values())
# File name endings dropped from the spooled file's name, so that a raw stream's name
# (its file name) is the same compressed or not.
SUFFIXES = (".gz", ".gzip", ".xz", ".zst", ".zstd")


class UnreadableInput(Exception):
    """An input that cannot be spooled: bad compressed data, no zstd decoder, full disk."""


def compression_of(head: bytes) -> Compression | None:
    for kind, magic in MAGICS.items():
        if head.startswith(magic):
            return kind
    return None


def needs_spooling(path: str) -> bool:
    """Whether `path` must be copied to a regular file first: stdin, a pipe or a
    character device (/dev/stdin), or a file whose content is compressed. Anything
    else (a missing file included) is the caller's to read or to refuse."""
    if path == STDIN:
        return True
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
            return True
        if not stat.S_ISREG(mode):
            return False
        with open(path, "rb") as handle:
            return compression_of(handle.read(MAGIC_LENGTH)) is not None
    except OSError:
        return False


@contextmanager
def spooled(path: str) -> Iterator[str]:
    """A regular, uncompressed file with the content of `path` (see needs_spooling),
    deleted when the block ends. Its name is the input's file name without a
    compression suffix (`stdin` for `-`)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="migshark-")
    try:
        local = _spool(path, Path(folder))
        try:
            yield local
        except Exception as error:
            # A reason about the spooled file ("... is empty") is about the input.
            if error.args and isinstance(error.args[0], str) and local in error.args[0]:
                error.args = (error.args[0].replace(local, _shown(path)), *error.args[1:])
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spool(path: str, folder: Path) -> str:
    import gzip
    import lzma
    import shutil
    import zlib

    shown = _shown(path)
    name = "stdin" if path == STDIN else _plain_name(Path(path).name)
    try:
        if path == STDIN or not stat.S_ISREG(os.stat(path).st_mode):
            copied = folder / "input"
            with _open_source(path) as source, copied.open("wb") as sink:
                shutil.copyfileobj(source, sink, SPOOL_CHUNK)
            path = str(copied)
        with open(path, "rb") as handle:
            kind = compression_of(handle.read(MAGIC_LENGTH))
        if kind is None:
            target = folder / name
            os.replace(path, target)
            return str(target)
        target = folder / name
        with open(path, "rb") as source, target.open("wb") as sink:
            _DECOMPRESSORS[kind](source, sink)
        if path.startswith(str(folder)):
            os.unlink(path)  # the compressed copy: one spooled file at a time on disk
        return str(target)
    except UnreadableInput as error:
        raise UnreadableInput(f"{shown}: {error}") from None
    except (OSError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise UnreadableInput(f"{shown}: cannot read: {reason}") from None


def _shown(path: str) -> str:
    return "stdin" if path == STDIN else path


def _open_source(path: str) -> BinaryIO:
    if path == STDIN:
        # Closing sys.stdin.buffer would close fd 0 under everyone else: a duplicate.
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    return open(path, "rb")  # noqa: SIM115 - the caller's with closes it


def _plain_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _gunzip(source: BinaryIO, sink: BinaryIO) -> None:
    import gzip
    import shutil

    with gzip.GzipFile(fileobj=source) as reader:
        shutil.copyfileobj(reader, sink, SPOOL_CHUNK)


def _unxz(source: BinaryIO, sink: BinaryIO) -> None:
    import lzma
    import shutil

    with lzma.LZMAFile(source) as reader:
        shutil.copyfileobj(reader, sink, SPOOL_CHUNK)


def _unzstd(source: BinaryIO, sink: BinaryIO) -> None:
    import shutil
    import subprocess

    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        try:
            zstandard.ZstdDecompressor().copy_stream(source, sink, read_size=SPOOL_CHUNK)
        except zstandard.ZstdError as error:
            raise UnreadableInput(f"bad zstd data: {error}") from None
        return
    program = shutil.which("zstd")
    if program is None:
        raise UnreadableInput("zstd-compressed input: install the zstandard module or the "
                              "zstd program, or decompress it first (zstd -d)")
    done = subprocess.run([program, "-dc"], stdin=source, stdout=sink,
                          stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise UnreadableInput(f"bad zstd data: {message[-1] if message else 'zstd failed'}")


_DECOMPRESSORS: dict[Compression, Callable[[BinaryIO, BinaryIO], None]] = {
    Compression.GZIP: _gunzip, Compression.XZ: _unxz, Compression.ZSTD: _unzstd,
}
