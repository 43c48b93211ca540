"""MeshStore + the node's captured pods -> the node Envoy's resources (pure: no I/O).

What is per local pod: its two listeners. What is shared by all of them: clusters, endpoints and
routes, keyed by service (the pod's netns travels with each connection, see ``filters``). Nothing
is generated for pods on other nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import envoy
from nodeagent.translate.listeners import inbound_listener, outbound_listener
from nodeagent.translate.protocol import HTTP2, is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    blackhole_cluster,
    http_ports_of,
    inbound_cluster,
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


def translate(store: MeshStore, local_pods: Sequence[LocalPod]) -> Resources:
    out: Resources = {envoy.CLUSTER: {}, envoy.ENDPOINT: {}, envoy.LISTENER: {}, envoy.ROUTE: {}}

    def add(type_url: str, resource: Message) -> None:
        # ClusterLoadAssignments are named by their cluster; the other types have a name.
        key = "cluster_name" if type_url == envoy.ENDPOINT else "name"
        out[type_url][str(getattr(resource, key))] = resource

    service_targets = list(targets(store))
    for target in service_targets:
        add(envoy.CLUSTER, service_cluster(target))
        add(envoy.ENDPOINT, load_assignment(store, target))
        if is_http(target.protocol):
            add(envoy.ROUTE, outbound_route(target))
    add(envoy.CLUSTER, original_dst_cluster(PASSTHROUGH))
    add(envoy.CLUSTER, original_dst_cluster(INBOUND_PASSTHROUGH))
    add(envoy.CLUSTER, blackhole_cluster())

    policy = store.mesh_config.outbound_traffic_policy
    for local in sorted(local_pods, key=lambda p: p.pod.key):
        pod = local.pod
        http_ports = http_ports_of(store, dict(pod.labels), pod.namespace)
        add(envoy.LISTENER, outbound_listener(pod, local.netns, service_targets, policy))
        add(envoy.LISTENER, inbound_listener(pod, local.netns, http_ports))
        for port, protocol in http_ports.items():
            if inbound_cluster(port) not in out[envoy.CLUSTER]:
                add(envoy.CLUSTER, original_dst_cluster(inbound_cluster(port), protocol == HTTP2))
                add(envoy.ROUTE, inbound_route(port))
    return out


__all__ = ["BLACKHOLE", "LocalPod", "Resources", "translate"]
