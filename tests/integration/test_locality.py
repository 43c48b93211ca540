"""DestinationRule localityLbSetting on a two-node testbed with the real Envoy (issue #15).

The nodes carry Istio's locality labels (testbed defaults: n1 region r1 zone z1, n2 r1/z2); the
caller runs on n1, each service has one endpoint per node. What the mesh did is read from the
answers (the fake service names its version: the node it runs on). The agents read the cluster,
Nodes included, from the Kubernetes API stand-in, as the DaemonSet's do.

Behaviour as Istio documents it: istio.io/latest/docs/tasks/traffic-management/
locality-load-balancing/ (failover, distribute) and istio.io/latest/docs/reference/config/
networking/destination-rule/#LocalityLoadBalancerSetting.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh.model import REGION_LABEL, ZONE_LABEL
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    envoy_admin,
    pod,
    put_yaml,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

PY = sys.executable
TALLY = str(Path(__file__).with_name("route_tally.py"))
NAME = "tblocal"
HELLO = "http://hello:8000/"
HELLO_CLUSTER = "outbound|8000||hello.default.svc.cluster.local"
FLAKY_CLUSTER = "outbound|8000||flaky.default.svc.cluster.local"
N2_ZONE = {REGION_LABEL: "r1", ZONE_LABEL: "z2"}  # the testbed's default for n2


def _topology() -> str:
    failing = {"ERROR_RATE": "1", "ERROR_CODE": "500"}
    pods = [pod("sleep", "n1", {"app": "sleep"}, workload={"type": "sleep"})]
    for app in ("hello", "flaky"):
        for node in ("n1", "n2"):
            env = failing if (app, node) == ("flaky", "n1") else {}
            fake = {"type": "fake-service", "port": 80, "env": env}
            pods.append(pod(f"{app}-{node}", node, {"app": app, "version": node}, workload=fake))
    # The two nodes keep the default localities r1/z1 and r1/z2.
    return topology_text(NAME, pods, [service(app, 8000, 80) for app in ("hello", "flaky")])


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_locality") as bed:
        yield bed


def apply(tb: Testbed, *texts: str) -> None:
    """The test's DestinationRules (YAML, namespace default), as kubectl apply; none: remove."""
    put_yaml(tb, "locality.yaml", *texts)


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    """Each test starts and ends with no DestinationRule, every pod ready, n2 in its zone."""
    apply(tb)
    yield tb
    apply(tb)
    tb.set_pod_ready("default/hello-n1", True)
    tb.set_node_labels("n2", dict(N2_ZONE))
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == PLAIN, 20, "hello back to plain groups")


def tally(tb: Testbed, url: str, count: int, threads: int = 1) -> dict[str, Any]:
    proc = tb.exec("default/sleep", [PY, TALLY, url, str(count), str(threads)], timeout=90)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def localities(tb: Testbed, cluster: str) -> dict[str, tuple[int, int, int]]:
    """n1's EDS for CLUSTER: zone -> (priority, locality weight, endpoints)."""
    dump = json.loads(envoy_admin(tb.name, "n1", "/config_dump?include_eds"))
    for config in dump.get("configs", []):
        for entry in config.get("dynamic_endpoint_configs", []):
            assignment = entry.get("endpoint_config", {})
            if assignment.get("cluster_name") != cluster:
                continue
            return {
                group.get("locality", {}).get("zone", ""): (
                    int(group.get("priority", 0)),
                    int(group.get("load_balancing_weight", 0)),
                    len(group.get("lb_endpoints", [])),
                )
                for group in assignment.get("endpoints", [])
            }
    return {}


PLAIN = {"z1": (0, 1, 1), "z2": (0, 1, 1)}  # grouped by locality, nothing else
OUTLIER = "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}"


def failover_rule(host: str) -> str:
    # The mesh default ({enabled: true}) ranks by locality once outlierDetection is set.
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer: {{localityLbSetting: {{enabled: true}}}}
    outlierDetection: {OUTLIER}
