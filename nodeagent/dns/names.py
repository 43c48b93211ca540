"""The names the DNS proxy answers itself, from the MeshStore (pure, no I/O).

Istio's name table (pkg/dns/server/name_table.go) and its lookup (pkg/dns/client/dns.go):
- a Kubernetes Service with a cluster IP answers to its FQDN ``svc.ns.svc.<domain>``, to
  ``svc.ns`` and ``svc.ns.svc`` from any namespace and to ``svc`` from its own namespace;
- a ServiceEntry host answers with the entry's ``addresses`` (single IPs; CIDR ranges are
  skipped), or with its auto-allocated address for proxies with DNS_AUTO_ALLOCATE (see
  mesh/autoallocate.py), to the namespaces it is exported to (``exportTo``; the oldest
  entry visible to the pod answers); wildcard hosts are left to the upstream resolver;
- a name that is one of these plus one of the pod's search domains (what a resolver with
  ``ndots:5`` asks first) is answered with a CNAME to the host and its addresses, saving the
  round trips to the upstream resolver that would say NXDOMAIN.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from nodeagent.mesh.autoallocate import SERVICE_ENTRY, allocate
from nodeagent.mesh.model import IstioResource, Service
from nodeagent.mesh.traffic import visible


@dataclass(frozen=True)
class HostAddresses:
    """What a host resolves to: its own addresses, and the allocated one (ServiceEntry)."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    allocated: str = ""  # used only for pods whose proxy auto-allocates
    entry: IstioResource | None = None  # the ServiceEntry (its exportTo); None: a Service

    def visible_to(self, namespace: str) -> bool:
        return self.entry is None or visible(self.entry, namespace)

    def for_pod(self, auto_allocate: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self.ipv4 or self.ipv6 or not (auto_allocate and self.allocated):
            return self.ipv4, self.ipv6
        return (self.allocated,), ()


@dataclass(frozen=True)
class Answer:
    """A name the table answers: the host it stands for, and the host's addresses."""

    host: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    cname: bool = False  # the name asked is the host plus a search domain


@dataclass
class NameTable:
    domain: str = "cluster.local"
    # FQDN -> what it resolves to: a Service, or the ServiceEntries naming it, oldest first
    # (the first one exported to the asking pod's namespace answers)
    hosts: dict[str, list[HostAddresses]] = field(default_factory=dict)
    # service short names: "svc.ns" -> FQDN (any namespace); (ns, "svc") -> FQDN (own ns)
    qualified: dict[str, str] = field(default_factory=dict)
    short: dict[tuple[str, str], str] = field(default_factory=dict)

    def lookup(
        self,
        name: str,
        namespace: str,
        search: Iterable[str] = (),
        auto_allocate: bool = False,
    ) -> Answer | None:
        """NAME (any case, trailing dot or not) as a pod of NAMESPACE asks for it: a host or
        one of its short names answers directly; a search-domain expansion answers with a
        CNAME to the host (Answer.cname)."""
        name = name.lower().rstrip(".")
        found, cname = self._host(name, namespace), False
        if found is None:
            for suffix in search:
                suffix = suffix.lower().strip(".")
                if suffix and name.endswith("." + suffix):
                    found, cname = self._host(name[: -len(suffix) - 1], namespace), True
                    if found is not None:
                        break
        if found is None:
            return None
        host, addresses = found
        ipv4, ipv6 = addresses.for_pod(auto_allocate)
        if not (ipv4 or ipv6):
            return None
        return Answer(host, ipv4, ipv6, cname)

    def _host(self, name: str, namespace: str) -> tuple[str, HostAddresses] | None:
        if name not in self.hosts:
            bare = name[: -len(".svc")] if name.endswith(".svc") else name
            name = self.qualified.get(bare) or self.short.get((namespace, bare)) or ""
        for addresses in self.hosts.get(name, ()):
            if addresses.visible_to(namespace):
                return name, addresses
        return None


def build(services: Iterable[Service], entries: Iterable[IstioResource], domain: str) -> NameTable:
    table = NameTable(domain=domain)
    for svc in services:
        if not svc.cluster_ip or svc.cluster_ip == "None":
            continue  # headless: kube-dns answers with the pods
        fqdn = svc.hostname(domain)
        table.hosts[fqdn] = [_split([svc.cluster_ip])]
        table.qualified[f"{svc.name}.{svc.namespace}"] = fqdn
        table.short[(svc.namespace, svc.name)] = fqdn
    entries = sorted(
        (e for e in entries if e.kind == SERVICE_ENTRY),
        key=lambda e: (e.created or "~", e.namespace, e.name),
    )
    allocated = allocate(entries)
    service_hosts = set(table.hosts)
    for entry in entries:
        given = _split(_single_addresses(entry.spec.get("addresses") or []))
        for raw in entry.spec.get("hosts") or []:
            host = str(raw).lower()
            if host.startswith("*") or host in service_hosts:
                continue  # a Service's name wins over a ServiceEntry naming it (as Istio's)
            addresses = HostAddresses(given.ipv4, given.ipv6, allocated.get(host, ""), entry)
            table.hosts.setdefault(host, []).append(addresses)
    return table


def _single_addresses(addresses: Iterable[object]) -> list[str]:
    out = []
    for raw in addresses:
        try:
            net = ipaddress.ip_network(str(raw), strict=False)
        except ValueError:
            continue
        if net.num_addresses == 1:
            out.append(str(net.network_address))
    return out


def _split(addresses: Iterable[str]) -> HostAddresses:
    ipv4: list[str] = []
    ipv6: list[str] = []
    for address in addresses:
        (ipv4 if ipaddress.ip_address(address).version == 4 else ipv6).append(address)
    return HostAddresses(tuple(ipv4), tuple(ipv6))
