"""Feeding a sans-IO decoder in pieces, and comparing the event streams it gives.

The decoders promise that any chunking of the input gives the same events. These
helpers cut the input the ways the tests need (at given offsets, in given sizes,
in equal pieces), feed a decoder, and reduce events to comparable tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from migshark.analyzer import speedups
from migshark.analyzer.records import Event, Record

T = TypeVar("T")


class Decoder(Protocol):
    def feed(self, data: bytes) -> Sequence[Event]: ...

    def finish(self) -> Sequence[Event]: ...


def pieces_at(data: bytes, cuts: Iterable[int]) -> Iterator[bytes]:
    """`data` cut at each offset in `cuts` (any order, repeats give empty pieces)."""
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        yield data[pos:cut]
        pos = max(pos, cut)


def pieces_of_sizes(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """Pieces of the given sizes while the data lasts, then the rest in one piece."""
    pos = 0
    for size in sizes:
        if pos >= len(data):
            return
        yield data[pos : pos + size]
        pos += size
    if pos < len(data):
        yield data[pos:]


def pieces_every(data: bytes, size: int) -> Iterator[bytes]:
    """Pieces of `size` bytes, the last one shorter."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def decode_pieces(decoder: Decoder, pieces: Iterable[bytes]) -> list[Event]:
    """Every event of feeding `pieces` in order, then of finishing."""
    events: list[Event] = []
    for piece in pieces:
        events += decoder.feed(piece)
    events += decoder.finish()
    return events


def event_signature(events: Iterable[Event]) -> list[tuple[Any, ...]]:
    """Everything a record or finding says, as tuples that compare by value."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, Record):
            out.append(("R", event.offset, event.length, event.kind, event.section,
                        event.node, event.bitmap, repr(sorted(event.fields.items()))))
        else:
            out.append(("F", event.code, event.offset, event.message))
    return out


def without_c(run: Callable[[], T]) -> T:
    """`run()` with the C extension switched off: the pure-Python path."""
    saved, speedups.native = speedups.native, None
    try:
        return run()
    finally:
        speedups.native = saved
