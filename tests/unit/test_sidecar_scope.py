"""Istio's Sidecar resource on the node: pods under one Sidecar share a scope, an internal
listener holding only the service chains their egress hosts import and their own fallback for
the rest (istio.io/latest/docs/reference/config/networking/sidecar/, istio/istio
pilot/pkg/model/sidecar.go)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from nodeagent.dns import names
from nodeagent.mesh import analysis, enforcement, sidecar_scope
from nodeagent.mesh.model import (
    REGISTRY_ONLY,
    IstioResource,
    MeshConfig,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources.directory import parse_document
from nodeagent.translate import LocalPod, TranslationCache, build
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import OUTBOUND_INTERNAL
from tests.unit.envoy_validate import assert_envoy_accepts_resources

ROOT = "istio-system"
SHOP_WEB = ("shop", "web", "10.96.0.10")
BILLING = ("billing", "ledger", "10.96.1.10")
ISTIOD = (ROOT, "istiod", "10.96.2.10")
SHOP_SCOPE = f"{OUTBOUND_INTERNAL}/shop/shop/default"


def sidecar(
    namespace: str,
    name: str = "default",
    hosts: list[str] | None = None,
    created: str = "",
    **spec: Any,
) -> IstioResource:
    """A Sidecar; HOSTS: its one egress listener's hosts (None: no egress at all)."""
    body = dict(spec)
    if hosts is not None:
        body.setdefault("egress", [{"hosts": hosts}])
    return IstioResource(
        "networking.istio.io", "v1", "Sidecar", namespace, name, body, {}, {}, created
    )


def mesh(policy: str = "ALLOW_ANY") -> MeshStore:
    """Three namespaces, one service each (80 http, 5432 tcp)."""
    s = MeshStore("n1")
    s.set_mesh_config(MeshConfig(outbound_traffic_policy=policy))
    for ns, name, vip in (SHOP_WEB, BILLING, ISTIOD):
        ports = (ServicePort(80, "http", 8080), ServicePort(5432, "tcp-db", 5432))
        s.put_service(Service(ns, name, vip, ports, {"app": name}))
    return s


def pod(namespace: str, name: str, labels: dict[str, str] | None = None) -> LocalPod:
    return LocalPod(Pod(namespace, name, labels=labels or {}), f"/run/netns/{name}")


def as_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def target_of(out: dict[str, Any], p: LocalPod) -> str:
    """The internal listener a pod's outbound listener hands its connections to."""
    listener = as_json(out[e.LISTENER][f"virtualOutbound/{p.pod.namespace}/{p.pod.name}"])
    tcp = listener["defaultFilterChain"]["filters"][-1]["typedConfig"]
    return str(tcp["cluster"])


def reach(out: dict[str, Any], listener: str) -> tuple[set[tuple[str, int]], str]:
    """The VIP:ports an internal listener has a chain for, and where anything else goes."""
    as_dict = as_json(out[e.LISTENER][listener])
    vips = {
        (
            c["filterChainMatch"]["prefixRanges"][0]["addressPrefix"],
            c["filterChainMatch"]["destinationPort"],
        )
        for c in as_dict.get("filterChains", [])
        if "prefixRanges" in c["filterChainMatch"]  # not the sidecar form's loop guard
    }
    fallback = as_dict["defaultFilterChain"]["filters"][-1]["typedConfig"]["cluster"]
    return vips, str(fallback)


def ports(vip: str) -> set[tuple[str, int]]:
    return {(vip, 80), (vip, 5432)}


# -- which Sidecar, which hosts ---------------------------------------------------------------


def test_a_selector_sidecar_wins_over_the_namespace_one_which_wins_over_the_root_default() -> None:
    s = mesh()
    s.put_istio(sidecar(ROOT, "mesh-default", ["*/*"]))
    assert sidecar_scope.sidecar_for(s, "shop", {}).name == "mesh-default"  # type: ignore[union-attr]
    s.put_istio(sidecar("shop", "ns-wide", ["./*"]))
    s.put_istio(sidecar("shop", "for-web", ["./*"], workloadSelector={"labels": {"app": "web"}}))
    assert sidecar_scope.sidecar_for(s, "shop", {"app": "web"}).name == "for-web"  # type: ignore[union-attr]
    assert sidecar_scope.sidecar_for(s, "shop", {"app": "db"}).name == "ns-wide"  # type: ignore[union-attr]
    # A root namespace Sidecar with a selector applies in the root namespace only.
    s.put_istio(sidecar(ROOT, "a-selector", ["*/*"], workloadSelector={"labels": {"app": "x"}}))
    assert sidecar_scope.sidecar_for(s, "billing", {"app": "x"}).name == "mesh-default"  # type: ignore[union-attr]
    assert sidecar_scope.sidecar_for(MeshStore(), "shop", {}) is None


