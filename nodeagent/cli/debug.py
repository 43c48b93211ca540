"""What the node holds, as istioctl shows it: `pods`, `proxy-status`, `proxy-config`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from nodeagent.cli.options import cni_socket_option, output_option, table


@click.command()
@cni_socket_option
@output_option
def pods(cni_socket: str, output: str) -> None:
    """Capture state of every pod handed to this node's agent."""
    from nodeagent.cni import wire

    try:
        answer = wire.request(cni_socket, {"command": "STATUS"}, 10.0)
    except (OSError, wire.ProtocolError) as e:
        raise click.ClickException(str(e)) from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("reason")))
    records = answer.get("pods", [])
    if output == "json":
        click.echo(json.dumps(records, indent=2))
        return
    table(
        [("NAMESPACE", "POD", "STATE", "CAPTURE", "IPS", "NETNS", "REASON")]
        + [
            (
                r["namespace"],
                r["name"],
                r["state"],
                r.get("backend") or "-",  # nftables or ebpf: the node's --capture-mode
                ",".join(r["ips"]),
                r["netns"],
                r["reason"],
            )
            for r in records
        ]
    )


@click.command("proxy-status")
@cni_socket_option
@output_option
def proxy_status(cni_socket: str, output: str) -> None:
    """Whether the node's Envoy holds the latest config, per xDS type, for every local pod."""
    from nodeagent.cni import wire

    try:
        answer = wire.request(cni_socket, {"command": "PROXY_STATUS"}, 10.0)
    except (OSError, wire.ProtocolError) as e:
        raise click.ClickException(str(e)) from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("reason")))
    if output == "json":
        click.echo(json.dumps(answer, indent=2))
        return
    proxy = answer["proxy"]
    kinds = ("CDS", "LDS", "EDS", "RDS")
    captured = [p for p in answer["pods"] if p["state"] == "captured"]
    sidecars = proxy.get("sidecars")  # the sidecar model: one Envoy per pod

    def states(pod: dict[str, Any]) -> list[str]:
        held = proxy["types"]
        if sidecars is not None:
            held = sidecars.get(f"{pod['namespace']}/{pod['name']}", {}).get("types", {})
        return [held.get(k, {}).get("state", "NOT SENT") for k in kinds]

    table(
        [("NAME", "NODE", *kinds, "VERSION")]
        + [
            (f"{p['name']}.{p['namespace']}", proxy["node"], *states(p), proxy["version"])
            for p in captured
        ]
    )
    if sidecars is not None:
        pids = ", ".join(f"{k} pid {s['pid']}" for k, s in sidecars.items())
        envoy = f"sidecar model, one Envoy per pod ({pids or 'none'})"
    elif proxy.get("envoy_mode") == "external":
        envoy = f"Envoy in its own container, {proxy['envoy_state'] or 'not answering'}"
    else:
        envoy = f"Envoy pid {proxy['envoy_pid']}"
    click.echo(
        f"\nnode {proxy['node']}: {envoy}, "
        f"{proxy['envoy_restarts']} restarts, {len(captured)} pods in the mesh"
    )
    if proxy.get("envoy_problem"):
        click.echo(proxy["envoy_problem"])
    for kind, info in proxy["types"].items():
        if info.get("last_nack"):
            click.echo(f"{kind} NACKED by Envoy: {info['last_nack']}")
    if proxy.get("error"):
        click.echo(f"last push failed: {proxy['error']}")
    for r in proxy.get("rejected", []):
        click.echo(
            f"left out: {r['kind']} {r['namespace']}/{r['name']} (rejected by {r['by']}):"
            f" {r['reason']}"
        )
    if proxy.get("unattributed_nack"):
        click.echo(f"NACK not traced to an object: {proxy['unattributed_nack']}")
    for key in proxy.get("identity_unknown", []):
        click.echo(
            f"pod {key}: identity unknown: pod not in the source (no certificate,"
            " no listeners: its traffic is refused)"
        )
    identity = answer.get("identity") or {}  # IdentityManager.status
    for sid, state in identity.get("identities", {}).items():
        if state.get("error"):
            held = f"current one expires {state['not_after']}" if state["not_after"] else "none"
            click.echo(
                f"certificate for {sid} not issued by {identity['issuer']} ({held}):"
                f" {state['error']}"
            )
    ignored = answer.get("not_enforced") or []  # nodeagent.mesh.enforcement
    if ignored:
        click.echo(f"\naccepted, not enforced ({len(ignored)} Istio resources):")
        for item in ignored:
            where = f"{item['kind']} {item['namespace']}/{item['name']}"
            click.echo(f"  {where}: {', '.join(item['fields'])} ({item['planned']})")


