"""MeshStore + the node's captured pods -> the node Envoy's resources (pure: no I/O).

Per local pod: its two listeners. Per local identity (service account with a pod here): the
clusters and routes its pods use, which present that identity's certificate (mTLS). Shared by
everyone: endpoints. Nothing is generated for pods on other nodes, and only local identities'
secrets are included.

The sidecar form (``sidecar=True``, the sidecar model of the benchmarks): exactly one pod, whose
own Envoy runs inside its netns. The same clusters, routes, endpoints and TLS, but listeners bound
plainly where that Envoy runs, no netns stamp or upstream bind override (nor mark: the capture
rules skip the proxy's uid), inbound delivery from 127.0.0.6 as Istio's sidecars do, and only
that pod's identity among the secrets.

One bad object stays contained: an error while translating one Service or one pod drops that
object's resources only (named in ``Translation.problems``), and objects the caller excludes
(``excluded``: e.g. ones Envoy rejected) are left out. A left-out Service's VIP:port goes to the
black hole, not through the passthrough: its traffic fails closed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from nodeagent.mesh import policy
from nodeagent.mesh.membership import DEFAULT_EXCLUDED_NAMESPACES, decide
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import envoy, tls
from nodeagent.translate.listeners import (
    blackhole_chain,
    has_vip,
    inbound_listener,
    inbound_name,
    outbound_chain,
    outbound_listener,
    outbound_name,
)
from nodeagent.translate.protocol import HTTP2, is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    Identity,
    ServiceTarget,
    blackhole_cluster,
    endpoint_pods,
    inbound_cluster,
    inbound_ports_of,
    inbound_route,
    load_assignment,
    original_dst_cluster,
    outbound_route,
    service_cluster,
    targets,
)

log = logging.getLogger("nodeagent.translate")

Resources = dict[str, dict[str, Message]]

SERVICE, POD = "Service", "Pod"


@dataclass(frozen=True, order=True)
class Origin:
    """The Kubernetes object a resource (or a filter chain) was made from."""

    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"


@dataclass(frozen=True)
class LocalPod:
    """A pod on this node whose traffic is captured, and where its network namespace is."""

    pod: Pod
    netns: str

    @property
    def identity(self) -> Identity:
        return (self.pod.namespace, self.pod.service_account)


@dataclass
class Translation:
    """The resources, what each came from, and the objects that could not be translated."""

    resources: Resources
    # (type URL, resource name) -> the one object it was made from (shared ones are absent).
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    # Listener filter chain name -> the object it was made from (services' outbound chains).
    chains: dict[str, Origin] = field(default_factory=dict)
    # Objects whose translation raised, dropped from the resources: why.
    problems: dict[Origin, str] = field(default_factory=dict)

    def objects(self) -> set[Origin]:
        return set(self.origins.values()) | set(self.chains.values())


def translate(
    store: MeshStore,
    local_pods: Sequence[LocalPod],
    secrets: Sequence[Message] = (),
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
    sidecar: bool = False,
) -> Resources:
    return build(store, local_pods, secrets, excluded_namespaces, sidecar).resources


def build(
    store: MeshStore,
    local_pods: Sequence[LocalPod],
    secrets: Sequence[Message] = (),
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
    sidecar: bool = False,
    excluded: Collection[Origin] = (),
) -> Translation:
    if sidecar and len(local_pods) != 1:
        raise ValueError(f"the sidecar form is one pod's config, not {len(local_pods)} pods'")
    out: Resources = {
        envoy.CLUSTER: {},
        envoy.ENDPOINT: {},
        envoy.LISTENER: {},
        envoy.ROUTE: {},
        envoy.SECRET: {},
    }
    result = Translation(out)

    def add(type_url: str, resource: Message, origin: Origin | None = None) -> None:
        # ClusterLoadAssignments are named by their cluster; the other types have a name.
        key = "cluster_name" if type_url == envoy.ENDPOINT else "name"
        name = str(getattr(resource, key))
        out[type_url][name] = resource
        if origin is not None:
            result.origins[(type_url, name)] = origin

    def failed(origin: Origin, error: Exception) -> None:
        result.problems[origin] = f"{type(error).__name__}: {error}"
        log.error("%s left out of the node's Envoy config: %s", origin, result.problems[origin])

    trust_domain = store.mesh_config.trust_domain

    def speaks_mtls(pod_key: str, port: int) -> bool:
        """A mesh pod whose peer authentication accepts mTLS on PORT."""
        pod = store.pods.get(pod_key)
        if pod is None:
            return False
        namespace = store.namespaces.get(pod.namespace)
        if not decide(pod, namespace, excluded_namespaces).in_mesh:
            return False
        return policy.effective_mtls(store, pod.namespace, pod.labels, port) != "DISABLE"

    identities = sorted({local.identity for local in local_pods})
    served: list[ServiceTarget] = []
    dropped: list[ServiceTarget] = []  # their VIP:ports go to the black hole
    by_service: dict[Origin, list[ServiceTarget]] = {}
    for target in targets(store):
        origin = Origin(SERVICE, target.service.namespace, target.service.name)
        by_service.setdefault(origin, []).append(target)
    for origin, service_targets in by_service.items():
        if origin in excluded:
            dropped.extend(service_targets)
            continue
        made: list[tuple[str, Message]] = []
        try:
            for target in service_targets:
                made.extend(_service_resources(store, target, identities, speaks_mtls, sidecar))
                if identities and has_vip(target):  # the chain every local pod's listener holds
                    outbound_chain(target, identities[0], "", "")
        except Exception as e:  # one bad Service must not take the node's config down
            failed(origin, e)
            dropped.extend(service_targets)
            continue
        for type_url, resource in made:
            add(type_url, resource, origin)
        for target in service_targets:
            served.append(target)
            for identity in identities:
                result.chains[target.cluster_for(identity)] = origin
    add(envoy.CLUSTER, original_dst_cluster(PASSTHROUGH, sidecar=sidecar))
    add(envoy.CLUSTER, original_dst_cluster(INBOUND_PASSTHROUGH, sidecar=sidecar, inbound=True))
    add(envoy.CLUSTER, blackhole_cluster())
    served_vips = {(t.service.cluster_ip, t.port.port) for t in served}
    closed = sorted(
        {(t.service.cluster_ip, t.port.port) for t in dropped if _is_ip(t.service.cluster_ip)}
        - served_vips
    )

    outbound_policy = store.mesh_config.outbound_traffic_policy
    for local in sorted(local_pods, key=lambda p: p.pod.key):
        pod = local.pod
        origin = Origin(POD, pod.namespace, pod.name)
        if origin in excluded:
            continue
        try:
            made = _pod_resources(store, local, served, closed, outbound_policy, sidecar)
        except Exception as e:  # one bad pod must not take the others' listeners down
            failed(origin, e)
            continue
        for type_url, resource in made:
            name = str(getattr(resource, "name", ""))
            if type_url == envoy.LISTENER:
                add(type_url, resource, origin)
            elif name not in out[type_url]:  # inbound|<port>||: shared by the pods using it
                add(type_url, resource)
    mine = {tls.spiffe_id(trust_domain, *local.identity) for local in local_pods}
    for secret in secrets:
        name = str(getattr(secret, "name", ""))
        if sidecar and name != tls.ROOTCA and name not in mine:
            continue  # a sidecar holds its own pod's identity only
        add(envoy.SECRET, secret)
    return result


def _service_resources(
    store: MeshStore,
    target: ServiceTarget,
    identities: Sequence[Identity],
    speaks_mtls: Callable[[str, int], bool],
    sidecar: bool,
) -> list[tuple[str, Message]]:
    """One service port's endpoints, and its clusters and routes for each local identity."""
    trust_domain = store.mesh_config.trust_domain
    made: list[tuple[str, Message]] = [
        (envoy.ENDPOINT, load_assignment(store, target, speaks_mtls))
    ]
    sans = sorted(
        tls.spiffe_id(trust_domain, pod.namespace, pod.service_account)
        for key in endpoint_pods(store, target)
        if (pod := store.pods.get(key)) is not None
    )
    for identity in identities:
        mode = policy.destination_tls_mode(store, identity[0], target.service, target.port.port)
        cluster = service_cluster(target, identity, trust_domain, sans, mode, sidecar=sidecar)
        made.append((envoy.CLUSTER, cluster))
        if is_http(target.protocol):
            made.append((envoy.ROUTE, outbound_route(target, identity)))
    return made


