"""The decoder's receive buffer: the bytes fed but not yet consumed, and where they lie.

h11's `_receivebuffer.py` is the model: one object owns the bytearray and the read
position, so that readers ask it for bytes instead of doing offset arithmetic of their
own. Two things are particular to a migration stream:

- offsets are absolute stream offsets (the `Q` of QEVM is 0), and the buffer's first
  byte sits at `base`;
- most of the stream is page data (and sometimes a large bitmap buffer) that no reader
  looks at, so a reader can ask for the next `skip` bytes to be dropped as they arrive,
  without being buffered at all. `skip_start` is where the record being skipped began,
  for a finding about a stream that ends inside it.
"""

from __future__ import annotations

# Consumed bytes are dropped from the front once there are this many (or none are left
# unconsumed): deleting the front of a bytearray costs a copy of what remains.
COMPACT_AFTER = 65536


class ReceiveBuffer:
    __slots__ = ("data", "pos", "base", "skip", "skip_start")

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0  # read position in data
        self.base = 0  # stream offset of data[0]
        self.skip = 0  # stream bytes still to drop as they arrive, unbuffered
        self.skip_start = 0  # stream offset of the record whose bytes are being skipped

    @property
    def end(self) -> int:
        """Stream offset just past the last byte received (or dropped by a skip)."""
        return self.base + len(self.data)

    @property
    def offset(self) -> int:
        """Stream offset of the read position."""
        return self.base + self.pos

    def available(self) -> int:
        return len(self.data) - self.pos

    def absolute(self, pos: int) -> int:
        """The stream offset of buffer index `pos`."""
        return self.base + pos

    def peek(self, size: int, at: int = 0) -> bytes:
        """A copy of `size` bytes from `at` past the read position (fewer at the end)."""
        start = self.pos + at
        return bytes(self.data[start : start + size])

    def advance(self, count: int) -> None:
        self.pos += count

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def compact(self) -> int:
        """Drop consumed bytes from the front when worth it; returns how many were
        dropped (buffer indexes kept by readers must move back by that much)."""
        pos = self.pos
        if pos > COMPACT_AFTER or pos == len(self.data):
            del self.data[:pos]
            self.base += pos
            self.pos = 0
            return pos
        return 0

    def discard_consumed(self) -> None:
        """Forget consumed bytes when nothing unconsumed is left (before data is read
        straight from the caller's memory instead of from here)."""
        if self.data:
            self.base += self.pos
            self.data.clear()
            self.pos = 0

    def start_skip(self, count: int, record_start: int) -> None:
        self.skip = count
        self.skip_start = record_start

    def take_skip(self, view: memoryview) -> memoryview:
        """Drop what a pending skip still wants from the front of `view`; returns the rest."""
        taken = min(self.skip, len(view))
        self.skip -= taken
        self.base += taken
        return view[taken:]

    def lose(self, length: int) -> None:
        """`length` bytes after the end never arrived (a capture gap): start afresh
        after them, with nothing buffered and nothing to skip."""
        self.base = self.end + length
        self.data.clear()
        self.pos = 0
        self.skip = 0

    def record_start(self) -> int:
        """Where the element being read began: a skipped record's start, else the
        read position."""
        return self.skip_start if self.skip else self.base + self.pos
