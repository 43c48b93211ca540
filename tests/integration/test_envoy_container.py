"""The node's Envoy in a container of its own, as the DaemonSet runs it (issue #6).

A two-node testbed with ``envoyContainer: true``: each node runs ``nodeagent envoy`` as a node
daemon (the envoy container, with exactly that container's capabilities) and the agent in
``--envoy-mode external``. The agent configures the real Envoy over xDS but never starts, restarts
or stops it; an agent restart leaves Envoy serving, and a dead Envoy comes back only when its
"container" is restarted, as kubelet would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.envoy.bootstrap import bootstrap_path
from nodeagent.envoy.launch import envoy_argv
from nodeagent.envoy.supervisor import PIDFILE, process_cmdline
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import (
    call,
    first_answer,
    http_status,
    node_cli,
    node_metrics,
    proxy_status,
    wait_for,
)

pytestmark = pytest.mark.integration

PY = sys.executable
ENVOY = Path(PY).parent / "envoy"
KEEPALIVE = str(Path(__file__).with_name("keepalive_client.py"))
NAME = "tec-split"
TOPOLOGY = f"""
name: {NAME}
envoyContainer: true
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: istioinaction, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - name: sleep
    namespace: istioinaction
    node: n1
    serviceAccount: sleep
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
  - name: purchase-history
    namespace: istioinaction
    node: n2
    labels: {{app: purchase-history, version: v1}}
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
"""
NODES = ("n1", "n2")
# CAP_NET_ADMIN (12) and CAP_SYS_ADMIN (21): the envoy container's capabilities, nothing else.
ENVOY_CAPS = (1 << 12) | (1 << 21)


@pytest.fixture(scope="module")
def split() -> Iterator[Testbed]:
    down(NAME)
    topology = loads_topology(TOPOLOGY, "test_envoy_container")
    try:
        yield Testbed.up(topology, TOPOLOGY, "test_envoy_container")
    finally:
        down(NAME)


def envoy_pids(tb: Testbed, node: str) -> list[int]:
    """Every Envoy process running in NODE's network namespace, whoever started it."""
    pids = []
    for pid in netns.pids_in(layout.node_netns(tb.name, node)):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/exe")).name == "envoy":
                pids.append(pid)
    return pids


def synced(tb: Testbed, node: str) -> bool:
    types = proxy_status(tb, node)["types"]
    return set(types) == {"CDS", "EDS", "LDS", "RDS", "SDS"} and all(
        t["state"] == "SYNCED" for t in types.values()
    )


