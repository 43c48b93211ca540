"""What is wrong with the mesh's traffic configuration, as ``istioctl analyze`` says it (pure).

A MeshStore in, findings out, each naming the Istio resource it is about and, where Istio has
one, its analyzer message code and level (istio.io/latest/docs/reference/config/analysis/;
istio/istio pkg/config/analysis/msg/messages.yaml). Checks, after Istio's analyzers in
pkg/config/analysis/analyzers/:

- IST0101 ReferencedResourceNotFound (Error): a VirtualService route or mirror whose host is no
  Service or ServiceEntry (virtualservice/destinationhosts.go), or that names a subset the
  DestinationRule for that host does not define (virtualservice/destinationrules.go; that
  route answers 503 ``NC``, cluster_not_found).
- IST0109 ConflictingMeshGatewayVirtualServiceHosts (Error): two VirtualServices of the mesh
  gateway for one host, visible in a common namespace (virtualservice/
  conflictingmeshgatewayhosts.go); says which one sidecars use: the oldest.
- IST0110 ConflictingSidecarWorkloadSelectors (Error): two Sidecars of a namespace whose
  workload selectors select one pod (sidecar/selector.go); says which one applies: the oldest.
- IST0111 MultipleSidecarsWithoutWorkloadSelectors (Error): more than one Sidecar without a
  selector in a namespace (sidecar/defaultselector.go); the oldest applies (mesh/sidecar_scope.py).
- IST0113 MTLSPolicyConflict (Error): the DestinationRule a client uses sets TLS mode DISABLE,
  SIMPLE or MUTUAL for a service port whose pods a STRICT PeerAuthentication holds to Istio mTLS
  (or ISTIO_MUTUAL where PeerAuthentication says DISABLE).
- IST0173 DestinationRuleSubsetNotSelectPods (Error): a subset whose labels select no pod of the
  host's service (destinationrule/subset.go; its routes answer 503 ``UH``).
- IST0174 UnknownDestinationRuleHost (Warning): a DestinationRule host that is no Service or
  ServiceEntry.
- no Istio code (Warning): a mesh VirtualService host that is no Service or ServiceEntry: no
  route on the node is built for it.

Hosts are resolved and VirtualServices picked as the node does it (``nodeagent.mesh.traffic``,
after Istio's sidecar): a name without a dot is a Service of the resource's own namespace; a name
with one is taken as it is; ``*.suffix`` and ``*`` are wildcards. Mesh membership is not
considered: a STRICT PeerAuthentication against a DISABLE DestinationRule is a conflict even
for pods outside the mesh today, as in Istio's analyzer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nodeagent.mesh import policy, sidecar_scope, traffic
from nodeagent.mesh.hosts import host_match, qualify
from nodeagent.mesh.model import IstioResource, Pod, Service
from nodeagent.mesh.store import MeshStore

ERROR, WARNING, INFO = "Error", "Warning", "Info"
VIRTUAL_SERVICE, DESTINATION_RULE = "VirtualService", "DestinationRule"
SERVICE_ENTRY = "ServiceEntry"
# TLS modes a client sends that a STRICT (Istio mTLS only) server refuses.
_NOT_ISTIO_MTLS = ("DISABLE", "SIMPLE", "MUTUAL")


@dataclass(frozen=True)
class Message:
    """One of Istio's analyzer messages: its code, name and level."""

    code: str
    name: str
    level: str


REFERENCED_RESOURCE_NOT_FOUND = Message("IST0101", "ReferencedResourceNotFound", ERROR)
SCHEMA_VALIDATION_ERROR = Message("IST0106", "SchemaValidationError", ERROR)
CONFLICTING_MESH_GATEWAY_HOSTS = Message(
    "IST0109", "ConflictingMeshGatewayVirtualServiceHosts", ERROR
)
CONFLICTING_SIDECAR_SELECTORS = Message("IST0110", "ConflictingSidecarWorkloadSelectors", ERROR)
MULTIPLE_DEFAULT_SIDECARS = Message("IST0111", "MultipleSidecarsWithoutWorkloadSelectors", ERROR)
MTLS_POLICY_CONFLICT = Message("IST0113", "MTLSPolicyConflict", ERROR)
SUBSET_SELECTS_NO_POD = Message("IST0173", "DestinationRuleSubsetNotSelectPods", ERROR)
UNKNOWN_DESTINATION_RULE_HOST = Message("IST0174", "UnknownDestinationRuleHost", WARNING)
# No Istio analyzer reports it (a VirtualService host may be any name for a gateway).
VIRTUAL_SERVICE_HOST_NOT_FOUND = Message("", "VirtualServiceHostNotFound", WARNING)


