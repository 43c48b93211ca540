"""Istio Gateway -> an ingress/egress gateway Envoy's listeners and route tables (pure).

Istio is the specification: istio.io/latest/docs/reference/config/networking/gateway/ for the
fields, istio/istio pilot/pkg/model/gateway.go (MergeGateways: servers merged per port, one
route table per plain-HTTP port, one per HTTPS server) and pilot/pkg/networking/core/gateway.go
(buildGatewayListeners, buildGatewayHTTPRouteConfig, buildGatewayNetworkFiltersFromTCPRoutes)
for what a gateway proxy gets:

- The Gateways whose ``selector`` the gateway workload's labels satisfy (an empty selector
  selects every gateway workload), in any namespace (PILOT_SCOPE_GATEWAY_TO_NAMESPACE is off by
  default), oldest first.
- One listener ``0.0.0.0_<port>`` per server port, the port translated through the Services
  selecting the gateway pod (``listen_ports``). Plain HTTP servers of a port share the
  route table ``http.<port>``; a TLS-terminating HTTPS server has a filter chain of its own,
  matched by SNI (its hosts), with the route table ``https.<port>.<portName>.<gw>.<ns>``.
- A server host is ``[namespace/]dnsName``: the VirtualServices of that namespace (``*`` any,
  ``.`` the Gateway's own) whose hosts match the name (wildcards either way) and whose
  ``gateways`` name this Gateway (``ns/name``, or ``name`` in the VirtualService's namespace)
  give the virtual hosts: the more specific of the two hosts, routes translated by the same code
  as the mesh's (translate/virtual_service.py) to the same clusters (``outbound|port|subset|host``,
  their mTLS presenting the gateway's own identity).
- tls.mode SIMPLE / MUTUAL terminate TLS with ``credentialName``, a Secret of the gateway
  workload's namespace (SDS ``kubernetes://<ns>/<name>``, its CA ``...-cacert``);
  ISTIO_MUTUAL with the gateway's workload certificate, requiring a mesh client certificate;
  PASSTHROUGH routes by SNI to the VirtualService ``tls`` routes; ``httpsRedirect`` answers
  plain HTTP with a 301 to https (virtual host ``require_tls: ALL``). TCP servers proxy to the
  VirtualService ``tcp`` route.

Not yet (named in ``problems``, the server is left out): AUTO_PASSTHROUGH (needs the SNI-DNAT
clusters ``outbound_.<port>_.<subset>_.<host>`` of every service, Istio's multi-network east-west
gateway), OPTIONAL_MUTUAL, and certificates from files (serverCertificate/privateKey:
credentialName is the way here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from nodeagent.mesh import credentials, hosts
from nodeagent.mesh.model import IstioResource
from nodeagent.mesh.policy import creation_order
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.traffic import visible, vs_hosts
from nodeagent.translate import tls, virtual_service
from nodeagent.translate.envoy import Listener, RouteConfiguration, message, typed
from nodeagent.translate.filters import http_connection_manager, tcp_proxy
from nodeagent.translate.gateway_policies import NO_POLICIES, GatewayPolicies
from nodeagent.translate.listeners import TLS_INSPECTOR
from nodeagent.translate.services import BLACKHOLE

GATEWAY = "Gateway"
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
TERMINATED = frozenset({"SIMPLE", "MUTUAL", "ISTIO_MUTUAL"})
NOT_YET = {
    "AUTO_PASSTHROUGH": "tls.mode AUTO_PASSTHROUGH is not enforced yet (it needs the SNI-DNAT"
    " clusters of every service, Istio's east-west gateway)",
    "OPTIONAL_MUTUAL": "tls.mode OPTIONAL_MUTUAL is not enforced yet",
}
# Istio's gateway HTTPS listeners offer these (pilot/pkg/networking/core/gateway.go).
HTTPS_ALPN = ["h2", "http/1.1"]

# Destination of a route as a cluster name, given the VirtualService and the listener port.
ClusterOf = Callable[[Mapping[str, Any], IstioResource, int], str]


@dataclass(frozen=True)
class Workload:
    """The gateway workload: its namespace (where credentialName Secrets are read), its labels
    (what Gateway selectors match) and its SPIFFE identity (ISTIO_MUTUAL)."""

    namespace: str
    labels: Mapping[str, str]
    identity: str
    name: str = "gateway"  # its pod's, for the access log
    # Service port -> the port its pod listens on, of the Services selecting the gateway pod
    # (``listen_ports``): a server's port is translated through them, as istiod's resolvePorts.
    ports: Mapping[int, int] = field(default_factory=dict)
    # AuthorizationPolicy, RequestAuthentication and numTrustedProxies for this workload
    # (translate/gateway_policies.py): on every chain of every listener.
    policies: GatewayPolicies = NO_POLICIES


@dataclass(frozen=True)
class Server:
    gateway: IstioResource
    index: int
    port: int
    protocol: str
    port_name: str
    hosts: tuple[str, ...]
    tls: Mapping[str, Any]
    listen: int = 0  # the port the gateway pod listens on for it (0: PORT itself)

    @property
    def listen_port(self) -> int:
        return self.listen or self.port

    @property
    def where(self) -> str:
        return f"{GATEWAY} {self.gateway.namespace}/{self.gateway.name}: servers[{self.index}]"

    @property
    def mode(self) -> str:
        return str(self.tls.get("mode") or "")

    @property
    def terminates(self) -> bool:
        return self.protocol in TLS_PROTOCOLS and self.mode in TERMINATED

    @property
    def route_name(self) -> str:
        """Istio's route table names (model/gateway.go gatewayRDSRouteName)."""
        if self.terminates and self.protocol == "HTTPS":
            gw = self.gateway
            return f"https.{self.port}.{self.port_name}.{gw.name}.{gw.namespace}"
        return f"http.{self.listen_port}"


