"""The node Envoy's internal plumbing: what makes a pod's config O(1) (pure).

A captured pod's outbound listener holds no service at all. It stamps who is calling (its netns,
its SPIFFE ID, its name) into filter state and hands every connection to ONE internal listener,
``outbound-internal``, which holds one filter chain per service port and the identity-free
clusters and routes behind them. A mesh endpoint is reached through a second internal listener,
``originate``, whose one cluster, ``originate-mtls``, connects from the caller's netns with the
caller's certificate, chosen per connection by a matcher on the stamped identity. So a pod costs
its own listeners, an identity one TLS socket, a service port one chain, cluster and route:
nothing grows with pods x services or identities x services (docs/o1-config.md).

The same-node fast path: an endpoint that is a local pod is an internal address of that pod's
``inboundInternal/<ns>/<pod>`` listener instead of ``originate``. Its chains do what the pod's
inbound listener does after the mTLS handshake (PeerAuthentication per port, the caller's
identity to the app in x-forwarded-client-cert, delivery from the pod's netns), with the caller's
identity taken from the filter state its own outbound listener stamped: no TLS inside one Envoy.
Only this Envoy's clusters can reach an internal listener, so that identity cannot be forged.

Envoy features this relies on (Envoy 1.40):
- internal listeners and ``envoy_internal_address`` endpoints (bootstrap extension
  ``envoy.bootstrap.internal_listener``; docs configuration/other_features/internal_listener);
- ``envoy.transport_sockets.internal_upstream``: filter state shared with the upstream crosses
  into the internal listener's connection, and ``passthrough_metadata`` copies endpoint (HOST)
  and cluster metadata into its dynamic metadata
  (api-v3/extensions/transport_sockets/internal_upstream/v3/internal_upstream.proto);
- the original_dst listener filter on an internal listener restores the destination from the
  dynamic metadata ``envoy.filters.listener.original_dst`` ``local`` or from the filter state
  ``envoy.filters.listener.original_dst.local_ip`` (configuration/listeners/listener_filters/
  original_dst_filter, "Internal listeners"), as Istio's waypoint does;
- well-known filter state ``envoy.network.upstream_server_name`` and
  ``envoy.network.upstream_subject_alt_names``: SNI and the SAN to verify, per connection
  (configuration/advanced/well_known_filter_state);
- ``Cluster.transport_socket_matcher`` with the transport socket ``FilterStateInput`` (1.37+):
  the certificate is picked per connection inside one cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from nodeagent.translate import tls
from nodeagent.translate.envoy import Cluster, Listener, message, typed
from nodeagent.translate.filters import (
    NETNS_FACTORY,
    NETNS_KEY,
    ORIGINAL_DST_FILTER,
    set_filter_state,
    state_value,
    tcp_proxy,
)

OUTBOUND_INTERNAL = "outbound-internal"  # listener and cluster: every service port's chain
ORIGINATE = "originate"  # listener: mesh endpoints, with the caller's certificate
ORIGINATE_CLUSTER = "originate-mtls"
# listener and cluster: endpoints of a cluster whose DestinationRule says tls SIMPLE or MUTUAL
# (the app terminates TLS; client_tls.py), one transport socket per distinct setting.
ORIGINATE_TLS = "originate-tls"
FAST_PREFIX = "inboundInternal"  # a local pod's fast-path listener: inboundInternal/<ns>/<pod>
CONNECT_TIMEOUT = "10s"

# Filter state stamped by the pod's listener. Netns and caller are hashable: Envoy folds them
# into the upstream connection-pool key, so one pod's pooled connection never carries another's
# request (see filters.NETNS_FACTORY). TRANSITIVE: they must reach originate, two hops away.
CALLER_KEY = "io.nodeagent.caller"  # the calling pod's SPIFFE ID
POD_KEY = "io.nodeagent.pod"  # namespace/name of the calling pod, for access logs
SOURCE_KEY = "io.nodeagent.source"  # the calling pod's IP (x-forwarded-for on the fast path)
CALLEE_KEY = "io.nodeagent.callee"  # set on the fast path: the called pod's SPIFFE ID
TLS_KEY = "io.nodeagent.tls"  # set in originate: the endpoint's tlsMode (auto mTLS)
SERVICE_KEY = "io.nodeagent.service"  # set in originate: the service port's cluster name
TLS_SOCKET_KEY = "io.nodeagent.tls_socket"  # set in originate-tls: the cluster's socket name
# The calling pod's labels (``labels_value``): a VirtualService match's sourceLabels is a route
# matcher on it (translate/virtual_service.py), as the caller's SPIFFE ID is for sourceNamespace.
LABELS_KEY = "io.nodeagent.labels"
POD_FORMAT = f"%FILTER_STATE({POD_KEY}:PLAIN)%"
LOG_CLASS_KEY = "io.nodeagent.log"  # the calling pod's access log class (access_logs.py)
STRING = "envoy.string"  # factory of our own keys' values

ORIGINAL_DST_META = "envoy.filters.listener.original_dst"  # endpoint metadata {local: ip:port}
ENDPOINT_META = "nodeagent"  # endpoint metadata {sans: the endpoint's SPIFFE ID}
CLUSTER_META = "nodeagent.service"  # cluster metadata {sni, name; tls_socket, tls_sni}

# transport_socket_matches of originate-mtls besides one per identity (named by its SPIFFE ID;
# stats with "spiffe://" in their name are never created, see envoy/bootstrap.py).
PLAINTEXT, NO_IDENTITY = "plaintext", "no-identity"
_FILTER_STATE_INPUT = "envoy.extensions.matching.common_inputs.transport_socket.v3.FilterStateInput"
_SOCKET_ACTION = (
    "envoy.extensions.matching.common_inputs.transport_socket.v3.TransportSocketNameAction"
)


def internal_address(listener: str, endpoint_id: str = "") -> dict[str, Any]:
    """An endpoint that is an internal listener. ENDPOINT_ID (endpoint_id()) keeps endpoints of one
    listener apart in load balancing and connection pools."""
    address: dict[str, Any] = {"server_listener_name": listener}
    if endpoint_id:
        address["endpoint_id"] = endpoint_id
    return {"envoy_internal_address": address}


def endpoint_id(where: str, spiffe: str | None) -> str:
    """The internal endpoint's id: its "ip:port", and a digest of the identity it is verified
    against. Envoy keys a host, and so its pooled connections, by address; the SANs are metadata,
    which Envoy updates in place. Without the digest, connections verified (or plaintext) under
    the endpoint's old identity would keep serving after its identity changed (a WorkloadEntry's
    serviceAccount, a pod turning mTLS on); with it the changed endpoint is a new host and the
    old one's pools drain, as a cluster's do at Istio when its SANs change."""
    if not spiffe:
        return where
    return f"{where}#{hashlib.sha256(spiffe.encode()).hexdigest()[:8]}"


def endpoint_where(endpoint_id: str) -> str:
    """The "ip:port" an internal endpoint stands for (its id without the identity digest)."""
    return endpoint_id.partition("#")[0]


def internal_upstream(
    host_metadata: Sequence[str] = (), cluster_metadata: Sequence[str] = ()
) -> dict[str, Any]:
    """The transport socket of every cluster that reaches an internal listener: it carries the
    filter state shared with the upstream, and the named metadata, across."""
    passthrough = [{"kind": {"host": {}}, "name": name} for name in host_metadata]
    passthrough += [{"kind": {"cluster": {}}, "name": name} for name in cluster_metadata]
    return {
        "name": "envoy.transport_sockets.internal_upstream",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            passthrough_metadata=passthrough,
            transport_socket=tls.plaintext(),
        ),
    }


def internal_cluster(listener: str) -> Cluster:
    """A cluster whose one endpoint is the internal LISTENER (named like it)."""
    return message(
        Cluster,
        {
            "name": listener,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": {
                "cluster_name": listener,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": internal_address(listener)}}]}
                ],
            },
            "transport_socket": internal_upstream(),
        },
    )


def fast_name(namespace: str, name: str) -> str:
    """The fast-path listener of the local pod NAMESPACE/NAME."""
    return f"{FAST_PREFIX}/{namespace}/{name}"


def labels_value(labels: Mapping[str, str]) -> str:
    """LABELS as one string, ",k1=v1,k2=v2," with keys sorted: every pair sits between commas, so
    one regex finds a selector's pairs in order (label keys and values hold no "," or "=")."""
    return "," + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + ","