@dataclass(frozen=True)
class Finding:
    """One problem with one resource. FILE is where the resource came from (a directory
    source's file), filled in by whoever knows it."""

    message: Message
    kind: str
    namespace: str
    name: str
    detail: str
    file: str = ""

    @property
    def level(self) -> str:
        return self.message.level

    def line(self) -> str:
        """As istioctl analyze prints one: ``Error [IST0101] (VirtualService ns/name file) ...``."""
        code = f" [{self.message.code}]" if self.message.code else ""
        name = f"{self.namespace}/{self.name}" if self.namespace else self.name
        where = " ".join(part for part in (self.kind, name, self.file) if part)
        return f"{self.level}{code} ({where}) {self.detail}"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        message = out.pop("message")
        return {"level": self.level, "code": message["code"], "message": message["name"], **out}


def fails(findings: Sequence[Finding]) -> bool:
    """True when a finding is at warning or error level (``nodeagent analyze`` exits 1)."""
    return any(f.level in (ERROR, WARNING) for f in findings)


def analyze(store: MeshStore) -> list[Finding]:
    """Every finding about the store's VirtualServices and DestinationRules, sorted by
    resource, then code."""
    hosts = _Hosts(store)
    findings = [
        *_virtual_service_references(store, hosts),
        *_conflicting_virtual_services(store, hosts),
        *_destination_rule_subsets(store, hosts),
        *_mtls_conflicts(store),
        *_sidecar_conflicts(store),
    ]
    return sorted(
        set(findings), key=lambda f: (f.kind, f.namespace, f.name, f.message.code, f.detail)
    )


# -- hosts ----------------------------------------------------------------------------------------


def _overlap(a: str, b: str) -> bool:
    return host_match(a, b) is not None or host_match(b, a) is not None


class _Hosts:
    """The mesh's hostnames: Services by FQDN, and the hosts ServiceEntries declare."""

    def __init__(self, store: MeshStore) -> None:
        self.domain = store.mesh_config.cluster_domain
        self.services: dict[str, Service] = {
            svc.hostname(self.domain): svc for svc in store.services.values()
        }
        self.entry_hosts: set[str] = set()
        for entry in store.istio_of_kind(SERVICE_ENTRY):
            for host in _list(entry.spec.get("hosts")):
                self.entry_hosts.add(qualify(str(host), entry.namespace, self.domain))

    def services_for(self, pattern: str) -> list[Service]:
        if not pattern.startswith("*"):
            svc = self.services.get(pattern)
            return [svc] if svc is not None else []
        return [
            svc
            for name, svc in sorted(self.services.items())
            if host_match(pattern, name) is not None
        ]

    def known(self, pattern: str) -> bool:
        """PATTERN names at least one Service or ServiceEntry host."""
        if self.services_for(pattern):
            return True
        return pattern in self.entry_hosts or any(_overlap(pattern, h) for h in self.entry_hosts)