"""


def test_without_a_rule_both_nodes_answer(clean: Testbed) -> None:
    tb = clean
    assert localities(tb, HELLO_CLUSTER) == PLAIN
    assert set(tally(tb, HELLO, 40)["version"]) == {"n1", "n2"}


def test_failover_keeps_calls_on_the_callers_node_until_its_endpoints_are_gone(
    clean: Testbed,
) -> None:
    tb = clean
    apply(tb, failover_rule("hello"))
    want = {"z1": (0, 1, 1), "z2": (1, 1, 1)}
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == want, 20, "n2's endpoint at priority 1")
    assert tally(tb, HELLO, 50)["version"] == {"n1": 50}
    # n1's endpoint leaves (not ready): priority 0 is empty, traffic moves to n2.
    tb.set_pod_ready("default/hello-n1", False)
    wait_for(lambda: "z1" not in localities(tb, HELLO_CLUSTER), 20, "n1's endpoint gone")
    assert tally(tb, HELLO, 30)["version"] == {"n2": 30}
    # Back: traffic returns to the caller's node.
    tb.set_pod_ready("default/hello-n1", True)
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == want, 20, "n1's endpoint back at 0")
    assert tally(tb, HELLO, 30)["version"] == {"n1": 30}


def test_a_failing_local_endpoint_is_ejected_and_traffic_fails_over(clean: Testbed) -> None:
    """flaky-n1 answers 500 to everything: outlier detection ejects it after its first 5xx,
    and with priority 0 empty Envoy sends everything to n2."""
    tb = clean
    apply(tb, failover_rule("flaky"))
    want = {"z1": (0, 1, 1), "z2": (1, 1, 1)}
    wait_for(lambda: localities(tb, FLAKY_CLUSTER) == want, 20, "flaky's n2 endpoint at 1")
    first = tally(tb, "http://flaky:8000/", 10)
    assert 1 <= first["status"].get("500", 0) <= 2, first  # n1 tried first, then ejected
    after = tally(tb, "http://flaky:8000/", 30)
    assert (after["status"], after["version"]) == ({"200": 30}, {"n2": 30}), after


def test_a_node_label_change_reprioritises(clean: Testbed) -> None:
    """n2 relabelled into n1's zone: both endpoints share the caller's locality, both answer;
    back in its own zone, n1's endpoint takes everything again."""
    tb = clean
    apply(tb, failover_rule("hello"))
    apart = {"z1": (0, 1, 1), "z2": (1, 1, 1)}
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == apart, 20, "n2's endpoint at priority 1")
    tb.set_node_labels("n2", {REGION_LABEL: "r1", ZONE_LABEL: "z1"})
    together = {"z1": (0, 2, 2)}
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == together, 20, "n2 relabelled to z1")
    assert set(tally(tb, HELLO, 40)["version"]) == {"n1", "n2"}
    tb.set_node_labels("n2", dict(N2_ZONE))
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == apart, 20, "n2 back in z2")
    assert tally(tb, HELLO, 30)["version"] == {"n1": 30}


def test_distribute_sends_80_percent_to_the_callers_zone(clean: Testbed) -> None:
    tb = clean
    apply(
        tb,
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {"r1/z1/*": 80, "r1/z2/*": 20}
""",
    )
    want = {"z1": (0, 80, 1), "z2": (0, 20, 1)}
    wait_for(lambda: localities(tb, HELLO_CLUSTER) == want, 20, "the 80/20 locality weights")
    path = "/config_dump?resource=dynamic_active_clusters&name_regex=.*hello.*"
    assert "locality_weighted_lb_config" in envoy_admin(tb.name, "n1", path)
    result = tally(tb, HELLO, 500, threads=4)  # each request picks its locality by weight
    assert result["status"] == {"200": 500}
    share = result["version"].get("n1", 0) / 500
    assert 0.75 <= share <= 0.85, result
