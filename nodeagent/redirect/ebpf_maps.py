"""What one pod's eBPF capture puts in the node's maps (pure, no I/O): the key and value layout
of bpf/capture.h, and a CaptureSpec turned into those maps' entries.

Every key carries the pod's netns cookie, so pods never share an entry; addresses are 16 bytes,
IPv4 as ::ffff:a.b.c.d. The exclusions follow nftables.py's output chain exactly: loopback is
skipped by the programs themselves; the pod's own addresses (routed via lo, which nftables skips
by ``oifname lo``) are excluded ranges here; includeOutboundIPRanges "" captures no outbound TCP.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.redirect.capture import CaptureSpec, Network

POD_CAPTURE_OUT, POD_INCLUDE_ALL4, POD_INCLUDE_ALL6 = 1, 2, 4
NETNS_BITS = 64

# map name -> (key size, value size), as bpf/capture.h declares them
MAPS = {
    "pods": (8, 4),
    "ports_out": (16, 1),
    "ranges_ex": (28, 1),
    "ranges_in": (28, 1),
    "origin_by_cookie": (8, 20),
    "origin_by_peer": (32, 20),
}
# The maps that hold per-pod configuration, and where their keys hold the netns cookie.
POD_MAPS = {"pods": 0, "ports_out": 0, "ranges_ex": 4, "ranges_in": 4}
_PRESENT = b"\x01"


def address16(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if address.version == 4:
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed


def pod_key(netns: int) -> bytes:
    return struct.pack("=Q", netns)


def port_key(netns: int, port: int) -> bytes:
    return struct.pack("=QII", netns, port, 0)


def range_key(netns: int, net: Network) -> bytes:
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return struct.pack("=IQ", NETNS_BITS + bits, netns) + address16(net.network_address)


def peer_key(netns: int, address: str, port: int) -> bytes:
    """origin_by_peer's key: the app's end of a redirected connection."""
    return (
        struct.pack("=Q", netns)
        + address16(ipaddress.ip_address(address))
        + struct.pack("=II", port, 0)
    )


def origin(value: bytes) -> str:
    """An origin value as host:port ([v6]:port)."""
    raw, port, v4 = value[:16], struct.unpack_from("!H", value, 16)[0], value[18]
    if v4:
        return f"{ipaddress.IPv4Address(raw[12:])}:{port}"
    return f"[{ipaddress.IPv6Address(raw)}]:{port}"


def netns_of(name: str, key: bytes) -> int:
    """The netns cookie in a key of per-pod map NAME."""
    offset = POD_MAPS[name]
    value: int = struct.unpack_from("=Q", key, offset)[0]
    return value


@dataclass(frozen=True)
class PodEntries:
    """One pod's entries, map name -> {key: value}."""

    maps: dict[str, dict[bytes, bytes]]

    def keys(self, name: str) -> set[bytes]:
        return set(self.maps.get(name, {}))


def flags(spec: CaptureSpec) -> int:
    if spec.include_outbound_ranges == ():
        return 0
    if spec.include_outbound_ranges is None:
        return POD_CAPTURE_OUT | POD_INCLUDE_ALL4 | POD_INCLUDE_ALL6
    return POD_CAPTURE_OUT


def pod_entries(netns: int, spec: CaptureSpec, own_addresses: Iterable[str] = ()) -> PodEntries:
    """The entries SPEC asks for, for the pod whose netns cookie is NETNS."""
    excluded: set[Network] = set(spec.exclude_outbound_ranges)
    excluded |= {ipaddress.ip_network(a) for a in own_addresses}
    return PodEntries(
        {
            "pods": {pod_key(netns): struct.pack("=I", flags(spec))},
            "ports_out": {port_key(netns, p): _PRESENT for p in spec.exclude_outbound_ports},
            "ranges_ex": {range_key(netns, n): _PRESENT for n in excluded},
            "ranges_in": {
                range_key(netns, n): _PRESENT for n in spec.include_outbound_ranges or ()
            },
        }
    )