# -- VirtualService: destinations and subsets -----------------------------------------------------


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def destinations(vs: IstioResource) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, destination) for every route and mirror destination of VS, where being the
    field path, e.g. ``http[0].route[1]`` or ``http[2].mirrors[0]``."""
    for section in ("http", "tcp", "tls"):
        for i, rule in enumerate(_list(vs.spec.get(section))):
            rule = _mapping(rule)
            for j, route in enumerate(_list(rule.get("route"))):
                dest = _mapping(_mapping(route).get("destination"))
                if dest:
                    yield f"{section}[{i}].route[{j}]", dest
            if section != "http":
                continue
            if mirror := _mapping(rule.get("mirror")):
                yield f"http[{i}].mirror", mirror
            for j, policy_ in enumerate(_list(rule.get("mirrors"))):
                dest = _mapping(_mapping(policy_).get("destination"))
                if dest:
                    yield f"http[{i}].mirrors[{j}]", dest


def _subset_names(dr: IstioResource | None) -> set[str]:
    if dr is None:
        return set()
    return {str(_mapping(s).get("name")) for s in _list(dr.spec.get("subsets"))}


def _virtual_service_references(store: MeshStore, hosts: _Hosts) -> Iterator[Finding]:
    for vs in store.istio_of_kind(VIRTUAL_SERVICE):
        for where, dest in destinations(vs):
            written = str(dest.get("host") or "")
            host = qualify(written, vs.namespace, hosts.domain)
            mirror = ".mirror" in where
            if not hosts.known(host):
                what = "mirror host" if mirror else "host"
                yield _about(
                    vs,
                    REFERENCED_RESOURCE_NOT_FOUND,
                    f'Referenced {what} not found: "{written}" ({where}; resolved as {host})',
                )
                continue
            subset = str(dest.get("subset") or "")
            services = hosts.services_for(host)
            if not subset or not services:  # a ServiceEntry host: no subset check here
                continue
            dr = policy.destination_rule_for(store, vs.namespace, services[0])
            if subset in _subset_names(dr):
                continue
            used = f"DestinationRule {dr.namespace}/{dr.name}" if dr else "no DestinationRule"
            yield _about(
                vs,
                REFERENCED_RESOURCE_NOT_FOUND,
                f'Referenced host+subset in destinationrule not found: "{written}+{subset}"'
                f" ({where}; clients in {vs.namespace} use {used} for {host}): requests routed"
                " there get 503 NC (cluster_not_found)",
            )


# -- VirtualService: two for one host -------------------------------------------------------------


def _client_namespaces(store: MeshStore) -> list[str]:
    """Every namespace the input names: where a client may call from, or a resource is
    exported to."""
    named = set(store.namespaces) | {pod.namespace for pod in store.pods.values()}
    for res in store.istio.values():
        named.add(res.namespace)
        named |= {str(ns) for ns in _list(res.spec.get("exportTo"))}
    return sorted(named - {".", "*", "~"})


def _conflicting_virtual_services(store: MeshStore, hosts: _Hosts) -> Iterator[Finding]:
    index = traffic.virtual_service_index(store)
    for vs in index.by_key.values():
        if not traffic.for_mesh(vs):
            continue
        for written in dict.fromkeys(str(h) for h in _list(vs.spec.get("hosts"))):
            host = qualify(written, vs.namespace, hosts.domain)
            if not hosts.known(host):
                yield _about(
                    vs,
                    VIRTUAL_SERVICE_HOST_NOT_FOUND,
                    f'host "{written}" (resolved as {host}) is no Service or ServiceEntry host:'
                    " no route is built for it",
                )
    by_host: defaultdict[str, list[IstioResource]] = defaultdict(list, index.exact)
    for pattern, vs in index.wildcard:  # oldest first, as index.exact's lists
        by_host[pattern].append(vs)
    namespaces = _client_namespaces(store)
    for host, group in by_host.items():
        if len(group) > 1:
            yield from _conflict(host, group, namespaces)


def _conflict(
    host: str, group: Sequence[IstioResource], namespaces: Sequence[str]
) -> Iterator[Finding]:
    """IST0109 for each of GROUP (VirtualServices naming HOST, oldest first) that a client
    namespace sees together with another: the oldest it sees is used there, as Istio's sidecar
    keeps the first virtual host for a domain (traffic.VirtualServiceIndex.binding)."""
    # vs key -> winner key -> the namespaces where that one is used over VS
    contested: dict[str, dict[str, list[str]]] = {}
    for ns in namespaces:
        seen = [vs for vs in group if traffic.visible(vs, ns)]
        if len(seen) > 1:
            for vs in seen:
                contested.setdefault(vs.key, {}).setdefault(seen[0].key, []).append(ns)
    names = ", ".join(f"{vs.namespace}/{vs.name}" for vs in group)
    for vs in group:
        if vs.key not in contested:
            continue
        parts = [
            f"clients in {_shown(where)} use "
            + ("this one" if winner == vs.key else f"{winner.split('/', 1)[1]}, not this one")
            for winner, where in contested[vs.key].items()
        ]
        yield _about(
            vs,
            CONFLICTING_MESH_GATEWAY_HOSTS,
            f"VirtualServices {names} of the mesh gateway define the same host {host}:"
            f" {'; '.join(parts)} (the oldest a client sees is used, as with Istio's sidecars;"
            " merge them into one)",
        )


def _shown(namespaces: Sequence[str]) -> str:
    return ("namespace " if len(namespaces) == 1 else "namespaces ") + ", ".join(namespaces)


# -- DestinationRule: hosts and subsets -----------------------------------------------------------


def selected_pods(store: MeshStore, service: Service, labels: Mapping[str, str]) -> list[Pod]:
    """The pods of SERVICE (its namespace, its selector) that also carry LABELS."""
    wanted = {**service.selector, **labels}
    if not service.selector:  # a service without a selector has no pods of its own
        return []
    return [
        pod
        for pod in store.pods_in(service.namespace)
        if all(pod.labels.get(k) == v for k, v in wanted.items())
    ]


def _destination_rule_subsets(store: MeshStore, hosts: _Hosts) -> Iterator[Finding]:
    for dr in store.istio_of_kind(DESTINATION_RULE):
        written = str(dr.spec.get("host") or "")
        host = qualify(written, dr.namespace, hosts.domain)
        if not hosts.known(host):
            yield _about(
                dr,
                UNKNOWN_DESTINATION_RULE_HOST,
                f'host "{written}" (resolved as {host}) is no Service or ServiceEntry host',
            )
            continue
        services = hosts.services_for(host)
        for subset in _list(dr.spec.get("subsets")):
            subset = _mapping(subset)
            labels = {str(k): str(v) for k, v in _mapping(subset.get("labels")).items()}
            if not services or any(selected_pods(store, svc, labels) for svc in services):
                continue
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
            names = ", ".join(svc.key for svc in services)
            # Deployments are not read: a directory of them alone holds no pod at all.
            empty = sorted({svc.namespace for svc in services if not store.pods_in(svc.namespace)})
            hint = f" (the input holds no pod in namespace {', '.join(empty)})" if empty else ""
            yield _about(
                dr,
                SUBSET_SELECTS_NO_POD,
                f'subset "{subset.get("name")}" (labels {shown}) selects no pod of service'
                f" {names}{hint}: requests routed to it get 503 UH (no healthy upstream)",
            )


# -- DestinationRule TLS against PeerAuthentication ----------------------------------------------


def _target_port(port: int, target: int | str) -> int:
    # A named target port would need the pods' container ports: the service port stands in.
    return target if isinstance(target, int) and target else port


def _rule_views(store: MeshStore) -> list[str]:
    """Client namespaces that, between them, see every DestinationRule a client can get
    (policy.destination_rule_for): those holding rules, those rules' exportTo names, and one
    namespace with neither (the empty name stands for all of those: they see the same)."""
    views = {""}
    for dr in store.istio_of_kind(DESTINATION_RULE):
        views.add(dr.namespace)
        views |= {str(ns) for ns in _list(dr.spec.get("exportTo"))}
    return sorted(views - {".", "*", "~"})


def _client_labels(store: MeshStore, namespace: str) -> list[dict[str, str]]:
    """Labels standing for NAMESPACE's client pods: none, and each workloadSelector of its
    DestinationRules (the pods it selects, policy.destination_rule_for)."""
    found: list[dict[str, str]] = [{}]
    for dr in policy.selector_rules(store, namespace) if namespace else []:
        selector = _mapping(_mapping(dr.spec.get("workloadSelector")).get("matchLabels"))
        found.append({str(k): str(v) for k, v in selector.items()})
    return found


def _mtls_conflicts(store: MeshStore) -> Iterator[Finding]:
    """IST0113: a DestinationRule's tls.mode (the rule's, a port's or a subset's: its own
    pods) that the PeerAuthentication of the pods it reaches refuses."""
    views = _rule_views(store)
    seen: set[tuple[str, int, str, str]] = set()
    for service in store.services.values():
        for port in service.ports:
            target = _target_port(port.port, port.target_port)
            for ns in dict.fromkeys([service.namespace, *views]):
                for labels in _client_labels(store, ns):
                    dr = policy.destination_rule_for(store, ns, service, labels)
                    if dr is None:
                        continue
                    subsets = [
                        str(_mapping(entry).get("name", ""))
                        for entry in _list(dr.spec.get("subsets"))
                    ]
                    for subset in ["", *subsets]:
                        key = (dr.key, port.port, subset, service.key)
                        if key in seen:
                            continue
                        seen.add(key)
                        finding = _mtls_conflict(
                            store, service, (port.port, target), ns, labels, dr, subset
                        )
                        if finding is not None:
                            yield finding


def _mtls_conflict(
    store: MeshStore,
    service: Service,
    ports: tuple[int, int],
    ns: str,
    labels: Mapping[str, str],
    dr: IstioResource,
    subset: str,
) -> Finding | None:
    """The IST0113 finding for calls from client pods of NS with LABELS to SERVICE's PORTS
    (service port, target port) under DR (its SUBSET's pods only, if named), or None."""
    port, target = ports
    subset_labels: Mapping[str, str] = {}
    if subset:
        entry = next(
            (
                _mapping(e)
                for e in _list(dr.spec.get("subsets"))
                if _mapping(e).get("name") == subset
            ),
            {},
        )
        subset_labels = {str(k): str(v) for k, v in _mapping(entry.get("labels")).items()}
    pods = selected_pods(store, service, subset_labels)
    if not pods:
        return None
    server = {
        pod.key: policy.effective_mtls(store, pod.namespace, pod.labels, target) for pod in pods
    }
    if policy.PERMISSIVE in server.values() and len(set(server.values())) == 1:
        return None  # PERMISSIVE accepts whatever a client sends
    mode = policy.destination_tls_mode(store, ns, service, port, subset, labels)
    if mode in _NOT_ISTIO_MTLS:
        refused = [key for key, m in server.items() if m == policy.STRICT]
        accepts = "accept only Istio mTLS (PeerAuthentication STRICT)"
    elif mode == "ISTIO_MUTUAL":
        refused = [key for key, m in server.items() if m == policy.DISABLE]
        accepts = "accept only plaintext (PeerAuthentication DISABLE)"
    else:
        return None
    if not refused:
        return None
    host = service.hostname(store.mesh_config.cluster_domain)
    what = f"{host}:{port}" + (f" subset {subset}" if subset else "")
    return _about(
        dr,
        MTLS_POLICY_CONFLICT,
        f"TLS mode {mode} for {what}, but its pods ({', '.join(sorted(refused))}) {accepts}"
        f" on port {target}: these calls fail",
    )


# -- Sidecar ------------------------------------------------------------------------------------


def _sidecar_conflicts(store: MeshStore) -> Iterator[Finding]:
    """IST0111 for a namespace's Sidecars without a selector beyond one, IST0110 for selector
    Sidecars selecting a common pod; each says which one applies (the oldest, as
    sidecar_scope.sidecar_for picks)."""
    by_namespace: defaultdict[str, list[IstioResource]] = defaultdict(list)
    for sidecar in store.istio_of_kind(sidecar_scope.SIDECAR):
        by_namespace[sidecar.namespace].append(sidecar)
    for namespace, group in sorted(by_namespace.items()):
        group.sort(key=policy.creation_order)
        plain = [sc for sc in group if not sidecar_scope.selector(sc)]
        if len(plain) > 1:
            names = ", ".join(sc.name for sc in plain)
            for sc in plain:
                used = "this one" if sc is plain[0] else f"{plain[0].name}, not this one"
                yield _about(
                    sc,
                    MULTIPLE_DEFAULT_SIDECARS,
                    f"Sidecars {names} of namespace {namespace} have no workloadSelector:"
                    f" its pods use {used} (the oldest)",
                )
        selecting = [sc for sc in group if sidecar_scope.selector(sc)]
        for pod in sorted(store.pods_in(namespace), key=lambda p: p.name):
            chosen = [sc for sc in selecting if sidecar_scope.selects(sc, pod.labels)]
            if len(chosen) < 2:
                continue
            names = ", ".join(sc.name for sc in chosen)
            for sc in chosen:
                used = "this one" if sc is chosen[0] else f"{chosen[0].name}, not this one"
                yield _about(
                    sc,
                    CONFLICTING_SIDECAR_SELECTORS,
                    f"Sidecars {names} select pod {pod.name}: it uses {used} (the oldest)",
                )


def _about(res: IstioResource, message: Message, detail: str) -> Finding:
    return Finding(message, res.kind, res.namespace, res.name, detail)


# -- resources the sources refused ---------------------------------------------------------------

# How the sources name a refused document (nodeagent.sources.directory: "<file or
# kubernetes>: document N[ items[M]]: <Kind> <namespace>/<name>: <problem>").
_REFUSED = re.compile(
    r"^(?P<source>.*?): document \d+(?: items\[\d+\])?: (?P<kind>\S+) "
    r"(?:(?P<namespace>[^/\s]+)/)?(?P<name>\S+): (?P<detail>.*)$",
    re.DOTALL,
)


def refused(problem: str, file: str = "", source: str = "") -> Finding:
    """IST0106 SchemaValidationError for a PROBLEM a source (SOURCE: a file's path, or
    "kubernetes") reported about a document it refused; a file that is no YAML at all, or a
    broken mesh config, is named without a resource."""
    match = _REFUSED.match(problem)
    if match is None:
        detail = problem.removeprefix(f"{source}: ") if source else problem
        return Finding(SCHEMA_VALIDATION_ERROR, "-", "", "", detail, file)
    return Finding(
        SCHEMA_VALIDATION_ERROR,
        match["kind"],
        match["namespace"] or "",
        match["name"],
        match["detail"],
        file,
    )