def stamp_caller(
    netns: str,
    spiffe: str,
    pod: str,
    source: str = "",
    labels: Mapping[str, str] | None = None,
    peer: Mapping[str, str] | None = None,
    log_class: str = "",
    extra: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The pod listener's filter: who calls (kept across every internal hop: its netns, SPIFFE
    ID, name, IP SOURCE and LABELS), where it was going (for outbound-internal's original_dst;
    kept across every hop too: a DestinationRule PASSTHROUGH cluster's endpoint, originate, has
    no address of its own and restores this one, see passthrough.py; an endpoint's own metadata
    wins over it everywhere else) and where from (one hop). PEER: the caller's side in Istio's
    metrics (filter state key -> value, istio_stats.stamp), kept across every hop too; LOG_CLASS:
    its access log class (access_logs.py); EXTRA: more entries (the pod's span tags,
    translate/tracing.py)."""
    who = [
        state_value(NETNS_KEY, netns, "TRANSITIVE", NETNS_FACTORY),
        state_value(CALLER_KEY, spiffe, "TRANSITIVE", NETNS_FACTORY),
        state_value(POD_KEY, pod, "TRANSITIVE", STRING),
        state_value(LABELS_KEY, labels_value(labels or {}), "TRANSITIVE", STRING),
    ]
    who += [state_value(k, v, "TRANSITIVE", STRING) for k, v in (peer or {}).items()]
    if source:
        who.append(state_value(SOURCE_KEY, source, "TRANSITIVE", STRING))
    if log_class:  # its access log class, which shared chains' loggers filter on (access_logs.py)
        who.append(state_value(LOG_CLASS_KEY, log_class, "TRANSITIVE", STRING))
    who += extra
    return set_filter_state(
        *who,
        # Hashable (Network::AddressObject): pooled connections stay apart per destination.
        state_value(f"{ORIGINAL_DST_META}.local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%", "TRANSITIVE"),
        state_value(f"{ORIGINAL_DST_META}.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", "ONCE"),
    )


def stamp_callee(netns: str, spiffe: str) -> dict[str, Any]:
    """A fast-path chain's filter: the delivery socket is made in the called pod's NETNS (this
    overrides the caller's netns, inherited TRANSITIVE), and the app is told who it is
    (SPIFFE, the By= of x-forwarded-client-cert). Neither goes further."""
    return set_filter_state(
        state_value(NETNS_KEY, netns, "ONCE", NETNS_FACTORY),
        state_value(CALLEE_KEY, spiffe, "NONE", STRING),
    )


def originate_listener() -> Listener:
    """Restores the endpoint's address from its metadata, states the SNI and the SAN to verify
    (the chosen endpoint's own identity), and proxies to originate-mtls."""
    stamp = set_filter_state(
        state_value(
            "envoy.network.upstream_server_name", f"%DYNAMIC_METADATA({CLUSTER_META}:sni)%", "ONCE"
        ),
        state_value(
            "envoy.network.upstream_subject_alt_names",
            f"%DYNAMIC_METADATA({ENDPOINT_META}:sans)%",
            "ONCE",
        ),
        state_value(TLS_KEY, f"%DYNAMIC_METADATA({tls.TLS_MODE_KEY}:tlsMode)%", "ONCE", STRING),
        state_value(SERVICE_KEY, f"%DYNAMIC_METADATA({CLUSTER_META}:name)%", "ONCE", STRING),
    )
    return message(
        Listener,
        {
            "name": ORIGINATE,
            "internal_listener": {},
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": [
                {
                    "name": ORIGINATE,
                    "filters": [
                        stamp,
                        tcp_proxy(ORIGINATE, ORIGINATE_CLUSTER, "outbound", POD_FORMAT),
                    ],
                }
            ],
        },
    )


def originate_tls_listener() -> Listener:
    """Like originate, for endpoints the node reaches with a DestinationRule's own TLS
    (SIMPLE/MUTUAL): the SNI and the socket come from the calling cluster's metadata; no mesh
    SAN (the endpoint's SPIFFE ID is not what an app's own certificate carries)."""
    stamp = set_filter_state(
        state_value(
            "envoy.network.upstream_server_name",
            f"%DYNAMIC_METADATA({CLUSTER_META}:tls_sni)%",
            "ONCE",
        ),
        state_value(
            TLS_SOCKET_KEY, f"%DYNAMIC_METADATA({CLUSTER_META}:tls_socket)%", "ONCE", STRING
        ),
    )
    return message(
        Listener,
        {
            "name": ORIGINATE_TLS,
            "internal_listener": {},
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": [
                {
                    "name": ORIGINATE_TLS,
                    "filters": [
                        stamp,
                        tcp_proxy(ORIGINATE_TLS, ORIGINATE_TLS, "outbound", POD_FORMAT),
                    ],
                }
            ],
        },
    )


