"""Capture follows the cluster, not the history of CNI calls (issue #12, defects 2 and 3).

One node, the real chain (bridge + host-local + nodeagent-cni as install-cni put it), the agent
and its Envoy.

- A pod whose CNI ADD never reached the agent (created while the agent was stopped and the
  primary CNI had rewritten the conflist without our entry) is captured once the agent runs,
  without restarting the pod; relabelling its namespace out of the mesh releases it, and back in
  adopts it again (istio-cni's node agent does this from its pod and namespace informers:
  istio/istio cni/pkg/nodeagent/informers.go).
- CNI GC (CNI spec 1.1 "GC": the runtime lists the valid attachments of one network) run with
  the real nodeagent-cni bundle, as a runtime executes it: an empty list, or one that cannot name
  the pods the agent adopted, removes nothing; one that omits a really deleted pod removes only
  that pod.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.cni.install import remove_entries
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.cni_runtime import load_conflist
from nodeagent.testbed.topology import Pod, Workload, loads_topology
from tests.integration.helpers import agent_pods, node_metrics, ruleset, wait_for

pytestmark = pytest.mark.integration

NAME = "capmember"
NODE = "n1"
TOPOLOGY = f"""
name: {NAME}
nodes: [{{name: {NODE}}}]
namespaces:
  - name: shop
    labels: {{nodeagent.io/mesh: enabled}}
pods:
  - name: web
    namespace: shop
    node: {NODE}
    serviceAccount: web
    labels: {{app: web}}
    workload: {{type: fake-service, port: 8080}}
  - name: client
    namespace: shop
    node: {NODE}
    serviceAccount: client
    workload: {{type: sleep}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}}, ports: [{{name: http, port: 8080}}]}}
  - {{name: late, namespace: shop, selector: {{app: late}}, ports: [{{name: http, port: 8080}}]}}
"""
# Created while the agent is down: its ADD never reaches the agent.
LATE = Pod("shop", "late", NODE, "late", {"app": "late"}, {}, Workload("fake-service", port=8080))
LATE2 = Pod("shop", "late-2", NODE, "late", {}, {}, Workload("sleep"))
SPIFFE = "spiffe://cluster.local/ns/shop/sa/"


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    down(NAME)
    topology = loads_topology(TOPOLOGY, "test_capture_membership")
    try:
        yield Testbed.up(topology, TOPOLOGY, "test_capture_membership")
    finally:
        down(NAME)


def pod_exec(tb: Testbed, key: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """ARGV inside pod KEY (also pods added after ``up``), with its /etc/hosts."""
    return subprocess.run(
        netns.in_netns(tb.state.pods[key].netns, argv),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def fetch(tb: Testbed, key: str, url: str) -> dict[str, Any] | None:
    """The fake service's JSON answer to POD's request (None: no answer)."""
    proc = pod_exec(tb, key, ["curl", "-sS", "--max-time", "3", url])
    if proc.returncode != 0:
        return None
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def through_envoy(tb: Testbed, caller: str, url: str) -> dict[str, Any]:
    """CALLER's request reached the app through the node's Envoy over mTLS: the app saw the
    client certificate of CALLER's service account (x-forwarded-client-cert)."""
    account = {"shop/client": "client", "shop/late": "late", "shop/web": "web"}[caller]
    seen: list[Any] = []

    def mtls() -> bool:
        answer = fetch(tb, caller, url)
        seen.append(answer)
        xfcc = (answer or {}).get("headers", {}).get("x-forwarded-client-cert", "")
        return f"URI={SPIFFE}{account}" in xfcc

    wait_for(mtls, 10, f"{caller} -> {url} through Envoy with mTLS (last: {seen[-1:]})", 0.2)
    return seen[-1]  # type: ignore[no-any-return]


def captured(tb: Testbed, key: str) -> bool:
    record = agent_pods(tb.name, NODE).get(key, {})
    tables = [t["name"] for t in ruleset(tb.state.pods[key].netns)]
    return record.get("state") == "captured" and tables == ["nodeagent"]


def released(tb: Testbed, key: str) -> bool:
    record = agent_pods(tb.name, NODE).get(key, {})
    return record.get("state") == "not-in-mesh" and ruleset(tb.state.pods[key].netns) == []


def valid_attachments(tb: Testbed) -> list[dict[str, str]]:
    return [
        {"containerID": r.container_id, "ifname": "eth0"}
        for r in tb.state.pods.values()
        if r.node == NODE
    ]


