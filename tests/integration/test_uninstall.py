"""Uninstall and upgrade on a real testbed node: the real CNI chain (bridge + host-local +
nodeagent-cni as install-cni chained it), nftables capture in each mesh pod, the node's probe SNAT
table, and the agent's registry.

- ``nodeagent uninstall`` (the manual path) removes all of it, leaves the primary CNI config as it
  was, and pods then talk to each other directly;
- on SIGTERM, install-cni and the agent ask the API server for their DaemonSet (the stand-in API
  server, as a process in the node's network namespace): while it exists (an upgrade) they keep
  everything, once it is being deleted they remove everything.

Pods run capture_probe.py: whatever listener a connection lands on answers with its port, so a
client sees whether capture is still in its way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.cni.bundle import locate_bundle
from nodeagent.cni.install import PLUGIN_TYPE, holds_entry, install_binary
from nodeagent.cni.wire import ProtocolError, request
from nodeagent.redirect.registry import PodRegistry
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, bridge_conflist, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import node_cli, root_netns_snapshot, ruleset, wait_for

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
PROBE = str(HERE / "capture_probe.py")
STANDIN = str(HERE / "standin_server.py")
PY = sys.executable
SERVE = [PY, PROBE, "serve", "15001@127.0.0.1", "15006", "8080"]
NODE = "n1"
MESH_PODS = ("mesh/client", "mesh/server")
DS = "nodeagent-system/nodeagent"
DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"namespace": "nodeagent-system", "name": "nodeagent", "uid": "ds-1"},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "nodeagent"}}},
}
DELETING: dict[str, Any] = copy.deepcopy(DAEMONSET)
DELETING["metadata"] |= {
    "deletionTimestamp": "2025-01-02T03:04:05Z",
    "finalizers": ["foregroundDeletion"],
}
WAIT = 60.0  # bound on every wait: a loaded 2-core machine starts Python processes slowly


def topology(name: str) -> str:
    return f"""
