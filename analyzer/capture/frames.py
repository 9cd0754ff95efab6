"""Link / network / transport decoding down to TCP segments.

Only what stream reassembly needs is decoded, with one ``struct`` call per
header and no copies: the payload is a memoryview slice of the frame.
Anything that is not a first-fragment TCP segment over IPv4/IPv6 yields
``None``; malformed input also yields ``None`` rather than raising, because a
single mangled frame must not abort the analysis of a capture.
"""

from __future__ import annotations

import ipaddress
import struct

from migshark.analyzer.records import Fields

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_LOOP",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "NS",
    "PSH",
    "RST",
    "SUPPORTED_LINKTYPES",
    "SYN",
    "URG",
    "TcpSegment",
    "format_flags",
    "parse_frame",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80
NS = 0x100

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW leaked into some files with its BSD-specific values 12 and 14.
_LINKTYPES_RAW = frozenset({LINKTYPE_RAW, 12, 14})
SUPPORTED_LINKTYPES = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    }
    | _LINKTYPES_RAW
)

_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
# BSD AF_INET6 differs per OS: Linux 10, NetBSD/OpenBSD 24, FreeBSD 28, Darwin 30.
_AF_INET = 2
_AF_INET6 = frozenset({10, 24, 28, 30})

_PROTO_TCP = 6
_IP6_HOPOPTS = 0
_IP6_ROUTING = 43
_IP6_FRAGMENT = 44
_IP6_AH = 51
_IP6_DSTOPTS = 60

_FLAG_NAMES = (
    (FIN, "F"),
    (SYN, "S"),
    (RST, "R"),
    (PSH, "P"),
    (ACK, "."),
    (URG, "U"),
    (ECE, "E"),
    (CWR, "W"),
    (NS, "N"),
)

_ip4 = struct.Struct("!BxHxxHxB2x4s4s").unpack_from
_ip6 = struct.Struct("!B3xHBx16s16s").unpack_from
_tcp = struct.Struct("!HHIIBBH").unpack_from
_u32le = struct.Struct("<I").unpack_from
# Option-less IPv4 + TCP header in one call (addresses as one 8-byte key), and
# the same prefixed by an Ethernet header: one struct call per typical frame.
_IP4TCP = "BxHxxHxB2x8sHHIIBBH"
_ip4tcp = struct.Struct("!" + _IP4TCP).unpack_from
_eth_ip4tcp = struct.Struct("!12xH" + _IP4TCP).unpack_from


class TcpSegment(Fields):
    __slots__ = _fields = ("timestamp", "src", "sport", "dst", "dport", "seq", "ack", "flags",
                           "payload", "window")

    def __init__(self, timestamp: float, src: str, sport: int, dst: str, dport: int, seq: int,
                 ack: int, flags: int, payload: memoryview, window: int) -> None:
        self.timestamp = timestamp
        self.src = src
        self.sport = sport
        self.dst = dst
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        # Zero-copy view into the frame: copy it if it must outlive the capture reader.
        self.payload = payload
        self.window = window


def format_flags(flags: int) -> str:
    """tcpdump-style flag string, e.g. ``"S."`` for SYN/ACK."""
    return "".join(name for bit, name in _FLAG_NAMES if flags & bit) or "none"


# Formatting addresses dominates per-packet cost if done every time, and a
# capture has few distinct addresses: memoise by raw bytes, bounded.
_ADDR_CACHE: dict[bytes, str] = {}
_PAIR_CACHE: dict[bytes, tuple[str, str]] = {}
_CACHE_MAX = 65536


def _addr(raw: bytes) -> str:
    s = _ADDR_CACHE.get(raw)
    if s is None:
        if len(raw) == 4:
            s = f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
        else:
            s = str(ipaddress.IPv6Address(raw))
        if len(_ADDR_CACHE) >= _CACHE_MAX:
            _ADDR_CACHE.clear()
        _ADDR_CACHE[raw] = s
    return s


def _addr_pair4(raw: bytes) -> tuple[str, str]:
    """Source and destination of an IPv4 header from its 8 address bytes."""
    pair = _PAIR_CACHE.get(raw)
    if pair is None:
        if len(_PAIR_CACHE) >= _CACHE_MAX:
            _PAIR_CACHE.clear()
        pair = _PAIR_CACHE[raw] = (_addr(raw[:4]), _addr(raw[4:]))
    return pair


