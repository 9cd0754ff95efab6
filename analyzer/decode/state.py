"""The framing machine's states, and what it knows of a section."""

from __future__ import annotations

from enum import Enum

NeedMore = int  # a reader's "come back when this many bytes are available"


class State(Enum):
    HEADER = "the stream header"
    ITEM = "an item"
    PAYLOAD = "a section payload"  # read by the section's dissector
    FOOTER = "a section footer"
    AFTER_EOF = "after EOF"  # only VMDESCRIPTION may follow
    AFTER_VMDESC = "after VMDESCRIPTION"  # nothing may follow
    RESYNC = "resynchronising"
    DONE = "done"  # trailing data, reported once and swallowed


class Section:
    __slots__ = ("section_id", "idstr", "instance_id", "version_id")

    def __init__(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self.section_id = section_id
        self.idstr = idstr
        self.instance_id = instance_id
        self.version_id = version_id

