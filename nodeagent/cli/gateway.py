"""``nodeagent gateway``: an ingress or egress gateway's Envoy and its xDS/SDS (a Deployment)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeagent.cli.options import ca_options, check_ca_options
from nodeagent.ports import ENVOY_STATS_PORT


def parse_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value...]`` (a Kubernetes equality selector) as labels."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--selector: expected key=value[,key=value...], got {part!r}")
        labels[key.strip()] = value.strip()
    if not labels:
        raise ValueError("--selector: expected at least one key=value")
    return labels


def _selector(_ctx: click.Context, _param: click.Parameter, value: str) -> dict[str, str]:
    try:
        return parse_selector(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option(
    "--selector",
    "labels",
    required=True,
    callback=_selector,
    help="This gateway's labels, key=value[,key=value]: it serves the Gateways whose selector"
    " they satisfy, e.g. istio=ingressgateway.",
)
@click.option("--namespace", required=True, envvar="POD_NAMESPACE", help="The gateway pod's.")
@click.option("--pod-name", required=True, envvar="POD_NAME", help="The gateway pod's name.")
@click.option(
    "--service-account",
    default="default",
    envvar="SERVICE_ACCOUNT",
    show_default=True,
    help="Its identity until the source shows its pod (then the pod's serviceAccountName).",
)
@click.option("--node", "node_name", default="", envvar="NODE_NAME", help="spec.nodeName.")
@click.option("--source-dir", type=click.Path(path_type=Path), default=None)
@click.option("--kubeconfig", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--in-cluster", is_flag=True, help="Watch the API server as the gateway's pod.")
@click.option("--mesh-config", type=click.Path(path_type=Path), default=None)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/run/nodeagent-gateway"),
    show_default=True,
    help="xDS socket, Envoy's bootstrap, admin socket (envoy-admin.sock) and pidfile.",
)
@click.option("--envoy-binary", type=click.Path(path_type=Path), default=None)
@click.option(
    "--envoy-log",
    type=click.Path(path_type=Path),
    default=Path("/dev/stdout"),
    show_default=True,
    help="Envoy's output, its access log included.",
)
@click.option("--stats-host", default="0.0.0.0", show_default=True)
@click.option("--stats-port", type=int, default=ENVOY_STATS_PORT, show_default=True)
@ca_options
@click.option(
    "--control-plane-namespace",
    default="",
    help="Read the mesh config and the CA's root bundle from this namespace's ConfigMaps"
    " (nodeagent-mesh, nodeagent-ca-root) into <run-dir>/mesh.yaml and <run-dir>/root-cert.pem,"
    " which --mesh-config and --ca-root-file then default to: a pod cannot mount another"
    " namespace's ConfigMaps. Needs --kubeconfig or --in-cluster.",
)
@click.option("--log-level", default="info", show_default=True)
def gateway(
    labels: dict[str, str],
    namespace: str,
    pod_name: str,
    service_account: str,
    node_name: str,
    source_dir: Path | None,
    kubeconfig: Path | None,
    in_cluster: bool,
    mesh_config: Path | None,
    run_dir: Path,
    envoy_binary: Path | None,
    envoy_log: Path,
    stats_host: str,
    stats_port: int,
    ca_dir: Path | None,
    ca_address: str | None,
    ca_root_file: Path | None,
    ca_token_file: Path | None,
    ca_server_name: str,
    cert_ttl: float,
    control_plane_namespace: str,
    log_level: str,
) -> None:
    """Run a gateway's Envoy, configured from the Gateways that select its labels."""
    import asyncio

    from nodeagent import logs
    from nodeagent.gateway.process import GatewayConfig, run
    from nodeagent.gateway.proxy import GatewaySettings

    if sum([source_dir is not None, kubeconfig is not None, in_cluster]) != 1:
        raise click.UsageError(
            "give exactly one source: --source-dir, --kubeconfig or --in-cluster"
        )
    if ca_dir is None and ca_address is None:
        raise click.UsageError(
            "a gateway's certificate must chain to the mesh's root: give --ca-address (the CA"
            " service) or --ca-dir (the mesh's plug-in CA files)"
        )
    if control_plane_namespace:
        from nodeagent.gateway.mirror import MESH_KEY, ROOT_KEY

        if source_dir is not None:
            raise click.UsageError(
                "--control-plane-namespace reads the API server, not a directory"
            )
        if mesh_config is not None or ca_root_file is not None:
            raise click.UsageError(
                "--control-plane-namespace mirrors the mesh config and the CA root itself: drop"
                " --mesh-config and --ca-root-file"
            )
        mesh_config, ca_root_file = run_dir / MESH_KEY, run_dir / ROOT_KEY
    check_ca_options(ca_dir, ca_address, ca_root_file, ca_token_file)
    logs.setup(log_level)
    settings = GatewaySettings(
        namespace=namespace,
        pod_name=pod_name,
        labels=labels,
        service_account=service_account,
        run_dir=run_dir,
        envoy_binary=envoy_binary or Path(sys.executable).parent / "envoy",
        envoy_log=envoy_log,
        stats_host=stats_host,
        stats_port=stats_port,
    )
    config = GatewayConfig(
        proxy=settings,
        node_name=node_name,
        source_dir=source_dir,
        kubeconfig=kubeconfig,
        in_cluster=in_cluster,
        mesh_config=mesh_config,
        ca_dir=ca_dir,
        ca_address=ca_address,
        ca_root_file=ca_root_file,
        ca_token_file=ca_token_file,
        ca_server_name=ca_server_name,
        cert_ttl=cert_ttl,
        control_plane_namespace=control_plane_namespace,
    )
    asyncio.run(run(config))