def test_of_two_namespace_wide_sidecars_the_oldest_applies() -> None:
    s = mesh()
    s.put_istio(sidecar("shop", "newer", ["./*"], created="2026-01-02T00:00:00Z"))
    s.put_istio(sidecar("shop", "older", ["*/*"], created="2026-01-01T00:00:00Z"))
    assert sidecar_scope.sidecar_for(s, "shop", {}).name == "older"  # type: ignore[union-attr]


def test_egress_hosts_import_as_istiod_selects_services() -> None:
    """``.`` is the client namespace (the root default's too); entries naming a service's own
    namespace are the only ones checked for it (``*/`` only when none does); ``~`` imports
    nothing; a port trims the import to that port."""
    s = mesh()
    scope = sidecar_scope.scope_of(
        s, sidecar(ROOT, hosts=["./*", "*/ledger.billing.svc.cluster.local", "~/*"]), "shop"
    )
    assert scope.name == f"{OUTBOUND_INTERNAL}/shop/{ROOT}/default"
    assert scope.admits("shop", "web.shop.svc.cluster.local", 80)
    assert scope.admits("billing", "ledger.billing.svc.cluster.local", 5432)
    assert not scope.admits(ROOT, "istiod.istio-system.svc.cluster.local", 80)
    named = sidecar_scope.scope_of(
        s, sidecar("shop", hosts=["billing/x.example.com", "*/*"]), "shop"
    )
    assert not named.admits("billing", "ledger.billing.svc.cluster.local", 80)  # billing/ decides
    assert named.admits(ROOT, "istiod.istio-system.svc.cluster.local", 80)
    wild = sidecar_scope.scope_of(
        s, sidecar("shop", hosts=["*/*.billing.svc.cluster.local"]), "shop"
    )
    assert wild.admits("billing", "ledger.billing.svc.cluster.local", 80)
    assert not wild.admits("shop", "web.shop.svc.cluster.local", 80)
    port = sidecar("shop", egress=[{"port": {"number": 5432, "protocol": "TCP"}, "hosts": ["*/*"]}])
    trimmed = sidecar_scope.scope_of(s, port, "shop")
    assert trimmed.admits("billing", "ledger.billing.svc.cluster.local", 5432)
    assert not trimmed.admits("billing", "ledger.billing.svc.cluster.local", 80)
    everything = sidecar_scope.scope_of(
        s, sidecar("shop", outboundTrafficPolicy={"mode": "REGISTRY_ONLY"}), "shop"
    )
    assert everything.admits(ROOT, "istiod.istio-system.svc.cluster.local", 80)  # no egress: */*
    assert everything.policy("ALLOW_ANY") == REGISTRY_ONLY


def test_a_host_without_a_namespace_is_skipped_with_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scope = sidecar_scope.scope_of(
        mesh(), sidecar("shop", hosts=["web.shop.svc.cluster.local"]), "shop"
    )
    assert not scope.admits("shop", "web.shop.svc.cluster.local", 80)
    assert "Sidecar shop/default: egress[0].hosts[0] 'web.shop.svc.cluster.local'" in caplog.text


def test_services_a_virtual_service_in_scope_routes_to_are_in_scope() -> None:
    s = mesh()
    vs = {
        "hosts": ["web"],
        "http": [{"route": [{"destination": {"host": "ledger.billing.svc.cluster.local"}}]}],
    }
    s.put_istio(IstioResource("networking.istio.io", "v1", "VirtualService", "shop", "vs", vs))
    scope = sidecar_scope.scope_of(s, sidecar("shop", hosts=["./*"]), "shop")
    assert scope.admits("billing", "ledger.billing.svc.cluster.local", 80)
    assert not scope.admits(ROOT, "istiod.istio-system.svc.cluster.local", 80)


