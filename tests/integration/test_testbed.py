"""The testbed as a user drives it: 2 nodes x 3 pods, real CNI plugins, real HTTP between pods."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import NODEAGENT, nodeagent, root_netns_snapshot, wait_for

pytestmark = pytest.mark.integration

# Two nodes, three pods each; `echo` has one replica per node so its service spans both nodes.
TWO_BY_THREE = """
name: unused
nodes: [{name: n1}, {name: n2}]
pods:
  - {name: client, namespace: shop, node: n1, labels: {app: client}}
  - {name: echo-1, namespace: shop, node: n1, labels: {app: echo}, workload: {type: fake-service}}
  - name: front
    namespace: shop
    node: n1
    labels: {app: front}
    workload: {type: fake-service, port: 9090, env: {UPSTREAM_URIS: "http://back:8080/deep"}}
  - {name: client, namespace: other, node: n2, labels: {app: client}}
  - {name: echo-2, namespace: shop, node: n2, labels: {app: echo}, workload: {type: fake-service}}
  - {name: back, namespace: shop, node: n2, labels: {app: back}, workload: {type: fake-service}}
services:
  - name: echo
    namespace: shop
    selector: {app: echo}
    ports: [{name: http, port: 80, targetPort: 8080}]
  - {name: front, namespace: shop, selector: {app: front}, ports: [{name: http, port: 9090}]}
  - {name: back, namespace: shop, selector: {app: back}, ports: [{name: http, port: 8080}]}
  - {name: nobody, namespace: shop, selector: {app: nobody}, ports: [{name: http, port: 80}]}
