"""A service port's clusters and routes as the node's local callers see them (pure).

Istio gives each sidecar its own copy of the routes and clusters, as its namespace sees the
VirtualServices and DestinationRules (exportTo, the client namespace's own rules first). The node
Envoy shares one route table and one set of clusters per service port among all local pods, so:

- **Routes.** The table is computed for each local client namespace; namespaces that get the same
  routes form one *view*. One view: its routes as they are. Several: each view's routes carry a
  ``filter_state`` match on the caller's SPIFFE ID (``io.nodeagent.caller``, stamped by the
  caller's own outbound listener), so a caller only ever matches its view's routes and, where
  none matches, gets Envoy's 404 ``NR`` as its sidecar would. Per-request source matches
  (``sourceLabels``, ``sourceNamespace``) are filter-state matches too (virtual_service.py):
  pods differ in routes without a table per pod.
- **TCP and TLS ports.** A VirtualService's ``tcp``/``tls`` rules become, per view, an ordered
  list of rules on the caller and the SNI (``port_tcp_route``); when that is not one route for
  everyone, the port's own routes listener applies them per connection (l4_routes.py), views
  told apart by the caller's SPIFFE ID as routes are.
- **Clusters.** A DestinationRule's subsets and traffic policy make ``outbound|port|subset|host``
  clusters, named as Istio names them, for the rule a namespace without rules of its own sees
  (the *canonical* rule). A local namespace that sees another rule (its own, or one exported only
  to it) gets its own copies, named ``...~<rule namespace>/<rule name>``, which only its view's
  routes name. TLS modes stay per caller in originate-mtls (cache.py), as before.

- **workloadSelector.** A DestinationRule with a workloadSelector applies to the pods of its
  namespace it selects. Local pods are grouped in *client classes*: a namespace and the labels its
  selector rules read of the pod (policy.selector_labels), never one per pod. A class that sees
  other routes than its namespace's other pods gets its own copy of them, guarded by the caller's
  namespace and labels (``io.nodeagent.labels``), put before the namespace-wide ones (a class
  with more selector labels first: a pod matches the guard of every class whose labels it
  carries, and its own class has the most); its clusters are the selector rule's variant.

A view is computed only for namespaces with a local pod. A pod of a new namespace gets its view
with the translation that adds its listeners; Envoy applies routes after listeners, so the
translation names the tables its view changed (``Translation.route_guards``) and the pod's CNI
ADD waits until Envoy holds them too (proxy.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from nodeagent.mesh import policy, secret_access, traffic
from nodeagent.mesh.model import IstioResource, Service
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import destination_rule, internal, istio_stats, mirror, virtual_service
from nodeagent.translate.envoy import RouteConfiguration, message
from nodeagent.translate.protocol import is_tls
from nodeagent.translate.routes import default_retry_policy
from nodeagent.translate.services import ServiceTarget, outbound_cluster

CANONICAL = ""  # a client namespace that has no rule of its own
# The suffix of a selector rule's clusters for callers refused its credentialName's certificate.
UNAUTHORIZED = "~unauthorized"


@dataclass(frozen=True, order=True)
class ClientClass:
    """Local client pods that see the same DestinationRules: their NAMESPACE, and SELECTED, the
    labels of theirs that its rules' workloadSelectors read (policy.selector_labels; empty when
    no selector selects them). UNAUTHORIZED: their service account, when a selector rule
    presents a credentialName's certificate for them and that account may not have it
    (mesh/secret_access.py); "" otherwise. So a class is still a group, never one per pod."""

    namespace: str
    selected: tuple[tuple[str, str], ...] = ()
    unauthorized: str = ""


Client = ClientClass | str  # a bare namespace: its pods no workloadSelector selects


def client_class(client: Client) -> ClientClass:
    return client if isinstance(client, ClientClass) else ClientClass(client)


def _same(a: IstioResource | None, b: IstioResource | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.key == b.key and a.spec == b.spec


def rule_variant(
    store: MeshStore, client: Client, svc: Service
) -> tuple[str, IstioResource | None]:
    """The suffix of the clusters a CLIENT (class or namespace) uses for SVC ("" for the
    canonical ones), and the DestinationRule behind them."""
    who = client_class(client)
    canonical = policy.destination_rule_for(store, CANONICAL, svc)
    if who.namespace == CANONICAL:
        return "", canonical
    mine = policy.destination_rule_for(store, who.namespace, svc, dict(who.selected))
    if _same(mine, canonical):
        return "", canonical
    suffix = "~" + (f"{mine.namespace}/{mine.name}" if mine is not None else "none")
    if who.unauthorized and secret_access.presents_credential(mine):
        suffix += UNAUTHORIZED  # the rule's clusters without its certificate
    return suffix, mine


def service_of_host(store: MeshStore, hostname: str) -> Service | None:
    """The Kubernetes Service whose hostname is HOSTNAME (<name>.<ns>.svc.<domain>), else the
    ServiceEntry host HOSTNAME (mesh/service_entries.py)."""
    suffix = ".svc." + store.mesh_config.cluster_domain
    if not hostname.endswith(suffix):
        return store.service_of_entry_host(hostname)
    name, _, namespace = hostname[: -len(suffix)].partition(".")
    if not name or not namespace or "." in namespace:
        return store.service_of_entry_host(hostname)
    return store.services.get(f"{namespace}/{name}") or store.service_of_entry_host(hostname)


@dataclass(frozen=True)
class SubsetCluster:
    """One cluster of a service port: its name, the subset's labels (None: every endpoint)
    and the merged traffic policy that applies to it."""

    name: str
    labels: Mapping[str, str] | None
    policy: Mapping[str, Any]
    subset: str = ""  # the DestinationRule subset's name ("": the port's own cluster)
    # The rule's namespace when it has a workloadSelector: only there does a sidecar read
    # tls.credentialName (a Secret of that namespace); "" otherwise.
    credentials_namespace: str = ""
    # loadBalancer PASSTHROUGH (destination_rule.is_passthrough): the cluster connects to the
    # address the caller dialled, without EDS (translate/passthrough.py). CHECKS_ENDPOINTS:
    # Istio's auto mTLS for it then looks at the service's endpoints (checks_endpoints).
    passthrough: bool = False
    checks_endpoints: bool = False
    # Its callers may not have the credentialName's certificate (mesh/secret_access.py).
    credentials_denied: bool = False


def port_clusters(
    store: MeshStore, target: ServiceTarget, clients: Sequence[Client]
) -> list[SubsetCluster]:
    """The clusters of a service port: the canonical rule's and each variant's (one per rule
    some local client class sees), each with its subsets (Istio makes a subset's cluster
    whether or not a route names it)."""
    rules: dict[str, IstioResource | None] = {}
    for client in (CANONICAL, *clients):
        suffix, rule = rule_variant(store, client, target.service)
        rules.setdefault(suffix, rule)
    port = target.port.port
    made: list[SubsetCluster] = []
    for suffix, rule in sorted(rules.items()):
        spec = rule.spec if rule is not None else {}
        secrets = rule.namespace if rule is not None and spec.get("workloadSelector") else ""
        denied = suffix.endswith(UNAUTHORIZED)
        made.append(
            SubsetCluster(
                target.cluster + suffix,
                None,
                destination_rule.traffic_policy(spec, port),
                credentials_namespace=secrets,
                passthrough=destination_rule.is_passthrough(spec, port),
                checks_endpoints=destination_rule.checks_endpoints(spec),
                credentials_denied=denied,
            )
        )
        for subset in spec.get("subsets") or []:
            name = str(subset.get("name", ""))
            labels = destination_rule.subset_labels(spec, name)
            made.append(
                SubsetCluster(
                    outbound_cluster(port, target.host, name) + suffix,
                    labels if labels is not None else {},
                    destination_rule.traffic_policy(spec, port, name),
                    name,
                    secrets,
                    destination_rule.is_passthrough(spec, port, name),
                    destination_rule.checks_endpoints(spec, name),
                    credentials_denied=denied,
                )
            )
    return made


class _Resolver:
    """Route destinations of one client class: cluster names, and the hash policy of the
    DestinationRule behind each."""

    def __init__(self, store: MeshStore, client: ClientClass, listener_port: int) -> None:
        self.store, self.client, self.port = store, client, listener_port
        self.hosts: set[str] = set()  # destination hosts named (dependencies)
        self._hash: dict[str, list[dict[str, Any]]] = {}

    def cluster(
        self, destination: Mapping[str, Any], vs: IstioResource | None, host: str = ""
    ) -> str:
        """Istio's GetDestinationCluster: the destination's port, else the service's only
        port, else the port called (pilot/pkg/networking/core/route/route.go)."""
        domain = self.store.mesh_config.cluster_domain
        if vs is not None:
            host = traffic.destination_host(destination, vs, domain)
        self.hosts.add(host)
        svc = service_of_host(self.store, host)
        number = (destination.get("port") or {}).get("number")
        tcp_ports = [p.port for p in svc.ports if p.protocol.upper() == "TCP"] if svc else []
        if number:
            port = int(number)
        elif len(tcp_ports) == 1:
            port = tcp_ports[0]
        else:
            port = self.port
        subset = str(destination.get("subset") or "")
        name = outbound_cluster(port, host, subset)
        if svc is not None:
            suffix, rule = rule_variant(self.store, self.client, svc)
            name += suffix
            spec = rule.spec if rule is not None else {}
            if subset and destination_rule.subset_labels(spec, subset) is None:
                return name  # no such subset: the cluster does not exist (503 NC)
            self._hash[name] = destination_rule.route_hash_policy(
                spec, int(number) if number else None, subset
            )
        return name

    def hash_policy(self, cluster: str) -> list[dict[str, Any]]:
        return self._hash.get(cluster, [])


def destination_cluster(
    store: MeshStore,
    client: Client,
    destination: Mapping[str, Any],
    vs: IstioResource,
    listener_port: int,
) -> str:
    """The cluster a route of VS sends CLIENT's requests to DESTINATION by (as in the mesh's
    route tables): a gateway's routes name the same clusters its sidecar-form config has."""
    return _Resolver(store, client_class(client), listener_port).cluster(destination, vs)


