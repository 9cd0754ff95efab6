"""Sans-IO incremental decoder for the QEMU migration stream (see analyzer.decode).

`StreamDecoder.feed(data)` accepts the stream in any chunking and returns the
records and findings completed so far; `finish()` closes the stream. This module is
the decoder's historical import path.
"""

from __future__ import annotations

from migshark.analyzer.decode import StreamDecoder, decode_bytes
from migshark.analyzer.records import Finding, Record

__all__ = ["StreamDecoder", "decode_bytes", "Finding", "Record"]
