"""What the node's Envoy holds for one pod, from its admin config dump (pure; like istioctl's).

A pod owns its two listeners; it uses every cluster and route those listeners reach (shared with
the node's other pods). Tables follow ``istioctl proxy-config``'s columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

LISTENERS = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
CLUSTERS = "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
ROUTES = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def _section(dump: dict[str, Any], type_url: str) -> dict[str, Any]:
    for config in dump.get("configs", []):
        if config.get("@type") == type_url:
            section: dict[str, Any] = config
            return section
    return {}


def pod_listeners(dump: dict[str, Any], namespace: str, pod: str) -> list[dict[str, Any]]:
    """The pod's own listeners, each followed by the node's internal listener it hands its
    connections to (outbound-internal: the service chains), shown at the pod's address."""
    suffix = f"/{namespace}/{pod}"
    listeners = [
        listener
        for entry in _section(dump, LISTENERS).get("dynamic_listeners", [])
        if (listener := (entry.get("active_state") or {}).get("listener"))
    ]
    internal = {str(x.get("name")): x for x in listeners if "internal_listener" in x}
    out = []
    for listener in listeners:
        if not str(listener.get("name", "")).endswith(suffix):
            continue
        out.append(listener)
        for chain in _chains(listener):
            kind, target = _terminal(chain)
            if kind == "Cluster" and target in internal:
                out.append({**internal.pop(target), "address": listener.get("address", {})})
    return out


