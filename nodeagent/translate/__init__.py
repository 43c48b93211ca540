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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from nodeagent.mesh import policy
from nodeagent.mesh.membership import DEFAULT_EXCLUDED_NAMESPACES, decide
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import envoy, tls
from nodeagent.translate.listeners import inbound_listener, outbound_listener
from nodeagent.translate.protocol import HTTP2, is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    Identity,
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

Resources = dict[str, dict[str, Message]]


@dataclass(frozen=True)
class LocalPod:
    """A pod on this node whose traffic is captured, and where its network namespace is."""

    pod: Pod
    netns: str

    @property
    def identity(self) -> Identity:
        return (self.pod.namespace, self.pod.service_account)


def translate(
    store: MeshStore,
    local_pods: Sequence[LocalPod],
    secrets: Sequence[Message] = (),
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
    sidecar: bool = False,
) -> Resources:
    if sidecar and len(local_pods) != 1:
        raise ValueError(f"the sidecar form is one pod's config, not {len(local_pods)} pods'")
    out: Resources = {
        envoy.CLUSTER: {},
        envoy.ENDPOINT: {},
        envoy.LISTENER: {},
        envoy.ROUTE: {},
        envoy.SECRET: {},
    }

    def add(type_url: str, resource: Message) -> None:
        # ClusterLoadAssignments are named by their cluster; the other types have a name.
        key = "cluster_name" if type_url == envoy.ENDPOINT else "name"
        out[type_url][str(getattr(resource, key))] = resource

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

    service_targets = list(targets(store))
    identities = sorted({local.identity for local in local_pods})
    for target in service_targets:
        add(envoy.ENDPOINT, load_assignment(store, target, speaks_mtls))
        sans = sorted(
            tls.spiffe_id(trust_domain, pod.namespace, pod.service_account)
            for key in endpoint_pods(store, target)
            if (pod := store.pods.get(key)) is not None
        )
        for identity in identities:
            mode = policy.destination_tls_mode(store, identity[0], target.service, target.port.port)
            add(
                envoy.CLUSTER,
                service_cluster(target, identity, trust_domain, sans, mode, sidecar=sidecar),
            )
            if is_http(target.protocol):
                add(envoy.ROUTE, outbound_route(target, identity))
    add(envoy.CLUSTER, original_dst_cluster(PASSTHROUGH, sidecar=sidecar))
    add(envoy.CLUSTER, original_dst_cluster(INBOUND_PASSTHROUGH, sidecar=sidecar, inbound=True))
    add(envoy.CLUSTER, blackhole_cluster())

    outbound_policy = store.mesh_config.outbound_traffic_policy
    for local in sorted(local_pods, key=lambda p: p.pod.key):
        pod = local.pod
        protocols = inbound_ports_of(store, dict(pod.labels), pod.namespace)
        modes = policy.effective_mtls_ports(store, pod.namespace, pod.labels, protocols)
        ports = {port: (protocols[port], modes[port]) for port in protocols}
        default_mode = policy.pod_default_mode(store, pod.namespace, pod.labels)
        me = tls.spiffe_id(trust_domain, *local.identity)
        netns = "" if sidecar else local.netns  # "": bound where the (sidecar) Envoy runs
        add(
            envoy.LISTENER,
            outbound_listener(pod, netns, service_targets, outbound_policy, local.identity),
        )
        add(envoy.LISTENER, inbound_listener(pod, netns, ports, default_mode, me))
        for port, protocol in protocols.items():
            if is_http(protocol) and inbound_cluster(port) not in out[envoy.CLUSTER]:
                cluster = original_dst_cluster(
                    inbound_cluster(port), protocol == HTTP2, sidecar=sidecar, inbound=True
                )
                add(envoy.CLUSTER, cluster)
                add(envoy.ROUTE, inbound_route(port))
    mine = {tls.spiffe_id(trust_domain, *local.identity) for local in local_pods}
    for secret in secrets:
        name = str(getattr(secret, "name", ""))
        if sidecar and name != tls.ROOTCA and name not in mine:
            continue  # a sidecar holds its own pod's identity only
        add(envoy.SECRET, secret)
    return out


__all__ = ["BLACKHOLE", "LocalPod", "Resources", "translate"]
