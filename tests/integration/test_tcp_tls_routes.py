"""VirtualService tcp[] matches on the caller and tls[] matches on the SNI, on a two-node testbed
with the real Envoy (issue #15).

Two pods on one node share its Envoy, yet a tcp[] ``sourceLabels`` rule sends one to v2 and the
other to v1 of a server-first TCP app; a TLS client through the mesh reaches the version its
tls[] ``sniHosts`` rule names, and a name no rule has is closed, as Istio's sidecar does. The
apps answer with their version, so what the mesh did is what the client reads.

Istio: istio.io/latest/docs/reference/config/networking/virtual-service/#TCPRoute, #TLSRoute,
#L4MatchAttributes, #TLSMatchAttributes; istio/istio pilot/pkg/networking/core/tls.go.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import envoy_admin, put_config, wait_for
from tests.integration.test_envoy_guards import self_signed

pytestmark = pytest.mark.integration

PY = sys.executable
PROBE = str(Path(__file__).with_name("l4_probe.py"))
NAME = "tbl4routes"
DB_PORT, WEB_PORT = 5432, 8443


def topology(cert: Path, key: Path) -> str:
    def app(name: str, version: str, node: str, argv: list[str]) -> str:
        port = WEB_PORT if name == "web" else DB_PORT
        spec = {
            "name": f"{name}-{version}",
            "namespace": "shop",
            "node": node,
            "serviceAccount": name,
            "labels": {"app": name, "version": version},
            "workload": {"type": "command", "port": port, "command": [PY, PROBE, *argv]},
        }
        return "  - " + json.dumps(spec)

    tls = [str(cert), str(key)]
    return "\n".join(
        [
            f"name: {NAME}",
            "source: kubernetes",
            "nodes: [{name: n1}, {name: n2}]",
            "namespaces:",
            "  - {name: shop, labels: {nodeagent.io/mesh: enabled}}",
            "pods:",
            "  - {name: curl, namespace: shop, node: n1, serviceAccount: curl,"
            " labels: {app: curl}}",
            "  - {name: sleep, namespace: shop, node: n1, serviceAccount: sleep,"
            " labels: {app: sleep}}",
            app("db", "v1", "n1", ["serve-tcp", str(DB_PORT), "v1"]),
            app("db", "v2", "n2", ["serve-tcp", str(DB_PORT), "v2"]),
            app("web", "v1", "n1", ["serve-tls", str(WEB_PORT), *tls, "v1"]),
            app("web", "v2", "n2", ["serve-tls", str(WEB_PORT), *tls, "v2"]),
            "services:",
            f"  - {{name: db, namespace: shop, selector: {{app: db}},"
            f" ports: [{{name: tcp-db, port: {DB_PORT}}}]}}",
            f"  - {{name: web, namespace: shop, selector: {{app: web}},"
            f" ports: [{{name: tls, port: {WEB_PORT}}}]}}",
        ]
    )


CONFIG = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{sourceLabels: {app: curl}}]
    route: [{destination: {host: db, subset: v2}}]
  - route: [{destination: {host: db, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web, a.example, b.example]
  tls:
  - match: [{sniHosts: [a.example]}]
    route: [{destination: {host: web, subset: v1}}]
  - match: [{sniHosts: [b.example]}]
    route: [{destination: {host: web, subset: v2}}]
"""


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """One testbed for the module, with the rules applied (as kubectl apply would)."""
    down(NAME)
    text = topology(*self_signed(tmp_path_factory.mktemp("web")))
    try:
        testbed = Testbed.up(
            loads_topology(text, "test_tcp_tls_routes"), text, "test_tcp_tls_routes"
        )
        docs = [d for d in yaml.safe_load_all(CONFIG) if d]
        (layout.cluster_dir(NAME) / "l4routes.yaml").write_text(yaml.safe_dump_all(docs))
        yield testbed
    finally:
        down(NAME)


def calls(tb: Testbed, pod: str, *args: str, count: int = 10) -> dict[str, Any]:
    """COUNT connections from POD (call-tcp or call-tls): which version answered how often."""
    proc = tb.exec(pod, [PY, PROBE, *args, str(count)], timeout=45)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    print(pod, *args, "->", result)  # which version answered, in the test's output
    return result


def only(tb: Testbed, pod: str, *args: str, answer: str) -> None:
    """Wait until 10 connections in a row get ANSWER only (the rules have landed)."""
    wait_for(
        lambda: calls(tb, pod, *args)["versions"] == {answer: 10},
        30,
        f"{pod} {' '.join(args)} answered by {answer} only",
        step=0.3,
    )


def test_two_pods_on_one_node_reach_different_versions_by_tcp_source_labels(tb: Testbed) -> None:
    """shop/curl and shop/sleep share n1's Envoy; the db port's rule sends curl to v2 (on n2)
    and everyone else to v1 (on n1, the same-node path). db speaks first: nothing on the way may
    wait for the client."""
    dial = ("call-tcp", "db.shop", str(DB_PORT))
    only(tb, "shop/curl", *dial, answer="v2")
    assert calls(tb, "shop/curl", *dial, count=20)["versions"] == {"v2": 20}
    assert calls(tb, "shop/sleep", *dial, count=20)["versions"] == {"v1": 20}


