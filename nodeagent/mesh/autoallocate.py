"""Addresses for ServiceEntry hosts that have none, so TCP to them can be routed by address.

Istio (DNS proxying with ``ISTIO_META_DNS_AUTO_ALLOCATE``,
https://istio.io/latest/docs/ops/configuration/traffic-management/dns-proxy/#address-auto-allocation):
a ServiceEntry without ``addresses`` gets a virtual IP from the reserved class E range
240.240.0.0/16 for each of its hosts; wildcard hosts get none, nor do entries with
``resolution: NONE`` (their traffic keeps its original destination). Istio 1.23+ allocates
in a controller and keeps an address stable per host (pilot/pkg/serviceregistry/serviceentry/
controller.go, the ip-autoallocate controller); here the address is a pure function of the
mesh's ServiceEntries: a host's address comes from a hash of its name, and a collision goes
to the next free address in the order of the entries' age, so adding a ServiceEntry never
moves an older host's address.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Mapping

from nodeagent.mesh.model import IstioResource

SERVICE_ENTRY = "ServiceEntry"
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
    return [str(h).lower() for h in spec.get("hosts") or [] if not str(h).startswith("*")]


def _slot_address(slot: int) -> str:
    third, fourth = divmod(slot, _OCTETS)
    return str(RANGE.network_address + (third + 1) * 256 + fourth + 1)


def allocate(entries: Iterable[IstioResource]) -> Mapping[str, str]:
    """host -> allocated IPv4 address, for every host that wants one (see wants_address)."""
    ordered = sorted(entries, key=lambda e: (e.created or "~", e.namespace, e.name))
    taken: set[int] = set()
    addresses: dict[str, str] = {}
    for entry in ordered:
        for host in wants_address(entry):
            if host in addresses:  # one host, one address, whichever entries name it
                continue
            if len(taken) == _SLOTS:  # the range is full: the newest hosts go without
                return addresses
            slot = zlib.crc32(host.encode()) % _SLOTS
            while slot in taken:
                slot = (slot + 1) % _SLOTS
            taken.add(slot)
            addresses[host] = _slot_address(slot)
    return addresses
