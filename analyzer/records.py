"""What the decoder emits: records (one per wire element) and findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


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


@dataclass(slots=True)
class Record:
    """One element of the stream, with the bytes it occupies.

    `offset` counts from the first byte of the migration stream (the `Q` of QEVM),
    whatever the transport. `depth` is 1 for items inside a PACKAGED command.
    """

    offset: int
    length: int
    kind: str
    section: str | None = None
    section_id: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    depth: int = 0
    node: str | None = None
    bitmap: str | None = None
    timestamp: float | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class Finding:
    """An expert-info item: something a destination would reject or a user should know."""

    code: str
    severity: Severity
    message: str
    offset: int
    section: str | None = None
    node: str | None = None
    bitmap: str | None = None
    length: int = 0
    timestamp: float | None = None

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

