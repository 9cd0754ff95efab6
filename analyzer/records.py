"""What the decoder emits: records (one per wire element) and findings."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class Severity(IntEnum):
    """Ordered so that filters like `severity >= warning` compare naturally."""

    NOTE = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.strip().upper()]


class Fields:
    """Equality and repr from a `_fields` tuple, as @dataclass would give them.

    These classes were dataclasses, but @dataclass writes and exec()s the source of
    __init__, __repr__ and __eq__ for every class at every start, about 1 ms each:
    16 ms of `migshark analyze`'s start-up for the 16 it imported. So each subclass
    writes its own __init__, names its attributes in `_fields` (also its __slots__
    when it has slots) and inherits from here: equal when of the same class with
    equal field tuples, hence unhashable unless the subclass says otherwise, and
    shown as `Name(field=value, ...)`.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _astuple(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._astuple() == other._astuple()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({shown})"


class Record(Fields):
    """One element of the stream, with the bytes it occupies.

    `offset` counts from the first byte of the migration stream (the `Q` of QEVM),
    whatever the transport. `depth` is 1 for items inside a PACKAGED command.
    `spans` gives the bytes each wire field occupies, in wire order, as
    (field key, absolute stream offset, length); the keys are those of `fields` (and
    the registry's, dissectors.registry), None where the dissector reports none.
    """

    __slots__ = _fields = ("offset", "length", "kind", "section", "section_id", "fields",
                           "depth", "node", "bitmap", "timestamp", "spans")

    def __init__(self, offset: int, length: int, kind: str, section: str | None = None,
                 section_id: int | None = None, fields: dict[str, Any] | None = None,
                 depth: int = 0, node: str | None = None, bitmap: str | None = None,
                 timestamp: float | None = None,
                 spans: tuple[tuple[str, int, int], ...] | None = None) -> None:
        self.offset = offset
        self.length = length
        self.kind = kind
        self.section = section
        self.section_id = section_id
        self.fields: dict[str, Any] = {} if fields is None else fields
        self.depth = depth
        self.node = node
        self.bitmap = bitmap
        self.timestamp = timestamp
        self.spans = spans

    @property
    def end(self) -> int:
        return self.offset + self.length


class Finding(Fields):
    """An expert-info item: something a destination would reject or a user should know.

    `fields` holds the finding's data (lengths, expected and found values, ids) for
    programs: `message` is for people and is never parsed.
    """

    __slots__ = _fields = ("code", "severity", "message", "offset", "section", "node",
                           "bitmap", "length", "timestamp", "fields")

    def __init__(self, code: str, severity: Severity, message: str, offset: int,
                 section: str | None = None, node: str | None = None,
                 bitmap: str | None = None, length: int = 0,
                 timestamp: float | None = None, fields: dict[str, Any] | None = None
                 ) -> None:
        self.code = code
        self.severity = severity
        self.message = message
        self.offset = offset
        self.section = section
        self.node = node
        self.bitmap = bitmap
        self.length = length
        self.timestamp = timestamp
        self.fields: dict[str, Any] = {} if fields is None else fields

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.label,
            "message": self.message,
            "offset": self.offset,
            "length": self.length,
            "section": self.section,
            "node": self.node,
            "bitmap": self.bitmap,
        }


Event = Record | Finding


class EventQueue:
    """The sans-IO decoders' outbox: events wait here until the caller's feed() or
    finish() returns them, each stamped with the capture time of the data fed last."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._timestamp: float | None = None

    def _drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit(self, event: Event) -> None:
        event.timestamp = self._timestamp
        self._events.append(event)

