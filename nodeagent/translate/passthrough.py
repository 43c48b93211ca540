"""DestinationRule ``loadBalancer.simple: PASSTHROUGH``: a service port's cluster that connects to
the address the caller dialled, as Istio's sidecar does (pure).

Istio: PASSTHROUGH "forward[s] the connection to the original IP address requested by the caller
without doing any form of load balancing"
(istio.io/latest/docs/reference/config/networking/destination-rule/#LoadBalancerSettings-SimpleLB);
istiod makes the cluster ORIGINAL_DST / CLUSTER_PROVIDED without endpoints (istio/istio
pilot/pkg/networking/core/cluster_traffic_policy.go applyLoadBalancer). The node's service proxy
(kube-proxy) then picks the endpoint behind the service VIP, not Envoy.

On the node the cluster keeps its name (``outbound|port|subset|host``, one per service port and
subset, whatever the callers: O(1) per pod) and has one endpoint instead of EDS: the
``originate`` internal listener (``originate-tls`` for a rule's SIMPLE/MUTUAL), without the
``original_dst.local`` metadata a load-balanced endpoint carries. originate's original_dst filter
then restores the destination from the filter state ``envoy.filters.listener.original_dst.local_ip``
(Envoy reads that metadata first, the filter state otherwise: source/extensions/filters/
listener/original_dst/original_dst.cc), which the caller's own listener stamped with where the
caller was going, the VIP:port, and shares TRANSITIVE (internal.stamp_caller). originate-mtls
connects there from the caller's netns, with the caller's certificate when mTLS applies. Never
the same-node fast path: no endpoint is chosen here.

TLS, as Istio's sidecar: a DestinationRule tls mode applies as for any cluster (originate-mtls's
overrides, or originate-tls). Without one, buildAutoMtlsSettings (cluster_builder.go) turns
mTLS on unless BestEffortInferServiceMTLSMode (pilot/pkg/model/push_context.go) infers DISABLE,
and for an ORIGINAL_DST cluster applyUpstreamTLSSettings (cluster_tls.go) keeps that mTLS socket
as the cluster's only one (no per-endpoint tlsMode match: there are no endpoints). So every
connection is mTLS, to the service's service accounts, or none is: ``sends_mtls``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nodeagent.mesh import policy
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import internal, tls
from nodeagent.translate.endpoints import endpoint_pods, ip_slices, slice_port
from nodeagent.translate.service_views import SubsetCluster
from nodeagent.translate.services import ServiceTarget


def sends_mtls(
    store: MeshStore,
    target: ServiceTarget,
    subset: SubsetCluster,
    in_mesh: Callable[[str], bool],
) -> bool:
    """Whether Istio's sidecar sends mTLS on SUBSET's PASSTHROUGH cluster when no
    DestinationRule tls mode applies (BestEffortInferServiceMTLSMode, then
    buildAutoMtlsSettings):

    - when the policy it looks at says PASSTHROUGH (``subset.checks_endpoints``): no endpoint
      of the service port, or one that is not a mesh pod (IN_MESH(namespace/name): Istio's
      ``security.istio.io/tlsMode`` label, set on pods with a sidecar), is DISABLE: plaintext;
    - then the service namespace's PeerAuthentication mode (else the mesh's): DISABLE is
      plaintext; STRICT, PERMISSIVE or none (Istio falls back to PERMISSIVE) is mTLS."""
    if subset.checks_endpoints:
        found = False
        for slice_ in ip_slices(store, target.service):
            if slice_port(slice_, target.port) is None:
                continue
            for endpoint in slice_.endpoints:
                found = True
                if not endpoint.pod or not in_mesh(endpoint.pod):
                    return False
        if not found:
            return False
    return policy.pod_default_mode(store, target.service.namespace, {}) != policy.DISABLE


def server_sans(store: MeshStore, target: ServiceTarget) -> list[str]:
    """The SPIFFE IDs of the pods behind the service port: the server identities Istio accepts
    on a cluster without per-endpoint ones (the service's service accounts)."""
    trust_domain = store.mesh_config.trust_domain
    return sorted(
        {
            tls.spiffe_id(trust_domain, pod.namespace, pod.service_account)
            for key in endpoint_pods(store, target)
            if (pod := store.pods.get(key)) is not None
        }
    )


def node_assignment(
    cluster: str, mtls: bool, sans: Sequence[str], originate: str = internal.ORIGINATE
) -> dict[str, Any]:
    """The node's PASSTHROUGH CLUSTER's one endpoint: the internal listener ORIGINATE, with no
    address of its own (the caller's dialled one is restored there), marked for mTLS when MTLS
    (``sends_mtls``; a DestinationRule tls mode overrides it in originate-mtls) and with the
    server identities SANS to verify."""
    metadata: dict[str, Any] = {tls.TLS_MODE_KEY: {"tlsMode": "istio" if mtls else "disabled"}}
    if sans:
        # envoy.network.upstream_subject_alt_names takes a comma-separated list
        # (configuration/advanced/well_known_filter_state).
        metadata[internal.ENDPOINT_META] = {"sans": ",".join(sans)}
    endpoint = {
        "endpoint": {"address": internal.internal_address(originate)},
        "health_status": "HEALTHY",
        "metadata": {"filter_metadata": metadata},
    }
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [endpoint]}]}
