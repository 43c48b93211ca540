"""DestinationRule ``loadBalancer.simple: PASSTHROUGH`` on a two-node testbed with the real Envoy
(issue #15).

default/sleep on n1 calls web (two replicas on n2). With PASSTHROUGH, Istio's sidecar does no
load balancing: it "forward[s] the connection to the original IP address requested by the
caller" (istio.io/latest/docs/reference/config/networking/destination-rule/
#LoadBalancerSettings-SimpleLB), an ORIGINAL_DST cluster (istio/istio pilot/pkg/networking/core/
cluster_traffic_policy.go applyLoadBalancer), so the node's service proxy (the testbed's
kube-proxy stand-in, nodeagent/testbed/services.py, a random pick) chooses the replica. Its TLS:
without a rule tls mode, mTLS for every connection unless istiod infers DISABLE from the
service namespace's PeerAuthentication (or, rule-level, from endpoints outside the mesh)
(pilot/pkg/model/push_context.go BestEffortInferServiceMTLSMode, cluster_builder.go
buildAutoMtlsSettings, cluster_tls.go applyUpstreamTLSSettings); tls ISTIO_MUTUAL always mTLS.
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
    http_status,
    pod,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbpassthru"
URL = "http://web:8080/"
FQDN = "web.default.svc.cluster.local"
CLUSTER = f"outbound|8080||{FQDN}"
CALLER = "spiffe://cluster.local/ns/default/sa/sleep"
PASSTHROUGH = {"loadBalancer": {"simple": "PASSTHROUGH"}}


def _topology() -> str:
    web = {"type": "fake-service", "port": 8080}
    pods = [
        pod("sleep", "n1", {"app": "sleep"}),
        *(pod(f"web-{i}", "n2", {"app": "web"}, workload=web) for i in (1, 2)),
    ]
    return topology_text(NAME, pods, [service("web", 8080, 8080)])


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_passthrough") as bed:
        yield bed


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    """Each test starts from no rule: web's cluster load-balances over its two pods again."""
    apply_docs(tb)
    wait_for(lambda: not passing_through(tb), 30, "web's cluster back on EDS", step=0.3)
    yield tb
    apply_docs(tb)


def rule(tls: str = "") -> dict[str, Any]:
    policy: dict[str, Any] = dict(PASSTHROUGH)
    if tls:
        policy["tls"] = {"mode": tls}
    return doc(
        "networking.istio.io/v1", "DestinationRule", "web", {"host": "web", "trafficPolicy": policy}
    )


def peer(name: str, mode: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return doc("security.istio.io/v1", "PeerAuthentication", name, spec)


def doc(api: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def hosts(tb: Testbed, cluster: str) -> set[str]:
    """The hosts n1's Envoy admin lists for CLUSTER (/clusters: ``name::host::stat::value``
    lines; the cluster's own lines, ``name::default_priority::...``, name no address)."""
    dump = envoy_admin(tb.name, "n1", "/clusters")
    fields = [line.split("::") for line in dump.splitlines() if line.startswith(f"{cluster}::")]
    return {parts[1] for parts in fields if ":" in parts[1]}


def passing_through(tb: Testbed) -> bool:
    """n1's cluster for web is the PASSTHROUGH one: its one host is originate itself."""
    return hosts(tb, CLUSTER) == {"envoy://originate/"}


def on_n1(tb: Testbed) -> str:
    return f"web's PASSTHROUGH cluster on n1 (its hosts there: {sorted(hosts(tb, CLUSTER))})"


def answers(tb: Testbed, calls: int = 40) -> dict[str, str]:
    """pod IP -> the caller identity it saw (x-forwarded-client-cert URI, "" without mTLS),
    calling until both replicas answered (at most CALLS calls)."""
    seen: dict[str, str] = {}
    for _ in range(calls):
        answer = call(tb, "default/sleep", URL)
        xfcc = answer["headers"].get("x-forwarded-client-cert", "")
        seen[answer["pod_ip"]] = CALLER if f"URI={CALLER}" in xfcc else ""
        if len(seen) == 2:
            break
    return seen


def vip(tb: Testbed) -> str:
    return str(next(s.cluster_ip for s in tb.services() if s.name == "web"))


def test_passthrough_connects_to_the_vip_and_the_service_proxy_picks(clean: Testbed) -> None:
    """Both replicas answer (the testbed's kube-proxy picks at random), with the caller's mTLS
    identity (every endpoint is a mesh pod: Istio keeps auto mTLS on); n1's Envoy never names
    a pod: web's cluster holds originate, and originate-mtls connected to the VIP:port."""
    tb = clean
    before = answers(tb)
    assert len(before) == 2
    apply_docs(tb, rule())
    wait_for(lambda: passing_through(tb), 30, lambda: on_n1(tb), step=0.3)
    seen = answers(tb)
    assert seen == {ip: CALLER for ip in before}, seen
    assert f"{vip(tb)}:8080" in hosts(tb, "originate-mtls")
    assert not {h for h in hosts(tb, CLUSTER) if any(ip in h for ip in before)}


def test_strict_callee_refuses_the_plaintext_istio_would_send(clean: Testbed) -> None:
    """The namespace's PeerAuthentication DISABLE makes istiod infer plaintext for the
    PASSTHROUGH cluster (it reads the namespace's mode only), while web's own policy is
    STRICT: the call fails, as Istio's would. tls ISTIO_MUTUAL in the rule: mTLS with the
    caller's identity, the call succeeds."""
    tb = clean
    strict_web = peer("web-strict", "STRICT", {"app": "web"})
    namespace_off = peer("default", "DISABLE")
    apply_docs(tb, namespace_off, strict_web, rule())
    wait_for(
        lambda: http_status(tb.exec, "default/sleep", URL) == "503",
        30,
        "the plaintext call refused",
        step=0.3,
    )
    assert passing_through(tb)
    assert {http_status(tb.exec, "default/sleep", URL) for _ in range(6)} == {"503"}
    apply_docs(tb, namespace_off, strict_web, rule("ISTIO_MUTUAL"))
    wait_for(
        lambda: http_status(tb.exec, "default/sleep", URL) == "200",
        30,
        "the ISTIO_MUTUAL call accepted",
        step=0.3,
    )
    seen = answers(tb)
    assert len(seen) == 2 and set(seen.values()) == {CALLER}, seen


def test_strict_namespace_gets_mtls_without_a_tls_mode(clean: Testbed) -> None:
    """A STRICT namespace and no tls in the rule: istiod infers mTLS (all endpoints are mesh
    pods), so the PASSTHROUGH call succeeds with the caller's identity."""
    tb = clean
    apply_docs(tb, peer("default", "STRICT"), rule())
    wait_for(lambda: passing_through(tb), 30, lambda: on_n1(tb), step=0.3)
    seen = answers(tb)
    assert len(seen) == 2 and set(seen.values()) == {CALLER}, seen
