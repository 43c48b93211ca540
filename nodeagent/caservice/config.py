"""The CA service's settings (``nodeagent ca`` options), with Istio's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nodeagent.identity.protocol import DEFAULT_PORT, TOKEN_AUDIENCE

DEFAULT_NAMESPACE = "nodeagent-system"
DEFAULT_NODE_ACCOUNT = "nodeagent"  # the DaemonSet's ServiceAccount
SERVICE_NAME = "nodeagent-ca"  # the CA's Service, named in its server certificate
DEFAULT_CERT_TTL = 86400.0  # Istio DEFAULT_WORKLOAD_CERT_TTL (24h)
MAX_CERT_TTL = 90 * 86400.0  # Istio MAX_WORKLOAD_CERT_TTL (90 days)
MONITORING_PORT = 15014  # istiod's monitoring port
RELOAD_INTERVAL = 10.0


def default_server_names(namespace: str) -> tuple[str, ...]:
    return (f"{SERVICE_NAME}.{namespace}.svc", f"{SERVICE_NAME}.{namespace}.svc.cluster.local")


@dataclass(frozen=True)
class CAConfig:
    kubeconfig: Path | None  # None: in-cluster service account
    namespace: str = DEFAULT_NAMESPACE
    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    server_names: tuple[str, ...] = default_server_names(DEFAULT_NAMESPACE)
    trust_domain: str = "cluster.local"
    # Istio CA_TRUSTED_NODE_ACCOUNTS: (namespace, service account) allowed to impersonate.
    trusted_node_accounts: frozenset[tuple[str, str]] = frozenset(
        {(DEFAULT_NAMESPACE, DEFAULT_NODE_ACCOUNT)}
    )
    token_audience: str = TOKEN_AUDIENCE
    default_cert_ttl: float = DEFAULT_CERT_TTL
    max_cert_ttl: float = MAX_CERT_TTL
    monitoring: tuple[str, int] | None = ("0.0.0.0", MONITORING_PORT)
    reload_interval: float = RELOAD_INTERVAL


def host_port(value: str, what: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT too); ValueError naming WHAT."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def node_account(value: str) -> tuple[str, str]:
    namespace, sep, account = value.partition("/")
    if not sep or not namespace or not account or "/" in account:
        raise ValueError(
            f"--trusted-node-account: expected NAMESPACE/SERVICEACCOUNT, got {value!r}"
        )
    return namespace, account


def trust_domain_of(mesh_config: Path | None) -> str:
    """trustDomain of a MeshConfig file, read as the node agent reads it; ValueError on a bad
    file (the CA must not start under a trust domain it was not given)."""
    from nodeagent.mesh.store import MeshStore
    from nodeagent.sources.directory import MeshConfigFile

    store = MeshStore()
    if mesh_config is None:
        return store.mesh_config.trust_domain
    reader = MeshConfigFile(mesh_config, store)
    reader.scan()
    if reader.errors:
        raise ValueError("; ".join(p for ps in reader.errors.values() for p in ps))
    return store.mesh_config.trust_domain
