"""Sans-IO decoder for the return path: destination-to-source messages.

The message format is declared in dissectors.returnpath (from QEMU's
migration/migration.c and ram.c); this module is the reader. The source refuses a
message whose length differs from the fixed length of its type ("Received '%s'
message (0x%04x) with incorrect length %d expecting %zu") and any type it does not
know ("Received invalid message 0x%04x length 0x%04x"). Those become findings here,
after which the decoder keeps going on the same framing, as a monitoring tool should.

Records carry section "return-path" and offsets counted from the first byte of the
reverse direction of the connection.
"""

from __future__ import annotations

import struct
from typing import Any

from migshark.analyzer import findings
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, EventQueue, Record
from migshark.dissectors import grammar as g
from migshark.dissectors import returnpath as rp
from migshark.dissectors.registry import Kind
from migshark.dissectors.returnpath import (
    FIXED_LENGTHS,
    RECV_BITMAP_ENDING,
    ReturnPathMessage,
    build_message,
    build_recv_bitmap,
)

RETURN_PATH_SECTION = "return-path"

# A received-pages bitmap covers one RAM block at one bit per target page: even a
# 16 TiB block at 4 KiB pages is 512 MiB. Anything larger is garbage, not a bitmap.
MAX_RECV_BITMAP = 1 << 30

# Fixed layouts read with one unpack each, formats taken from the declarations.
_HEADER = struct.Struct(">" + g.fixed_format(rp.MessageHeader))
_HEADER_SIZE = _HEADER.size
_BE32 = struct.Struct(rp.Be32Value.fmtstr)
_BE64 = struct.Struct(rp.RecvBitmapEnding.fmtstr)
_REQ_PAGES = struct.Struct(">" + g.fixed_format(rp.ReqPages))
_BITMAP_HEAD_SIZE = rp.RecvBitmapHead.sizeof()
_BITMAP_FRAME = _BITMAP_HEAD_SIZE + rp.RecvBitmapEnding.sizeof()