# -- on the node ------------------------------------------------------------------------------


def test_pods_under_a_namespace_sidecar_see_only_its_services_others_see_all(
    tmp_path: Path,
) -> None:
    """The issue's case: a pod of shop under ``./*`` + ``istio-system/*`` REGISTRY_ONLY gets
    shop's and istio-system's services and a black hole for the rest (billing's VIP too); a pod
    of billing, unscoped, on the same node keeps every chain and the mesh's ALLOW_ANY."""
    s = mesh()
    s.put_istio(
        sidecar("shop", hosts=["./*", f"{ROOT}/*"], outboundTrafficPolicy={"mode": "REGISTRY_ONLY"})
    )
    scoped, free = pod("shop", "a"), pod("billing", "b")
    out = build(s, [scoped, free]).resources
    assert target_of(out, scoped) == SHOP_SCOPE
    assert target_of(out, free) == OUTBOUND_INTERNAL
    assert reach(out, SHOP_SCOPE) == (ports(SHOP_WEB[2]) | ports(ISTIOD[2]), "BlackHoleCluster")
    everything = ports(SHOP_WEB[2]) | ports(ISTIOD[2]) | ports(BILLING[2])
    assert reach(out, OUTBOUND_INTERNAL) == (everything, "PassthroughCluster")
    assert SHOP_SCOPE in out[e.CLUSTER]
    # Shared: one route table and one cluster per service port, whoever calls.
    assert {n for n in out[e.ROUTE] if n.startswith("outbound|")} == {
        f"outbound|80||{h}"
        for h in (
            "web.shop.svc.cluster.local",
            "ledger.billing.svc.cluster.local",
            "istiod.istio-system.svc.cluster.local",
        )
    }
    # (EDS clusters need an ADS server, which Envoy's validate mode has not: left out.)
    internal = ("BlackHoleCluster", "PassthroughCluster", SHOP_SCOPE, OUTBOUND_INTERNAL)
    outbound = ("virtualOutbound/shop/a", "virtualOutbound/billing/b")
    assert_envoy_accepts_resources(
        tmp_path,
        clusters=[out[e.CLUSTER][n] for n in internal],
        listeners=[out[e.LISTENER][n] for n in outbound]
        + [_tcp_only(out[e.LISTENER][n]) for n in (SHOP_SCOPE, OUTBOUND_INTERNAL)],
    )


def _tcp_only(listener: Any) -> dict[str, Any]:
    """LISTENER without its HTTP chains (their RDS needs an ADS server, which Envoy's validate
    mode has not)."""
    as_dict = json_format.MessageToDict(listener, preserving_proto_field_name=True)
    as_dict["filter_chains"] = [
        c for c in as_dict.get("filter_chains", []) if "tcp_proxy" in c["filters"][-1]["name"]
    ]
    return as_dict


def test_a_sidecars_outbound_traffic_policy_overrides_the_mesh_config() -> None:
    s = mesh(REGISTRY_ONLY)
    s.put_istio(sidecar("shop", hosts=["./*"], outboundTrafficPolicy={"mode": "ALLOW_ANY"}))
    out = build(s, [pod("shop", "a"), pod("billing", "b")]).resources
    assert reach(out, SHOP_SCOPE)[1] == "PassthroughCluster"
    assert reach(out, OUTBOUND_INTERNAL)[1] == "BlackHoleCluster"


def test_without_an_unscoped_local_pod_there_is_no_node_wide_listener() -> None:
    """The point of scoping on a node: the listener of every service's chain costs Envoy memory
    only while some local pod uses it."""
    s = mesh()
    s.put_istio(sidecar(ROOT, hosts=["./*"]))
    out = build(s, [pod("shop", "a"), pod("billing", "b")]).resources
    assert OUTBOUND_INTERNAL not in out[e.LISTENER] and OUTBOUND_INTERNAL not in out[e.CLUSTER]
    assert reach(out, f"{OUTBOUND_INTERNAL}/shop/{ROOT}/default")[0] == ports(SHOP_WEB[2])
    assert reach(out, f"{OUTBOUND_INTERNAL}/billing/{ROOT}/default")[0] == ports(BILLING[2])


