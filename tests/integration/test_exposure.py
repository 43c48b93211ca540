"""What the node exposes (#12 defect 9), on a two-node testbed with the real Envoy.

- Envoy's admin is not reachable over TCP, neither from a host-network process (the node's netns)
  nor from a captured pod: nothing listens on :15000, ``POST /quitquitquit`` goes nowhere and
  Envoy keeps serving, while ``nodeagent proxy-config``/``proxy-status`` still work (root, over
  the admin's UNIX socket and the agent's socket).
- The unauthenticated ports, Envoy's :15090 (Prometheus stats) and the agent's :15020 (metrics),
  name no SPIFFE identity, no ``~<ns>~<sa>`` and no pod; the one exception is :15020's
  ``nodeagent_authz_denials_total``, per pod by design (#17, nodeagent/metrics.py), for pods
  with AuthorizationPolicies (none here).

Istio's node agents expose the same port numbers (15020 merged metrics, 15090 Envoy stats,
15000 admin on loopback): https://istio.io/latest/docs/ops/deployment/application-requirements/
("Ports used by Istio"); here the admin is moved off TCP altogether.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator

import pytest

from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import envoy_stats, http_status, node_cli, node_metrics

pytestmark = pytest.mark.integration

NAME = "tbexp"
# Pod names that occur nowhere else (not in a service, namespace or account name).
SERVER, CLIENT = "web-7f9c4", "client-5d2b8"
TOPOLOGY = f"""
name: {NAME}
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: shop, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: {SERVER}, namespace: shop, node: n1, serviceAccount: web-sa, labels: {{app: web}},
     workload: {{type: fake-service, port: 80}}}}
  - {{name: {CLIENT}, namespace: shop, node: n2, serviceAccount: client-sa,
     labels: {{app: client}}}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}},
     ports: [{{name: http, port: 8080, targetPort: 80}}]}}
"""
URL = "http://web.shop:8080/"
PRIVATE = ("spiffe://", "~shop~", "web-sa", "client-sa", SERVER, CLIENT)


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        bed = Testbed.up(loads_topology(TOPOLOGY, "test_exposure"), TOPOLOGY, "test_exposure")
        # Traffic first, so that the per-cluster and SDS stats exist (mTLS across nodes).
        assert http_status(bed.exec, f"shop/{CLIENT}", URL) == "200"
        yield bed
    finally:
        down(NAME)


def node_ip(tb: Testbed, node: str) -> str:
    return next(str(n.underlay_ip) for n in tb.topology.nodes if n.name == node)


def in_node(tb: Testbed, node: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        netns.in_netns(layout.node_netns(tb.name, node), argv),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def curl_code(run: subprocess.CompletedProcess[str]) -> str:
    return run.stdout.strip() or "000"


CURL = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3"]


def envoy_pid(tb: Testbed, node: str) -> int:
    proc = node_cli(tb.name, node, "proxy-status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(proc.stdout)["proxy"]["envoy_pid"]
    assert isinstance(pid, int)
    return pid


def test_envoy_admin_is_not_on_tcp_from_the_node(tb: Testbed) -> None:
    for node in ("n1", "n2"):
        listening = in_node(tb, node, ["ss", "-Hltn", "sport = :15000"])
        assert listening.returncode == 0 and listening.stdout.strip() == "", listening.stdout
        for host in ("127.0.0.1", node_ip(tb, node)):
            got = curl_code(in_node(tb, node, [*CURL, f"http://{host}:15000/server_info"]))
            assert got == "000", f"{node}: Envoy admin answered {got} on {host}:15000"


def test_envoy_admin_is_a_root_only_socket(tb: Testbed) -> None:
    sock = layout.envoy_admin_socket(tb.name, "n1")
    mode = sock.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert sock.stat().st_uid == 0
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700


def test_quitquitquit_over_tcp_has_no_effect(tb: Testbed) -> None:
    before = envoy_pid(tb, "n2")
    for host in ("127.0.0.1", node_ip(tb, "n2")):
        posted = in_node(tb, "n2", [*CURL, "-X", "POST", f"http://{host}:15000/quitquitquit"])
        assert curl_code(posted) == "000"
    # And from the captured pod, at its own loopback and at its node.
    for host in ("127.0.0.1", node_ip(tb, "n2")):
        posted = tb.exec(
            f"shop/{CLIENT}", [*CURL, "-X", "POST", f"http://{host}:15000/quitquitquit"]
        )
        assert curl_code(posted) == "000", f"{host}: {posted.stdout}"
    assert http_status(tb.exec, f"shop/{CLIENT}", URL) == "200"
    assert envoy_pid(tb, "n2") == before


def test_proxy_config_and_status_still_work_through_the_sockets(tb: Testbed) -> None:
    clusters = node_cli(tb.name, "n2", "proxy-config", "clusters", f"shop/{CLIENT}")
    assert clusters.returncode == 0, clusters.stderr
    assert "web.shop.svc.cluster.local" in clusters.stdout
    secrets = node_cli(tb.name, "n2", "proxy-config", "secrets", f"shop/{CLIENT}", "-o", "json")
    assert secrets.returncode == 0, secrets.stderr
    assert "spiffe://cluster.local/ns/shop/sa/client-sa" in secrets.stdout  # root keeps detail
    status = node_cli(tb.name, "n2", "proxy-status")
    assert status.returncode == 0, status.stderr
    assert f"{CLIENT}.shop" in status.stdout and "SYNCED" in status.stdout


def envoys_own(text: str) -> list[str]:
    """The lines of a Prometheus text that are not Istio's standard metrics. Those name
    workloads and principals by design, as every Istio sidecar's do (istio.io/latest/docs/
    reference/config/metrics/: source_principal, source_workload, ...; issue #19)."""
    istio = re.compile(r"^(# (TYPE|HELP) )?(envoy_istiocustom_)?istio_")
    return [line for line in text.splitlines() if not istio.match(line)]


def test_envoy_stats_name_no_identity_and_no_pod(tb: Testbed) -> None:
    for node in ("n1", "n2"):
        text = envoy_stats(tb.name, node, node_ip(tb, node))
        assert "envoy_server_live" in text
        for private in PRIVATE:
            leaks = [line for line in envoys_own(text) if private in line][:3]
            assert not leaks, f"{node} :15090 names {private!r}: {leaks}"
    # Istio's metrics do name the caller, as Istio's: the exception is theirs alone.
    assert 'source_principal="spiffe://cluster.local/ns/shop/sa/client-sa"' in text
    # The service's stats are there, under its name (alt_stat_name), with the client's traffic.
    assert "outbound|8080||web" in text, "no stats of the service's cluster"


def test_agent_metrics_name_no_identity_and_no_pod(tb: Testbed) -> None:
    for node in ("n1", "n2"):
        text = node_metrics(tb.name, node)
        for private in PRIVATE:
            leaks = [line for line in envoys_own(text) if private in line][:3]
            assert not leaks, f"{node} :15020 names {private!r}: {leaks}"
        # Aggregates instead: pods by state, the first certificate expiry.
        assert 'nodeagent_pods{state="captured"} 1.0' in text
        assert "nodeagent_cert_earliest_expiry_timestamp_seconds " in text
