"""The migration stream decoder: a framing machine over a receive buffer, with one
dissector per section payload (RAM, dirty-bitmap, device state) registered by idstr.

    receivebuffer  the bytes fed and not yet consumed, and their stream offsets
    framing        the State table, the item readers, PACKAGED nesting, footers
    sections/      the section dissector registry and the dissectors
    resync         finding a plausible item again after bytes that cannot be placed
    stream         StreamDecoder: feed / gap / finish and the RAM walk hand-off
"""

from migshark.analyzer.decode.stream import StreamDecoder, decode_bytes

__all__ = ["StreamDecoder", "decode_bytes"]
