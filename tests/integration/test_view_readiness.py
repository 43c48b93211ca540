"""A pod of a namespace new to its node gets its own routes from its very first request.

The node Envoy shares one route table per service port among local namespaces; where their
VirtualServices differ, each namespace's routes are guarded by the caller's identity
(translate/service_views.py). A pod of a namespace with no pod on the node yet adds its view to
those tables with the push that adds its listeners, and Envoy applies RDS after LDS: the CNI ADD
must return only once Envoy holds the changed tables, or the pod's first requests meet the
tables of before (another namespace's routes, or a 404 where views were already guarded).

Istio's sidecar starts with its own routes (a VirtualService with ``exportTo: ['.']`` binds only
its namespace's callers: istio.io/latest/docs/reference/config/networking/virtual-service/
#VirtualService-export_to), and an application container starts only once its proxy is ready
(``holdApplicationUntilProxyStarts``). Each round: a pod of namespace ``late`` whose command
makes one request the moment it starts, right after its ADD returned. The agents sign with the
plug-in CA (``--ca-dir``): the new identity's certificate is at hand at once, so it does not
make the ADD wait past the route update by chance (a CA service's round trip can).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology
from tests.integration.helpers import call, wait_for

pytestmark = pytest.mark.integration

NAME = "tbviewready"
NODE = "n1"
ROUNDS = 8
# Routes of late's view no request matches: its view weighs on Envoy (regexes to compile), so
# that the table's update takes Envoy long enough for a request to meet the table before it.
UNUSED_ROUTES = 2000
TOPOLOGY = f"""
name: {NAME}
source: kubernetes
ca: plugin
nodes: [{{name: {NODE}}}]
namespaces:
  - {{name: shop, labels: {{nodeagent.io/mesh: enabled}}}}
  - {{name: late, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: web-v1, namespace: shop, node: {NODE}, serviceAccount: web,
      labels: {{app: web, version: v1}}, workload: {{type: fake-service, port: 8080}}}}
  - {{name: web-v2, namespace: shop, node: {NODE}, serviceAccount: web,
      labels: {{app: web, version: v2}}, workload: {{type: fake-service, port: 8080}}}}
  - {{name: client, namespace: shop, node: {NODE}, serviceAccount: client}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}}, ports: [{{name: http, port: 8080}}]}}
"""
HOST = "web.shop.svc.cluster.local"


def _rules() -> list[dict[str, Any]]:
    """Subsets of web; shop's callers routed to v1, late's to v2 (each VirtualService exported
    to its own namespace only)."""
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "host": HOST,
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    }

    def routed(namespace: str, subset: str, unused: int = 0) -> dict[str, Any]:
        to = {"destination": {"host": HOST, "subset": subset}}
        # UNUSED header-matched routes no request takes, before the one that applies.
        never = {"destination": {"host": HOST, "subset": "v1"}}
        http = [
            {"match": [{"headers": {"x-unused": {"regex": f"never-{i}-[a-z]+"}}}], "route": [never]}
            for i in range(unused)
        ]
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"hosts": [HOST], "exportTo": ["."], "http": [*http, {"route": [to]}]},
        }

    return [rule, routed("shop", "v1"), routed("late", "v2", UNUSED_ROUTES)]


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        testbed = Testbed.up(loads_topology(TOPOLOGY, "test_view_readiness"), TOPOLOGY, NAME)
        (layout.cluster_dir(NAME) / "routing.yaml").write_text(yaml.safe_dump_all(_rules()))
        yield testbed
    finally:
        down(NAME)


def _first_answer(tb: Testbed, pod: Pod) -> tuple[str, str]:
    """(status, version) of the one request POD's command made when it started."""
    log = layout.logs_dir(tb.name) / f"{pod.namespace}.{pod.name}.log"
    wait_for(lambda: "status " in log.read_text(), 15, f"{pod.key}'s first request answered")
    body, _, status = log.read_text().rpartition("status ")
    try:
        version = str(json.loads(body.strip()).get("version", ""))
    except ValueError:
        version = ""
    return status.strip(), version


def test_a_new_namespaces_first_request_takes_its_own_routes(tb: Testbed) -> None:
    vip = next(s.cluster_ip for s in tb.services() if s.key == "shop/web")
    url = f"http://{vip}:8080/"
    # The rules have landed: shop's callers get v1 only.
    wait_for(
        lambda: {call(tb, "shop/client", url)["version"] for _ in range(5)} == {"v1"},
        20,
        "shop's VirtualService in force",
        step=0.3,
    )
    request = f"curl -sS --max-time 5 -w '\\nstatus %{{http_code}}\\n' {url}; exec sleep infinity"
    answers = []
    for i in range(ROUNDS):
        pod = Pod(
            "late",
            f"caller-{i}",
            NODE,
            "caller",
            {"app": "caller"},
            {},
            Workload("command", command=("sh", "-c", request)),
        )
        tb.add_pod(pod, publish_lead=0.3)
        try:
            answers.append(_first_answer(tb, pod))
        finally:
            # Its namespace's last pod: the next round's pod joins the node afresh.
            assert tb.remove_pod(pod) == []
    assert answers == [("200", "v2")] * ROUNDS
