"""The testbed (`nodeagent testbed ...`) and its pods' fake service (`workload`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nodeagent.cli.options import output_option, table

if TYPE_CHECKING:
    from nodeagent.testbed.cluster import Testbed


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def workload(args: tuple[str, ...]) -> None:
    """Run the HTTP fake service of testbed pods (configured by NAME, UPSTREAM_URIS, ... env)."""
    from nodeagent.testbed import workload as fake_service

    sys.exit(fake_service.main(list(args)))


name_option = click.option(
    "--name", "name", default=None, help="Testbed name (default: the only testbed that is up)."
)


@click.group()
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
@output_option
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


@testbed.command("doctor", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("node")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def doctor(name: str | None, node: str, args: tuple[str, ...]) -> None:
    """`nodeagent doctor` on NODE, given that node's paths and source as its agent has them;
    ARGS go to doctor (e.g. -o json)."""
    tb = _open(name)
    if node not in {n.name for n in tb.topology.nodes}:
        raise click.ClickException(f"no node {node!r} in testbed {tb.name!r}")
    argv = doctor_argv(tb, node, *args)
    os.execvp(argv[0], argv)


def doctor_argv(tb: Testbed, node: str, *args: str) -> list[str]:
    """`nodeagent doctor ARGS` in NODE's netns, with the options its agent runs with."""
    from nodeagent.testbed import layout

    top = tb.topology
    source = (
        ["--kubeconfig", str(layout.apiserver_kubeconfig(tb.name))]
        if top.source == "kubernetes"
        else ["--source-dir", str(layout.cluster_dir(tb.name))]
    )
    ebpf = top.capture_mode_of(node) != "nftables"
    return [
        "ip", "netns", "exec", layout.node_netns(tb.name, node),
        sys.executable, "-m", "nodeagent", "doctor",
        "--cni-socket", str(layout.agent_socket(tb.name, node)),
        "--state-dir", str(layout.agent_state_dir(tb.name, node)),
        "--run-dir", str(layout.agent_socket(tb.name, node).parent),
        "--cni-conf-dir", str(layout.cni_conf_dir(tb.name, node)),
        "--cni-bin-dir", str(layout.cni_bin_dir(tb.name, node)),
        "--bpf-dir", str(layout.bpf_dir(tb.name, node)),
        *(["--cgroup-root", str(layout.CGROUP2_MOUNT)] if ebpf else []),
        "--proxy-model", top.proxy_model,
        "--node", node, *source,
        "--mesh-config", str(layout.mesh_config_file(tb.name)),
        *args,
    ]  # fmt: skip


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
    from nodeagent.testbed import layout

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
        "externals": [
            {
                "name": ext.name,
                "names": list(ext.names),
                "ip": str(ext.ip),
                "httpPort": ext.http_port,
                "httpsPort": ext.https_port,
                "caFile": str(layout.external_ca_file(tb.name, ext.name)),
            }
            for ext in topo.externals
        ],
        "controlPlane": [
            {
                "component": c.component,
                "pid": c.pid,
                "address": c.address,
                "ready": not c.ready,
                "reason": c.ready,
            }
            for c in tb.control_plane_status()
        ],
    }


def _print_status(tb: Testbed) -> None:
    topo = tb.topology
    click.echo(f"testbed {tb.name}: {tb.state.phase}")
    control = tb.control_plane_status()
    if control:
        names = {"apiserver": "API server", "ca": "CA", "resolver": "DNS"}
        table(
            [("CONTROL PLANE", "PID", "ADDRESS", "STATUS")]
            + [
                (
                    names.get(c.component, c.component),
                    str(c.pid or "-"),
                    c.address,
                    "ready" if not c.ready else f"not ready: {c.ready}",
                )
                for c in control
            ]
        )
    table(
        [("NODE", "POD CIDR", "UNDERLAY IP")]
        + [(n.name, str(n.pod_cidr), str(n.underlay_ip)) for n in topo.nodes]
    )
    table(
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
    table(
        [("NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS")]
        + [
            (svc.namespace, svc.name, str(svc.cluster_ip), ",".join(str(p.port) for p in svc.ports))
            for svc in topo.services
        ]
    )
    if topo.externals:
        table(
            [("EXTERNAL", "NAMES", "IP", "HTTP", "HTTPS")]
            + [
                (e.name, ",".join(e.names), str(e.ip), str(e.http_port), str(e.https_port))
                for e in topo.externals
            ]
        )
