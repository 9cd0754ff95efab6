"""The multifd channel header: the first bytes of every extra multifd connection.

Facts from QEMU's migration/multifd.c (`MultiFDInit_t`, `multifd_send_initial_packet`,
`multifd_recv_initial_packet`): each multifd channel starts with one packed 64-byte
header, integers big-endian, before any page packet. The main migration connection
starts with "QEVM" instead, which is how a capture tells the two apart.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ub, Int32ub, Padding, Struct

MULTIFD_MAGIC = 0x11223344
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")
# multifd_recv_initial_packet() refuses any other version.
MULTIFD_VERSION = 1

MultifdInit = Struct(
    "magic" / Const(MULTIFD_MAGIC_BYTES),
    "version" / Int32ub,
    "uuid" / Bytes(16),  # the source's QemuUUID; the destination checks it against its own
    "channel_id" / Int8ub,
    "unused1" / Padding(7),
    "unused2" / Padding(4 * 8),
)
MULTIFD_INIT_SIZE = MultifdInit.sizeof()


def is_multifd_channel(head: bytes) -> bool:
    """Whether a connection's first bytes are a multifd channel's (4 suffice)."""
    return head[:4] == MULTIFD_MAGIC_BYTES


def build_multifd_init(channel_id: int, uuid: bytes = bytes(16),
                       version: int = MULTIFD_VERSION) -> bytes:
    return MultifdInit.build({"version": version, "uuid": uuid, "channel_id": channel_id})
