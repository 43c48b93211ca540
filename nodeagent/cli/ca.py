"""The mesh's CA service (`nodeagent ca`, a Deployment)."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command("ca")
@click.option("--in-cluster", is_flag=True, help="Use the API server as the CA's pod.")
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Use the API server this kubeconfig names.",
)
@click.option(
    "--namespace",
    default=lambda: os.environ.get("POD_NAMESPACE") or "nodeagent-system",
    show_default="$POD_NAMESPACE, else nodeagent-system",
    help="Where the signing Secrets and the root ConfigMap live.",
)
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="gRPC over TLS.")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="DNS name or IP address in the CA's TLS certificate (repeatable); default"
    " nodeagent-ca.<namespace>.svc and nodeagent-ca.<namespace>.svc.cluster.local.",
)
@click.option(
    "--mesh-config",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="MeshConfig file: its trustDomain (default cluster.local).",
)
@click.option(
    "--trusted-node-account",
    "node_accounts",
    multiple=True,
    metavar="NS/SA",
    help="May ask for identities of pods on its node (Istio CA_TRUSTED_NODE_ACCOUNTS;"
    " repeatable); default <namespace>/nodeagent.",
)
@click.option("--token-audience", default="istio-ca", show_default=True)
@click.option("--default-cert-ttl", type=float, default=86400.0, show_default=True)
@click.option(
    "--max-cert-ttl",
    type=float,
    default=90 * 86400.0,
    show_default=True,
    help="Longer requests are cut to this.",
)
@click.option(
    "--monitoring", default="0.0.0.0:15014", show_default=True, help="/metrics and /ready."
)
@click.option(
    "--reload-interval",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between reads of the signing Secrets.",
)
@click.option("--log-level", default="info", show_default=True)
def ca(
    in_cluster: bool,
    kubeconfig: Path | None,
    namespace: str,
    listen: str,
    server_names: tuple[str, ...],
    mesh_config: Path | None,
    node_accounts: tuple[str, ...],
    token_audience: str,
    default_cert_ttl: float,
    max_cert_ttl: float,
    monitoring: str,
    reload_interval: float,
    log_level: str,
) -> None:
    """Run the mesh's CA service (Istio's certificate API; the only holder of the signing key)."""
    import asyncio

    from nodeagent import logs
    from nodeagent.caservice import config as ca_config
    from nodeagent.caservice.server import run as run_ca

    if in_cluster == (kubeconfig is not None):
        raise click.UsageError("give exactly one of --in-cluster or --kubeconfig")
    try:
        config = ca_config.CAConfig(
            kubeconfig=kubeconfig,
            namespace=namespace,
            listen=ca_config.host_port(listen, "--listen"),
            server_names=server_names or ca_config.default_server_names(namespace),
            trust_domain=ca_config.trust_domain_of(mesh_config),
            trusted_node_accounts=frozenset(ca_config.node_account(a) for a in node_accounts)
            or frozenset({(namespace, ca_config.DEFAULT_NODE_ACCOUNT)}),
            token_audience=token_audience,
            default_cert_ttl=default_cert_ttl,
            max_cert_ttl=max_cert_ttl,
            monitoring=ca_config.host_port(monitoring, "--monitoring"),
            reload_interval=reload_interval,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    logs.setup(log_level)
    asyncio.run(run_ca(config))
