"""The section dissector interface and the table of dissectors by idstr."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # annotations only: framing imports this package
    from migshark.analyzer.decode.framing import FramingMachine, NeedMore, Section


class SectionDissector:
    """Reads one kind of section payload over its machine's receive buffer."""

    # What a stream that ends inside this payload ended inside ("a RAM record").
    description = "a section payload"

    def __init__(self, machine: FramingMachine) -> None:
        self.machine = machine
        self.rb = machine.rb

    def begin(self, section: Section, item_type: int) -> None:
        """A payload of `section` starts at the read position (after its header)."""

    def read(self) -> NeedMore | None:
        """Consume what can be consumed; the framing machine's reader contract: None
        to be called again, or how many bytes must be available first. Calls
        machine.end_payload() once the payload has ended."""
        raise NotImplementedError

    def interrupted(self, at: int) -> None:
        """Decoding of the payload stops at stream offset `at` (resync, gap, end)."""

    def ended_inside(self, end: int) -> None:
        """The data ended at `end` inside this payload: report what is missing."""

    def vmdescription(self, desc: dict[str, Any]) -> None:
        """The stream's VMDESCRIPTION arrived (after EOF)."""

    def plausible_start(self, buf: bytearray, pos: int, limit: int) -> bool | None:
        """Whether a payload of this section can start at buffer index pos, for the
        resynchroniser's guess at a PART/END header (None: not enough bytes)."""
        return False


_Dissector = TypeVar("_Dissector", bound=type[SectionDissector])

_BY_IDSTR: dict[str, type[SectionDissector]] = {}
_FALLBACK: list[type[SectionDissector]] = []


def register(idstr: str) -> Callable[[_Dissector], _Dissector]:
    """Class decorator: the dissector of the sections named `idstr`."""

    def add(cls: _Dissector) -> _Dissector:
        if idstr in _BY_IDSTR:
            raise ValueError(f"two dissectors for section {idstr!r}")
        _BY_IDSTR[idstr] = cls
        return cls

    return add


def register_fallback(cls: _Dissector) -> _Dissector:
    """Class decorator: the dissector of every section no other one claims."""
    if _FALLBACK:
        raise ValueError("two fallback section dissectors")
    _FALLBACK.append(cls)
    return cls


def dissector_classes() -> tuple[dict[str, type[SectionDissector]], type[SectionDissector]]:
    """(idstr -> dissector class, the fallback class)."""
    return dict(_BY_IDSTR), _FALLBACK[0]