@dataclass
class GatewayConfig:
    """What a gateway Envoy gets: listeners, route tables, the credentialName Secrets its TLS
    servers name (namespace, name), and why some servers were left out (by Gateway key)."""

    listeners: list[Listener] = field(default_factory=list)
    routes: list[RouteConfiguration] = field(default_factory=list)
    credentials: set[tuple[str, str]] = field(default_factory=set)
    problems: dict[str, list[str]] = field(default_factory=dict)


# A Service label that opts out of the port translation (Istio's
# DisableGatewayPortTranslationLabel).
NO_PORT_TRANSLATION = "networking.istio.io/disable-gateway-port-translation"


def listen_ports(store: MeshStore, namespace: str, labels: Mapping[str, str]) -> dict[int, int]:
    """Service port -> target port, of the Services selecting the gateway pod (NAMESPACE,
    LABELS), the first Service (by name) winning: istiod's resolvePorts for a Gateway that
    selects by labels (pilot/pkg/model/gateway.go). A server on port 80 behind a Service mapping
    80 to 8080 listens on 8080, so the gateway needs no privilege to bind it; a port no Service
    names is listened on as it is. A named targetPort (a container port's name, which the
    source does not keep) counts as the port itself."""
    ports: dict[int, int] = {}
    for svc in store.services_selecting(namespace, labels):
        if NO_PORT_TRANSLATION in svc.labels:
            continue
        for port in svc.ports:
            target = port.target_port if isinstance(port.target_port, int) else 0
            ports.setdefault(port.port, target or port.port)
    return ports


def selects(gateway: IstioResource, labels: Mapping[str, str]) -> bool:
    """Whether GATEWAY's selector picks a workload with LABELS (every selector label equal)."""
    selector = gateway.spec.get("selector") or {}
    return all(labels.get(str(k)) == str(v) for k, v in selector.items())


def selected(store: MeshStore, labels: Mapping[str, str]) -> list[IstioResource]:
    """The Gateways of every namespace that select LABELS, oldest first."""
    found = [r for r in store.istio.values() if r.kind == GATEWAY and selects(r, labels)]
    return sorted(found, key=creation_order)