def parse_frame(linktype: int, data: memoryview | bytes, timestamp: float) -> TcpSegment | None:
    """Decode one captured frame; ``None`` unless it is a usable TCP segment."""
    if type(data) is not memoryview:
        data = memoryview(data)
    n = len(data)
    if linktype == LINKTYPE_ETHERNET:
        if n >= 54:
            # Fast path: untagged Ethernet, IPv4 without options, TCP.
            (
                ethertype,
                vihl,
                total,
                frag,
                proto,
                addrs,
                sport,
                dport,
                seq,
                ack,
                offres,
                flags,
                window,
            ) = _eth_ip4tcp(data, 0)
            if ethertype == _ETH_IPV4 and vihl == 0x45:
                if proto != _PROTO_TCP or frag & 0x1FFF:
                    return None
                avail = n - 14
                end = n if total == 0 or total > avail or avail > 0xFFFF else 14 + total
                doff = (offres >> 4) * 4
                if doff < 20 or 34 + doff > end:
                    return None
                pair = _PAIR_CACHE.get(addrs) or _addr_pair4(addrs)
                return TcpSegment(
                    timestamp,
                    pair[0],
                    sport,
                    pair[1],
                    dport,
                    seq,
                    ack,
                    flags | ((offres & 1) << 8),
                    data[34 + doff : end],
                    window,
                )
        elif n < 14:
            return None
        ethertype = (data[12] << 8) | data[13]
        off = 14
    elif linktype == LINKTYPE_LINUX_SLL:
        if n < 16:
            return None
        ethertype = (data[14] << 8) | data[15]
        off = 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if n < 20:
            return None
        ethertype = (data[0] << 8) | data[1]
        off = 20
    elif linktype in _LINKTYPES_RAW:
        if n < 1:
            return None
        version = data[0] >> 4
        if version == 4:
            return _ipv4(data, 0, timestamp)
        if version == 6:
            return _ipv6(data, 0, timestamp)
        return None
    elif linktype == LINKTYPE_IPV4:
        return _ipv4(data, 0, timestamp)
    elif linktype == LINKTYPE_IPV6:
        return _ipv6(data, 0, timestamp)
    elif linktype == LINKTYPE_NULL or linktype == LINKTYPE_LOOP:
        if n < 4:
            return None
        # NULL stores the family in the capturing host's byte order, LOOP in
        # network order; families are small, so whichever reading fits wins.
        (family,) = _u32le(data, 0)
        if family > 0xFFFF:
            family = int.from_bytes(data[0:4], "big")
        if family == _AF_INET:
            return _ipv4(data, 4, timestamp)
        if family in _AF_INET6:
            return _ipv6(data, 4, timestamp)
        return None
    else:
        return None

    # 802.1Q / 802.1ad tags, possibly stacked (QinQ).
    while ethertype in _VLAN_TPIDS:
        if off + 4 > n:
            return None
        ethertype = (data[off + 2] << 8) | data[off + 3]
        off += 4
    if ethertype == _ETH_IPV4:
        return _ipv4(data, off, timestamp)
    if ethertype == _ETH_IPV6:
        return _ipv6(data, off, timestamp)
    return None


def _ipv4(data: memoryview, off: int, timestamp: float) -> TcpSegment | None:
    n = len(data)
    avail = n - off
    if avail >= 40:
        (vihl, total, frag, proto, addrs, sport, dport, seq, ack, offres, flags, window) = _ip4tcp(
            data, off
        )
        if vihl == 0x45:
            if proto != _PROTO_TCP or frag & 0x1FFF:
                return None
            end = n if total == 0 or total > avail or avail > 0xFFFF else off + total
            doff = (offres >> 4) * 4
            tcp_off = off + 20
            if doff < 20 or tcp_off + doff > end:
                return None
            pair = _PAIR_CACHE.get(addrs) or _addr_pair4(addrs)
            return TcpSegment(
                timestamp,
                pair[0],
                sport,
                pair[1],
                dport,
                seq,
                ack,
                flags | ((offres & 1) << 8),
                data[tcp_off + doff : end],
                window,
            )
    # IPv4 options, or too short for the combined decode: field by field.
    if avail < 20:
        return None
    vihl, total, frag, proto, src, dst = _ip4(data, off)
    if vihl >> 4 != 4 or proto != _PROTO_TCP or frag & 0x1FFF:
        return None
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or ihl > avail:
        return None
    # total_length is 0 for GSO/BIG TCP packets and wraps for loopback frames
    # above 64 KiB; Ethernet padding only exists on tiny frames, so for big
    # frames the captured length is the truth.
    if total == 0 or total > avail or (total < avail and avail > 0xFFFF):
        total = avail
    elif total < ihl:
        return None
    return _tcp_segment(data, off + ihl, off + total, _addr(src), _addr(dst), timestamp)


def _ipv6(data: memoryview, off: int, timestamp: float) -> TcpSegment | None:
    avail = len(data) - off
    if avail < 40:
        return None
    vtc, plen, nxt, src, dst = _ip6(data, off)
    if vtc >> 4 != 6:
        return None
    end = off + 40 + plen
    # Payload length 0 means a jumbogram (BIG TCP); trust the captured length then.
    if plen == 0 or end > len(data) or (avail - 40 > 0xFFFF):
        end = len(data)
    pos = off + 40
    while nxt != _PROTO_TCP:
        if nxt in (_IP6_HOPOPTS, _IP6_ROUTING, _IP6_DSTOPTS):
            if pos + 8 > end:
                return None
            nxt = data[pos]
            pos += (data[pos + 1] + 1) * 8
        elif nxt == _IP6_AH:
            if pos + 8 > end:
                return None
            nxt = data[pos]
            pos += (data[pos + 1] + 2) * 4
        else:
            # Fragments cannot be reassembled into a stream here; no-next-header,
            # ESP and other upper layers are not TCP.
            return None
    return _tcp_segment(data, pos, end, _addr(src), _addr(dst), timestamp)


def _tcp_segment(
    data: memoryview, off: int, end: int, src: str, dst: str, timestamp: float
) -> TcpSegment | None:
    if off + 20 > end:
        return None
    sport, dport, seq, ack, offres, flags, window = _tcp(data, off)
    doff = (offres >> 4) * 4
    if doff < 20 or off + doff > end:
        return None
    return TcpSegment(
        timestamp,
        src,
        sport,
        dst,
        dport,
        seq,
        ack,
        flags | ((offres & 1) << 8),
        data[off + doff : end],
        window,
    )