def originate_tls_cluster(
    sockets: Mapping[str, dict[str, Any]], upstream_bind: dict[str, Any]
) -> Cluster:
    """Connects to the endpoint originate-tls restored, from the caller's netns, with the
    transport socket SOCKETS[name] the calling cluster names (client_tls.transport_socket), or
    PLAINTEXT (a rule whose TLS Istio drops at sidecars, see client_tls.origination).
    A name it does not know (none should reach it) gets a socket no server passes."""
    fields: dict[str, Any] = {
        "name": ORIGINATE_TLS,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "upstream_bind_config": upstream_bind,
    }
    refuse = tls.refuse_all()
    matches = [{"name": PLAINTEXT, "match": {}, "transport_socket": tls.plaintext()}]
    matches += [
        {"name": name, "match": {}, "transport_socket": socket}
        for name, socket in sorted(sockets.items())
    ]
    matches.append({"name": NO_IDENTITY, "match": {}, "transport_socket": refuse})
    table = {name: _use(name) for name in [PLAINTEXT, *sockets]}
    fields["transport_socket_matches"] = matches
    fields["transport_socket_matcher"] = _by(TLS_SOCKET_KEY, table, _use(NO_IDENTITY))["matcher"]
    return message(Cluster, fields)


def _use(socket_name: str) -> dict[str, Any]:
    return {
        "action": {"name": socket_name, "typed_config": typed(_SOCKET_ACTION, name=socket_name)}
    }