def _default_route(resolver: _Resolver, target: ServiceTarget) -> dict[str, Any]:
    """Every request to the service port's own cluster, with Istio's default retries."""
    cluster = resolver.cluster({}, None, target.host)
    action: dict[str, Any] = {
        "cluster": cluster,
        "timeout": "0s",
        "retry_policy": default_retry_policy(),
    }
    if hashing := resolver.hash_policy(cluster):
        action["hash_policy"] = hashing
    return {"name": "default", "match": {"prefix": "/"}, "route": action}


@dataclass(frozen=True)
class PortRoutes:
    """A service port's route table and what it was made from."""

    table: RouteConfiguration
    virtual_services: tuple[str, ...]  # keys of the VirtualServices in it
    hosts: frozenset[str]  # destination hosts it names


def _client_routes(
    store: MeshStore,
    index: traffic.VirtualServiceIndex,
    target: ServiceTarget,
    client: ClientClass,
) -> tuple[list[dict[str, Any]], IstioResource | None, set[str]]:
    namespace = client.namespace
    resolver = _Resolver(store, client, target.port.port)
    vs = index.binding(target.host, namespace)
    if vs is None:
        return [_default_route(resolver, target)], None, resolver.hosts

    def delegate_of(name: str, ns: str) -> IstioResource | None:
        found = index.delegate(name, ns)
        return found if found is not None and traffic.visible(found, namespace) else None

    routes = virtual_service.http_routes(
        vs,
        target.port.port,
        lambda destination: resolver.cluster(destination, vs),
        resolver.hash_policy,
        delegate_of,
    )
    return routes, vs, resolver.hosts


