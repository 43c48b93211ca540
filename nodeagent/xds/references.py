"""The names one resource makes Envoy ask for: EDS services of clusters, RDS names of listeners."""

from __future__ import annotations

from collections.abc import Iterator

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def eds_service_name(cluster: Message) -> str | None:
    """The ClusterLoadAssignment an EDS cluster subscribes to; None for other cluster types."""
    if not isinstance(cluster, cluster_pb2.Cluster):
        return None
    if cluster.WhichOneof("cluster_discovery_type") != "type":
        return None
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    service: str = cluster.eds_cluster_config.service_name or cluster.name
    return service


def route_config_names(listener: Message) -> Iterator[tuple[str, str]]:
    """(filter chain, route_config_name) for each HTTP connection manager that uses RDS."""
    if not isinstance(listener, listener_pb2.Listener):
        return
    chains = [(c.name or f"#{i}", c) for i, c in enumerate(listener.filter_chains)]
    if listener.HasField("default_filter_chain"):
        chains.append(
            (listener.default_filter_chain.name or "default", listener.default_filter_chain)
        )
    for chain_name, chain in chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != _HCM_TYPE:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(hcm)
            if hcm.WhichOneof("route_specifier") == "rds":
                yield chain_name, hcm.rds.route_config_name