def servers(gateway: IstioResource) -> tuple[list[Server], list[str]]:
    """GATEWAY's servers, and a problem for each one that cannot be used."""
    out: list[Server] = []
    problems: list[str] = []
    for i, raw in enumerate(gateway.spec.get("servers") or []):
        where = f"{GATEWAY} {gateway.namespace}/{gateway.name}: servers[{i}]"
        port = raw.get("port") or {}
        try:
            number = int(port["number"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}.port.number: expected a port number")
            continue
        protocol = str(port.get("protocol") or "").upper()
        server = Server(
            gateway,
            i,
            number,
            protocol,
            str(port.get("name") or f"{protocol.lower()}-{number}"),
            tuple(str(h) for h in raw.get("hosts") or ()),
            raw.get("tls") or {},
        )
        if server.mode in NOT_YET:
            problems.append(f"{where}: {NOT_YET[server.mode]}")
        elif protocol in TLS_PROTOCOLS and server.mode in ("SIMPLE", "MUTUAL"):
            if not server.tls.get("credentialName"):
                problems.append(
                    f"{where}.tls: mode {server.mode} needs credentialName here (certificate"
                    " files, serverCertificate/privateKey, are not enforced yet)"
                )
            else:
                out.append(server)
        elif protocol in TLS_PROTOCOLS and server.mode not in ("PASSTHROUGH", "ISTIO_MUTUAL"):
            problems.append(f"{where}.tls.mode: {server.mode or 'unset'} on a {protocol} port")
        elif protocol not in HTTP_PROTOCOLS | TLS_PROTOCOLS | {"TCP"}:
            problems.append(f"{where}.port.protocol: {protocol or 'unset'} is not served")
        else:
            out.append(server)
    return out, problems


def credentials_named(store: MeshStore, workload: Workload) -> set[tuple[str, str]]:
    """(namespace, name) of the Secrets the TLS servers of WORKLOAD's Gateways name: always
    in the gateway workload's own namespace (Istio reads a gateway's credentialName there)."""
    named: set[tuple[str, str]] = set()
    for gateway in selected(store, workload.labels):
        for server in servers(gateway)[0]:
            if server.mode in ("SIMPLE", "MUTUAL") and server.tls.get("credentialName"):
                named.add((workload.namespace, str(server.tls["credentialName"])))
    return named


def _gateway_names(vs: IstioResource, gateway: IstioResource) -> set[str]:
    """How VS may spell GATEWAY in ``gateways``."""
    names = {f"{gateway.namespace}/{gateway.name}"}
    if vs.namespace == gateway.namespace:
        names.add(gateway.name)
    return names


def bound(vs: IstioResource, gateway: IstioResource) -> bool:
    """Whether VS's ``gateways`` names GATEWAY."""
    return bool(_gateway_names(vs, gateway) & {str(g) for g in vs.spec.get("gateways") or ()})


def _narrower(a: str, b: str) -> str | None:
    """The more specific of hosts A and B when one matches the other (wildcards), else None."""
    if hosts.host_match(a, b) is not None:
        return b
    if hosts.host_match(b, a) is not None:
        return a
    if a == "*" or b == "*":
        return b if a == "*" else a
    return None


def server_host_allows(server_host: str, gateway_ns: str, vs: IstioResource, host: str) -> str:
    """The virtual host a server host ``[ns/]dnsName`` gives VS's HOST ("" when none)."""
    namespace, _, dns = server_host.rpartition("/")
    namespace = namespace or "*"
    if namespace == ".":
        namespace = gateway_ns
    if namespace not in ("*", vs.namespace):
        return ""
    return _narrower(dns, host) or ""


def _vs_hosts_for(server: Server, vs: IstioResource, domain: str) -> list[str]:
    made: list[str] = []
    for host in vs_hosts(vs, domain):
        for server_host in server.hosts:
            narrowed = server_host_allows(server_host, server.gateway.namespace, vs, host)
            if narrowed and narrowed not in made:
                made.append(narrowed)
    return made


def _destination(
    cluster_of: ClusterOf, vs: IstioResource, port: int, destination: Mapping[str, Any]
) -> str:
    return cluster_of(destination, vs, port)


def _domains(host: str) -> list[str]:
    return ["*"] if host == "*" else [host, f"{host}:*"]


def route_table(
    name: str,
    group: Sequence[Server],
    virtual_services: Sequence[IstioResource],
    cluster_of: ClusterOf,
    domain: str,
    problems: dict[str, list[str]] | None = None,
) -> RouteConfiguration:
    """One route table for the servers of GROUP (sharing NAME): a virtual host per host, with
    the routes of the VirtualServices bound to their Gateway, in creation order. A
    VirtualService that cannot be translated is left out, its error in PROBLEMS (by its key):
    the others' routes stay served."""
    by_host: dict[str, list[dict[str, Any]]] = {}
    redirect: set[str] = set()
    for server in group:
        for vs in virtual_services:
            if not bound(vs, server.gateway):
                continue
            names = _gateway_names(vs, server.gateway)
            try:
                routes = virtual_service.http_routes(
                    vs,
                    server.port,
                    partial(_destination, cluster_of, vs, server.port),
                    gateways=names,
                )
            except ValueError as e:
                if problems is not None and str(e) not in problems.setdefault(vs.key, []):
                    problems[vs.key].append(str(e))
                continue
            for host in _vs_hosts_for(server, vs, domain):
                by_host.setdefault(host, []).extend(routes)
                if server.tls.get("httpsRedirect"):
                    redirect.add(host)
    vhosts = []
    for host in sorted(by_host, key=lambda h: (h == "*", h)):
        vhost: dict[str, Any] = {
            "name": f"{host}:{group[0].port}",
            "domains": _domains(host),
            "routes": by_host[host],
        }
        if host in redirect:
            vhost["require_tls"] = "ALL"  # Istio: a 301 to https for every request
        vhosts.append(vhost)
    return message(
        RouteConfiguration,
        {"name": name, "virtual_hosts": vhosts, "validate_clusters": False},
    )


def _sni_names(server: Server) -> list[str]:
    names = sorted({h.rpartition("/")[2] for h in server.hosts})
    return [] if "*" in names else names


def _downstream_tls(server: Server, workload: Workload) -> dict[str, Any]:
    """The TLS a terminating server presents (and, MUTUAL / ISTIO_MUTUAL, requires)."""
    if server.mode == "ISTIO_MUTUAL":
        return tls.downstream_mtls(workload.identity)
    name = str(server.tls["credentialName"])
    common: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [
            tls.sds(credentials.certificate_name(workload.namespace, name))
        ],
        "alpn_protocols": HTTPS_ALPN if server.protocol == "HTTPS" else [],
    }
    context: dict[str, Any] = {}
    if server.mode == "MUTUAL":
        # Istio matches a client's SAN of any type (its exact string matchers are untyped):
        # the names a client certificate carries are DNS names or URIs (SPIFFE IDs).
        sans = [
            {"san_type": kind, "matcher": {"exact": str(san)}}
            for san in server.tls.get("subjectAltNames") or ()
            for kind in ("DNS", "URI")
        ]
        common["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": sans},
            "validation_context_sds_secret_config": tls.sds(
                credentials.ca_name(workload.namespace, name)
            ),
        }
        context["require_client_certificate"] = True
    minimum = server.tls.get("minProtocolVersion")
    if minimum and minimum != "TLS_AUTO":
        common["tls_params"] = {
            "tls_minimum_protocol_version": str(minimum).replace("TLSV", "TLSv")
        }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context=common,
            **context,
        ),
    }