def test_services_no_scope_reaches_get_no_cluster_while_every_local_pod_is_scoped() -> None:
    """As Istio's Sidecar trims a sidecar's clusters: with only scoped pods on the node, a
    service no scope admits has no cluster, route or endpoints there, unless a route in scope
    names it (a VirtualService destination); an unscoped pod brings everything back."""
    s = mesh()
    s.put_istio(sidecar("shop", hosts=["./*"]))
    scoped = pod("shop", "a")
    cache = TranslationCache()
    out = cache.build(s, [scoped]).resources
    hosts = {n.rpartition("|")[2] for n in out[e.CLUSTER] if n.startswith("outbound|")}
    assert hosts == {"web.shop.svc.cluster.local"}
    assert {n for n in out[e.ROUTE] if n.startswith("outbound|")} == {
        "outbound|80||web.shop.svc.cluster.local"
    }
    vs = {
        "hosts": ["web"],
        "http": [{"route": [{"destination": {"host": "ledger.billing.svc.cluster.local"}}]}],
    }
    s.put_istio(IstioResource("networking.istio.io", "v1", "VirtualService", "shop", "vs", vs))
    out = cache.build(s, [scoped]).resources
    assert "outbound|80||ledger.billing.svc.cluster.local" in out[e.CLUSTER]
    assert "outbound|80||ledger.billing.svc.cluster.local" in out[e.ENDPOINT]
    assert not any("istiod" in n for n in out[e.CLUSTER])
    out = cache.build(s, [scoped, pod("billing", "b")]).resources
    assert "outbound|80||istiod.istio-system.svc.cluster.local" in out[e.CLUSTER]
    assert out == build(s, [scoped, pod("billing", "b")]).resources


def test_trimming_follows_changes_service_by_service() -> None:
    """Each step of the incremental translation equals a fresh one: a new service out of every
    scope is left out, a change of it pushes nothing, a route naming it brings it in."""
    s = mesh()
    s.put_istio(sidecar("shop", hosts=["./*"]))
    pods = [pod("shop", "a")]
    cache = TranslationCache()
    cache.build(s, pods)
    ports = (ServicePort(80, "http", 8080),)
    steps = [
        lambda: s.put_service(Service("billing", "audit", "10.96.1.20", ports, {"app": "audit"})),
        lambda: s.put_service(Service("billing", "audit", "10.96.1.21", ports, {"app": "x"})),
        lambda: s.put_istio(
            IstioResource(
                "networking.istio.io",
                "v1",
                "VirtualService",
                "shop",
                "vs",
                {
                    "hosts": ["web"],
                    "http": [
                        {"route": [{"destination": {"host": "audit.billing.svc.cluster.local"}}]}
                    ],
                },
            )
        ),
        lambda: s.delete_istio("VirtualService/shop/vs"),
        lambda: s.delete_service("billing/audit"),
    ]
    audit = "outbound|80||audit.billing.svc.cluster.local"
    seen = []
    for i, step in enumerate(steps):
        step()
        made = cache.build(s, pods)
        assert made.resources == build(s, pods).resources, i
        seen.append(audit in made.resources[e.CLUSTER])
        if i == 1:  # audit changed, out of scope: nothing to push
            assert made.changed is not None and not any(made.changed.values())
    assert seen == [False, False, True, False, False]


def test_the_sidecar_form_keeps_only_its_scope() -> None:
    s = mesh()
    s.put_istio(sidecar("shop", hosts=["./*"], outboundTrafficPolicy={"mode": "REGISTRY_ONLY"}))
    out = build(s, [pod("shop", "a")], sidecar=True).resources
    assert reach(out, "virtualOutbound/shop/a") == (ports(SHOP_WEB[2]), "BlackHoleCluster")


