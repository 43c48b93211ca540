"""Pods running before nodeagent was installed: found through /proc and captured at agent start.

The testbed comes up without nodeagent (its pods get only the bridge plugin, as on a cluster
before the DaemonSet is applied), then nodeagent is installed on every node: install-cni, then
the agent, which finds each mesh pod's network namespace from its processes' cgroups.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.testbed import cgroups, daemons, layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology
from tests.integration.helpers import agent_pods, call, ruleset, wait_for

pytestmark = pytest.mark.integration

NAME = "preexisting"
TOPOLOGY = """
name: preexisting
nodeagent: false
nodes: [{name: n1}, {name: n2}]
namespaces:
  - name: shop
    labels: {nodeagent.io/mesh: enabled}
  - name: default
pods:
  - name: web
    namespace: shop
    node: n1
    serviceAccount: web
    labels: {app: web}
    workload: {type: fake-service, port: 8080, env: {UPSTREAM_URIS: "http://api:8080"}}
  - name: api-1
    namespace: shop
    node: n1
    serviceAccount: api
    labels: {app: api}
    workload: {type: fake-service, port: 8080}
  - name: api-2
    namespace: shop
    node: n2
    serviceAccount: api
    labels: {app: api}
    workload: {type: fake-service, port: 8080}
  - name: client
    namespace: shop
    node: n2
    serviceAccount: client
    workload: {type: sleep}
  - name: optout
    namespace: shop
    node: n1
    annotations: {nodeagent.io/mesh: disabled}
    workload: {type: sleep}
  - name: outside
    namespace: default
    node: n2
    workload: {type: sleep}
services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports: [{name: http, port: 8080}]
  - name: api
    namespace: shop
    selector: {app: api}
    ports: [{name: http, port: 8080}]
"""
MESH_PODS = {"shop/web": "n1", "shop/api-1": "n1", "shop/api-2": "n2", "shop/client": "n2"}
LEFT_ALONE = {"shop/optout": "n1", "default/outside": "n2"}


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    down(NAME)
    topology = loads_topology(TOPOLOGY, "test_preexisting_pods")
    try:
        yield Testbed.up(topology, TOPOLOGY, "test_preexisting_pods")
    finally:
        down(NAME)


def _started_at(pid: int) -> float:
    """When PID started (Unix time, 10 ms resolution): boot time plus its start in ticks (the
    boot time from the uptime, /proc/stat's btime is whole seconds)."""
    import os

    btime = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def captured(tb: Testbed) -> set[str]:
    records = {**agent_pods(tb.name, "n1"), **agent_pods(tb.name, "n2")}
    return {
        key
        for key in MESH_PODS
        if records.get(key, {}).get("state") == "captured"
        and [t["name"] for t in ruleset(tb.pod_netns(key))] == ["nodeagent"]
    }


def test_pods_running_before_nodeagent_are_all_captured_at_agent_start(
    testbed: Testbed,
) -> None:
    # Before: plain pods, no capture anywhere, and the apps already talk to each other.
    assert all(ruleset(testbed.pod_netns(key)) == [] for key in {**MESH_PODS, **LEFT_ALONE})
    assert call(testbed, "shop/client", "http://web:8080/")["code"] == 200

    started = time.time()
    testbed.install_nodeagent()  # install-cni and the agent on both nodes, as a DaemonSet would
    installed = time.time() - started
    assert captured(testbed) == set(MESH_PODS)
    # When each pod's capture took hold, by the agents' records (wall clock, same machine).
    records = {**agent_pods(testbed.name, "n1"), **agent_pods(testbed.name, "n2")}
    # From the agents' start: install first starts the CA service they need (ca: service).
    agents_started = min(_started_at(testbed.daemon(n, daemons.AGENT).pid) for n in ("n1", "n2"))
    assert started <= agents_started + 0.05  # clock ticks and uptime: 10 ms each
    took = max(records[key]["updated"] for key in MESH_PODS) - agents_started
    print(
        f"\nnodeagent install returned after {installed:.2f}s; "
        f"all {len(MESH_PODS)} pods captured {took:.2f}s after the agents were started"
    )
    # Captured by the agents' start-up discovery, not by a later reconcile (every 60 s). How
    # fast is a figure for the machine, not a pass/fail line: 1.1-1.8 s on the machine of
    # issue #9, 3.1-3.7 s on a slower one (2026-12-07, the same code as then).
    assert took < 10.0, f"pods captured only {took:.2f}s after the agents were started"

    for key in MESH_PODS:
        assert records[key]["discovered"], records[key]
        found = Path(records[key]["netns"]).resolve()
        assert found == (Path("/run/netns") / testbed.pod_netns(key)).resolve()
    # Opted-out and non-mesh pods are found neither in the registry nor with a table.
    for key in LEFT_ALONE:
        assert key not in records
        assert ruleset(testbed.pod_netns(key)) == []


def test_captured_pods_talk_through_the_node_envoys_with_mtls(testbed: Testbed) -> None:
    request_id = f"test-{uuid.uuid4()}"
    answer = call(testbed, "shop/client", "http://web:8080/", f"x-request-id: {request_id}")
    assert answer["name"] == "web"
    assert answer["headers"]["x-forwarded-for"] == testbed.pod_ip("shop/client")
    # client (n2) -> web (n1) crossed nodes over mTLS with the client's own identity.
    xfcc = answer["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/shop/sa/client" in xfcc
    upstream = answer["upstream_calls"]["http://api:8080"]
    assert upstream["code"] == 200 and upstream["name"] == "api"

    def logged(node: str) -> list[str]:
        log = (layout.logs_dir(testbed.name) / f"{node}.envoy.log").read_text()
        return [ln.split()[1] for ln in log.splitlines() if request_id in ln]

    wait_for(
        lambda: "outbound" in logged("n2") and "inbound" in logged("n1"),
        5,
        "the request in the Envoy access logs",
        step=0.2,
    )


def test_a_pod_created_after_the_install_is_captured_by_the_cni_plugin(testbed: Testbed) -> None:
    late = Pod("shop", "late", "n1", "client", {}, {}, Workload("sleep"))
    testbed.add_pod(late)
    try:
        record = agent_pods(testbed.name, "n1")["shop/late"]
        assert record["state"] == "captured" and not record["discovered"]
        assert [t["name"] for t in ruleset(layout.pod_netns(testbed.name, late))] == ["nodeagent"]
    finally:
        testbed.remove_pod(late)


def test_pods_live_in_kubelet_style_cgroups_that_down_removes(testbed: Testbed) -> None:
    record = testbed.state.pods["shop/web"]
    cgroup = Path(f"/proc/{record.pid}/cgroup").read_text()
    assert f"/kubepods/besteffort/pod{record.uid}/{record.container_id}" in cgroup
    folder = cgroups.testbed_dir(NAME)
    assert folder.is_dir()
    down(NAME)
    assert not folder.exists()
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"tb-{NAME}." not in proc.stdout
