"""DestinationRule workloadSelector on a two-node testbed with the real Envoy (issue #15).

Two client pods of one namespace, on one node, with the same service account: default/curl
(app=curl) and default/sleep (app=sleep). default has two DestinationRules for ph: one without
a selector (subset ``chosen`` = version v1), one selecting app=curl (``chosen`` = version v2,
tls DISABLE against ph's PERMISSIVE pods). A VirtualService sends everyone to ``chosen``. As
Istio's sidecars would (istio.io/latest/docs/reference/config/networking/destination-rule/,
workloadSelector; pilot/pkg/model/sidecar.go SidecarScope.DestinationRule), curl's calls go to
v2 in plaintext, sleep's to v1 with mTLS: one shared Envoy, told apart by the caller's labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    call,
    envoy_admin,
    pod,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbdrsel"
URL = "http://ph:8080/"
SA = "spiffe://cluster.local/ns/default/sa/client"


def _topology() -> str:
    ph = {"type": "fake-service", "port": 8080}
    pods = [
        # Both clients share one service account.
        pod("curl", "n1", {"app": "curl"}, account="client"),
        pod("sleep", "n1", {"app": "sleep"}, account="client"),
        *(
            pod(f"ph-{version}", node, {"app": "ph", "version": version}, workload=ph)
            for version, node in (("v1", "n1"), ("v2", "n2"))
        ),
    ]
    return topology_text(NAME, pods, [service("ph", 8080, 8080)])


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_dr_selector") as bed:
        yield bed


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    apply_docs(tb)
    yield tb
    apply_docs(tb)


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


NAMESPACE_RULE = doc(
    "DestinationRule",
    "ph",
    {"host": "ph", "subsets": [{"name": "chosen", "labels": {"version": "v1"}}]},
)
CURL_RULE = doc(
    "DestinationRule",
    "ph-curl",
    {
        "host": "ph",
        "workloadSelector": {"matchLabels": {"app": "curl"}},
        "trafficPolicy": {"tls": {"mode": "DISABLE"}},
        "subsets": [{"name": "chosen", "labels": {"version": "v2"}}],
    },
)
TO_CHOSEN = doc(
    "VirtualService",
    "ph",
    {"hosts": ["ph"], "http": [{"route": [{"destination": {"host": "ph", "subset": "chosen"}}]}]},
)


def seen(tb: Testbed, pod: str, calls: int = 10) -> set[tuple[str, bool]]:
    """(version, whether the server side saw the caller's mTLS identity) of POD's CALLS to ph."""
    out = set()
    for _ in range(calls):
        answer = call(tb, f"default/{pod}", URL)
        xfcc = answer["headers"].get("x-forwarded-client-cert", "")
        out.add((str(answer["version"]), f"URI={SA}" in xfcc))
    return out


def test_a_selected_pod_follows_the_selector_rule_its_neighbour_the_namespace_rule(
    clean: Testbed,
) -> None:
    tb = clean
    apply_docs(tb, NAMESPACE_RULE, CURL_RULE, TO_CHOSEN)
    wait_for(lambda: seen(tb, "curl", 5) == {("v2", False)}, 30, "curl on v2, plaintext", step=0.3)
    assert seen(tb, "curl", 20) == {("v2", False)}
    assert seen(tb, "sleep", 20) == {("v1", True)}
    # One copy of ph's clusters for the selected class, none per pod.
    dump = envoy_admin(tb.name, "n1", "/clusters")
    names = {line.split("::", 1)[0] for line in dump.splitlines() if "ph.default" in line}
    assert {n for n in names if n.endswith("~default/ph-curl")} == {
        "outbound|8080||ph.default.svc.cluster.local~default/ph-curl",
        "outbound|8080|chosen|ph.default.svc.cluster.local~default/ph-curl",
    }
    # Without the selector rule, curl follows the namespace rule too.
    apply_docs(tb, NAMESPACE_RULE, TO_CHOSEN)
    wait_for(lambda: seen(tb, "curl", 5) == {("v1", True)}, 30, "curl back on v1", step=0.3)
