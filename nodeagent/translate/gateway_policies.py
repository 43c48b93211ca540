"""AuthorizationPolicy and RequestAuthentication on a gateway's Envoy (pure).

At Istio both apply to a gateway workload as to any other (istio.io/latest/docs/tasks/security/
authorization/authz-ingress/, istio.io/latest/docs/tasks/security/authentication/authn-policy/
#end-user-authentication): the gateway's HTTP connection managers get jwt_authn, then RBAC,
before the VirtualService filters and the router (istio/istio pilot/pkg/networking/core/
listener_builder.go, buildHTTPConnectionManager: authn, authz, then fault and CORS); its TCP
chains get network RBAC before tcp_proxy.

Which policies: ``nodeagent gateway`` serves Istio's own Gateway kind (networking.istio.io), so
its pod is a classic gateway (no ``gateway.networking.k8s.io/gateway-name`` label). For such a
workload istiod picks policies by selector, as for a sidecar's pod (root-namespace ones, the
gateway namespace's without a selector and those selecting the pod's labels), and ignores any
policy with ``targetRef``/``targetRefs``: those attach to Gateway API gateways and waypoints
(istio/istio pilot/pkg/model/policyattachment.go, getPolicyMatcher; the targetRef reference,
istio.io/latest/docs/reference/config/type/workload-selector/#PolicyTargetReference, "to
target a Kubernetes Gateway"). translate/authz.py ``policies_for`` and translate/jwt.py
``inbound_filters`` choose exactly so for a pod; here the pod is the gateway's own.
CUSTOM (ext_authz): the gateway's Envoy is a proxy of its own, as a sidecar is, so its ext_authz
calls the provider's service cluster ``outbound|<port>||<host>`` directly, as istiod's
LookupCluster names it for any proxy (translate/extauthz.py; ``policies_for(..., sidecar=True)``):
the gateway's upstream side holds that cluster like any other service's, mTLS with the gateway's
own identity when the provider is in the mesh, plaintext otherwise (the authz-custom task,
istio.io/latest/docs/tasks/security/authorization/authz-custom/, puts its policy on the ingress
gateway the same way). A provider cluster the gateway does not have (its service not exported to
the gateway's namespace, or not served by gateways) would fail every check, and pass it under
failOpen: instead the CUSTOM rules deny what they match, as for a provider in error (fail closed).

Not yet: a targetRef naming a classic Gateway (group networking.istio.io, in the policy's and the
Gateway's namespace), which Istio's newest source attaches to that Gateway's workloads
(policyattachment.go, attachesToClassicGateway) and its reference pages do not document yet.

The client's address: gateways run with ``use_remote_address`` and ``xff_num_trusted_hops`` =
the gateway's ``gatewayTopology.numTrustedProxies`` (mesh/gateway_topology.py), so
``remoteIpBlocks``/``remote.ip`` judge the original client a trusted load balancer named in
X-Forwarded-For, and ``ipBlocks``/``source.ip`` the connection's peer (Istio's conditions page,
istio.io/latest/docs/reference/config/security/conditions/).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nodeagent.mesh.gateway_topology import gateway_trusted_proxies
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import authz, extauthz, jwt


@dataclass(frozen=True)
class GatewayPolicies:
    """What a gateway's listeners enforce: HTTP filters before the VirtualService filters and
    the router, network filters before tcp_proxy, and the trusted proxies in front of it."""

    http_filters: Sequence[dict[str, Any]] = ()
    network_filters: Sequence[dict[str, Any]] = ()
    trusted_proxies: int = 0
    custom_error: str = ""  # why CUSTOM's rules deny instead of calling the provider


NO_POLICIES = GatewayPolicies()


def for_gateway(
    store: MeshStore, pod: Pod, clusters: Collection[str] | None = None
) -> GatewayPolicies:
    """The policies of the gateway workload POD (its namespace, labels and annotations);
    CLUSTERS: the names of the gateway's clusters, where a CUSTOM provider's must be (None: not
    checked). ValueError naming the annotation when its proxy.istio.io/config cannot be read."""
    policies = authz.policies_for(store, pod, sidecar=True)
    custom = policies.custom
    if (
        custom is not None
        and custom.provider is not None
        and clusters is not None
        and custom.target not in clusters
    ):  # fail closed (module docstring)
        error = (
            f'extension provider "{custom.provider.name}": the gateway has no cluster '
            f"{custom.target} (is {custom.host} exported to namespace {pod.namespace}?)"
        )
        policies = replace(policies, custom=extauthz.Custom(None, error=error))
    return GatewayPolicies(
        http_filters=(
            *jwt.inbound_filters(store, pod),
            *authz.chain_filters(policies, tcp=False),
        ),
        network_filters=tuple(authz.chain_filters(policies, tcp=True)),
        trusted_proxies=gateway_trusted_proxies(
            store.mesh_config.gateway_trusted_proxies, pod.annotations
        ),
        custom_error=policies.custom.error if policies.custom is not None else "",
    )


__all__ = ["NO_POLICIES", "GatewayPolicies", "for_gateway"]
