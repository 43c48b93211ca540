"""The sidecar model, the benchmarks' baseline (issue #7): one Envoy inside each captured pod.

A two-node testbed with ``proxyModel: sidecar``: each node agent captures its pods with
istio-init's rule set and runs, per pod, an Envoy inside the pod's netns as uid/gid 1337, fed by
the agent's xDS server with that pod's config. The S1 chain runs through the sidecars only.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.nftables import SIDECAR_RULES, NftablesBackend, describe
from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology
from tests.integration.helpers import call, proxy_status, ruleset, wait_for

pytestmark = pytest.mark.integration

NAME = "side-model"
TOPOLOGY = f"""
name: {NAME}
proxyModel: sidecar
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
    serviceAccount: web-api
    labels: {{app: web-api, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://recommendation:8080"}}}}
  - name: recommendation
    namespace: istioinaction
    node: n2
    serviceAccount: recommendation
    labels: {{app: recommendation, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://purchase-history:8080"}}}}
  - name: purchase-history
    namespace: istioinaction
    node: n1
    serviceAccount: purchase-history
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
MESH_PODS = {
    "istioinaction/sleep": "n1",
    "istioinaction/web-api": "n1",
    "istioinaction/recommendation": "n2",
    "istioinaction/purchase-history": "n1",
}


@pytest.fixture(scope="module")
def side() -> Iterator[Testbed]:
    down(NAME)
    topology = loads_topology(TOPOLOGY, "test_sidecar_model")
    try:
        yield Testbed.up(topology, TOPOLOGY, "test_sidecar_model")
    finally:
        down(NAME)


def envoys_in(ns: str) -> list[int]:
    """Every Envoy process whose network namespace is NS."""
    pids = []
    for pid in netns.pids_in(ns):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/exe")).name == "envoy":
                pids.append(pid)
    return pids


def ids(pid: int) -> tuple[list[str], list[str]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(ln for ln in status if ln.startswith("Uid:")).split()[1:]
    gid = next(ln for ln in status if ln.startswith("Gid:")).split()[1:]
    return uid, gid


def sidecar_log(tb: Testbed, pod: str) -> str:
    namespace, _, name = pod.partition("/")
    path = layout.logs_dir(tb.name) / f"{namespace}.{name}.envoy.log"
    return path.read_text() if path.exists() else ""


def test_s1_chain_goes_through_each_pods_own_sidecar(side: Testbed) -> None:
    request_id = f"side-{uuid.uuid4()}"
    answer = call(
        side, "istioinaction/sleep", "http://web-api:8080/", f"x-request-id: {request_id}"
    )
    rec = answer["upstream_calls"]["http://recommendation:8080"]
    history = rec["upstream_calls"]["http://purchase-history:8080"]
    assert [answer["name"], rec["name"], history["name"]] == [
        "web-api",
        "recommendation",
        "purchase-history",
    ]
    assert all(a["code"] == 200 for a in (answer, rec, history))
    # mTLS between sidecars, across nodes both ways: each callee sees its caller's identity.
    for callee, caller in ((answer, "sleep"), (rec, "web-api"), (history, "recommendation")):
        xfcc = callee["headers"]["x-forwarded-client-cert"]
        assert f"URI=spiffe://cluster.local/ns/istioinaction/sa/{caller};" in xfcc + ";", xfcc
    assert rec["headers"]["x-forwarded-for"] == side.pod_ip("istioinaction/web-api")
    # Each hop logged by the caller's own sidecar (outbound) and the callee's (inbound), and in
    # no other pod's sidecar log.
    hops = {
        "istioinaction/sleep": {"outbound"},
        "istioinaction/web-api": {"inbound", "outbound"},
        "istioinaction/recommendation": {"inbound", "outbound"},
        "istioinaction/purchase-history": {"inbound"},
    }

    def logged(pod: str) -> set[tuple[str, str]]:
        lines = [ln for ln in sidecar_log(side, pod).splitlines() if request_id in ln]
        return {(ln.split()[1], ln.split()[2]) for ln in lines}

    for pod, directions in hops.items():
        want = {(d, pod) for d in directions}
        wait_for(lambda pod=pod, want=want: logged(pod) == want, 5, f"{pod}'s sidecar log")
        lines = [ln for ln in sidecar_log(side, pod).splitlines() if request_id in ln]
        assert all(" 200 - via_upstream " in ln for ln in lines), lines
    # There is no node Envoy whose log could hold them.
    for node in NODES:
        assert not (layout.logs_dir(side.name) / f"{node}.envoy.log").exists()


def test_one_sidecar_per_pod_as_uid_1337_and_no_node_envoy(side: Testbed) -> None:
    for node in NODES:
        assert envoys_in(layout.node_netns(side.name, node)) == []
        status = proxy_status(side, node)
        assert status["proxy_model"] == "sidecar" and status["envoy_pid"] is None
        local = {k for k, n in MESH_PODS.items() if n == node}
        assert set(status["sidecars"]) == local
        for key in local:
            sidecar = status["sidecars"][key]
            assert all(t["state"] == "SYNCED" for t in sidecar["types"].values()), sidecar
            assert {"CDS", "LDS", "EDS", "RDS", "SDS"} <= set(sidecar["types"])
    for key in MESH_PODS:
        pids = envoys_in(side.pod_netns(key))
        assert len(pids) == 1, (key, pids)
        assert side.sidecar_pid(key) == pids[0]
        assert ids(pids[0]) == (["1337"] * 4, ["1337"] * 4)
        # Its admin answers inside the pod; it holds only this pod's identity and the root.
        sa = key.split("/")[1]
        assert side.sidecar_admin(key, "/ready").strip() == "LIVE"
        secrets = side.sidecar_admin(key, "/config_dump?resource=dynamic_active_secrets")
        assert f"spiffe://cluster.local/ns/istioinaction/sa/{sa}" in secrets
        others = {k.split("/")[1] for k in MESH_PODS} - {sa}
        assert not any(f'/sa/{o}"' in secrets for o in others)


def test_each_pod_holds_istio_inits_rules_and_they_verify(side: Testbed) -> None:
    backend = NftablesBackend(SIDECAR_RULES)
    for key in MESH_PODS:
        ns = side.pod_netns(key)
        tables = ruleset(ns)
        assert [(t["family"], t["name"]) for t in tables] == [("inet", "nodeagent")]
        assert backend.verify(netns.netns_path(ns), CaptureSpec()).ok
        assert not NftablesBackend().verify(netns.netns_path(ns), CaptureSpec()).ok
    listing = netns.run(
        netns.in_netns(side.pod_netns("istioinaction/web-api"), ["nft", "-j", "list", "ruleset"])
    ).stdout
    rules = [
        describe(o["rule"]["expr"])
        for o in json.loads(listing)["nftables"]
        if "rule" in o and o["rule"]["chain"] == "istio-output"
    ]
    assert "meta skuid 1337 return" in rules
    assert "meta oifname lo ip saddr 127.0.0.6 return" in rules
    assert rules[-1] == "jump istio-redirect"


def test_an_agent_restart_keeps_the_sidecars_and_adopts_them(side: Testbed) -> None:
    before = {k: side.sidecar_pid(k) for k, n in MESH_PODS.items() if n == "n2"}
    side.restart_agent("n2")
    wait_for(
        lambda: all(
            t["state"] == "SYNCED"
            for s in proxy_status(side, "n2")["sidecars"].values()
            for t in s["types"].values()
        ),
        10,
        "the sidecars to resync with the restarted agent",
    )
    assert {k: side.sidecar_pid(k) for k in before} == before
    assert (
        proxy_status(side, "n2")["sidecars"]["istioinaction/recommendation"]["pid"]
        == (before["istioinaction/recommendation"])
    )
    assert call(side, "istioinaction/sleep", "http://web-api:8080/")["code"] == 200


def test_a_new_pod_gets_a_sidecar_and_deleting_it_stops_the_sidecar(side: Testbed) -> None:
    pod = Pod(
        "istioinaction",
        "extra",
        "n2",
        "extra",
        {"app": "extra"},
        {},
        Workload("fake-service", 8080),
    )
    side.add_pod(pod)
    try:
        pid = side.sidecar_pid(pod.key)
        assert pid is not None and envoys_in(side.state.pods[pod.key].netns) == [pid]
        assert ids(pid)[0] == ["1337"] * 4
        reply = netns.run(
            netns.in_netns(
                side.state.pods[pod.key].netns,
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://web-api:8080/",
                ],
            )
        )
        assert reply.stdout == "200"
        # Envoy writes its access log once a second (--file-flush-interval-msec 1000).
        wait_for(
            lambda: "outbound istioinaction/extra " in sidecar_log(side, pod.key),
            5,
            "the new pod's sidecar logging its call",
        )
    finally:
        problems = side.remove_pod(pod)
    assert problems == []
    assert not netns.alive(pid, None)
    assert "istioinaction/extra" not in proxy_status(side, "n2")["sidecars"]
    piddir = layout.sidecar_dir(side.name, "n2") / "istioinaction.extra"
    assert not piddir.exists()