def _hcm(route_name: str, who: str, policies: GatewayPolicies) -> dict[str, Any]:
    """An edge HCM: the client's address is the remote address (Istio's gateways set
    use_remote_address), or the one that many trusted proxies in front of it put into
    X-Forwarded-For (xff_num_trusted_hops); authentication and authorization first, then the
    VirtualService filters (fault, CORS) before the router."""
    hcm = http_connection_manager(
        route_name, route_name, "outbound", who, inbound_filters=policies.http_filters
    )
    hcm["typed_config"]["use_remote_address"] = True
    if policies.trusted_proxies:
        hcm["typed_config"]["xff_num_trusted_hops"] = policies.trusted_proxies
    return hcm


def _l4_cluster(
    server: Server,
    virtual_services: Sequence[IstioResource],
    cluster_of: ClusterOf,
    domain: str,
    section: str,
    sni: str = "",
) -> str | None:
    """The cluster of the first VirtualService ``tcp`` (or ``tls``, matching SNI) route bound
    to SERVER's Gateway for one of its hosts (Istio: first match wins)."""
    for vs in virtual_services:
        if not bound(vs, server.gateway) or not _vs_hosts_for(server, vs, domain):
            continue
        names = _gateway_names(vs, server.gateway)
        for rule in vs.spec.get(section) or []:
            matches = rule.get("match") or [{}]
            for match in matches:
                if match.get("port") and int(match["port"]) != server.port:
                    continue
                if match.get("gateways") and not names & set(match["gateways"]):
                    continue
                if sni and not any(
                    hosts.host_match(str(h), sni) is not None for h in match.get("sniHosts") or ()
                ):
                    continue
                destinations = rule.get("route") or []
                if destinations:
                    return cluster_of(destinations[0].get("destination") or {}, vs, server.port)
    return None