def _by(key: str, table: Mapping[str, dict[str, Any]], otherwise: dict[str, Any]) -> dict[str, Any]:
    """A matcher on the filter state KEY: exact values in TABLE, else OTHERWISE."""
    return {
        "matcher": {
            "matcher_tree": {
                "input": {"name": key, "typed_config": typed(_FILTER_STATE_INPUT, key=key)},
                # Sorted: the same table must encode to the same bytes (unchanged resources
                # are not pushed again).
                "exact_match_map": {"map": dict(sorted(table.items()))},
            },
            "on_no_match": otherwise,
        }
    }


def originate_cluster(
    identities: Sequence[str],
    overrides: Mapping[str, Mapping[str, str]],
    trust_domain: str,
    upstream_bind: dict[str, Any],
) -> Cluster:
    """Connects to the endpoint originate restored, from the caller's netns (UPSTREAM_BIND).

    The transport socket, per connection: the caller's (IDENTITIES: SPIFFE IDs of local pods)
    certificate when the endpoint speaks mTLS (its ``tlsMode`` is ``istio``: Istio's auto mTLS),
    plaintext otherwise; OVERRIDES[spiffe][service cluster] is a DestinationRule's ``tls.mode``
    that binds that caller for that service (ISTIO_MUTUAL: always mTLS, DISABLE: never). An
    unknown caller gets a TLS socket without a certificate: it cannot pass a mesh server.
    """
    matches = [
        {
            "name": spiffe,
            "match": {},
            "transport_socket": tls.upstream_mtls(
                spiffe, (), "", san_prefix=f"spiffe://{trust_domain}/"
            ),
        }
        for spiffe in identities
    ]
    fields: dict[str, Any] = {
        "name": ORIGINATE_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "upstream_bind_config": upstream_bind,
    }
    if not identities:  # no local pod: nobody to present (a matcher needs one entry at least)
        return message(Cluster, {**fields, "transport_socket": tls.no_identity(validate=False)})
    matches.append({"name": PLAINTEXT, "match": {}, "transport_socket": tls.plaintext()})
    matches.append({"name": NO_IDENTITY, "match": {}, "transport_socket": tls.no_identity()})
    by_caller: dict[str, dict[str, Any]] = {}
    for spiffe in identities:
        auto = _by(TLS_KEY, {"istio": _use(spiffe)}, _use(PLAINTEXT))
        modes = overrides.get(spiffe, {})
        by_caller[spiffe] = (
            _by(
                SERVICE_KEY,
                {
                    svc: _use(PLAINTEXT if mode == "DISABLE" else spiffe)
                    for svc, mode in modes.items()
                },
                auto,
            )
            if modes
            else auto
        )
    matcher = _by(CALLER_KEY, by_caller, _use(NO_IDENTITY))["matcher"]
    fields["transport_socket_matches"] = matches
    fields["transport_socket_matcher"] = matcher
    return message(Cluster, fields)