def test_a_sidecar_change_resends_its_scope_only_and_a_pod_moving_scope_its_own_listener() -> None:
    s = mesh()
    s.put_istio(sidecar("shop", hosts=["./*"]))
    a, b, c = pod("shop", "a", {"app": "x"}), pod("shop", "b"), pod("billing", "c")
    cache = TranslationCache()
    cache.build(s, [a, b, c])
    s.put_istio(sidecar("shop", hosts=["./*", "billing/*"]))
    changed = cache.build(s, [a, b, c]).changed
    assert changed is not None
    assert changed.get(e.LISTENER) == {SHOP_SCOPE}
    assert not changed.get(e.CLUSTER) and not changed.get(e.ROUTE)
    s.put_istio(sidecar("shop", "for-x", ["*/*"], workloadSelector={"labels": {"app": "x"}}))
    out = cache.build(s, [a, b, c])
    assert out.changed is not None
    new_scope = f"{OUTBOUND_INTERNAL}/shop/shop/for-x"
    assert out.changed.get(e.LISTENER) == {"virtualOutbound/shop/a", new_scope}
    assert out.changed.get(e.CLUSTER) == {new_scope}
    assert target_of(out.resources, a) == new_scope and target_of(out.resources, b) == SHOP_SCOPE


# -- accepted, and said what is enforced -------------------------------------------------------