def cni_gc(tb: Testbed, attachments: Any) -> subprocess.CompletedProcess[str]:
    """CNI GC of the node's pod network with the real nodeagent-cni bundle, executed as a runtime
    executes a plugin (CNI spec 1.1): in the node's netns, CNI_COMMAND=GC, the plugin's entry of
    the conflist on stdin with the list's name and cniVersion and ``cni.dev/valid-attachments``
    (libcni also sends ``cni.dev/attachments``)."""
    conflist = load_conflist(layout.cni_conf_dir(tb.name, NODE))
    (entry,) = [p for p in conflist["plugins"] if p.get("type") == "nodeagent-cni"]
    config = {**entry, "cniVersion": "1.1.0", "name": conflist["name"]}
    config["cni.dev/valid-attachments"] = attachments
    config["cni.dev/attachments"] = attachments
    bin_dir = layout.cni_bin_dir(tb.name, NODE)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": "GC",
        "CNI_PATH": str(bin_dir),
    }
    return subprocess.run(
        ["ip", "netns", "exec", layout.node_netns(tb.name, NODE), str(bin_dir / "nodeagent-cni")],
        input=json.dumps(config),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_pods_in_a_mesh_namespace_talk_through_envoy(testbed: Testbed) -> None:
    assert captured(testbed, "shop/web") and captured(testbed, "shop/client")
    through_envoy(testbed, "shop/client", "http://web:8080/")


def test_a_pod_created_while_the_agent_is_down_is_captured_when_it_starts(
    testbed: Testbed,
) -> None:
    testbed.stop_agent(NODE)
    testbed.stop_daemon(NODE, daemons.INSTALL_CNI)
    try:
        # The primary CNI rewrites its file without our entry: the runtime's ADD skips us.
        remove_entries(layout.cni_conf_dir(testbed.name, NODE))
        testbed.add_pod(LATE)
        assert ruleset(testbed.state.pods[LATE.key].netns) == []
        pid = testbed.state.pods[LATE.key].pid

        testbed.start_agent(NODE)  # returns once the agent answers (its first passes done)
        wait_for(lambda: captured(testbed, LATE.key), 3, "late pod captured")
        record = agent_pods(testbed.name, NODE)[LATE.key]
        assert record["discovered"], record
        assert testbed.state.pods[LATE.key].pid == pid  # the same pod, not restarted

        # With the agent running, a pod whose ADD skips us (entry still missing) is adopted too.
        testbed.add_pod(LATE2)
        try:
            took = wait_for(lambda: captured(testbed, LATE2.key), 3, "pod adopted by the agent")
            print(f"\npod without ADD adopted {took:.2f}s after it was ready")
        finally:
            testbed.remove_pod(LATE2)
    finally:
        testbed.start_daemon(NODE, daemons.INSTALL_CNI)  # puts our entry back

    # Traffic from it and to it goes through Envoy, with its own identity.
    through_envoy(testbed, LATE.key, "http://web:8080/")
    answer = through_envoy(testbed, "shop/client", "http://late:8080/")
    assert answer["name"] == "late"


def test_relabelling_the_namespace_releases_and_adopts_running_pods(testbed: Testbed) -> None:
    """Out by Istio's sidecar label, back in by its ambient label (istio.io: "Controlling the
    injection policy"; ambient "Add workloads to the mesh")."""
    testbed.set_namespace_labels("shop", {"istio-injection": "disabled"})
    keys = ["shop/web", "shop/client", LATE.key]
    wait_for(lambda: all(released(testbed, k) for k in keys), 5, "pods released")
    records = agent_pods(testbed.name, NODE)
    for key in keys:
        assert records[key]["reason"].startswith(
            "released from the mesh: namespace label istio-injection=disabled"
        ), records
    # Plain traffic now: the app sees no client certificate.
    answer = fetch(testbed, "shop/client", "http://late:8080/")
    assert answer is not None and "x-forwarded-client-cert" not in answer["headers"]
    metrics = node_metrics(testbed.name, NODE)
    assert 'nodeagent_membership_changes_total{change="released"} 3.0' in metrics

    # Back in, by Istio's ambient label this time.
    testbed.set_namespace_labels("shop", {"istio.io/dataplane-mode": "ambient"})
    wait_for(lambda: all(captured(testbed, k) for k in keys), 5, "pods adopted again")
    records = agent_pods(testbed.name, NODE)
    assert "istio.io/dataplane-mode=ambient" in records[LATE.key]["reason"]
    through_envoy(testbed, "shop/client", "http://late:8080/")
    through_envoy(testbed, LATE.key, "http://web:8080/")


def test_cni_gc_never_removes_capture_of_pods_that_still_run(testbed: Testbed) -> None:
    keys = ["shop/web", "shop/client", LATE.key]
    testbed.set_namespace_labels("shop", {"nodeagent.io/mesh": "enabled"})  # whatever came before
    wait_for(lambda: all(captured(testbed, k) for k in keys), 5, "pods in the mesh")
    everyone = valid_attachments(testbed)
    # Empty, and without the pod adopted from /proc (the runtime cannot name it to us).
    without_late = [
        a for a in everyone if a["containerID"] != testbed.state.pods[LATE.key].container_id
    ]
    for attachments in ([], without_late):
        proc = cni_gc(testbed, attachments)
        assert proc.returncode == 0 and proc.stdout == "", (proc.stdout, proc.stderr)
        assert all(captured(testbed, k) for k in keys), agent_pods(testbed.name, NODE)
        through_envoy(testbed, "shop/client", "http://late:8080/")
        through_envoy(testbed, LATE.key, "http://web:8080/")
    # Malformed: a CNI error naming the field; nothing removed.
    proc = cni_gc(testbed, {"containerID": "x"})
    error = json.loads(proc.stdout)
    assert proc.returncode == 1 and error["code"] == 7, error
    assert "cni.dev/valid-attachments" in error["msg"]
    assert all(captured(testbed, k) for k in keys)


def test_cni_gc_removes_a_really_deleted_pod_and_only_it(testbed: Testbed) -> None:
    gone = Pod("shop", "gone", NODE, "gone", {}, {}, Workload("sleep"))
    testbed.add_pod(gone)
    assert captured(testbed, gone.key)
    # Deleted while the agent is away: its DEL never reaches the agent.
    testbed.stop_agent(NODE)
    testbed.remove_pod(gone)
    testbed.start_agent(NODE)
    assert gone.key in agent_pods(testbed.name, NODE)

    proc = cni_gc(testbed, valid_attachments(testbed))
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    records = agent_pods(testbed.name, NODE)
    assert gone.key not in records
    assert all(captured(testbed, k) for k in ["shop/web", "shop/client", LATE.key]), records
    through_envoy(testbed, "shop/client", "http://late:8080/")
    testbed.remove_pod(LATE)
    log = (layout.logs_dir(testbed.name) / f"{NODE}.agent.log").read_text()
    assert f"CNI GC: pod {gone.key}" in log
