"""Istio's Sidecar resource on a one-node testbed with the real Envoy (issue #16, part 3).

Namespaces ``a`` and ``b``, all on n1: a/sleep and a/web, b/sleep and b/api (and ``c``'s
service db, without pods). A namespace-local
Sidecar in ``a`` (egress hosts ``./*`` and ``istio-system/*``, outboundTrafficPolicy
REGISTRY_ONLY, the reference page's namespace isolation example: istio.io/latest/docs/
reference/config/networking/sidecar/) scopes a/sleep: its calls to b's api meet the black hole,
as an unknown host under REGISTRY_ONLY does at Istio's sidecar (pilot/pkg/model/sidecar.go
selectServices: out-of-scope services are not in its config), while b/sleep, on the same node
and its same Envoy, unscoped, reaches api; a/sleep still reaches web in its own namespace (over
the same-node fast path, with its identity). With the Sidecar's own ALLOW_ANY, a/sleep's call to
api leaves as plain passthrough (no mesh identity: the app sees no client certificate).
A ServiceEntry of b exported to b only is reached by b/sleep and not by a/sleep (the same
scope machinery: a's namespace gets an internal listener of its own without it).
"""

from __future__ import annotations

import json
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

NAME = "tbsidecar"
API = "http://api.b:8080/"
WEB = "http://web.a:8080/"
SCOPE = "outbound-internal/a/a/default"


def _topology() -> str:
    app = {"type": "fake-service", "port": 8080}
    pods = [
        pod("sleep", "n1", {"app": "sleep"}, namespace="a"),
        pod("web", "n1", {"app": "web"}, namespace="a", workload=app),
        pod("sleep", "n1", {"app": "sleep"}, namespace="b"),
        pod("api", "n1", {"app": "api"}, namespace="b", workload=app),
    ]
    services = [service("web", 8080, 8080, "a"), service("api", 8080, 8080, "b")]
    services.append(service("db", 8080, 8080, "c"))  # no local pod's namespace: no pod at all
    return topology_text(NAME, pods, services, nodes=[{"name": "n1"}], mesh=("a", "b", "c"))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_sidecar_scope") as bed:
        yield bed


def namespace_sidecar(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "a"},
        "spec": {
            "egress": [{"hosts": ["./*", "istio-system/*"]}],
            "outboundTrafficPolicy": {"mode": mode},
        },
    }


def root_sidecar() -> dict[str, Any]:
    """The mesh-wide default: the root namespace's Sidecar without a selector, ``./*`` meaning
    each pod's own namespace (istiod copies it per namespace)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {
            "egress": [{"hosts": ["./*"]}],
            "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
        },
    }


def web_to_api() -> dict[str, Any]:
    """a's VirtualService sending web's requests to b's api (out of a's scope)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "a"},
        "spec": {
            "hosts": ["web"],
            "http": [{"route": [{"destination": {"host": "api.b.svc.cluster.local"}}]}],
        },
    }


def clusters(tb: Testbed) -> set[str]:
    """The service clusters n1's Envoy holds."""
    dump = envoy_admin(tb.name, "n1", "/clusters")
    return {line.split("::")[0] for line in dump.splitlines() if line.startswith("outbound|")}


def scope_fallback(tb: Testbed, name: str = SCOPE) -> str:
    """The cluster n1's Envoy sends a/sleep's unknown destinations to ("" while it has no scope
    listener NAME for ``a``)."""
    dump = json.loads(envoy_admin(tb.name, "n1", "/config_dump?resource=dynamic_listeners"))
    for entry in dump.get("configs", []):
        listener = (entry.get("active_state") or {}).get("listener") or {}
        if listener.get("name") == name:
            tcp = listener["default_filter_chain"]["filters"][-1]["typed_config"]
            return str(tcp["cluster"])
    return ""


def status(tb: Testbed, caller: str, url: str) -> str:
    return http_status(tb.exec, caller, url)


def test_a_namespace_sidecar_scopes_its_pods_only(tb: Testbed) -> None:
    """REGISTRY_ONLY in the Sidecar: a/sleep cannot reach b's api (the scope's black hole: no
    HTTP answer), still reaches a's web with its identity; b/sleep on the same node reaches api.
    Then the same Sidecar with ALLOW_ANY: a/sleep reaches api as passthrough, without mTLS."""
    try:
        apply_docs(tb, namespace_sidecar("REGISTRY_ONLY"))
        wait_for(lambda: scope_fallback(tb) == "BlackHoleCluster", 30, "a's scope", step=0.3)
        wait_for(lambda: status(tb, "a/sleep", API) == "000", 15, "api out of a's scope")
        assert {status(tb, "a/sleep", API) for _ in range(3)} == {"000"}
        own = call(tb, "a/sleep", WEB)
        xfcc = own["headers"].get("x-forwarded-client-cert", "")
        assert "URI=spiffe://cluster.local/ns/a/sa/sleep" in xfcc, own
        other = call(tb, "b/sleep", API)
        assert "URI=spiffe://cluster.local/ns/b/sa/sleep" in other["headers"].get(
            "x-forwarded-client-cert", ""
        ), other
        apply_docs(tb, namespace_sidecar("ALLOW_ANY"))
        wait_for(lambda: scope_fallback(tb) == "PassthroughCluster", 30, "ALLOW_ANY", step=0.3)
        passed = call(tb, "a/sleep", API)
        assert "x-forwarded-client-cert" not in passed["headers"], passed
    finally:
        apply_docs(tb)
    wait_for(lambda: scope_fallback(tb) == "", 30, "a's scope gone", step=0.3)
    back = call(tb, "a/sleep", API)  # unscoped again: the mesh path, with its identity
    assert "URI=spiffe://cluster.local/ns/a/sa/sleep" in back["headers"].get(
        "x-forwarded-client-cert", ""
    ), back


