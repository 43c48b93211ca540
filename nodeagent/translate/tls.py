"""Istio mTLS on the node Envoy: transport sockets that present a local identity (pure).

Certificates come over SDS (same ADS stream): the secret named with a local identity's SPIFFE ID
holds its certificate and key, ``ROOTCA`` the mesh root. Clients verify servers against the root
and the service's expected identities (secure naming); servers require a client certificate from
the root on mTLS chains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeagent.translate.envoy import typed

ROOTCA = "ROOTCA"
TLS_MODE_KEY = "envoy.transport_socket_match"  # endpoint metadata that selects mTLS (Istio's)
ISTIO_ALPN = ["istio-peer-exchange", "istio"]  # what our clients offer on mTLS (Istio's TCP ALPN)
# Every ALPN an Istio client offers on mesh mTLS (Istio's allIstioMtlsALPNs, pilot/pkg/networking/
# core/listener.go): servers take TLS as mesh mTLS only with one of these (PERMISSIVE).
MTLS_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def _common(identity: str, peer_sans: Iterable[str] = (), san_prefix: str = "") -> dict[str, Any]:
    sans = [{"san_type": "URI", "matcher": {"exact": san}} for san in sorted(set(peer_sans))]
    if san_prefix:
        sans.append({"san_type": "URI", "matcher": {"prefix": san_prefix}})
    return {
        "tls_certificate_sds_secret_configs": [sds(identity)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": sans},
            "validation_context_sds_secret_config": sds(ROOTCA),
        },
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
    }


def upstream_mtls(
    identity: str, server_sans: Iterable[str], sni: str, san_prefix: str = ""
) -> dict[str, Any]:
    """Client side: present IDENTITY, accept only servers from the root with SERVER_SANS (or,
    with SAN_PREFIX, any SAN under it: the exact one then comes per connection from the filter
    state ``envoy.network.upstream_subject_alt_names``, as SNI from
    ``envoy.network.upstream_server_name``)."""
    common = _common(identity, server_sans, san_prefix)
    common["alpn_protocols"] = ISTIO_ALPN
    return upstream_tls(common, sni)


def upstream_tls(common: dict[str, Any], sni: str = "") -> dict[str, Any]:
    """A client-side TLS transport socket with the CommonTlsContext COMMON, sending SNI."""
    context: dict[str, Any] = {"common_tls_context": common}
    if sni:
        context["sni"] = sni
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context
        ),
    }


def no_identity(validate: bool = True) -> dict[str, Any]:
    """Client side without a certificate: a mesh server (which requires one) refuses it.
    VALIDATE: check the server against ROOTCA too (over SDS: a cluster using it warms until
    ROOTCA arrives, so the node's cluster for no caller at all leaves it out)."""
    common: dict[str, Any] = {"alpn_protocols": ISTIO_ALPN}
    if validate:
        common["validation_context_sds_secret_config"] = sds(ROOTCA)
    return upstream_tls(common)


def refuse_all() -> dict[str, Any]:
    """Client side that no server passes: its certificate must hash to all zeroes."""
    validation = {"verify_certificate_hash": ["00" * 32]}
    return upstream_tls({"validation_context": validation})


def plaintext() -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": typed("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
    }


def auto_mtls_matches(identity: str, server_sans: Iterable[str], sni: str) -> list[dict[str, Any]]:
    """Istio's auto mTLS: mTLS to endpoints marked ``tlsMode: istio``, plaintext to the rest."""
    return [
        {
            "name": "tlsMode-istio",
            "match": {"tlsMode": "istio"},
            "transport_socket": upstream_mtls(identity, server_sans, sni),
        },
        {"name": "tlsMode-disabled", "match": {}, "transport_socket": plaintext()},
    ]


def downstream_mtls(identity: str) -> dict[str, Any]:
    """Server side: present the pod's IDENTITY, require a client certificate from the root."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context=_common(identity),
            require_client_certificate=True,
        ),
    }


def deny_all(stat_prefix: str) -> dict[str, Any]:
    """A network filter refusing every connection (plaintext on a STRICT port)."""
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": typed(
            "envoy.extensions.filters.network.rbac.v3.RBAC",
            stat_prefix=stat_prefix,
            rules={"action": "ALLOW", "policies": {}},
        ),
    }


def outbound_sni(port: int, host: str) -> str:
    return f"outbound_.{port}_._.{host}"