def _caller_in(namespaces: Sequence[str]) -> dict[str, Any]:
    """A route match on the calling pod's namespace (from the SPIFFE ID its listener stamped)."""
    alternatives = "|".join(sorted(namespaces))
    return {
        "key": internal.CALLER_KEY,
        "string_match": {"safe_regex": {"regex": f"^spiffe://[^/]+/ns/({alternatives})/sa/[^/]+$"}},
    }


def _caller_is(namespace: str, service_account: str) -> dict[str, Any]:
    """A route match on the calling pod's namespace and service account."""
    account = re.escape(service_account)
    return {
        "key": internal.CALLER_KEY,
        "string_match": {"safe_regex": {"regex": f"^spiffe://[^/]+/ns/{namespace}/sa/{account}$"}},
    }


def _guards(
    views: Sequence[tuple[Any, list[ClientClass]]],
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """VIEWS (what each group of client classes sees) in the order a caller tries them, each
    with its filter-state guard: first a copy per class of a namespace whose classes do not all
    see the same (namespace and labels guard, more labels first), then the namespace views
    (``_caller_in``)."""
    view_of: dict[str, set[int]] = {}
    for i, (_, members) in enumerate(views):
        for member in members:
            view_of.setdefault(member.namespace, set()).add(i)
    split = {ns for ns, seen in view_of.items() if len(seen) > 1}
    by_class: list[tuple[ClientClass, Any]] = []
    plain: list[tuple[Any, list[str]]] = []
    for content, members in views:
        namespaces = sorted(
            {m.namespace for m in members if m.namespace not in split or not m.selected}
        )
        if namespaces:
            plain.append((content, namespaces))
        by_class += [(m, content) for m in members if m.namespace in split and m.selected]
    out: list[tuple[Any, list[dict[str, Any]]]] = []
    # A class refused a credential is its service account's pods of those labels: before the
    # class of the same labels, which its pods match too.
    order = sorted(by_class, key=lambda c: (not c[0].unauthorized, -len(c[0].selected), c[0]))
    for member, content in order:
        where = f"workloadSelector of {member.namespace}"
        labels = virtual_service.labels_matcher(dict(member.selected), where)
        caller = (
            _caller_is(member.namespace, member.unauthorized)
            if member.unauthorized
            else _caller_in([member.namespace])
        )
        out.append((content, [caller, labels]))
    out += [
        (content, [_caller_in(namespaces)])
        for content, namespaces in sorted(plain, key=lambda v: v[1])
    ]
    return out


def _mirrored_via_listener(route: dict[str, Any]) -> dict[str, Any]:
    action = route.get("route")
    if not action or not action.get("request_mirror_policies"):
        return route
    policies = [mirror.via_mirror_listener(p) for p in action["request_mirror_policies"]]
    return {**route, "route": {**action, "request_mirror_policies": policies}}


def port_routes(
    store: MeshStore,
    index: traffic.VirtualServiceIndex,
    target: ServiceTarget,
    clients: Sequence[Client],
    node: bool = True,
) -> PortRoutes:
    """The route table ``outbound|<port>||<host>`` every local caller of TARGET uses (CLIENTS:
    the local client classes, or namespaces). NODE: the node Envoy's, whose mirror copies go
    through the ``mirror`` listener (mirror.py); the sidecar form's Envoy sends them itself."""
    views: dict[str, tuple[list[dict[str, Any]], list[ClientClass]]] = {}
    used: set[str] = set()
    hosts: set[str] = set()
    for client in sorted({client_class(c) for c in clients or (CANONICAL,)}):
        routes, vs, named = _client_routes(store, index, target, client)
        hosts |= named
        if vs is not None:
            used.add(vs.key)
        key = json.dumps(routes, sort_keys=True)
        views.setdefault(key, (routes, []))[1].append(client)
    if len(views) == 1:
        routes = next(iter(views.values()))[0]
    else:
        routes = []
        for view_routes, guards in _guards(list(views.values())):
            for route in view_routes:
                match = dict(route["match"])
                match["filter_state"] = [*guards, *match.get("filter_state", [])]
                routes.append({**route, "match": match})
    if node:
        routes = [_mirrored_via_listener(route) for route in routes]
    extra: dict[str, Any] = {}
    entry = target.service.entry
    if entry is None or entry.location == "MESH_INTERNAL":
        # The caller's side, for the destination node's metrics (istio_stats.py); not to hosts
        # outside the mesh. (None in the sidecar form: nothing stamps it, and Envoy adds no
        # header whose value is empty.)
        extra["request_headers_to_add"] = istio_stats.peer_headers()
    table = message(
        RouteConfiguration,
        {
            "name": target.cluster,
            "validate_clusters": False,
            **extra,
            "virtual_hosts": [
                {"name": f"{target.host}:{target.port.port}", "domains": ["*"], "routes": routes}
            ],
        },
    )
    return PortRoutes(table, tuple(sorted(used)), frozenset(hosts))


@dataclass(frozen=True)
class PortTcpRoute:
    """A TCP (or TLS) service port's destination by its VirtualService's ``tcp`` (``tls``)
    rules. ROUTE: where every connection goes (tcp_proxy ``cluster`` or ``weighted_clusters``;
    None: the port's own cluster). RULES, when the caller or the SNI decides: the port's routes
    listener's rules (l4_routes.py), in order, the last one taking what is left."""

    route: dict[str, Any] | None
    virtual_services: tuple[str, ...]
    hosts: frozenset[str]
    rules: tuple[virtual_service.L4Rule, ...] = ()


def _tcp_view(rules: list[virtual_service.L4Rule], own: dict[str, Any]) -> list[Any]:
    """Istio's TCP chains for one caller: the first rule that holds, else the port's cluster."""
    if not rules or rules[-1].when:
        rules = [*rules, virtual_service.L4Rule((), own)]
    return rules


def _tls_view(rules: list[virtual_service.L4Rule], own: dict[str, Any]) -> list[Any]:
    """Istio's TLS chains for one caller (buildSidecarOutboundTLSFilterChainOpts): a caller
    for which some tls[] match holds gets that rule's chains by SNI and no other chain, so a
    connection with another SNI finds none and is closed; any other caller gets the port's own
    cluster whatever the SNI."""
    if not rules:
        return [virtual_service.L4Rule((), own)]
    sources = [alt[1:] for rule in rules for alt in rule.when]  # each alternative but its SNI
    if any(not callers for callers in sources):
        return [*rules, virtual_service.L4Rule((), None)]
    return [*rules, virtual_service.L4Rule(tuple(sources), None), virtual_service.L4Rule((), own)]


def _guarded(
    rule: virtual_service.L4Rule, guards: Sequence[dict[str, Any]]
) -> virtual_service.L4Rule:
    conditions = [virtual_service.Condition(g["key"], (g["string_match"],)) for g in guards]
    when = rule.when or ((),)
    return virtual_service.L4Rule(tuple((*conditions, *alt) for alt in when), rule.route)


def port_tcp_route(
    store: MeshStore,
    index: traffic.VirtualServiceIndex,
    target: ServiceTarget,
    clients: Sequence[Client],
) -> PortTcpRoute:
    """TARGET's TCP routing as each local client class sees it. Classes that see the same
    rules form a view; several views are told apart by the caller's SPIFFE ID and labels (the
    last view's rules need no guard: the views before it took their callers, and a caller of a
    namespace without a view yet falls to it), as for HTTP routes (``port_routes``)."""
    views: dict[str, tuple[list[virtual_service.L4Rule], list[ClientClass]]] = {}
    hosts: set[str] = set()
    used: set[str] = set()
    for client in sorted({client_class(c) for c in clients or (CANONICAL,)}):
        namespace = client.namespace
        resolver = _Resolver(store, client, target.port.port)
        # The port's own cluster as this class sees it (a DestinationRule variant's).
        own = {"cluster": resolver.cluster({}, None, target.host)}
        vs = index.binding(target.host, namespace)
        rules = [virtual_service.L4Rule((), own)]
        if vs is not None:
            used.add(vs.key)
            cluster_of = partial(resolver.cluster, vs=vs)
            port, vip = target.port.port, target.service.cluster_ip
            if is_tls(target.protocol):
                rules = _tls_view(virtual_service.tls_rules(vs, port, cluster_of, vip), own)
            else:
                rules = _tcp_view(virtual_service.tcp_rules(vs, port, cluster_of, vip), own)
        hosts |= resolver.hosts
        key = json.dumps([dataclasses.asdict(rule) for rule in rules], sort_keys=True)
        views.setdefault(key, (rules, []))[1].append(client)
    ordered = _guards(list(views.values()))
    if len(ordered) == 1 and len(ordered[0][0]) == 1:
        route = ordered[0][0][0].route
        mine = route == {"cluster": target.cluster}
        return PortTcpRoute(None if mine else route, tuple(sorted(used)), frozenset(hosts))
    combined: list[virtual_service.L4Rule] = []
    for rules, guards in ordered[:-1]:
        combined += [_guarded(rule, guards) for rule in rules]
    combined += ordered[-1][0]
    return PortTcpRoute(None, tuple(sorted(used)), frozenset(hosts), tuple(combined))
