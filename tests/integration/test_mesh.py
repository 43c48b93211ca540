"""One shared Envoy per node over xDS, on a two-node testbed with the real Envoy (issue #4).

The shop of SCENARIOS S1 plus an ``echo`` service with a replica on each node. Traffic is real
HTTP between pods; what the mesh did is read from the answers, Envoy's access logs, proxy-status
and the node metrics. The agents read the cluster from the Kubernetes API (the testbed's API
stand-in), as the DaemonSet's do.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Service, ServicePort, Workload, loads_topology
from tests.integration.helpers import (
    call,
    envoy_admin,
    first_answer,
    node_cli,
    node_metrics,
    proxy_status,
    wait_for,
)

pytestmark = pytest.mark.integration

PY = sys.executable
KEEPALIVE = str(Path(__file__).with_name("keepalive_client.py"))
TALLY = str(Path(__file__).with_name("route_tally.py"))
NAME = "tbmesh"
TOPOLOGY = f"""
name: {NAME}
source: kubernetes
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: istioinaction, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - name: sleep
    namespace: istioinaction
    node: n1
    serviceAccount: sleep
    labels: {{app: sleep}}
  - name: sleep-2
    namespace: istioinaction
    node: n2
    labels: {{app: sleep}}
  - name: web-api
    namespace: istioinaction
    node: n1
    labels: {{app: web-api, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://recommendation:8080"}}}}
  - name: recommendation
    namespace: istioinaction
    node: n2
    labels: {{app: recommendation, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://purchase-history:8080"}}}}
  - name: purchase-history-v1
    namespace: istioinaction
    node: n1
    labels: {{app: purchase-history, version: v1}}
    workload: {{type: fake-service}}
  - name: purchase-history-v2
    namespace: istioinaction
    node: n2
    labels: {{app: purchase-history, version: v2}}
    workload: {{type: fake-service}}
  - name: echo-1
    namespace: istioinaction
    node: n1
    labels: {{app: echo, version: v1}}
    workload: {{type: fake-service}}
  - name: echo-2
    namespace: istioinaction
    node: n2
    labels: {{app: echo, version: v2}}
    workload: {{type: fake-service}}
services:
  - name: web-api
    namespace: istioinaction
    selector: {{app: web-api}}
    ports: [{{name: http, port: 8080}}]
  - name: recommendation
    namespace: istioinaction
    selector: {{app: recommendation}}
    ports: [{{name: http, port: 8080}}]
  - name: purchase-history
    namespace: istioinaction
    selector: {{app: purchase-history}}
    ports: [{{name: http, port: 8080}}]
  - name: echo
    namespace: istioinaction
    selector: {{app: echo}}
    ports: [{{name: http-echo, port: 80, targetPort: 8080}}]
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[Testbed]:
    down(NAME)
    topology = loads_topology(TOPOLOGY, "test_mesh")
    try:
        yield Testbed.up(topology, TOPOLOGY, "test_mesh")
    finally:
        down(NAME)


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text; NAME includes its labels, e.g. 'x{type="LDS"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def envoy_log(tb: Testbed, node: str) -> str:
    return (layout.logs_dir(tb.name) / f"{node}.envoy.log").read_text()


def all_synced(tb: Testbed) -> bool:
    return all(
        all(t["state"] == "SYNCED" for t in proxy_status(tb, n)["types"].values())
        for n in ("n1", "n2")
    )


def test_s1_1_every_hop_goes_through_the_node_envoys(mesh: Testbed) -> None:
    request_id = f"test-{uuid.uuid4()}"
    answer = call(
        mesh, "istioinaction/sleep", "http://web-api:8080/", f"x-request-id: {request_id}"
    )
    rec = answer["upstream_calls"]["http://recommendation:8080"]
    history = rec["upstream_calls"]["http://purchase-history:8080"]
    assert [answer["name"], rec["name"], history["name"]] == [
        "web-api",
        "recommendation",
        "purchase-history",
    ]
    assert all(a["code"] == 200 for a in (answer, rec, history))
    # Each app sees its real caller's pod IP, never a node address.
    assert answer["headers"]["x-forwarded-for"] == mesh.pod_ip("istioinaction/sleep")
    assert rec["headers"]["x-forwarded-for"] == mesh.pod_ip("istioinaction/web-api")
    assert history["headers"]["x-forwarded-for"] == mesh.pod_ip("istioinaction/recommendation")
    # web-api (n1) -> recommendation (n2) crosses nodes over mTLS with web-api's own identity:
    # the caller's node knows the remote endpoint's pod (auto mTLS, tlsMode: istio).
    xfcc = rec["headers"].get("x-forwarded-client-cert", "")
    assert "URI=spiffe://cluster.local/ns/istioinaction/sa/default" in xfcc, rec["headers"]
    # Both node Envoys logged every hop of this request, outbound at the caller, inbound at the
    # callee (Envoy flushes access logs within a second or so).
    want = {
        ("outbound", "istioinaction/sleep"),
        ("inbound", "istioinaction/web-api"),
        ("outbound", "istioinaction/web-api"),
        ("inbound", "istioinaction/recommendation"),
        ("outbound", "istioinaction/recommendation"),
        ("inbound", f"istioinaction/{_pod_of(mesh, history['pod_ip'])}"),
    }
    logs: dict[str, list[str]] = {}

    def logged() -> bool:
        logs.update(
            {
                n: [ln for ln in envoy_log(mesh, n).splitlines() if request_id in ln]
                for n in ("n1", "n2")
            }
        )
        return want <= {(ln.split()[1], ln.split()[2]) for n in logs for ln in logs[n]}

    wait_for(logged, 5, "both Envoys to log the request", step=0.2)
    assert all(" 200 - via_upstream " in ln for n in logs for ln in logs[n])
    assert all_synced(mesh)


def envoy_counters(tb: Testbed, node: str, *names: str) -> dict[str, int]:
    """Counters of the node Envoy (0 for one it has not created)."""
    text = envoy_admin(tb.name, node, "/stats?usedonly")
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(values.get(name, "0")) for name in names}


def test_same_node_calls_take_the_fast_path_and_keep_the_callers_identity(mesh: Testbed) -> None:
    """#14 part 3: echo has a replica on each node. sleep (n1) -> echo-1 (n1) is handed from the
    caller's outbound side to the callee's inbound side inside n1's Envoy, with no TLS; the app
    still learns its caller's SPIFFE ID and IP, as over mTLS. sleep -> echo-2 (n2) is mTLS."""
    sleep = "istioinaction/sleep"
    fast = "http.inboundInternal|8080||.downstream_rq_total"
    handshakes = "listener.0.0.0.0_15006.ssl.handshake"  # every local pod's inbound listener
    call(mesh, "istioinaction/sleep-2", "http://web-api:8080/")  # n2 -> n1: one mTLS at least
    before = envoy_counters(mesh, "n1", fast, handshakes)
    assert before[handshakes] > 0, "n1's inbound mTLS handshakes are not counted there"
    answers = [call(mesh, sleep, "http://echo/") for _ in range(12)]
    after = envoy_counters(mesh, "n1", fast, handshakes)
    by_pod = Counter(_pod_of(mesh, a["pod_ip"]) for a in answers)
    # Both nodes' replicas (LEAST_REQUEST picks either idle one: all 12 on one has odds 2^-11).
    assert by_pod["echo-1"] and by_pod["echo-2"], by_pod
    td = "spiffe://cluster.local/ns/istioinaction/sa"
    for answer in answers:
        headers = answer["headers"]
        assert answer["code"] == 200 and headers["x-forwarded-for"] == mesh.pod_ip(sleep)
        xfcc = headers["x-forwarded-client-cert"]
        if _pod_of(mesh, answer["pod_ip"]) == "echo-1":  # no certificate: By= and URI= only
            assert xfcc == f"By={td}/default;URI={td}/sleep", xfcc
        else:  # mTLS: the certificate's hash too
            assert xfcc.startswith(f"By={td}/default;Hash=") and f"URI={td}/sleep" in xfcc
    assert after[fast] - before[fast] == by_pod["echo-1"]
    assert after[handshakes] == before[handshakes]  # no TLS on n1's inbound side


def test_pods_of_one_service_account_never_share_an_upstream_connection(mesh: Testbed) -> None:
    """web-api and echo-1 run on n1 as istioinaction/default, so their calls to recommendation
    (n2) take one cluster with one client certificate, whose upstream connections Envoy keeps
    alive and pools. A pooled connection is bound in the netns of the pod that opened it: were
    it reused for the other pod, that request would leave with the first pod's IP."""
    callers = ("istioinaction/web-api", "istioinaction/echo-1")
    seen = []
    for _ in range(4):  # interleaved, so each call finds the other pod's idle connection
        for caller in callers:
            answer = call(mesh, caller, "http://recommendation:8080/")
            assert answer["code"] == 200, answer
            seen.append((caller, answer["headers"]["x-forwarded-for"]))
    assert seen == [(c, mesh.pod_ip(c)) for _ in range(4) for c in callers]


def _pod_of(tb: Testbed, ip: str) -> str:
    return next(key.split("/")[1] for key, rec in tb.state.pods.items() if rec.ip == ip)


def test_a_service_is_balanced_over_endpoints_on_both_nodes(mesh: Testbed) -> None:
    """Istio's default balancing, LEAST_REQUEST: with one request at a time every endpoint is
    as idle as the other, so each gets about half (not one node's endpoints only)."""
    proc = mesh.exec("istioinaction/sleep", [PY, TALLY, "http://echo/", "200"], timeout=90)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)["version"]  # echo-1 (n1) is v1, echo-2 (n2) v2
    assert set(seen) == {"v1", "v2"}
    assert min(seen.values()) >= 60, seen  # binomial(200, 1/2) below 60: p < 1e-8


def test_pods_and_services_changes_are_followed_within_a_second(mesh: Testbed) -> None:
    # A long-lived connection from another pod, through the whole sequence of changes.
    keepalive = subprocess.Popen(
        mesh.exec_argv("istioinaction/sleep-2", [PY, KEEPALIVE, "echo", "80", "9"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        echo3 = Pod(
            "istioinaction",
            "echo-3",
            "n2",
            "default",
            {"app": "echo", "version": "v3"},
            {},
            Workload("fake-service", 8080),
        )
        mesh.add_pod(echo3)
        new_ip = mesh.state.pods[echo3.key].ip
        took = wait_for(
            lambda: call(mesh, "istioinaction/sleep", "http://echo/")["pod_ip"] == new_ip,
            3,
            "the new endpoint to get traffic",
        )
        assert took < 1.0, f"the new endpoint got traffic after {took:.2f}s"

        mesh.remove_pod(echo3)
        after = [call(mesh, "istioinaction/sleep", "http://echo/")["pod_ip"] for _ in range(10)]
        assert new_ip not in after

        only_v2 = Service(
            "istioinaction",
            "echo",
            {"app": "echo", "version": "v2"},
            (ServicePort("http-echo", 80, 8080),),
            next(s.cluster_ip for s in mesh.services() if s.name == "echo"),
        )
        mesh.set_service(only_v2)
        v2 = mesh.pod_ip("istioinaction/echo-2")
        took = wait_for(
            lambda: all(
                call(mesh, "istioinaction/sleep", "http://echo/")["pod_ip"] == v2 for _ in range(4)
            ),
            3,
            "traffic to follow the service change",
        )
        assert took < 1.0, f"the service change was followed after {took:.2f}s"
    finally:
        out, _ = keepalive.communicate(timeout=30)
        mesh.set_service(
            Service(
                "istioinaction",
                "echo",
                {"app": "echo"},
                (ServicePort("http-echo", 80, 8080),),
                next(s.cluster_ip for s in mesh.services() if s.name == "echo"),
            )
        )
    summary = json.loads(out)
    assert summary["failures"] == [] and len(summary["ports"]) == 1, summary
    assert summary["sent"] > 50


def test_envoy_killed_is_restarted_and_an_agent_restart_keeps_envoy_serving(
    mesh: Testbed,
) -> None:
    old_pid = proxy_status(mesh, "n1")["envoy_pid"]
    os.kill(old_pid, signal.SIGKILL)
    # Fails closed while Envoy is down, then recovers on its own.
    wait_for(lambda: call_ok(mesh), 20, "calls through a restarted Envoy", step=0.2)
    status = proxy_status(mesh, "n1")
    assert status["envoy_pid"] != old_pid and status["envoy_restarts"] >= 1
    assert metric(node_metrics(mesh.name, "n1"), "nodeagent_envoy_restarts_total") >= 1

    envoy_pid = status["envoy_pid"]
    keepalive = subprocess.Popen(
        mesh.exec_argv("istioinaction/sleep", [PY, KEEPALIVE, "echo", "80", "6"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_answer(keepalive)
    mesh.restart_agent("n1")
    out, _ = keepalive.communicate(timeout=30)
    summary = json.loads(out)
    assert summary["failures"] == [], summary  # Envoy served through the agent's restart
    assert proxy_status(mesh, "n1")["envoy_pid"] == envoy_pid  # the same Envoy, adopted
    wait_for(lambda: all_synced(mesh), 10, "every node SYNCED")
    assert call(mesh, "istioinaction/sleep", "http://web-api:8080/")["code"] == 200


def call_ok(tb: Testbed) -> bool:
    proc = tb.exec("istioinaction/sleep", ["curl", "-sS", "--max-time", "2", "http://echo/"])
    return proc.returncode == 0


def test_a_bad_istio_file_is_named_and_breaks_nothing(mesh: Testbed) -> None:
    bad = layout.cluster_dir(mesh.name) / "bad-virtualservice.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: echo, namespace: istioinaction}\n"
        "spec: {hosts: [echo], http: [{rout: [{destination: {host: echo}}]}]}\n"
    )
    try:
        log = layout.logs_dir(mesh.name) / "n1.agent.log"
        wait_for(
            lambda: (
                'unknown field \\"spec.http[0].rout\\"' in log.read_text()
                or 'unknown field "spec.http[0].rout"' in log.read_text()
            ),
            5,
            "the agent to log the unknown field",
        )
        line = next(ln for ln in log.read_text().splitlines() if "spec.http[0].rout" in ln)
        # Named by kind and namespace/name (the API server knows no file; the directory source
        # names the file too).
        assert "VirtualService istioinaction/echo" in line
        if mesh.topology.source == "directory":
            assert "bad-virtualservice.yaml" in line
        assert call(mesh, "istioinaction/sleep", "http://echo/")["name"] == "echo"
        assert all_synced(mesh)
    finally:
        bad.unlink()


def test_proxy_config_shows_what_the_node_envoy_holds_for_a_pod(mesh: Testbed) -> None:
    def table(kind: str, pod: str = "istioinaction/web-api") -> str:
        proc = node_cli(mesh.name, "n1", "proxy-config", kind, pod)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    rec_vip = next(s.cluster_ip for s in mesh.services() if s.name == "recommendation")
    listeners = table("listeners")
    assert f"127.0.0.1:15001  {rec_vip}:8080" in listeners
    assert "Route: outbound|8080||recommendation.istioinaction.svc.cluster.local" in listeners
    assert "0.0.0.0:15006" in listeners and "Cluster: PassthroughCluster" in listeners
    clusters = [line.split() for line in table("clusters").splitlines()]
    assert [
        "purchase-history.istioinaction.svc.cluster.local",
        "8080",
        "-",
        "outbound",
        "EDS",
        "istioinaction/default",
    ] in clusters
    assert "outbound|8080||web-api.istioinaction.svc.cluster.local " in table("routes")
    endpoints = [line.split()[:2] for line in table("endpoints").splitlines() if line.strip()]
    for pod in ("purchase-history-v1", "purchase-history-v2"):
        assert [f"{mesh.pod_ip('istioinaction/' + pod)}:8080", "HEALTHY"] in endpoints
    raw = node_cli(
        mesh.name, "n1", "proxy-config", "listeners", "istioinaction/web-api", "-o", "json"
    )
    names = {listener["name"] for listener in json.loads(raw.stdout)}
    # The pod's own three (its same-node fast path too), and the node's listener of service
    # chains its outbound one reaches.
    assert names == {
        "virtualOutbound/istioinaction/web-api",
        "virtualInbound/istioinaction/web-api",
        "inboundInternal/istioinaction/web-api",
        "outbound-internal",
    }
    missing = node_cli(mesh.name, "n1", "proxy-config", "listeners", "istioinaction/nope")
    assert missing.returncode != 0 and "holds no listeners for istioinaction/nope" in missing.stderr


def test_a_service_without_endpoints_answers_503_with_the_uh_flag(mesh: Testbed) -> None:
    mesh.set_service(
        Service(
            "istioinaction",
            "nobody",
            {"app": "nobody"},
            (ServicePort("http", 80, 8080),),
            ipaddress.IPv4Address("10.96.0.200"),
        )
    )
    try:
        mesh.wait_converged()
        request_id = f"uh-{uuid.uuid4()}"
        proc = mesh.exec(
            "istioinaction/sleep",
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f"x-request-id: {request_id}",
                "http://nobody/",
            ],
        )
        assert proc.stdout == "503"
        wait_for(lambda: request_id in envoy_log(mesh, "n1"), 5, "n1's access log", step=0.2)
        line = next(ln for ln in envoy_log(mesh, "n1").splitlines() if request_id in ln)
        assert " 503 UH no_healthy_upstream " in line, line
    finally:
        mesh.delete_service("istioinaction/nobody")