name: {name}
proxy: false  # capture itself: the probe pods listen on 15001/15006 where Envoy would
ca: plugin  # the agents this test starts itself sign with the testbed's plug-in cacerts
nodes: [{{name: {NODE}}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - name: client
    namespace: mesh
    node: {NODE}
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: server
    namespace: mesh
    node: {NODE}
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
"""


@contextlib.contextmanager
def running_testbed(name: str) -> Iterator[Testbed]:
    down(name)  # a leftover of an earlier, killed run of this test
    text = topology(name)
    tb = Testbed.up(loads_topology(text, "test_uninstall"), text, "test_uninstall")
    try:
        yield tb
    finally:
        # The runtime DELs each pod with the config it ADDed it with (its result cache), which
        # names nodeagent-cni: put the plugin back (its DEL succeeds with no agent) so that the
        # pods' networking is torn down cleanly.
        bin_dir = layout.cni_bin_dir(name, NODE)
        if not (bin_dir / PLUGIN_TYPE).exists():
            install_binary(locate_bundle(), bin_dir)
        down(name)


# -- what a user sees -----------------------------------------------------------------------------


def tables(ns: str) -> list[tuple[str, str]]:
    return sorted((t["family"], t["name"]) for t in ruleset(ns))


def node_state(tb: Testbed) -> dict[str, Any]:
    """Everything nodeagent installs on a node, as a user would look for it."""
    return {
        "pod tables": {pod: tables(tb.pod_netns(pod)) for pod in MESH_PODS},
        "probe SNAT": ("ip", "nodeagent-host") in tables(layout.node_netns(tb.name, NODE)),
        "CNI entry": holds_entry(layout.cni_conf_dir(tb.name, NODE)),
        "CNI bin dir": sorted(os.listdir(layout.cni_bin_dir(tb.name, NODE))),
        "registry": PodRegistry(layout.agent_state_dir(tb.name, NODE) / "pods").exists(),
    }


INSTALLED = {
    "pod tables": {pod: [("inet", "nodeagent")] for pod in MESH_PODS},
    "probe SNAT": True,
    "CNI entry": True,
    "CNI bin dir": [PLUGIN_TYPE, f"{PLUGIN_TYPE}.d"],
    "registry": True,
}
REMOVED = {
    "pod tables": {pod: [] for pod in MESH_PODS},
    "probe SNAT": False,
    "CNI entry": False,
    "CNI bin dir": [],
    "registry": False,
}


def landed(tb: Testbed) -> tuple[str, int]:
    """(pod, listener) that a connection from the client to the server's IP:8080 lands on."""
    proc = tb.exec("mesh/client", [PY, PROBE, "connect", tb.pod_ip("mesh/server"), "8080"])
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    return answer["pod"], answer["listener"]


CAPTURED = ("client", 15001)  # the client's outbound capture, where its Envoy would be
DIRECT = ("server", 8080)


def primary_config(tb: Testbed) -> Any:
    return json.loads((layout.cni_conf_dir(tb.name, NODE) / "10-testbed.conflist").read_text())


def log_messages(path: Path) -> list[str]:
    messages = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            messages.append(str(json.loads(line).get("msg", "")))
    return messages


def until(check: Callable[[], str], what: str) -> None:
    """Until CHECK says nothing is missing (bounded by WAIT)."""
    missing = [""]

    def done() -> bool:
        missing[0] = check()
        return not missing[0]

    wait_for(done, WAIT, lambda: f"{what} (missing: {missing[0]})", step=0.1)


def stop_node_daemons(tb: Testbed) -> None:
    """The testbed's install-cni and agent, stopped as kubelet stops containers (SIGTERM)."""
    tb.stop_daemon(NODE, daemons.INSTALL_CNI)
    tb.stop_agent(NODE)


# -- nodeagent uninstall --------------------------------------------------------------------------


def test_nodeagent_uninstall_removes_everything_and_pods_talk_directly() -> None:
    name = "tun-manual"
    with running_testbed(name) as tb:
        root_before = root_netns_snapshot()
        assert node_state(tb) == INSTALLED
        assert landed(tb) == CAPTURED
        args = [
            "uninstall",
            *["--cni-bin-dir", str(layout.cni_bin_dir(name, NODE))],
            *["--cni-conf-dir", str(layout.cni_conf_dir(name, NODE))],
            *["--state-dir", str(layout.agent_state_dir(name, NODE))],
            *["--cni-socket", str(layout.agent_socket(name, NODE))],
        ]

        refused = node_cli(name, NODE, *args)
        assert refused.returncode == 1
        assert "the node agent is running" in refused.stderr
        assert node_state(tb) == INSTALLED

        # Not told their DaemonSet, stopped daemons keep everything and say so.
        stop_node_daemons(tb)
        assert node_state(tb) == INSTALLED
        for daemon in (daemons.INSTALL_CNI, daemons.AGENT):
            messages = log_messages(layout.logs_dir(name) / f"{NODE}.{daemon}.log")
            assert any("stopping, keeping what it installed" in m for m in messages), daemon

        done = node_cli(name, NODE, *args)
        assert done.returncode == 0, done.stderr
        assert "capture removed from 2 pods" in done.stdout

        assert node_state(tb) == REMOVED
        assert primary_config(tb) == bridge_conflist(name, tb.topology.nodes[0])
        assert landed(tb) == DIRECT
        assert root_netns_snapshot() == root_before

        again = node_cli(name, NODE, *args)
        assert again.returncode == 0, again.stderr
        assert "capture removed from 0 pods" in again.stdout


# -- SIGTERM, with the API server ---------------------------------------------------------------


def cluster_objects(tb: Testbed) -> list[dict[str, Any]]:
    """The namespaces and pods the testbed published, as the API server would hold them."""
    folder = layout.cluster_dir(tb.name)
    files = [folder / "namespaces.yaml", *sorted((folder / "pods").glob("*.yaml"))]
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def terminate(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as kubelet stops a container; SIGKILL if it is still there after WAIT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@contextlib.contextmanager
def standin(tb: Testbed, folder: Path, objects: list[dict[str, Any]]) -> Iterator[Path]:
    """The stand-in API server in the node's netns; yields its kubeconfig."""
    folder.mkdir(parents=True)
    (folder / "objects.json").write_text(json.dumps(objects))
    kubeconfig = folder / "kubeconfig"
    with open(folder / "standin.log", "wb") as log:
        proc = subprocess.Popen(
            netns.in_netns(
                layout.node_netns(tb.name, NODE),
                [PY, STANDIN, str(folder / "objects.json"), str(kubeconfig)],
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        until(
            lambda: "" if kubeconfig.exists() or proc.poll() is not None else "no kubeconfig",
            "the stand-in API server",
        )
        assert proc.poll() is None, (folder / "standin.log").read_text()
        yield kubeconfig
    finally:
        terminate(proc)


def daemon_argv(tb: Testbed, daemon: str, kubeconfig: Path) -> list[str]:
    """The node's daemon as the DaemonSet runs it: told its DaemonSet, asking the API server."""
    name, sock = tb.name, str(layout.agent_socket(tb.name, NODE))
    if daemon == daemons.AGENT:
        argv = [
            *["run", "--node", NODE, "--kubeconfig", str(kubeconfig), "--no-proxy"],
            *["--cni-socket", sock, "--state-dir", str(layout.agent_state_dir(name, NODE))],
            *["--run-dir", str(Path(sock).parent), "--ca-dir", str(layout.cacerts_dir(name))],
            *["--metrics-port", "0", "--readiness-port", "0"],
        ]
    else:
        argv = [
            *["install-cni", "--watch", "--kubeconfig", str(kubeconfig)],
            *["--cni-bin-dir", str(layout.cni_bin_dir(name, NODE))],
            *["--cni-conf-dir", str(layout.cni_conf_dir(name, NODE))],
            *["--bundle", str(locate_bundle()), "--agent-socket", sock],
            *["--log-file", str(layout.logs_dir(name) / f"{NODE}.nodeagent-cni.log")],
        ]
    return [PY, "-m", "nodeagent", *argv, "--daemonset", DS]


def agent_missing(tb: Testbed) -> str:
    """What is not ready yet: the agent answering with both mesh pods captured."""
    try:
        answer = request(str(layout.agent_socket(tb.name, NODE)), {"command": "STATUS"}, 2)
    except (OSError, ProtocolError) as e:
        return str(e)
    states = {f"{p['namespace']}/{p['name']}": p["state"] for p in answer.get("pods", [])}
    return "" if all(states.get(pod) == "captured" for pod in MESH_PODS) else str(states)


def run_then_sigterm(tb: Testbed, folder: Path, daemonset: dict[str, Any]) -> dict[str, list[str]]:
    """Start install-cni and the agent against an API server holding DAEMONSET, wait until they
    serve, stop them with SIGTERM; their log messages, and the API server's DaemonSet GETs."""
    logs: dict[str, list[str]] = {}
    with standin(tb, folder, [*cluster_objects(tb), daemonset]) as kubeconfig:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for daemon in (daemons.INSTALL_CNI, daemons.AGENT):
                with open(folder / f"{daemon}.log", "wb") as log:
                    procs[daemon] = subprocess.Popen(
                        netns.in_netns(
                            layout.node_netns(tb.name, NODE),
                            daemon_argv(tb, daemon, kubeconfig),
                        ),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            until(
                lambda: (
                    ""
                    if holds_entry(layout.cni_conf_dir(tb.name, NODE))
                    and (layout.cni_bin_dir(tb.name, NODE) / PLUGIN_TYPE).is_file()
                    else "no entry or binary"
                ),
                "install-cni installing the plugin",
            )
            until(lambda: agent_missing(tb), "the agent serving both mesh pods")
            for daemon, proc in procs.items():
                assert proc.poll() is None, (folder / f"{daemon}.log").read_text()
        finally:
            codes = {daemon: terminate(proc) for daemon, proc in procs.items()}
        for daemon, code in codes.items():
            logs[daemon] = log_messages(folder / f"{daemon}.log")
            assert code == 0, "\n".join(logs[daemon][-10:])
    gets = json.loads((folder / "kubeconfig.requests.json").read_text())
    logs["API server"] = [r for r in gets if "/daemonsets/" in r]
    return logs


def test_on_sigterm_an_upgrade_keeps_everything_and_an_uninstall_removes_it(
    tmp_path: Path,
) -> None:
    name = "tun-sigterm"
    get = "GET /apis/apps/v1/namespaces/nodeagent-system/daemonsets/nodeagent"
    with running_testbed(name) as tb:
        stop_node_daemons(tb)  # this test runs them as the DaemonSet does
        assert node_state(tb) == INSTALLED

        upgrade = run_then_sigterm(tb, tmp_path / "upgrade", DAEMONSET)

        assert upgrade["API server"] == [get, get]  # one question from each
        for daemon in ("install-cni", "node agent"):
            key = daemons.AGENT if daemon == "node agent" else daemons.INSTALL_CNI
            assert (
                f"{daemon} stopping, keeping what it installed: DaemonSet {DS} exists and is not"
                " being deleted: an upgrade or a restart"
            ) in upgrade[key]
        assert node_state(tb) == INSTALLED
        assert landed(tb) == CAPTURED

        uninstall = run_then_sigterm(tb, tmp_path / "uninstall", DELETING)

        assert uninstall["API server"] == [get, get]
        for daemon in ("install-cni", "node agent"):
            key = daemons.AGENT if daemon == "node agent" else daemons.INSTALL_CNI
            assert (
                f"{daemon} stopping, removing what it installed: DaemonSet {DS} is being deleted"
                " (since 2025-01-02T03:04:05Z): an uninstall"
            ) in uninstall[key]
        assert node_state(tb) == REMOVED
        assert primary_config(tb) == bridge_conflist(name, tb.topology.nodes[0])
        assert landed(tb) == DIRECT