def node_get(tb: Testbed, node: str, url: str) -> tuple[str, str]:
    """(HTTP status, body) of a GET on the node's own loopback ("000": no answer)."""
    proc = subprocess.run(
        netns.in_netns(
            layout.node_netns(tb.name, node),
            ["curl", "-sS", "--max-time", "3", "-w", "\n%{http_code}", url],
        ),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    body, _, code = proc.stdout.rpartition("\n")
    return code or "000", body.strip()


def readiness(tb: Testbed, node: str) -> tuple[str, str]:
    return node_get(tb, node, "http://127.0.0.1:15021/healthz/ready")


def ads_connected(tb: Testbed, node: str) -> str:
    """Envoy's own view of its xDS stream: "1" connected, "0" not (control_plane stats)."""
    proc = subprocess.run(
        daemons.admin_curl(tb.name, node, "/stats?filter=^control_plane.connected_state$"),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    return proc.stdout.rpartition(":")[2].strip()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}")


def test_s1_request_through_both_nodes_split_envoys(split: Testbed) -> None:
    request_id = f"tec-{uuid.uuid4()}"
    answer = call(
        split, "istioinaction/sleep", "http://web-api:8080/", f"x-request-id: {request_id}"
    )
    rec = answer["upstream_calls"]["http://recommendation:8080"]
    history = rec["upstream_calls"]["http://purchase-history:8080"]
    assert [answer["name"], rec["name"], history["name"]] == [
        "web-api",
        "recommendation",
        "purchase-history",
    ]
    assert all(a["code"] == 200 for a in (answer, rec, history))
    assert answer["headers"]["x-forwarded-for"] == split.pod_ip("istioinaction/sleep")
    # Across nodes, mTLS between the two Envoys: the callee sees its caller's SPIFFE identity.
    xfcc = rec["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/istioinaction/sa/default" in xfcc, xfcc
    # The access logs are Envoy's stdout, i.e. the envoy daemon's (container's) log.
    for node in NODES:
        log = layout.logs_dir(split.name) / f"{node}.envoy.log"
        wait_for(lambda log=log: request_id in log.read_text(), 5, f"{node}'s access log")


def test_the_agent_never_runs_an_envoy(split: Testbed) -> None:
    for node in NODES:
        record = split.daemon(node, daemons.ENVOY)
        # One Envoy per node: the envoy daemon itself, which exec'd Envoy (same pid).
        assert envoy_pids(split, node) == [record.pid]
        run_dir = layout.agent_socket(split.name, node).parent
        assert process_cmdline(record.pid) == envoy_argv(ENVOY, bootstrap_path(run_dir))
        status = Path(f"/proc/{record.pid}/status").read_text()
        cap_eff = next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
        assert int(cap_eff.split()[1], 16) == ENVOY_CAPS  # all it needs, as in the DaemonSet
        assert not (run_dir / PIDFILE).exists()
        agent_log = (layout.logs_dir(split.name) / f"{node}.agent.log").read_text()
        assert "started Envoy" not in agent_log and "adopted Envoy" not in agent_log
        status_ = proxy_status(split, node)
        assert (status_["envoy_mode"], status_["envoy_pid"]) == ("external", None)
        assert (status_["envoy_state"], status_["envoy_problem"]) == ("LIVE", "")
        assert readiness(split, node) == ("200", "ok")
        assert metric(node_metrics(split.name, node), "nodeagent_envoy_ready") == 1
        shown = node_cli(split.name, node, "proxy-status").stdout
        assert "Envoy in its own container, LIVE" in shown


def test_an_agent_restart_leaves_envoy_serving(split: Testbed) -> None:
    record = split.daemon("n1", daemons.ENVOY)
    keepalive = subprocess.Popen(
        split.exec_argv("istioinaction/sleep", [PY, KEEPALIVE, "web-api", "8080", "8"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first_answer(keepalive)
        split.stop_agent("n1")
        # The ADS stream is gone (Envoy says so itself) and Envoy serves its last config, to
        # the long-lived connection and to new ones alike.
        wait_for(lambda: ads_connected(split, "n1") == "0", 5, "Envoy to lose its xDS stream")
        assert not (layout.agent_socket(split.name, "n1").parent / "xds.sock").exists()
        assert call(split, "istioinaction/sleep", "http://web-api:8080/")["code"] == 200
        time.sleep(1.5)  # Envoy alone: the long-lived connection must see no failure meanwhile
        split.start_agent("n1")
    finally:
        out, _ = keepalive.communicate(timeout=30)
    summary = json.loads(out)
    assert summary["failures"] == [], summary
    assert len(summary["ports"]) == 1 and summary["sent"] > 40, summary
    # The very same Envoy, never restarted; it reconnected and holds the new agent's config.
    assert envoy_pids(split, "n1") == [record.pid]
    assert netns.alive(record.pid, record.start_time)
    wait_for(lambda: ads_connected(split, "n1") == "1", 10, "Envoy to reconnect")
    wait_for(lambda: synced(split, "n1"), 10, "proxy-status SYNCED after the agent restart")
    assert proxy_status(split, "n1")["envoy_restarts"] == 0
    assert call(split, "istioinaction/sleep", "http://web-api:8080/")["code"] == 200


def test_a_killed_envoy_comes_back_with_its_container_not_the_agent(split: Testbed) -> None:
    old = split.daemon("n1", daemons.ENVOY)
    os.kill(old.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(old.pid, 0)  # this process started the daemon: reap it

    wait_for(lambda: readiness(split, "n1")[0] == "503", 5, "the agent to turn not ready")
    _, why = readiness(split, "n1")
    admin = f"unix:{layout.envoy_admin_socket(split.name, 'n1')}"
    assert why.startswith(f"Envoy not ready: its admin {admin} stopped answering"), why
    assert "nodeagent envoy" in why
    assert metric(node_metrics(split.name, "n1"), "nodeagent_envoy_ready") == 0
    assert why in node_cli(split.name, "n1", "proxy-status").stdout
    # Fails closed meanwhile, and nobody but the "kubelet" restarts Envoy (a managed agent would
    # have restarted it after 0.5 s).
    assert http_status(split.exec, "istioinaction/sleep", "http://web-api:8080/") == "000"
    time.sleep(2)  # a while in which nobody may start an Envoy
    assert envoy_pids(split, "n1") == []
    assert proxy_status(split, "n1")["envoy_state"] == ""

    split.stop_daemon("n1", daemons.ENVOY)  # kubelet notices the dead container...
    split.start_daemon("n1", daemons.ENVOY)  # ...and starts it again; returns once LIVE
    new = split.daemon("n1", daemons.ENVOY)
    assert new.pid != old.pid and envoy_pids(split, "n1") == [new.pid]
    wait_for(lambda: readiness(split, "n1") == ("200", "ok"), 5, "the agent to be ready again")
    wait_for(lambda: synced(split, "n1"), 10, "the new Envoy to hold the config")
    answer = call(split, "istioinaction/sleep", "http://web-api:8080/")
    assert answer["upstream_calls"]["http://recommendation:8080"]["code"] == 200
    text = node_metrics(split.name, "n1")
    assert metric(text, "nodeagent_envoy_restarts_total") == 1
    assert metric(text, "nodeagent_envoy_ready") == 1
    assert envoy_pids(split, "n2") == [split.daemon("n2", daemons.ENVOY).pid]  # n2 untouched