# The forms istio.io's Sidecar reference page documents (written here, not copied: there is no
# Sidecar sample in Istio's samples/).
DOCUMENTED = [
    {"egress": [{"hosts": ["./*", f"{ROOT}/*"]}]},
    {
        "workloadSelector": {"labels": {"app": "ratings"}},
        "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
        "egress": [
            {
                "port": {"number": 9080, "protocol": "HTTP", "name": "egresshttp"},
                "hosts": ["prod-us1/*"],
            },
            {"hosts": [f"{ROOT}/*"]},
        ],
    },
    {"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}, "egress": [{"hosts": ["~/*"]}]},
]


@pytest.mark.parametrize("spec", DOCUMENTED)
def test_documented_sidecars_pass_istios_schema_and_are_enforced(spec: dict[str, Any]) -> None:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": spec,
    }
    assert IstioSchemas.load().validate(doc) == []
    assert enforcement.not_enforced(sidecar("shop", **spec)) is None


def test_what_is_not_enforced_yet_is_named() -> None:
    spec = {
        "ingress": [
            {
                "port": {"number": 9080, "protocol": "HTTP", "name": "h"},
                "defaultEndpoint": "127.0.0.1:8080",
            }
        ],
        "egress": [{"bind": "127.0.0.2", "captureMode": "NONE", "hosts": ["./*"]}],
    }
    found = enforcement.not_enforced(sidecar("shop", **spec))
    assert found is not None
    assert set(found.fields) == {"ingress", "egress[0].bind", "egress[0].captureMode"}


def test_service_entry_hosts_are_scoped_by_their_entrys_namespace_and_host() -> None:
    """A ServiceEntry host is a registry service of its entry's namespace (mesh/
    service_entries.py): a scope imports it by ``ns/host`` like any service. ``./*`` in shop
    leaves out ext's api.example.com (no Host-routing entry for it, no cluster while every pod
    is scoped); ``*/api.example.com`` brings both."""
    api = "api.example.com"
    s = mesh()
    spec = {
        "hosts": [api],
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "resolution": "DNS",
    }
    s.put_istio(IstioResource("networking.istio.io", "v1", "ServiceEntry", "ext", "api", spec))
    s.put_istio(sidecar("shop", hosts=["./*"]))
    pods = [pod("shop", "a")]
    cache = TranslationCache()
    out = cache.build(s, pods).resources
    assert f"outbound|80||{api}" not in out[e.CLUSTER]
    assert not any(api in str(as_json(t)) for n, t in out[e.ROUTE].items() if n.startswith("80"))
    s.put_istio(sidecar("shop", hosts=["./*", f"*/{api}"]))
    out = cache.build(s, pods).resources
    assert f"outbound|80||{api}" in out[e.CLUSTER]
    tables = [as_json(t) for n, t in out[e.ROUTE].items() if n.startswith("80")]
    assert any(v["domains"][0] == api for t in tables for v in t["virtualHosts"])
    assert out == build(s, pods).resources


def test_analyze_reports_conflicting_sidecars_and_which_one_applies() -> None:
    """istioctl analyze's IST0111 (two namespace-wide Sidecars) and IST0110 (two selectors on
    one pod), each saying which Sidecar the pods use: the oldest, as sidecar_for picks."""
    s = mesh()
    s.put_pod(Pod("shop", "web-1", labels={"app": "web", "tier": "front"}))
    s.put_pod(Pod("shop", "db-1", labels={"app": "db"}))
    s.put_istio(sidecar("shop", "older", ["./*"], created="2026-01-01T00:00:00Z"))
    s.put_istio(sidecar("shop", "newer", ["*/*"], created="2026-01-02T00:00:00Z"))
    by_app = {"labels": {"app": "web"}}
    by_tier = {"labels": {"tier": "front"}}
    s.put_istio(sidecar("shop", "app", ["./*"], "2026-01-03T00:00:00Z", workloadSelector=by_app))
    s.put_istio(sidecar("shop", "tier", ["./*"], "2026-01-04T00:00:00Z", workloadSelector=by_tier))
    found = {(f.message.code, f.name): f.detail for f in analysis.analyze(s)}
    assert found == {
        ("IST0111", "older"): "Sidecars older, newer of namespace shop have no workloadSelector:"
        " its pods use this one (the oldest)",
        ("IST0111", "newer"): "Sidecars older, newer of namespace shop have no workloadSelector:"
        " its pods use older, not this one (the oldest)",
        ("IST0110", "app"): "Sidecars app, tier select pod web-1: it uses this one (the oldest)",
        ("IST0110", "tier"): "Sidecars app, tier select pod web-1: it uses app, not this one"
        " (the oldest)",
    }
    assert sidecar_scope.sidecar_for(s, "shop", {"app": "web", "tier": "front"}).name == "app"  # type: ignore[union-attr]
    assert sidecar_scope.sidecar_for(s, "shop", {"app": "db"}).name == "older"  # type: ignore[union-attr]


# -- exportTo: per client namespace -------------------------------------------------------------


def _entry(namespace: str, host: str, vip: str, export_to: list[str]) -> IstioResource:
    spec: dict[str, Any] = {
        "hosts": [host],
        "addresses": [vip],
        "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
        "resolution": "NONE",
        "exportTo": export_to,
    }
    return IstioResource("networking.istio.io", "v1", "ServiceEntry", namespace, host, spec)


def test_a_service_entry_exported_to_its_namespace_reaches_only_its_pods() -> None:
    """ServiceEntry exportTo ``.`` (istio.io/latest/docs/reference/config/networking/
    service-entry/#ServiceEntry-export_to): shop's pod reaches shop's entry through the node's
    outbound-internal; billing's pod on the same node does not see it: its namespace's own
    listener lacks the chain and falls back to the mesh's policy (REGISTRY_ONLY: BlackHole),
    while still reaching every other service. One listener per namespace that differs, not
    per pod; exported everywhere again, billing is back on outbound-internal."""
    s = mesh(REGISTRY_ONLY)
    s.put_istio(_entry("shop", "pay.example.com", "240.0.0.9", ["."]))
    shop, billing, billing2 = pod("shop", "a"), pod("billing", "b"), pod("billing", "c")
    cache = TranslationCache()
    out = cache.build(s, [shop, billing, billing2]).resources
    mine = f"{OUTBOUND_INTERNAL}/billing"
    assert target_of(out, shop) == OUTBOUND_INTERNAL
    assert target_of(out, billing) == target_of(out, billing2) == mine
    everything = ports(SHOP_WEB[2]) | ports(ISTIOD[2]) | ports(BILLING[2])
    assert reach(out, OUTBOUND_INTERNAL) == (everything | {("240.0.0.9", 443)}, "BlackHoleCluster")
    assert reach(out, mine) == (everything, "BlackHoleCluster")
    assert "outbound|443||pay.example.com" in out[e.CLUSTER]
    assert {n for n in out[e.LISTENER] if n.startswith(OUTBOUND_INTERNAL)} == {
        OUTBOUND_INTERNAL,
        mine,
    }
    assert out == build(s, [shop, billing, billing2]).resources
    s.set_mesh_config(MeshConfig(outbound_traffic_policy="ALLOW_ANY"))
    out = cache.build(s, [shop, billing, billing2]).resources
    assert reach(out, mine) == (everything, "PassthroughCluster")
    s.put_istio(_entry("shop", "pay.example.com", "240.0.0.9", ["shop", "billing"]))
    out = cache.build(s, [shop, billing, billing2]).resources
    assert target_of(out, billing) == OUTBOUND_INTERNAL and mine not in out[e.LISTENER]
    # Exported to billing only: shop's pod gets the namespace listener; no pod of billing here.
    s.put_istio(_entry("shop", "pay.example.com", "240.0.0.9", ["billing"]))
    out = cache.build(s, [shop, billing]).resources
    assert target_of(out, shop) == f"{OUTBOUND_INTERNAL}/shop"
    assert target_of(out, billing) == OUTBOUND_INTERNAL
    assert out == build(s, [shop, billing]).resources


def test_a_sidecar_scope_also_leaves_out_hosts_not_exported_to_its_namespace() -> None:
    """A Sidecar importing ``*/*`` still does not bring in a host not exported to its namespace
    (istiod's scope selects among the services exported to it: push_context.go
    servicesExportedToNamespace); its listener keeps the Sidecar's name and policy."""
    s = mesh()
    s.put_istio(_entry("shop", "pay.example.com", "240.0.0.9", ["."]))
    s.put_istio(sidecar("billing", hosts=["*/*"], outboundTrafficPolicy={"mode": "REGISTRY_ONLY"}))
    shop, billing = pod("shop", "a"), pod("billing", "b")
    out = build(s, [shop, billing]).resources
    scope = f"{OUTBOUND_INTERNAL}/billing/billing/default"
    assert target_of(out, billing) == scope
    assert ("240.0.0.9", 443) not in reach(out, scope)[0]
    assert reach(out, scope)[1] == "BlackHoleCluster"
    assert ("240.0.0.9", 443) in reach(out, OUTBOUND_INTERNAL)[0]
    # Under the Sidecar only, shop gone: nothing exported to billing, nothing built for it.
    out = build(s, [billing]).resources
    assert "outbound|443||pay.example.com" not in out[e.CLUSTER]


def test_exported_to_follows_istios_export_to_values() -> None:
    assert sidecar_scope.exported_to((), "shop", "billing")
    assert sidecar_scope.exported_to(("*",), "shop", "billing")
    assert sidecar_scope.exported_to((".",), "shop", "shop")
    assert not sidecar_scope.exported_to((".",), "shop", "billing")
    assert sidecar_scope.exported_to(("billing",), "shop", "billing")
    assert not sidecar_scope.exported_to(("~",), "shop", "shop")


def test_a_services_export_to_annotation_hides_it_from_other_namespaces() -> None:
    """A Kubernetes Service's ``networking.istio.io/exportTo`` annotation (istio.io/latest/docs/
    reference/config/annotations/, comma-separated, as pilot/pkg/serviceregistry/kube/
    conversion.go reads it) works as a ServiceEntry's exportTo: ``.`` keeps billing's ledger
    from shop's pod (its namespace's own listener, no DNS answer) while billing's pod has it."""
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "ledger",
            "namespace": "billing",
            "annotations": {"networking.istio.io/exportTo": " ., istio-system "},
        },
        "spec": {"clusterIP": BILLING[2], "ports": [{"port": 80, "name": "http"}]},
    }
    (parsed,) = parse_document(doc, "test", 0)
    assert isinstance(parsed.record, Service)
    assert parsed.record.export_to == (".", "istio-system")
    s = mesh()
    s.put_service(parsed.record)
    shop, billing = pod("shop", "a"), pod("billing", "b")
    out = build(s, [shop, billing]).resources
    assert target_of(out, shop) == f"{OUTBOUND_INTERNAL}/shop"
    assert reach(out, f"{OUTBOUND_INTERNAL}/shop")[0] == ports(SHOP_WEB[2]) | ports(ISTIOD[2])
    assert target_of(out, billing) == OUTBOUND_INTERNAL
    assert (BILLING[2], 80) in reach(out, OUTBOUND_INTERNAL)[0]
    table = names.build(s.services.values(), "cluster.local")
    assert table.lookup("ledger.billing", "shop") is None
    assert table.lookup("ledger.billing", "billing") is not None
    # Exported to no namespace with a local pod: not built at all.
    out = build(s, [shop]).resources
    assert "outbound|80||ledger.billing.svc.cluster.local" not in out[e.CLUSTER]
