"""The return path's wire format: destination-to-source messages, declared with construct.

Facts from QEMU's migration/migration.c (`enum mig_rp_message_type`, `rp_cmd_args`,
`migrate_send_rp_message`, `migrate_send_rp_recv_bitmap`) and ram.c
(`ramblock_recv_bitmap_send`). Each message is be16 type, be16 length, then `length`
bytes of data:

    1 SHUT            be32 error code (0: the destination finished cleanly)
    2 PONG            be32 value of the PING it answers
    3 REQ_PAGES_ID    be64 start, be32 length, counted RAM block name
    4 REQ_PAGES       be64 start, be32 length (same RAM block as the previous request)
    5 RECV_BITMAP     counted RAM block name; the message is followed, outside of the
                      message framing, by be64 size, `size` bytes of bitmap and the be64
                      marker 0x0123456789abcdef
    6 RESUME_ACK      be32 value
    7 SWITCHOVER_ACK  no data (QEMU 8.1+)

The reader (sans-IO) is analyzer.returnpath; this module only says what the bytes are.
"""

from __future__ import annotations

from enum import IntEnum

from construct import Int16ub, Int32ub, Int64ub, Struct

from migshark.dissectors.grammar import counted_name


class ReturnPathMessage(IntEnum):
    """MIG_RP_MSG_* (migration.c)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


MessageHeader = Struct(
    "type" / Int16ub,
    "length" / Int16ub,
)

# SHUT's error code, PONG's ping value, RESUME_ACK's value.
Be32Value = Int32ub

ReqPages = Struct(
    "start" / Int64ub,
    "length" / Int32ub,
)

BlockName = counted_name

ReqPagesId = Struct(
    *ReqPages.subcons,
    "block" / BlockName,
)

# What follows a RECV_BITMAP message outside its framing.
RecvBitmapHead = Struct(
    "size" / Int64ub,
)
RecvBitmapEnding = Int64ub
RECV_BITMAP_ENDING = 0x0123456789ABCDEF

# rp_cmd_args[].len: the source refuses another length ("with incorrect length").
# None: variable length, checked by the reader against the message's own layout.
FIXED_LENGTHS: dict[int, int | None] = {
    ReturnPathMessage.SHUT: Be32Value.sizeof(),
    ReturnPathMessage.PONG: Be32Value.sizeof(),
    ReturnPathMessage.REQ_PAGES_ID: None,
    ReturnPathMessage.REQ_PAGES: ReqPages.sizeof(),
    ReturnPathMessage.RECV_BITMAP: None,
    ReturnPathMessage.RESUME_ACK: Be32Value.sizeof(),
    ReturnPathMessage.SWITCHOVER_ACK: 0,
}


def build_message(message: int, data: bytes = b"") -> bytes:
    """One return-path message as QEMU writes it (for tests and generators)."""
    return MessageHeader.build({"type": message, "length": len(data)}) + data


def build_recv_bitmap(block: str, bitmap: bytes) -> bytes:
    """RECV_BITMAP message plus the bitmap that follows it on the wire."""
    return (build_message(ReturnPathMessage.RECV_BITMAP, BlockName.build(block))
            + RecvBitmapHead.build({"size": len(bitmap)}) + bitmap
            + RecvBitmapEnding.build(RECV_BITMAP_ENDING))