def test_the_root_default_scopes_every_pod_and_trims_what_none_reaches(tb: Testbed) -> None:
    """The root namespace's Sidecar (``./*``, REGISTRY_ONLY) applies to a and b: each pod
    reaches its own namespace only, and with no unscoped pod left the node holds only the
    clusters some scope reaches. a's VirtualService routing web to b's api brings api into a's
    scope (istiod adds a VirtualService's destinations to it): a/sleep's call to web is
    answered by api, with its identity."""
    api = "outbound|8080||api.b.svc.cluster.local"
    web = "outbound|8080||web.a.svc.cluster.local"
    db = "outbound|8080||db.c.svc.cluster.local"
    wait_for(lambda: clusters(tb) == {web, api, db}, 30, "every service's cluster")
    try:
        apply_docs(tb, root_sidecar())
        wait_for(lambda: status(tb, "a/sleep", API) == "000", 30, "api out of a's scope")
        assert status(tb, "b/sleep", WEB) == "000"
        assert status(tb, "a/sleep", WEB) == "200" and status(tb, "b/sleep", API) == "200"
        # db: no scope reaches it (removed with the same push as the listeners' change)
        wait_for(lambda: clusters(tb) == {web, api}, 10, "db's cluster trimmed")
        apply_docs(tb, root_sidecar(), web_to_api())
        wait_for(lambda: call(tb, "a/sleep", WEB)["pod_ip"] == tb.pod_ip("b/api"), 30, "VS")
        routed = call(tb, "a/sleep", WEB)
        xfcc = routed["headers"].get("x-forwarded-client-cert", "")
        assert "URI=spiffe://cluster.local/ns/a/sa/sleep" in xfcc, routed
        assert status(tb, "a/sleep", API) == "200"  # api's own chain is in a's scope now
    finally:
        apply_docs(tb)
    wait_for(lambda: status(tb, "b/sleep", WEB) == "200", 30, "unscoped again")
    wait_for(lambda: db in clusters(tb), 30, "db's cluster back")


PARTNER = "http://240.1.0.1:8080/"


def partner_entry(tb: Testbed) -> dict[str, Any]:
    """b's ServiceEntry exported to b only (``exportTo: ["."]``), its address 240.1.0.1 sending
    to b/api's pod (STATIC, MESH_EXTERNAL: plain TCP)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "partner", "namespace": "b"},
        "spec": {
            "hosts": ["partner.example.test"],
            "addresses": ["240.1.0.1"],
            "ports": [{"number": 8080, "name": "tcp", "protocol": "TCP"}],
            "resolution": "STATIC",
            "endpoints": [{"address": tb.pod_ip("b/api")}],
            "exportTo": ["."],
        },
    }


def test_a_service_entry_exported_to_its_namespace_is_reached_by_its_pods_only(
    tb: Testbed,
) -> None:
    """ServiceEntry exportTo ``.`` under the mesh's REGISTRY_ONLY (istio.io/latest/docs/
    reference/config/networking/service-entry/#ServiceEntry-export_to): b/sleep reaches the
    entry's address, a/sleep on the same node and Envoy does not (a's own internal listener,
    without the entry, black-holes it) yet still reaches b's api Service."""
    try:
        tb.set_mesh_config({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})
        apply_docs(tb, partner_entry(tb))
        wait_for(lambda: status(tb, "b/sleep", PARTNER) == "200", 30, "b reaching its entry")
        wait_for(
            lambda: scope_fallback(tb, "outbound-internal/a") == "BlackHoleCluster",
            30,
            "a's own listener under REGISTRY_ONLY",
            step=0.3,
        )
        assert {status(tb, "a/sleep", PARTNER) for _ in range(3)} == {"000"}
        assert status(tb, "a/sleep", API) == "200"
    finally:
        apply_docs(tb)
        tb.set_mesh_config({})
    wait_for(lambda: scope_fallback(tb, "outbound-internal/a") == "", 30, "a's listener gone")
