"""A gateway's ``gatewayTopology.numTrustedProxies`` (Istio ProxyConfig), pure.

istio.io/latest/docs/ops/configuration/traffic-management/network-topologies/: how many
proxies in front of the gateway (load balancers) append to X-Forwarded-For; the gateway then
takes the client's address from that header, that many entries from its end. Set mesh-wide in
``meshConfig.defaultConfig.gatewayTopology`` or per gateway pod in the ``proxy.istio.io/config``
annotation, the pod's value overriding the mesh's field by field (istiod merges the ProxyConfig
messages: pkg/config/mesh/mesh.go ApplyProxyConfig). istiod puts it into every gateway HCM as
``xff_num_trusted_hops``, with ``use_remote_address`` on (pilot/pkg/networking/core/gateway.go,
buildGatewayConnectionManager), and so does translate/gateway.py: AuthorizationPolicy's
``remoteIpBlocks`` / ``remote.ip`` then judge the original client, ``ipBlocks`` the peer
(istio.io/latest/docs/tasks/security/authorization/authz-ingress/).

Only ``numTrustedProxies`` is read; the other GatewayTopology fields (forwardClientCertDetails,
proxyProtocol) are refused by name rather than ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from nodeagent.mesh.proxy_metadata import PROXY_CONFIG_ANNOTATION, pod_proxy_config

FIELD = "gatewayTopology"
KNOWN = ("numTrustedProxies",)
MAX_HOPS = 2**32 - 1  # a uint32 in Istio's ProxyConfig and Envoy's HCM


def trusted_proxies(value: object, where: str) -> int | None:
    """``numTrustedProxies`` of a gatewayTopology VALUE (None when it does not set it);
    ValueError naming WHERE for anything that is not one."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    unknown = [str(key) for key in value if key not in KNOWN]
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {KNOWN[0]})")
    hops: object = value.get("numTrustedProxies")
    if hops is None:
        return None
    if isinstance(hops, bool) or not isinstance(hops, int) or not 0 <= hops <= MAX_HOPS:
        raise ValueError(f"{where}.numTrustedProxies: expected a count of proxies, got {hops!r}")
    return hops


def gateway_trusted_proxies(mesh_default: int, annotations: Mapping[str, str]) -> int:
    """The gateway pod's numTrustedProxies: its annotation's, else MESH_DEFAULT (the mesh
    config's); ValueError naming the annotation when it is not valid."""
    config = pod_proxy_config(annotations)
    where = f"annotation {PROXY_CONFIG_ANNOTATION}: {FIELD}"
    hops = trusted_proxies(config.get(FIELD), where)
    return mesh_default if hops is None else hops