def build(
    store: MeshStore,
    workload: Workload,
    cluster_of: ClusterOf,
) -> GatewayConfig:
    """The gateway Envoy's listeners and route tables for WORKLOAD."""
    out = GatewayConfig()
    domain = store.mesh_config.cluster_domain
    # Those exported to the gateway's namespace (istiod's VirtualServicesForGateway).
    virtual_services = sorted(
        (
            r
            for r in store.istio.values()
            if r.kind == "VirtualService" and visible(r, workload.namespace)
        ),
        key=creation_order,
    )
    by_port: dict[int, list[Server]] = {}
    for gateway in selected(store, workload.labels):
        usable, problems = servers(gateway)
        if problems:
            out.problems[gateway.key] = problems
        for server in usable:
            server = replace(server, listen=workload.ports.get(server.port, server.port))
            group = by_port.setdefault(server.listen_port, [])
            plain = not server.terminates and server.protocol in HTTP_PROTOCOLS
            if group and plain != (not group[0].terminates and group[0].protocol in HTTP_PROTOCOLS):
                out.problems.setdefault(gateway.key, []).append(
                    f"{server.where}: port {server.listen_port} is already served with another"
                    f" protocol by {group[0].where}; left out"
                )
                continue
            group.append(server)
    who = f"{workload.namespace}/{workload.name}"
    for port, group in sorted(by_port.items()):
        chains: list[dict[str, Any]] = []
        listener_filters: list[dict[str, Any]] = []
        first = group[0]
        if not first.terminates and first.protocol in HTTP_PROTOCOLS:
            name = first.route_name
            out.routes.append(
                route_table(name, group, virtual_services, cluster_of, domain, out.problems)
            )
            chains.append({"filters": [_hcm(name, who, workload.policies)]})
        else:
            listener_filters = [TLS_INSPECTOR]
            for server in group:
                if server.terminates and server.protocol == "HTTPS":
                    name = server.route_name
                    out.routes.append(
                        route_table(
                            name, [server], virtual_services, cluster_of, domain, out.problems
                        )
                    )
                    chain: dict[str, Any] = {
                        "filters": [_hcm(name, who, workload.policies)],
                        "transport_socket": _downstream_tls(server, workload),
                    }
                    if server.mode in ("SIMPLE", "MUTUAL"):
                        credential = (workload.namespace, str(server.tls["credentialName"]))
                        out.credentials.add(credential)
                    if sni := _sni_names(server):
                        chain["filter_chain_match"] = {"server_names": sni}
                    chains.append(chain)
                elif server.protocol == "TCP" or server.terminates:
                    cluster = _l4_cluster(server, virtual_services, cluster_of, domain, "tcp")
                    chain = {
                        "filters": [
                            *workload.policies.network_filters,
                            tcp_proxy(name_of(server), cluster or BLACKHOLE, "outbound", who),
                        ]
                    }
                    if server.terminates:
                        chain["transport_socket"] = _downstream_tls(server, workload)
                        if server.mode in ("SIMPLE", "MUTUAL"):
                            out.credentials.add(
                                (workload.namespace, str(server.tls["credentialName"]))
                            )
                    chains.append(chain)
                else:  # PASSTHROUGH: one chain per SNI name a VirtualService tls route takes
                    for name in _passthrough_names(server, virtual_services, domain):
                        cluster = _l4_cluster(
                            server, virtual_services, cluster_of, domain, "tls", name
                        )
                        if cluster is None:
                            continue
                        chains.append(
                            {
                                "filter_chain_match": {"server_names": [name]},
                                "filters": [
                                    *workload.policies.network_filters,
                                    tcp_proxy(f"{port}.{name}", cluster, "outbound", who),
                                ],
                            }
                        )
        chains = _unique_matches(chains)
        if not chains:
            continue
        fields: dict[str, Any] = {
            "name": f"0.0.0.0_{port}",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": chains,
        }
        if listener_filters:
            fields["listener_filters"] = listener_filters
        out.listeners.append(message(Listener, fields))
    return out


def name_of(server: Server) -> str:
    return f"{server.port}.{server.port_name}.{server.gateway.name}.{server.gateway.namespace}"


def _passthrough_names(
    server: Server, virtual_services: Sequence[IstioResource], domain: str
) -> list[str]:
    """The SNI names of the ``tls`` routes of VirtualServices bound to SERVER's Gateway that the
    server's hosts admit."""
    names: list[str] = []
    for vs in virtual_services:
        if not bound(vs, server.gateway):
            continue
        for rule in vs.spec.get("tls") or []:
            for match in rule.get("match") or []:
                for sni in match.get("sniHosts") or ():
                    admitted = any(
                        server_host_allows(h, server.gateway.namespace, vs, str(sni))
                        for h in server.hosts
                    )
                    if admitted and str(sni) not in names:
                        names.append(str(sni))
    return names


def _unique_matches(chains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Envoy refuses two filter chains with one match: the first (oldest Gateway) wins."""
    seen: set[str] = set()
    out = []
    for chain in chains:
        key = repr(chain.get("filter_chain_match"))
        if key not in seen:
            seen.add(key)
            out.append(chain)
    return out


__all__ = ["GATEWAY", "GatewayConfig", "Server", "Workload", "build", "selected"]
