"""The names the DNS proxy answers itself, from the MeshStore (pure, no I/O).

Istio's name table (pkg/dns/server/name_table.go) and its lookup (pkg/dns/client/dns.go):
- a Kubernetes Service with a cluster IP answers to its FQDN ``svc.ns.svc.<domain>``, to
  ``svc.ns`` and ``svc.ns.svc`` from any namespace and to ``svc`` from its own namespace;
- a ServiceEntry host answers with the entry's ``addresses`` (single IPs; CIDR ranges are
  skipped), or with its auto-allocated address for proxies with DNS_AUTO_ALLOCATE (see
  mesh/autoallocate.py), to the namespaces it is exported to (``exportTo``, as a Service is by
  its ``networking.istio.io/exportTo`` annotation); wildcard hosts
  are left to the upstream resolver;
- only the hosts in the pod's Sidecar scope (``Admits``): istiod builds a proxy's table from
  the services of its scope's egress listeners (pkg/dns/server/name_table.go
  ``BuildNameTable``); names out of scope go to the upstream resolver;
- a name that is one of these plus one of the pod's search domains (what a resolver with
  ``ndots:5`` asks first) is answered with a CNAME to the host and its addresses, saving the
  round trips to the upstream resolver that would say NXDOMAIN.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from nodeagent.mesh.model import Service


@dataclass(frozen=True)
class HostAddresses:
    """What a host resolves to: its own addresses, and the allocated one (ServiceEntry)."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    allocated: str = ""  # used only for pods whose proxy auto-allocates
    # The service's namespace and exportTo (empty: everywhere)
    namespace: str = ""
    export_to: frozenset[str] = frozenset()
    ports: tuple[int, ...] = ()  # the service's ports (a Sidecar scope may import some only)

    def visible_to(self, namespace: str) -> bool:
        """Istio's exportTo: ``*`` everywhere, ``.`` the entry's own namespace, ``~`` none,
        else the namespaces named (istio.io/latest/docs/reference/config/networking/
        service-entry/#ServiceEntry-export_to)."""
        to = self.export_to
        if not to or "*" in to:
            return True
        return namespace in to or ("." in to and namespace == self.namespace)

    def for_pod(self, auto_allocate: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self.ipv4 or self.ipv6 or not (auto_allocate and self.allocated):
            return self.ipv4, self.ipv6
        return (self.allocated,), ()


# Whether the asking pod's scope holds a host: (its namespace, host, ports) -> yes or no.
Admits = Callable[[str, str, tuple[int, ...]], bool]


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
    # FQDN -> what it resolves to (a list: room for more than one registry entry per host)
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
        admits: Admits | None = None,
    ) -> Answer | None:
        """NAME (any case, trailing dot or not) as a pod of NAMESPACE asks for it: a host or
        one of its short names answers directly; a search-domain expansion answers with a
        CNAME to the host (Answer.cname). ADMITS: the pod's Sidecar scope (None: every host)."""
        name = name.lower().rstrip(".")
        found, cname = self._host(name, namespace, admits), False
        if found is None:
            for suffix in search:
                suffix = suffix.lower().strip(".")
                if suffix and name.endswith("." + suffix):
                    found, cname = self._host(name[: -len(suffix) - 1], namespace, admits), True
                    if found is not None:
                        break
        if found is None:
            return None
        host, addresses = found
        ipv4, ipv6 = addresses.for_pod(auto_allocate)
        if not (ipv4 or ipv6):
            return None
        return Answer(host, ipv4, ipv6, cname)

    def _host(
        self, name: str, namespace: str, admits: Admits | None = None
    ) -> tuple[str, HostAddresses] | None:
        if name not in self.hosts:
            bare = name[: -len(".svc")] if name.endswith(".svc") else name
            name = self.qualified.get(bare) or self.short.get((namespace, bare)) or ""
        for addresses in self.hosts.get(name, ()):
            if addresses.visible_to(namespace) and (
                admits is None or admits(addresses.namespace, name, addresses.ports)
            ):
                return name, addresses
        return None


def build(services: Iterable[Service], domain: str) -> NameTable:
    """The table of the registry's services: Kubernetes Services, and the ServiceEntry hosts
    the store derived from the entries (mesh/service_entries.py; the store gives a host to
    one entry only, and its auto-allocated address)."""
    table = NameTable(domain=domain)
    entry_hosts = []
    for svc in services:
        if svc.entry is not None:
            entry_hosts.append(svc)
            continue
        if not svc.cluster_ip or svc.cluster_ip == "None":
            continue  # headless: kube-dns answers with the pods
        fqdn = svc.hostname(domain)
        ports = tuple(p.port for p in svc.ports)
        table.hosts[fqdn] = [
            replace(
                _split([svc.cluster_ip]),
                namespace=svc.namespace,
                export_to=frozenset(svc.export_to),
                ports=ports,
            )
        ]
        table.qualified[f"{svc.name}.{svc.namespace}"] = fqdn
        table.short[(svc.namespace, svc.name)] = fqdn
    for svc in entry_hosts:
        assert svc.entry is not None
        host = svc.host.lower()
        if host.startswith("*") or host in table.hosts:
            continue  # a Service's name wins over a ServiceEntry naming it (as Istio's)
        given = _split(_single_addresses(svc.entry.addresses))
        table.hosts[host] = [
            HostAddresses(
                given.ipv4,
                given.ipv6,
                svc.allocated_ip,
                svc.namespace,
                frozenset(svc.entry.export_to),
                tuple(p.port for p in svc.ports),
            )
        ]
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
