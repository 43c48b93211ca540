"""What one pod's eBPF capture puts in the node's maps (pure, no I/O): the key and value layout
of bpf/capture.h, and a CaptureSpec turned into those maps' entries.

Every key carries the pod's netns cookie, so pods never share an entry; addresses are 16 bytes,
IPv4 as ::ffff:a.b.c.d. The exclusions follow nftables.py's output chain exactly: loopback is
skipped by the programs themselves; the pod's own addresses (routed via lo, which nftables skips
by ``oifname lo``) are excluded ranges here; includeOutboundIPRanges "" captures no outbound TCP.
DNS capture is a flag: its hooks take port 53 before any exclusion, as nftables' DNS rules do.
Inbound follows its prerouting chain: the pod's addresses (pod_addrs, the one map keyed by address:
sk_lookup has no netns cookie to go by) lead to its cookie, its flags say whether inbound is
captured and on every port, ports_in holds excludeInboundPorts and includeInboundPorts.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.redirect.capture import CaptureSpec, Network

POD_CAPTURE_OUT, POD_INCLUDE_ALL4, POD_INCLUDE_ALL6 = 1, 2, 4
POD_CAPTURE_IN, POD_INBOUND_ALL = 8, 16
POD_CAPTURE_DNS = 32
PORT_IN_EXCLUDED, PORT_IN_INCLUDED = b"\x01", b"\x02"
NETNS_BITS = 64

# map name -> (key size, value size), as bpf/capture.h declares them
MAPS = {
    "pods": (8, 4),
    "ports_out": (16, 1),
    "ranges_ex": (28, 1),
    "ranges_in": (28, 1),
    "ports_in": (16, 1),
    "pod_addrs": (16, 8),
    "listeners": (8, 8),  # sockhash: a socket's fd in, its cookie out
    "origin_by_cookie": (8, 20),
    "origin_by_peer": (32, 20),
}
# The maps that hold per-pod configuration, and where their keys hold the netns cookie (None: the
# value is the cookie).
POD_MAPS: dict[str, int | None] = {
    "pods": 0,
    "ports_out": 0,
    "ranges_ex": 4,
    "ranges_in": 4,
    "ports_in": 0,
    "pod_addrs": None,
}
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


def addr_key(address: str) -> bytes:
    return address16(ipaddress.ip_address(address))


def listener_key(netns: int) -> bytes:
    return struct.pack("=Q", netns)


def netns_of(name: str, key: bytes, value: bytes = b"") -> int:
    """The netns cookie in an entry of per-pod map NAME (its key's, or for pod_addrs its
    VALUE's)."""
    offset = POD_MAPS[name]
    cookie: int = struct.unpack_from("=Q", value if offset is None else key, offset or 0)[0]
    return cookie


@dataclass(frozen=True)
class PodEntries:
    """One pod's entries, map name -> {key: value}."""

    maps: dict[str, dict[bytes, bytes]]

    def keys(self, name: str) -> set[bytes]:
        return set(self.maps.get(name, {}))


def flags(spec: CaptureSpec) -> int:
    """pods' flags. DNS capture stands alone, as nftables' DNS rules come before (and without)
    the outbound ones: a pod capturing no outbound TCP (includeOutboundIPRanges "") may still
    capture DNS."""
    captures = POD_CAPTURE_DNS if spec.dns else 0
    if spec.include_inbound_ports is None:
        captures |= POD_CAPTURE_IN | POD_INBOUND_ALL
    elif spec.include_inbound_ports:
        captures |= POD_CAPTURE_IN
    if spec.include_outbound_ranges == ():
        return captures
    if spec.include_outbound_ranges is None:
        return captures | POD_CAPTURE_OUT | POD_INCLUDE_ALL4 | POD_INCLUDE_ALL6
    return captures | POD_CAPTURE_OUT


def inbound_ports(netns: int, spec: CaptureSpec) -> dict[bytes, bytes]:
    """ports_in entries: nftables checks exclusions first, so an excluded port stays excluded
    when includeInboundPorts also lists it."""
    entries = {port_key(netns, p): PORT_IN_INCLUDED for p in spec.include_inbound_ports or ()}
    entries |= {port_key(netns, p): PORT_IN_EXCLUDED for p in spec.exclude_inbound_ports}
    return entries


def pod_entries(netns: int, spec: CaptureSpec, own_addresses: Iterable[str] = ()) -> PodEntries:
    """The entries SPEC asks for, for the pod whose netns cookie is NETNS."""
    excluded: set[Network] = set(spec.exclude_outbound_ranges)
    own = tuple(own_addresses)
    excluded |= {ipaddress.ip_network(a) for a in own}
    return PodEntries(
        {
            "pods": {pod_key(netns): struct.pack("=I", flags(spec))},
            "ports_out": {port_key(netns, p): _PRESENT for p in spec.exclude_outbound_ports},
            "ranges_ex": {range_key(netns, n): _PRESENT for n in excluded},
            "ranges_in": {
                range_key(netns, n): _PRESENT for n in spec.include_outbound_ranges or ()
            },
            "ports_in": inbound_ports(netns, spec),
            "pod_addrs": {addr_key(a): pod_key(netns) for a in own},
        }
    )
