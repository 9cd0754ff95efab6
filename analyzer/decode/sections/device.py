"""Device state: the payload of every section no other dissector claims (vmstate).

Its length is not on the wire. With a VMDESCRIPTION given up front, the payload is
walked with the device's description (analyzer.vmstate); otherwise it ends at the
first footer `0x7e` + be32 section id that is followed by something that can be an
item. Payloads found by the footer are kept (up to a bound) and checked against the
stream's own VMDESCRIPTION when it arrives after EOF. Device-state records carry no
spans: the payload's fields are not dissected.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from migshark.analyzer import findings
from migshark.analyzer.decode.resync import plausible_next_item
from migshark.analyzer.decode.sections.base import SectionDissector, register_fallback
from migshark.analyzer.findings import Code
from migshark.analyzer.vmstate import (
    VmstateIncomplete,
    VmstateInvalid,
    index_vmdesc,
    walk_device,
)
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import Kind

if TYPE_CHECKING:
    from migshark.analyzer.decode.framing import FramingMachine, NeedMore, Section

MAX_DEVICE_SECTION = 64 << 20
_FOOTER = struct.Struct(">" + g.fixed_format(g.SectionFooter))
_FOOTER_BYTE = bytes([g.ItemType.SECTION_FOOTER])


@register_fallback
class DeviceDissector(SectionDissector):
    description = "a device state section"

    def __init__(self, machine: FramingMachine) -> None:
        super().__init__(machine)
        # Stream offset from which the footer scan goes on: the bytes before it were
        # searched already (an offset, not a buffer index, so compaction cannot move it).
        self.scan_from = 0
        self.retained: list[tuple[Section, bytes, int]] = []

    def begin(self, section: Section, item_type: int) -> None:
        self.scan_from = self.rb.offset

    def read(self) -> NeedMore | None:
        machine = self.machine
        section = machine.current
        assert section is not None
        rb = self.rb
        buf = rb.data
        start_pos = rb.pos
        limit = start_pos + machine.available()
        if machine.vmdesc_devices is not None:
            desc = machine.vmdesc_devices.get((section.idstr, section.instance_id))
            if desc is not None:
                try:
                    end = walk_device(desc, buf, start_pos, limit)
                except VmstateIncomplete as short:
                    return machine.short(short.needed - start_pos, self.description)
                except VmstateInvalid as bad:
                    machine.emit(findings.make(
                        Code.VMDESC_MISMATCH, f"{section.idstr}: {bad}", rb.absolute(start_pos),
                        section=section.idstr,
                        fields={"idstr": section.idstr, "instance_id": section.instance_id,
                                "reason": str(bad)}))
                else:
                    machine.record(Kind.DEVICE_STATE, rb.absolute(start_pos), rb.absolute(end),
                                   method="vmdesc", idstr=section.idstr,
                                   instance_id=section.instance_id, size=end - start_pos)
                    rb.pos = end
                    machine.end_payload()
                    return None
        marker = _FOOTER_BYTE + _FOOTER.pack(section.section_id)
        scan = max(self.scan_from - rb.base, start_pos)
        while True:
            found = buf.find(marker, scan, limit)
            if found < 0:
                self.scan_from = rb.absolute(max(start_pos, limit - 4))
                if limit - start_pos > MAX_DEVICE_SECTION:
                    machine.emit(findings.make(
                        Code.FOOTER_MISMATCH, f"no footer within {MAX_DEVICE_SECTION} bytes of "
                        f"device section {section.idstr}", rb.absolute(start_pos),
                        section=section.idstr,
                        fields={"section_id": section.section_id,
                                "limit": MAX_DEVICE_SECTION}))
                    machine.enter_resync(rb.absolute(start_pos))
                    return None
                return machine.short(limit - start_pos + 1, self.description)
            verdict = plausible_next_item(machine, found + 5, limit)
            if verdict is None:
                self.scan_from = rb.absolute(found)
                return machine.short(found + 5 - start_pos + 16, self.description)
            if verdict:
                break
            scan = found + 1
        size = found - start_pos
        machine.record(Kind.DEVICE_STATE, rb.absolute(start_pos), rb.absolute(found),
                       method="footer", idstr=section.idstr, instance_id=section.instance_id,
                       size=size)
        if sum(len(p) for _, p, _ in self.retained) + size <= MAX_DEVICE_SECTION:
            self.retained.append((section, bytes(buf[start_pos:found]), rb.absolute(start_pos)))
        rb.pos = found
        machine.end_payload()
        return None

    def vmdescription(self, desc: dict[str, Any]) -> None:
        """Walk the device sections delimited by footers with the late VMDESCRIPTION."""
        devices = index_vmdesc(desc)
        for section, payload, offset in self.retained:
            device = devices.get((section.idstr, section.instance_id))
            if device is None:
                continue
            try:
                end = walk_device(device, payload, 0, len(payload))
            except (VmstateIncomplete, VmstateInvalid) as bad:
                self.machine.emit(findings.make(
                    Code.VMDESC_MISMATCH, f"{section.idstr}: VMDESCRIPTION does not describe the "
                    f"{len(payload)} bytes found between its header and footer ({bad})",
                    offset, section=section.idstr,
                    fields={"idstr": section.idstr, "instance_id": section.instance_id,
                            "found_size": len(payload), "reason": str(bad)}))
                continue
            if end != len(payload):
                self.machine.emit(findings.make(
                    Code.VMDESC_MISMATCH, f"{section.idstr}: VMDESCRIPTION describes {end} "
                    f"bytes, the footer came after {len(payload)}", offset,
                    section=section.idstr,
                    fields={"idstr": section.idstr, "instance_id": section.instance_id,
                            "described_size": end, "found_size": len(payload)}))
        self.retained.clear()