def _pod_resources(
    store: MeshStore,
    local: LocalPod,
    served: Sequence[ServiceTarget],
    closed: Sequence[tuple[str, int]],
    outbound_policy: str,
    sidecar: bool,
) -> list[tuple[str, Message]]:
    """A local pod's two listeners, and the inbound clusters and routes of its HTTP ports."""
    pod = local.pod
    protocols = inbound_ports_of(store, dict(pod.labels), pod.namespace)
    modes = policy.effective_mtls_ports(store, pod.namespace, pod.labels, protocols)
    ports = {port: (protocols[port], modes[port]) for port in protocols}
    default_mode = policy.pod_default_mode(store, pod.namespace, pod.labels)
    me = tls.spiffe_id(store.mesh_config.trust_domain, *local.identity)
    netns = "" if sidecar else local.netns  # "": bound where the (sidecar) Envoy runs
    extra = [blackhole_chain(ip, port, pod.key) for ip, port in closed]
    made: list[tuple[str, Message]] = [
        (
            envoy.LISTENER,
            outbound_listener(pod, netns, served, outbound_policy, local.identity, extra),
        ),
        (envoy.LISTENER, inbound_listener(pod, netns, ports, default_mode, me)),
    ]
    for port, protocol in protocols.items():
        if is_http(protocol):
            cluster = original_dst_cluster(
                inbound_cluster(port), protocol == HTTP2, sidecar=sidecar, inbound=True
            )
            made.append((envoy.CLUSTER, cluster))
            made.append((envoy.ROUTE, inbound_route(port)))
    return made


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def pod_listener_names(namespace: str, name: str) -> tuple[str, str]:
    pod = Pod(namespace, name)
    return outbound_name(pod), inbound_name(pod)


__all__ = [
    "BLACKHOLE",
    "LocalPod",
    "Origin",
    "Resources",
    "Translation",
    "build",
    "pod_listener_names",
    "translate",
]
