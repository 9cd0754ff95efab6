"""Section dissectors, registered by the idstr of the section whose payload they read.

Wireshark's dissector tables are the model: the framing machine reads a section header,
looks the idstr up here, and hands the payload to that dissector until it says the
payload has ended. A section no dissector claims is device state, read by the one
fallback (vmstate walk or footer scan).

A dissector lives as long as its decoder (one instance per decoder and dissector
class), because some state outlives a section: the RAM block of CONTINUE records, the
dirty-bitmap device and bitmap names a record may leave out.
"""

from __future__ import annotations

# The built-in dissectors register themselves in base's table on import.
from migshark.analyzer.decode.sections import device, dirty_bitmap, ram  # noqa: F401
from migshark.analyzer.decode.sections.base import (
    SectionDissector,
    dissector_classes,
    register,
    register_fallback,
)

__all__ = ["SectionDissector", "dissector_classes", "register", "register_fallback"]