def _chains(listener: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from listener.get("filter_chains", [])
    if listener.get("default_filter_chain"):
        yield listener["default_filter_chain"]


def _terminal(chain: dict[str, Any]) -> tuple[str, str]:
    """("Route", rds name) or ("Cluster", cluster) for a filter chain."""
    for f in chain.get("filters", []):
        config = f.get("typed_config", {})
        if f.get("name") == HCM:
            return "Route", str(config.get("rds", {}).get("route_config_name", ""))
        if f.get("name") == TCP_PROXY:
            return "Cluster", str(config.get("cluster", ""))
    return "", ""


def pod_routes(dump: dict[str, Any], listeners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {
        target
        for listener in listeners
        for chain in _chains(listener)
        for kind, target in [_terminal(chain)]
        if kind == "Route"
    }
    out = []
    for entry in _section(dump, ROUTES).get("dynamic_route_configs", []):
        config = entry.get("route_config", {})
        if config.get("name") in names:
            out.append(config)
    return sorted(out, key=lambda r: str(r.get("name")))


def _route_clusters(route: dict[str, Any]) -> Iterator[str]:
    for vhost in route.get("virtual_hosts", []):
        for r in vhost.get("routes", []):
            action = r.get("route", {})
            if "cluster" in action:
                yield str(action["cluster"])
            for weighted in action.get("weighted_clusters", {}).get("clusters", []):
                yield str(weighted.get("name"))
            for mirror in action.get("request_mirror_policies", []):
                yield str(mirror.get("cluster"))


def pod_clusters(
    dump: dict[str, Any], listeners: list[dict[str, Any]], routes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    names = {
        target
        for listener in listeners
        for chain in _chains(listener)
        for kind, target in [_terminal(chain)]
        if kind == "Cluster"
    }
    names |= {c for route in routes for c in _route_clusters(route)}
    out = []
    section = _section(dump, CLUSTERS)
    for key in ("static_clusters", "dynamic_active_clusters"):
        for entry in section.get(key, []):
            cluster = entry.get("cluster", {})
            if cluster.get("name") in names:
                out.append(cluster)
    return sorted(out, key=lambda c: str(c.get("name")))


def listener_rows(listeners: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("ADDRESS:PORT", "MATCH", "DESTINATION")]
    for listener in listeners:
        sock = listener.get("address", {}).get("socket_address", {})
        where = f"{sock.get('address')}:{sock.get('port_value')}"
        for chain in _chains(listener):
            match = chain.get("filter_chain_match", {})
            prefixes = ",".join(p.get("address_prefix", "") for p in match.get("prefix_ranges", []))
            port = match.get("destination_port")
            if prefixes or port:
                shown = f"{prefixes or '0.0.0.0'}:{port}" if port else prefixes
            else:
                shown = "ALL"
            if match.get("transport_protocol"):
                alpn = ", Istio ALPN" if match.get("application_protocols") else ""
                shown += f" ({match['transport_protocol']}{alpn})"
            kind, target = _terminal(chain)
            if any(f.get("name") == "envoy.filters.network.rbac" for f in chain.get("filters", [])):
                kind, target = "Refused", "plaintext on an mTLS-only port"
            rows.append((where, shown, f"{kind}: {target}" if kind else "-"))
    return rows


def cluster_rows(clusters: list[dict[str, Any]], identity: str = "") -> list[tuple[str, ...]]:
    """istioctl's columns plus the source identity the pod presents through the cluster: its
    own (IDENTITY, a SPIFFE ID), chosen per connection on the node (no cluster names one)."""
    source = identity.split("/ns/", 1)[-1].replace("/sa/", "/") if identity else ""
    rows: list[tuple[str, ...]] = [
        ("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "SOURCE IDENTITY")
    ]
    for cluster in clusters:
        name = str(cluster.get("name", ""))
        parts = name.split("|")
        ctype = str(cluster.get("type", "EDS"))
        if len(parts) == 4:
            outbound = parts[0] == "outbound"
            rows.append(
                (
                    parts[3] or "-",
                    parts[1],
                    parts[2] or "-",
                    parts[0],
                    ctype,
                    (source if outbound else "") or "-",
                )
            )
        else:
            rows.append((name, "-", "-", "-", ctype, "-"))
    return rows


def route_rows(routes: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("NAME", "VHOST NAME", "DOMAINS", "MATCH", "DESTINATION")]
    for route in routes:
        for vhost in route.get("virtual_hosts", []):
            for r in vhost.get("routes", []):
                match = r.get("match", {})
                shown = (
                    match.get("prefix")
                    or match.get("path")
                    or match.get("safe_regex", {}).get("regex", "*")
                )
                if match.get("headers"):
                    shown += " (+headers)"
                action = r.get("route", {})
                dest = action.get("cluster") or ",".join(
                    f"{w.get('name')}:{w.get('weight')}"
                    for w in action.get("weighted_clusters", {}).get("clusters", [])
                )
                if "direct_response" in r:
                    dest = f"direct {r['direct_response'].get('status')}"
                rows.append(
                    (
                        str(route.get("name")),
                        str(vhost.get("name")),
                        ",".join(vhost.get("domains", [])),
                        str(shown),
                        str(dest),
                    )
                )
    return rows


def host_address(address: dict[str, Any]) -> str:
    """ "ip:port" of an endpoint in admin output: a socket address, or the destination an
    internal address (``originate``) stands for, its endpoint_id."""
    internal = address.get("envoy_internal_address")
    if internal is not None:
        return str(internal.get("endpoint_id") or internal.get("server_listener_name", ""))
    sock = address.get("socket_address", {})
    return f"{sock.get('address')}:{sock.get('port_value')}"


def endpoint_rows(clusters_status: dict[str, Any], names: set[str]) -> list[tuple[str, ...]]:
    """From admin ``/clusters?format=json``: each endpoint of the pod's clusters and its health."""
    rows: list[tuple[str, ...]] = [("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER")]
    for status in clusters_status.get("cluster_statuses", []):
        if status.get("name") not in names:
            continue
        for host in status.get("host_statuses", []):
            health = host.get("health_status", {})
            ejected = health.get("failed_outlier_check", False)
            state = health.get("eds_health_status", "HEALTHY")
            rows.append(
                (
                    host_address(host.get("address", {})),
                    "UNHEALTHY" if ejected else str(state),
                    "FAILED" if ejected else "OK",
                    str(status.get("name")),
                )
            )
    return rows


def pod_identity(listeners: list[dict[str, Any]]) -> str:
    """The SPIFFE ID a pod presents: the SDS secret its inbound mTLS chains name."""
    for listener in listeners:
        for chain in _chains(listener):
            context = (chain.get("transport_socket") or {}).get("typed_config", {})
            common = context.get("common_tls_context", {})
            for sds in common.get("tls_certificate_sds_secret_configs", []):
                return str(sds.get("name", ""))
    return ""


def secret_rows(secrets: list[dict[str, str]], identity: str) -> list[tuple[str, ...]]:
    """The pod's certificate and the mesh root, as Envoy holds them (never key material)."""
    rows: list[tuple[str, ...]] = [
        ("RESOURCE NAME", "IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "ROOT SHA256")
    ]
    for secret in secrets:
        if secret.get("name") in (identity, "ROOTCA"):
            rows.append(
                (
                    secret.get("name", ""),
                    secret.get("identity", "") or "-",
                    secret.get("serial", ""),
                    secret.get("not_before", ""),
                    secret.get("not_after", ""),
                    secret.get("root_fingerprint", "")[:16],
                )
            )
    return rows