class ReturnPathDecoder(EventQueue):
    """Incremental: feed() any chunking, get the completed Records and Findings."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.offset = 0  # stream offset of _buf[0]
        super().__init__()
        self._last_block: str | None = None
        # RECV_BITMAP's trailing bitmap: (block, message offset) while it is awaited
        self._bitmap_for: tuple[str, int] | None = None
        self.shut_code: int | None = None
        self.messages: dict[str, int] = {}
        # after a gap or a garbage length no message boundary can be found again
        self._lost = False

    def feed(self, data: bytes | bytearray | memoryview,
             timestamp: float | None = None) -> list[Event]:
        self._timestamp = timestamp
        self._buf += data
        while self._step():
            pass
        return self._drain()

    def gap(self, length: int, timestamp: float | None = None) -> list[Event]:
        """Bytes are missing: there is no way to find the next message boundary."""
        self._timestamp = timestamp
        start = self.offset + len(self._buf)
        self._emit(findings.make(
            Code.CAPTURE_GAP, f"{length} return-path bytes missing at offset {start}; "
            "the rest of the return path is not decoded", start,
            section=RETURN_PATH_SECTION, length=length))
        self._buf.clear()
        self.offset = start + length
        self._lost = True
        return self._drain()

    def finish(self) -> list[Event]:
        if self._buf and not self._lost:
            self._emit(findings.make(
                Code.CAPTURE_TRUNCATED,
                f"the return path ends inside a message ({len(self._buf)} bytes left over)",
                self.offset, section=RETURN_PATH_SECTION, length=len(self._buf)))
        return self._drain()

    # --- machinery ----------------------------------------------------------

    def _consume(self, size: int) -> None:
        del self._buf[:size]
        self.offset += size

    def _record(self, kind: Kind, span: int, **fields: Any) -> Record:
        record = Record(offset=self.offset, length=span, kind=kind,
                        section=RETURN_PATH_SECTION, fields=fields)
        self._emit(record)
        return record

    def _step(self) -> bool:
        if self._lost:
            self._buf.clear()
            return False
        if self._bitmap_for is not None:
            return self._recv_bitmap_body()
        if len(self._buf) < _HEADER_SIZE:
            return False
        message, length = _HEADER.unpack_from(self._buf, 0)
        if len(self._buf) < _HEADER_SIZE + length:
            return False
        data = bytes(self._buf[_HEADER_SIZE : _HEADER_SIZE + length])
        self._message(message, length, data)
        self._consume(_HEADER_SIZE + length)
        return True

    def _message(self, message: int, length: int, data: bytes) -> None:
        try:
            name = ReturnPathMessage(message).name
        except ValueError:
            name = f"UNKNOWN({message})"
        self.messages[name] = self.messages.get(name, 0) + 1
        fields: dict[str, Any] = {"message": name, "message_number": message, "length": length}
        size = _HEADER_SIZE + length
        if message not in FIXED_LENGTHS:
            self._record(Kind.RP_MESSAGE, size, **fields, data=data.hex())
            self._bad(f"return-path message type {message} (length {length}) that QEMU does "
                      "not know; the source stops its return-path thread", size)
            return
        fixed = FIXED_LENGTHS[message]
        if fixed is not None and length != fixed:
            self._record(Kind.RP_MESSAGE, size, **fields, data=data.hex())
            self._bad(f"{name} with length {length}, QEMU expects {fixed}", size)
            return
        if message in (ReturnPathMessage.SHUT, ReturnPathMessage.PONG,
                       ReturnPathMessage.RESUME_ACK):
            (fields["value"],) = _BE32.unpack(data)
            if message == ReturnPathMessage.SHUT:
                self.shut_code = fields["value"]
        elif message == ReturnPathMessage.REQ_PAGES:
            fields["start"], fields["page_bytes"] = _REQ_PAGES.unpack(data)
            fields["block"] = self._last_block
        elif message == ReturnPathMessage.REQ_PAGES_ID:
            block = self._counted(data, _REQ_PAGES.size)
            if block is None:
                self._record(Kind.RP_MESSAGE, size, **fields, data=data.hex())
                self._bad(f"REQ_PAGES_ID of {length} bytes does not hold start, length and "
                          "a counted block name", size)
                return
            fields["start"], fields["page_bytes"] = _REQ_PAGES.unpack_from(data, 0)
            fields["block"] = self._last_block = block
        elif message == ReturnPathMessage.RECV_BITMAP:
            block = self._counted(data, 0)
            if block is None:
                self._record(Kind.RP_MESSAGE, size, **fields, data=data.hex())
                self._bad(f"RECV_BITMAP of {length} bytes does not hold a counted block name",
                          size)
                return
            fields["block"] = block
            self._bitmap_for = (block, self.offset)
        self._record(Kind.RP_MESSAGE, size, **fields)
        if message == ReturnPathMessage.SHUT and fields["value"]:
            self._emit(findings.make(
                Code.RETURN_PATH_ERROR,
                f"the destination shut the return path with error {fields['value']}",
                self.offset, section=RETURN_PATH_SECTION, length=size))

    @staticmethod
    def _counted(data: bytes, at: int) -> str | None:
        if len(data) < at + 1 or len(data) != at + 1 + data[at]:
            return None
        return data[at + 1 :].decode("utf-8", "surrogateescape")

    def _recv_bitmap_body(self) -> bool:
        if len(self._buf) < _BITMAP_HEAD_SIZE:
            return False
        (size,) = _BE64.unpack_from(self._buf, 0)
        assert self._bitmap_for is not None
        block, _ = self._bitmap_for
        if size > MAX_RECV_BITMAP:
            self._bitmap_for = None
            self._record(Kind.RP_RECV_BITMAP, _BITMAP_HEAD_SIZE, block=block, size=size)
            self._bad(f"received-pages bitmap for {block!r} claims {size} bytes",
                      _BITMAP_HEAD_SIZE)
            self._lost = True
            return False
        if len(self._buf) < _BITMAP_FRAME + size:
            return False
        (ending,) = _BE64.unpack_from(self._buf, _BITMAP_HEAD_SIZE + size)
        bitmap = bytes(self._buf[_BITMAP_HEAD_SIZE : _BITMAP_HEAD_SIZE + size])
        bits = int.from_bytes(bitmap, "little").bit_count()
        self._bitmap_for = None
        self._record(Kind.RP_RECV_BITMAP, _BITMAP_FRAME + size, block=block, size=size,
                     received_pages=bits, ending=f"{ending:#018x}")
        if ending != RECV_BITMAP_ENDING:
            self._bad(f"received-pages bitmap for {block!r} ends with {ending:#018x}, not "
                      f"{RECV_BITMAP_ENDING:#018x}; QEMU refuses it", _BITMAP_FRAME + size)
        self._consume(_BITMAP_FRAME + size)
        return True

    def _bad(self, message: str, length: int) -> None:
        self._emit(findings.make(Code.BAD_RETURN_PATH, message, self.offset,
                                 section=RETURN_PATH_SECTION, length=length))


__all__ = ["FIXED_LENGTHS", "MAX_RECV_BITMAP", "RECV_BITMAP_ENDING", "RETURN_PATH_SECTION",
           "ReturnPathDecoder", "ReturnPathMessage", "build_message", "build_recv_bitmap"]