@click.command("proxy-config")
@click.argument(
    "kind",
    type=click.Choice(["listeners", "routes", "clusters", "endpoints", "secrets", "authz"]),
)
@click.argument("pod")
@click.option(
    "--admin-socket",
    type=click.Path(path_type=Path),
    default=Path("/run/nodeagent/envoy-admin.sock"),
    show_default=True,
    envvar="NODEAGENT_ENVOY_ADMIN",
    help="The node Envoy's admin socket (<run-dir>/envoy-admin.sock of the agent; root only).",
)
@output_option
def proxy_config(kind: str, pod: str, admin_socket: Path, output: str) -> None:
    """What the node's Envoy holds for POD (namespace/name), like istioctl proxy-config.
    ``authz``: the pod's effective authentication and authorization chain, per inbound path and
    port, in evaluation order (RequestAuthentication's JWT issuers, then the
    AuthorizationPolicy rules by action, enforced or dry-run)."""
    from nodeagent import proxyconfig as pc
    from nodeagent.envoy.admin import EnvoyAdmin, EnvoyAdminError
    from nodeagent.identity.secrets import describe_secrets

    namespace, _, name = pod.rpartition("/")
    namespace = namespace or "default"
    client = EnvoyAdmin(admin_socket, timeout=5.0)
    try:
        dump = client.config_dump()
        listeners = pc.pod_listeners(dump, namespace, name)
        if not listeners:
            raise click.ClickException(
                f"the node's Envoy holds no listeners for {namespace}/{name}"
            )
        routes = pc.pod_routes(dump, listeners)
        clusters = pc.pod_clusters(dump, listeners, routes)
        statuses = client.clusters_json() if kind == "endpoints" else {}
        secrets = describe_secrets(dump) if kind == "secrets" else []
    except EnvoyAdminError as e:
        raise click.ClickException(str(e)) from None
    identity = pc.pod_identity(listeners)
    chosen: list[Any] | None = {
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
        "secrets": [s for s in secrets if s.get("name") in (identity, "ROOTCA")],
        "authz": pc.authz_chains(listeners),
    }.get(kind)
    if output == "json":
        raw: object = chosen if chosen is not None else statuses
        click.echo(json.dumps(raw, indent=2))
        return
    if kind == "listeners":
        table(pc.listener_rows(listeners))
    elif kind == "routes":
        table(pc.route_rows(routes))
    elif kind == "clusters":
        table(pc.cluster_rows(clusters, identity))
    elif kind == "secrets":
        table(pc.secret_rows(secrets, identity))
    elif kind == "authz":
        table(pc.authz_rows(pc.authz_chains(listeners)))
    else:
        table(pc.endpoint_rows(statuses, {str(c.get("name")) for c in clusters}))


@click.command()
@click.argument(
    "directory",
    required=False,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Analyze the cluster this kubeconfig names (one LIST of each kind) instead.",
)
@click.option(
    "--mesh-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="MeshConfig file (rootNamespace, clusterDomain, ...), as the agent's --mesh-config.",
)
@output_option
def analyze(
    directory: Path | None, kubeconfig: Path | None, mesh_config: Path | None, output: str
) -> None:
    """What is wrong with the mesh's VirtualServices and DestinationRules, as istioctl analyze
    says it: from DIRECTORY (Kubernetes YAML, as the agent's --source-dir reads it) or from the
    cluster of --kubeconfig. Exits 1 when anything is at warning or error level, 2 when it
    could not analyze (bad usage, an API server that does not answer)."""
    from nodeagent.mesh import analysis

    if (directory is None) == (kubeconfig is None):
        raise click.UsageError("give exactly one of DIRECTORY or --kubeconfig")
    if directory is not None:
        findings, analyzed = _analyze_directory(directory, mesh_config)
    else:
        assert kubeconfig is not None
        findings, analyzed = _analyze_cluster(kubeconfig, mesh_config)
    if output == "json":
        click.echo(json.dumps([f.as_json() for f in findings], indent=2))
    elif findings:
        for finding in findings:
            click.echo(finding.line())
    else:
        click.echo(f"No validation issues found ({analyzed} Istio resources analyzed).")
    if analysis.fails(findings):
        raise SystemExit(1)


def _analyze_directory(directory: Path, mesh_config: Path | None) -> tuple[list[Any], int]:
    """Findings about DIRECTORY's resources, each with the file it came from."""
    from dataclasses import replace

    from nodeagent.mesh import analysis
    from nodeagent.mesh.store import MeshStore
    from nodeagent.sources.directory import DirectorySource

    store = MeshStore()
    with _quiet_sources():
        source = DirectorySource(directory, store, mesh_config_path=mesh_config)
        source.scan()
    findings = [
        replace(f, file=_shown_path(source.file_of(f.kind, f"{f.kind}/{f.namespace}/{f.name}")))
        for f in analysis.analyze(store)
    ]
    for path, problems in sorted(source.errors.items()):
        findings += [analysis.refused(p, _shown_path(path), str(path)) for p in problems]
    return findings, len(store.istio)


def _analyze_cluster(kubeconfig: Path, mesh_config: Path | None) -> tuple[list[Any], int]:
    import asyncio

    from nodeagent.mesh import analysis
    from nodeagent.mesh.store import MeshStore
    from nodeagent.sources.directory import MeshConfigFile
    from nodeagent.sources.kubernetes import KubernetesSource

    store = MeshStore()
    with _quiet_sources():
        if mesh_config is not None:
            MeshConfigFile(mesh_config, store).scan()
        source = KubernetesSource(store, "", kubeconfig=kubeconfig)
        try:
            missing = asyncio.run(source.list_once())
        except Exception as e:  # the client's errors have no common base
            # Exit code 2, as for a usage error: 1 means "analyzed, and found problems".
            click.echo(f"Error: cannot list the cluster of {kubeconfig}: {e}", err=True)
            raise SystemExit(2) from None
    for kind in missing:
        click.echo(f"note: the API server serves no {kind} (its CRD is not installed)", err=True)
    findings = analysis.analyze(store)
    for problems in source.invalid.values():
        findings += [analysis.refused(p, source="kubernetes") for p in problems]
    return findings, len(store.istio)


def _shown_path(path: Path | None) -> str:
    """PATH relative to the working directory when it is below it, as a user typed it."""
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def _quiet_sources() -> Iterator[None]:
    """The sources log each refused document; analyze reports them itself, once."""
    logger = logging.getLogger("nodeagent")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