"""


def pods_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{p['namespace']}/{p['name']}": p for p in status["pods"]}


def test_pods_talk_across_nodes_by_ip_and_service_name(make_cluster: Any) -> None:
    before = root_netns_snapshot()
    cluster = make_cluster("tb2x3", TWO_BY_THREE)
    status = cluster.status()
    pods = pods_by_name(status)
    assert all(p["running"] for p in pods.values()), pods
    nodes = {n["name"]: n for n in status["nodes"]}

    # Addresses come from each node's host-local range, through the real bridge plugin.
    assert pods["shop/echo-1"]["ip"].startswith(nodes["n1"]["podCIDR"].rsplit(".", 2)[0])
    assert pods["shop/echo-2"]["ip"].startswith(nodes["n2"]["podCIDR"].rsplit(".", 2)[0])

    # Pod -> pod by IP, across nodes: the answer names the pod that served it.
    answer = cluster.curl("shop/client", f"http://{pods['shop/echo-2']['ip']}:8080/by-ip")
    assert (answer["name"], answer["pod_ip"], answer["uri"]) == (
        "echo",
        pods["shop/echo-2"]["ip"],
        "/by-ip",
    )

    # Pod -> service name, from another namespace and node: both endpoints answer over time.
    served = Counter(
        # 16 calls: both endpoints are seen unless 16 fair picks all land on one (3e-5).
        answer["pod_ip"]
        for answer in cluster.curls("other/client", "http://echo.shop:80/", 16)
    )
    assert set(served) == {pods["shop/echo-1"]["ip"], pods["shop/echo-2"]["ip"]}, served

    # Same-node service hop (client and echo-1 share n1's bridge) keeps working both ways.
    same_node = Counter(a["pod_ip"] for a in cluster.curls("shop/client", "http://echo/", 8))
    assert pods["shop/echo-1"]["ip"] in same_node, same_node

    # A call chain across nodes: front (n1) -> back (n2), by short service name.
    chain = cluster.curl("shop/client", "http://front:9090/")
    assert chain["name"] == "front"
    calls = chain["upstream_calls"]
    assert isinstance(calls, dict)
    assert calls["http://back:8080/deep"]["name"] == "back"
    assert calls["http://back:8080/deep"]["uri"] == "/deep"

    # Short names resolve only inside the service's namespace, as cluster DNS answers them.
    assert cluster.exec("shop/client", "getent", "hosts", "echo").returncode == 0
    assert cluster.exec("other/client", "getent", "hosts", "echo").returncode != 0

    # A service without endpoints is refused at once, like kube-proxy does.
    refused = cluster.exec("shop/client", "curl", "-sS", "--max-time", "5", "http://nobody/")
    assert refused.returncode == 7, refused.stderr  # curl: couldn't connect

    assert root_netns_snapshot() == before, "the testbed changed the root network namespace"


def test_down_removes_everything_it_made(make_cluster: Any) -> None:
    links_before = root_netns_snapshot()["links"]
    cluster = make_cluster("tbdown", TWO_BY_THREE)
    made_netns = [n for n in list_netns() if n.startswith("tb-tbdown.")]
    # underlay, control plane, resolver, nodes, pods
    assert len(made_netns) == 1 + 1 + 1 + 2 + 6
    # The control plane (the default ca: service): the API server and the CA, both ready; the
    # testbed resolver (cluster DNS) too.
    control = {c["component"]: c for c in cluster.status()["controlPlane"]}
    assert control["ca"]["ready"] and control["apiserver"]["ready"], control
    assert control["ca"]["pid"] in netns_pids("tb-tbdown.control-plane")
    assert control["resolver"]["ready"], control
    assert control["resolver"]["pid"] in netns_pids("tb-tbdown.resolver")
    table = nodeagent("testbed", "status", "--name", cluster.name).stdout
    ca_rows = [ln.split() for ln in table.splitlines() if ln.startswith("CA ")]
    assert "CONTROL PLANE" in table and ca_rows, table
    assert ca_rows[0][1:] == [str(control["ca"]["pid"]), control["ca"]["address"], "ready"]
    pids = [pid for ns in made_netns for pid in netns_pids(ns)]
    assert len(pids) >= 6  # one workload per pod
    etc = [Path("/etc/netns") / n for n in made_netns if ".pod-" in n]
    assert all((d / "hosts").exists() and (d / "resolv.conf").exists() for d in etc)

    down = nodeagent("testbed", "down", "--name", cluster.name)
    assert down.returncode == 0, down.stderr

    assert not [n for n in list_netns() if n.startswith("tb-tbdown.")]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)]
    assert not any(d.exists() for d in etc)
    assert not Path("/run/nodeagent/testbed/tbdown").exists()
    assert root_netns_snapshot()["links"] == links_before
    assert nodeagent("testbed", "status", "--name", cluster.name).returncode != 0


def test_up_on_an_existing_testbed_reports_it_and_leaves_it_working(make_cluster: Any) -> None:
    cluster = make_cluster("tbtwice", TWO_BY_THREE)
    topology = Path("/run/nodeagent/testbed/tbtwice/state.json")
    state = json.loads(topology.read_text())
    again = subprocess.run(
        [*NODEAGENT, "testbed", "up", "workshop", "--name", "tbtwice"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0
    assert "already up" in again.stderr
    assert json.loads(topology.read_text()) == state
    assert cluster.curl("shop/client", "http://echo/")["name"] == "echo"


def test_down_cleans_up_after_up_was_killed_midway(tmp_path: Path) -> None:
    path = tmp_path / "crash.yaml"
    path.write_text(TWO_BY_THREE)
    state = Path("/run/nodeagent/testbed/tbcrash/state.json")
    up = subprocess.Popen(
        [*NODEAGENT, "testbed", "up", str(path), "--name", "tbcrash"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def pods_up() -> int:
        try:
            return len(json.loads(state.read_text())["pods"])
        except (OSError, ValueError):  # not written yet, or being written
            return 0

    try:
        wait_for(lambda: pods_up() >= 3, 60, "testbed up to reach its third pod", step=0.02)
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
        assert [n for n in list_netns() if n.startswith("tb-tbcrash.")], "nothing was left to clean"
    finally:
        down = nodeagent("testbed", "down", "--name", "tbcrash")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [n for n in list_netns() if n.startswith("tb-tbcrash.")]
    assert not list(Path("/etc").glob("netns/tb-tbcrash.*"))
    assert not state.parent.exists()


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("[/nonexistent/app]", "default/p: workload command '/nonexistent/app' not found"),
        ("[sh, -c, 'exit 3']", "default/p: workload exited"),
    ],
)
def test_a_failed_up_says_why_and_removes_what_it_made(
    tmp_path: Path, command: str, error: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: unused\nnodes: [{name: n1}]\n"
        f"pods: [{{name: p, node: n1, workload: {{type: command, command: {command}}}}}]\n"
    )
    proc = nodeagent("testbed", "up", str(path), "--name", "tbfail")
    assert proc.returncode != 0
    assert error in proc.stderr
    assert "everything made so far was removed" in proc.stderr
    assert not [n for n in list_netns() if n.startswith("tb-tbfail.")]
    assert not list(Path("/etc").glob("netns/tb-tbfail.*"))
    assert not Path("/run/nodeagent/testbed/tbfail").exists()


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_down_of_a_state_without_a_cgroup_leaves_the_working_directory_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file saved before ``up`` recorded the testbed's cgroup (killed right at its start)
    names none; ``down`` must not take that for the working directory and prune its folders."""
    from nodeagent.testbed.cluster import down
    from nodeagent.testbed.state import TestbedState

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    TestbedState(name="tbnocg", topology_source="", topology_text="").save()
    assert down("tbnocg") == []
    assert (tmp_path / "empty").is_dir()
    assert TestbedState.load("tbnocg") is None