def test_a_tls_client_reaches_the_version_its_sni_names(tb: Testbed) -> None:
    """The TLS passes through the mesh untouched (the app's own certificate); Envoy reads its
    SNI: a.example goes to v1, b.example to v2, and a name no tls[] rule has gets no answer (a
    TLS port with a matching rule has no default route in Istio's sidecar)."""
    only(tb, "shop/sleep", "call-tls", "web.shop", str(WEB_PORT), "b.example", answer="v2")
    for pod in ("shop/curl", "shop/sleep"):
        a = calls(tb, pod, "call-tls", "web.shop", str(WEB_PORT), "a.example", count=20)
        assert a["versions"] == {"v1": 20}
        b = calls(tb, pod, "call-tls", "web.shop", str(WEB_PORT), "b.example", count=20)
        assert b["versions"] == {"v2": 20}
    other = calls(tb, "shop/curl", "call-tls", "web.shop", str(WEB_PORT), "c.example", count=5)
    assert set(other["versions"]) == {"<error>"}, other


def draining(tb: Testbed) -> int:
    """Listeners and filter chains the testbed's Envoys are draining (Envoy's listener manager
    gauges, configuration/listeners/stats)."""
    total = 0
    for node in ("n1", "n2"):
        stats = envoy_admin(tb.name, node, "/stats?filter=listener_manager.total_.*draining")
        total += sum(int(line.rpartition(": ")[2]) for line in stats.splitlines() if line)
    return total


def test_a_held_connection_survives_rule_changes_of_another_service(
    tb: Testbed, tmp_path: Path
) -> None:
    """The issue: "a route change takes effect for new requests without dropping a long-lived
    connection of another pod". shop/sleep (to db v1, same node) and shop/curl (to db v2, the
    other node) each hold one db connection while the web VirtualService (its tls[] rules: web's
    chain hops to its own routes listener, or not) is removed and applied again ROUNDS times,
    each change waited for. Envoy drains only what changed (web's filter chain, web's routes
    listener: a filter-chain-only update, api-v3 Listener ``filter_chains`` and
    intro/arch_overview/listeners/listeners "filter chain only update"); once nothing is
    draining any more, both db connections still echo, as at Istio's sidecar."""
    rounds = 3
    docs = [d for d in yaml.safe_load_all(CONFIG) if d]
    without_web = [
        d for d in docs if (d["kind"], d["metadata"]["name"]) != ("VirtualService", "web")
    ]
    assert len(without_web) == len(docs) - 1
    c_example = ("call-tls", "web.shop", str(WEB_PORT), "c.example")
    only(tb, "shop/curl", "call-tcp", "db.shop", str(DB_PORT), answer="v2")
    stop = tmp_path / "stop"
    holders = {}
    caller: subprocess.Popen[str] | None = None
    new: dict[str, Any] = {"versions": {}, "errors": ["not started"]}
    try:
        for pod in ("shop/sleep", "shop/curl"):
            argv = [PY, PROBE, "hold-tcp", "db.shop", str(DB_PORT), str(stop), "300"]
            holders[pod] = subprocess.Popen(
                tb.exec_argv(pod, argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        for pod, holder in holders.items():
            assert holder.stderr is not None
            assert holder.stderr.readline() == "connected\n", pod  # at most TIMEOUT (5 s)
        # New connections all along too: a.example reaches web (v1 by the rule, else either).
        argv = [PY, PROBE, "call-tls-until", "web.shop", str(WEB_PORT), "a.example", str(stop)]
        caller = subprocess.Popen(
            tb.exec_argv("shop/curl", [*argv, "300"]), stdout=subprocess.PIPE, text=True
        )
        most_draining = 0
        for _ in range(rounds):
            put_config(tb, "l4routes.yaml", without_web)  # c.example: web's default route
            wait_for(
                lambda: "<error>" not in calls(tb, "shop/sleep", *c_example, count=3)["versions"],
                30,
                "the web VirtualService gone",
                step=0.3,
            )
            put_config(tb, "l4routes.yaml", docs)  # c.example: no tls[] rule, closed
            wait_for(
                lambda: (
                    set(calls(tb, "shop/sleep", *c_example, count=3)["versions"]) == {"<error>"}
                ),
                30,
                "the web VirtualService back",
                step=0.3,
            )
            most_draining = max(most_draining, draining(tb))
        wait_for(lambda: draining(tb) == 0, 60, "Envoy done draining", step=0.5)
        print("most listeners and filter chains draining at once:", most_draining)
        # How Envoy took the changes: filter-chain-only updates (as many as modifications).
        print(envoy_admin(tb.name, "n1", "/stats?filter=listener_(in_place_updated|modified)"))
    finally:
        stop.touch()
        results = {}
        for pod, holder in holders.items():
            try:
                out, _ = holder.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                holder.kill()
                out, _ = holder.communicate(timeout=10)
            results[pod] = json.loads(out) if out.strip() else {"error": "no summary"}
        if caller is not None:
            try:
                out, _ = caller.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                caller.kill()
                out, _ = caller.communicate(timeout=10)
            new = json.loads(out) if out.strip() else {"versions": {}, "errors": ["no summary"]}
    print(results, "new connections to web:", new)
    assert set(new["versions"]) <= {"v1", "v2"} and sum(new["versions"].values()) > 20, new
    assert results["shop/sleep"]["version"] == "v1" and results["shop/curl"]["version"] == "v2"
    for pod, result in results.items():
        assert result["error"] == "", (pod, result)
        assert int(result["echoes"]) > 0, (pod, result)
