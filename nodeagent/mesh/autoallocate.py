"""Addresses for ServiceEntry hosts that have none, so TCP to them can be routed by address.

Istio (DNS proxying with ``ISTIO_META_DNS_AUTO_ALLOCATE``,
https://istio.io/latest/docs/ops/configuration/traffic-management/dns-proxy/#address-auto-allocation):
a ServiceEntry without ``addresses`` gets a virtual IP from the reserved class E range
240.240.0.0/16 for each of its hosts; wildcard hosts get none, nor do entries with
``resolution: NONE`` (their traffic keeps its original destination). Istio 1.23+ allocates
in a controller and keeps an address with its host for as long as the host exists
(pilot/pkg/serviceregistry/serviceentry/, the ip-autoallocate controller writing the entry's
``status.addresses``). Here each node's store allocates (``AddressAllocator``): a host's address
comes from a hash of its name, a collision takes the next free one, and an address stays with
its host until no entry wants it any more. The node's DNS proxy and its Envoy chains read the
same store, so a pod connects to the address its own node answered.
"""

from __future__ import annotations

import ipaddress
import zlib

from nodeagent.mesh.model import IstioResource

RANGE = ipaddress.IPv4Network("240.240.0.0/16")
# The usable last two octets: 1-254 each (no .0/.255, which tools read as network/broadcast).
_OCTETS = 254
_SLOTS = _OCTETS * _OCTETS


def wants_address(entry: IstioResource) -> list[str]:
    """The hosts of a ServiceEntry that get an allocated address (none when it has
    addresses, resolves NONE, or for wildcard hosts)."""
    spec = entry.spec
    if spec.get("addresses") or spec.get("resolution", "NONE") == "NONE":
        return []
    return [str(h) for h in spec.get("hosts") or [] if not str(h).startswith("*")]


def _slot_address(slot: int) -> str:
    third, fourth = divmod(slot, _OCTETS)
    return str(RANGE.network_address + (third + 1) * 256 + fourth + 1)


class AddressAllocator:
    """host -> address, stable while the host is wanted; O(1) per change (no rescan)."""

    def __init__(self) -> None:
        self._address: dict[str, str] = {}
        self._slot: dict[str, int] = {}
        self._holder: dict[int, str] = {}
        self._wanted_by: dict[str, set[str]] = {}  # host -> keys of the entries wanting it
        self._hosts_of: dict[str, set[str]] = {}  # entry key -> the hosts it wants

    def address(self, host: str) -> str:
        """HOST's address ("" when it has none)."""
        return self._address.get(host, "")

    def update(self, entry_key: str, hosts: list[str]) -> set[str]:
        """Entry ENTRY_KEY now wants addresses for HOSTS (none: it is gone or has its own);
        returns the hosts whose address changed (given or taken back)."""
        changed = set()
        for host in self._hosts_of.pop(entry_key, set()) - set(hosts):
            self._wanted_by[host].discard(entry_key)
            if not self._wanted_by[host]:
                del self._wanted_by[host]
                self._release(host)
                changed.add(host)
        if hosts:
            self._hosts_of[entry_key] = set(hosts)
        for host in hosts:
            self._wanted_by.setdefault(host, set()).add(entry_key)
            if host not in self._address and self._assign(host):
                changed.add(host)
        return changed

    def _assign(self, host: str) -> bool:
        if len(self._holder) == _SLOTS:  # the range is full: the newest hosts go without
            return False
        slot = zlib.crc32(host.encode()) % _SLOTS
        while slot in self._holder:
            slot = (slot + 1) % _SLOTS
        self._holder[slot] = host
        self._slot[host] = slot
        self._address[host] = _slot_address(slot)
        return True

    def _release(self, host: str) -> None:
        slot = self._slot.pop(host, None)
        if slot is not None:
            del self._holder[slot]
            del self._address[host]
