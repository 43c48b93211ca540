"""Which TLS a connection gets under Istio's PeerAuthentication and DestinationRule (pure).

Server side, PeerAuthentication says what a pod accepts on a container port: STRICT (mTLS only),
PERMISSIVE (mTLS or plaintext) or DISABLE (plaintext). Client side, a DestinationRule's
``trafficPolicy.tls`` says what a client sends; without one, auto mTLS decides. Both follow istiod
(pilot's ComposePeerAuthentication and PushContext.destinationRule), with these simplifications:
the mesh's default DestinationRule exportTo is taken to be "*", and destination rule inheritance
(off by default in Istio) is not done. A DestinationRule with a ``workloadSelector`` applies to
the client pods of its own namespace it selects (``selector_labels``).

Where Istio lets the oldest object win, age comes from ``metadata.creationTimestamp`` (RFC 3339,
set by the API server; a directory source's files may carry it), else from the annotation
``nodeagent.io/creationTimestamp``; ties, and objects without either, fall back to name, then
namespace. An object without a timestamp counts as created at the dawn of time, as Istio treats a
zero creation timestamp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from nodeagent.mesh.hosts import host_match, qualify
from nodeagent.mesh.model import IstioResource, Service
from nodeagent.mesh.store import MeshStore

CREATION_TIMESTAMP_ANNOTATION = "nodeagent.io/creationTimestamp"
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
_PEER_MODES = frozenset({STRICT, PERMISSIVE, DISABLE})  # anything else (UNSET, absent) inherits
_DAWN = datetime.min.replace(tzinfo=UTC)


def creation_order(res: IstioResource) -> tuple[datetime, str, str]:
    """Sort key, oldest first: creation time, then name, then namespace (as istiod sorts)."""
    try:
        stamp = res.created or res.annotations.get(CREATION_TIMESTAMP_ANNOTATION, "")
        created = datetime.fromisoformat(stamp)
    except ValueError:
        created = _DAWN
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (created, res.name, res.namespace)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _port_number(value: object) -> int | None:
    """A port given as a number or, in YAML map keys, as a string of digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _selector(spec: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    return _mapping(_mapping(spec.get(field)).get("matchLabels"))


# -- PeerAuthentication ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerPolicy:
    """The PeerAuthentication in force for one pod: a mode, and overrides by container port."""

    mode: str
    port_modes: Mapping[int, str]

    def mode_for(self, port: int) -> str:
        return self.port_modes.get(port, self.mode)


def _peer_mode(mtls: object) -> str | None:
    """The mode an ``mtls`` block sets; None for UNSET or no block, which inherit the parent's."""
    mode = _mapping(mtls).get("mode")
    return mode if isinstance(mode, str) and mode in _PEER_MODES else None


def peer_policy(store: MeshStore, namespace: str, labels: Mapping[str, str]) -> PeerPolicy:
    """Compose the mesh, namespace and workload PeerAuthentications that apply to a pod."""
    root = store.mesh_config.root_namespace
    mesh: IstioResource | None = None
    ns_wide: IstioResource | None = None
    workload: IstioResource | None = None
    # Only the root namespace's and the pod's own can apply. Oldest first, so the first policy
    # found at each level is the one that wins there.
    candidates = store.istio_in("PeerAuthentication", root)
    if namespace != root:
        candidates += store.istio_in("PeerAuthentication", namespace)
    for pa in sorted(candidates, key=creation_order):
        selector = _selector(pa.spec, "selector")
        if not selector:  # an empty matchLabels is namespace-wide too
            if pa.namespace == root:
                mesh = mesh or pa
            elif pa.namespace == namespace:
                ns_wide = ns_wide or pa
        # Selectors are ignored in the root namespace: such a policy applies to nothing.
        elif (
            pa.namespace == namespace
            and namespace != root
            and all(labels.get(key) == value for key, value in selector.items())
        ):
            workload = workload or pa
    mode = PERMISSIVE
    for level in (mesh, ns_wide, workload):
        if level is not None:
            mode = _peer_mode(level.spec.get("mtls")) or mode
    port_modes: dict[int, str] = {}
    if workload is not None:  # istiod ignores portLevelMtls on namespace and mesh policies
        for key, mtls in _mapping(workload.spec.get("portLevelMtls")).items():
            port = _port_number(key)
            if port is not None:
                port_modes[port] = _peer_mode(mtls) or mode
    return PeerPolicy(mode, port_modes)


def effective_mtls(store: MeshStore, namespace: str, labels: Mapping[str, str], port: int) -> str:
    """STRICT, PERMISSIVE or DISABLE for traffic reaching a pod on container PORT."""
    return peer_policy(store, namespace, labels).mode_for(port)


def effective_mtls_ports(
    store: MeshStore, namespace: str, labels: Mapping[str, str], ports: Iterable[int]
) -> dict[int, str]:
    policy = peer_policy(store, namespace, labels)
    return {port: policy.mode_for(port) for port in ports}


def pod_default_mode(store: MeshStore, namespace: str, labels: Mapping[str, str]) -> str:
    """The mode for the pod's ports that have no port-level override."""
    return peer_policy(store, namespace, labels).mode


# -- DestinationRule ------------------------------------------------------------------------------


def _rule_host(dr: IstioResource, domain: str) -> str:
    """The DR's host, a short name qualified with the DR's own namespace."""
    return qualify(str(dr.spec.get("host", "")), dr.namespace, domain)


def _export_to(dr: IstioResource) -> frozenset[str]:
    raw = dr.spec.get("exportTo")
    return frozenset(str(ns) for ns in raw) if isinstance(raw, list) else frozenset()


def _private_only(dr: IstioResource) -> bool:
    export_to = _export_to(dr)
    return len(export_to) == 1 and ("." in export_to or dr.namespace in export_to)


def _visible_at_home(dr: IstioResource) -> bool:
    export_to = _export_to(dr)
    return not export_to or bool(export_to & {"*", ".", dr.namespace})


def _most_specific(
    rules: Sequence[IstioResource], hostname: str, domain: str
) -> list[IstioResource]:
    """The RULES (kept oldest first) whose host names HOSTNAME most specifically."""
    scored = [(host_match(_rule_host(dr, domain), hostname), dr) for dr in rules]
    matched = [(score, dr) for score, dr in scored if score is not None]
    if not matched:
        return []
    best = max(score for score, _ in matched)
    return [dr for score, dr in matched if score == best]


def _exported_to(group: Sequence[IstioResource], client_namespace: str) -> bool:
    # A merged host takes the exportTo of its oldest rule that has one; here "." is not the
    # client's namespace, as in istiod (a client at home already found the rule locally).
    export_to = next((e for e in map(_export_to, group) if e), frozenset())
    return not export_to or "*" in export_to or client_namespace in export_to


def _merge(group: Sequence[IstioResource]) -> IstioResource:
    """Rules for one host in one namespace act as one: the oldest, plus the subsets it lacks and,
    if it has none, the first trafficPolicy of the others."""
    first = group[0]
    if len(group) == 1:
        return first
    spec = dict(first.spec)
    subsets = list(spec.get("subsets") or [])
    names = {_mapping(s).get("name") for s in subsets}
    for dr in group[1:]:
        for subset in dr.spec.get("subsets") or []:
            if _mapping(subset).get("name") not in names:
                subsets.append(subset)
                names.add(_mapping(subset).get("name"))
        if spec.get("trafficPolicy") is None and dr.spec.get("trafficPolicy") is not None:
            spec["trafficPolicy"] = dr.spec["trafficPolicy"]
    if subsets:
        spec["subsets"] = subsets
    return replace(first, spec=spec)


def _selects(dr: IstioResource, client_namespace: str, labels: Mapping[str, str]) -> bool:
    selector = _selector(dr.spec, "workloadSelector")
    return (
        dr.namespace == client_namespace
        and bool(selector)
        and all(labels.get(key) == value for key, value in selector.items())
    )


def _pick(
    group: Sequence[IstioResource], client_namespace: str, labels: Mapping[str, str]
) -> IstioResource | None:
    """Of the rules for one host (oldest first), the one a client pod uses, as Istio's
    SidecarScope.DestinationRule picks it (pilot/pkg/model/sidecar.go): the oldest rule whose
    workloadSelector selects the pod (merged with the rules of the same selector), else the
    rules without one, else none. Istio does not look further when none applies: a client
    namespace whose rules for the host all select other pods gives its other pods no rule at
    all (istio/istio#57719, #52691)."""
    for dr in group:
        if _selects(dr, client_namespace, labels):
            same = _selector(dr.spec, "workloadSelector")
            return _merge(
                [
                    other
                    for other in group
                    if other.namespace == dr.namespace
                    and _selector(other.spec, "workloadSelector") == same
                ]
            )
    plain = [dr for dr in group if not _selector(dr.spec, "workloadSelector")]
    return _merge(plain) if plain else None


def selector_rules(store: MeshStore, namespace: str) -> list[IstioResource]:
    """NAMESPACE's DestinationRules that have a workloadSelector (they apply only there)."""
    return [
        dr
        for dr in store.istio_in("DestinationRule", namespace)
        if _selector(dr.spec, "workloadSelector")
    ]


def selector_labels(
    store: MeshStore, namespace: str, labels: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """What of a pod's LABELS the DestinationRule workloadSelectors of its NAMESPACE read: the
    union of the selectors that select it (sorted pairs). Pods with the same union are selected
    by the same rules (any selector within the union selects them all), so they see the same
    rules: ``destination_rule_for`` with these labels is theirs."""
    pairs: dict[str, str] = {}
    for dr in selector_rules(store, namespace):
        if _selects(dr, namespace, labels):
            pairs.update(
                (str(k), str(v)) for k, v in _selector(dr.spec, "workloadSelector").items()
            )
    return tuple(sorted(pairs.items()))


def destination_rule_for(
    store: MeshStore,
    client_namespace: str,
    service: Service,
    labels: Mapping[str, str] | None = None,
) -> IstioResource | None:
    """The DestinationRule a client pod in CLIENT_NAMESPACE with LABELS uses for SERVICE, as
    istiod picks it (PushContext.destinationRule, then SidecarScope.DestinationRule): the
    client's namespace, then the service's, then the root namespace; in each the most specific
    host wins (exact, then the longest wildcard), and several rules for that host merge into
    one. A rule with a workloadSelector stays in its namespace (never exported: istio/istio
    pull 37174) and applies to the pods there it selects (``_pick``); the reference page,
    istio.io/latest/docs/reference/config/networking/destination-rule/#DestinationRule:
    "workload selectors do not apply across namespace boundaries"."""
    domain = store.mesh_config.cluster_domain
    root = store.mesh_config.root_namespace
    hostname = service.hostname(domain)
    labels = labels or {}
    # Only the client's, the service's and the root namespace's rules can apply.
    candidates: dict[str, IstioResource] = {}
    for ns in (client_namespace, service.namespace, root):
        candidates.update((dr.key, dr) for dr in store.istio_in("DestinationRule", ns))
    rules = sorted(candidates.values(), key=creation_order)
    if client_namespace != root:
        local = [dr for dr in rules if dr.namespace == client_namespace and _visible_at_home(dr)]
    else:  # exported root rules are the last resort below; only private ones come first
        local = [
            dr
            for dr in rules
            if dr.namespace == root
            and (_private_only(dr) or _selector(dr.spec, "workloadSelector"))
        ]
    group = _most_specific(local, hostname, domain)
    if group:
        return _pick(group, client_namespace, labels)
    exportable = [dr for dr in rules if not _selector(dr.spec, "workloadSelector")]
    for owner in (service.namespace, root):
        exported = [dr for dr in exportable if dr.namespace == owner and not _private_only(dr)]
        group = _most_specific(exported, hostname, domain)
        # A best match hidden from the client ends this namespace's search (istiod does not
        # fall back to a less specific host there).
        if group and _exported_to(group, client_namespace):
            return _merge(group)
    return None


def destination_tls_mode(
    store: MeshStore,
    client_namespace: str,
    service: Service,
    port: int,
    subset: str = "",
    labels: Mapping[str, str] | None = None,
) -> str | None:
    """DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL for calls to SERVICE:PORT (a service port; SUBSET
    of the rule, if named) from a client pod in CLIENT_NAMESPACE with LABELS, or None when no
    DestinationRule sets TLS and auto mTLS decides."""
    dr = destination_rule_for(store, client_namespace, service, labels)
    return rule_tls_mode(dr.spec if dr is not None else {}, port, subset)


def rule_tls_mode(spec: Mapping[str, Any], port: int, subset: str = "") -> str | None:
    """The tls.mode a DestinationRule's SPEC sets for service port PORT (and SUBSET), None
    when it sets none."""
    tls = _tls_of(_mapping(spec.get("trafficPolicy")), port, None)
    if subset:  # a subset's tls replaces the rule's (destination_rule.traffic_policy merges so)
        for entry in spec.get("subsets") or []:
            if _mapping(entry).get("name") == subset:
                tls = _tls_of(_mapping(_mapping(entry).get("trafficPolicy")), port, tls)
                break
    if not isinstance(tls, Mapping):
        return None
    # DISABLE is the proto's zero value: a tls block without a mode turns TLS off.
    return str(tls.get("mode") or DISABLE)


def _tls_of(policy: Mapping[str, Any], port: int, otherwise: object) -> object:
    """The tls block a traffic POLICY sets for PORT (its portLevelSettings entry first), else
    OTHERWISE."""
    tls = policy["tls"] if policy.get("tls") is not None else otherwise
    for setting in policy.get("portLevelSettings") or []:
        if _port_number(_mapping(_mapping(setting).get("port")).get("number")) == port:
            if _mapping(setting).get("tls") is not None:  # even {}: that means DISABLE
                tls = _mapping(setting)["tls"]
            break  # the first entry for the port counts
    return tls
