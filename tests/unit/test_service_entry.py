"""ServiceEntry hosts as registry services, and what the node Envoy gets for them (issue #16).

Istio: istio.io/latest/docs/reference/config/networking/service-entry/ and istio/istio
pilot/pkg/serviceregistry/serviceentry/conversion.go (a service per host), pilot/pkg/networking/
core/cluster_builder.go (STATIC: EDS, DNS: STRICT_DNS, DNS_ROUND_ROBIN: LOGICAL_DNS, NONE:
ORIGINAL_DST), listener building for hosts without addresses (0.0.0.0:<port>, HTTP routed by Host
among the port's hosts; route/route.go BuildCatchAllVirtualHost: allow_any / block_all 502).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format

from nodeagent.identity.tls_files import FileSecrets
from nodeagent.mesh.model import (
    IstioResource,
    MeshConfig,
    Namespace,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.service_entries import derive, derived_name, host_of
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import TranslationCache, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import ENDPOINT_META, ORIGINAL_DST_META, OUTBOUND_INTERNAL
from nodeagent.translate.tls import TLS_MODE_KEY
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.istio_data import istio_data
from tests.unit.test_translate import as_json, local, store

API = "api.example.com"
HTTP_80 = {"number": 80, "name": "http", "protocol": "HTTP"}


def entry(name: str = "api", namespace: str = "shop", **spec: Any) -> IstioResource:
    body = {"hosts": [API], "ports": [HTTP_80], "resolution": "DNS"} | spec
    return IstioResource("networking.istio.io", "v1", "ServiceEntry", namespace, name, body)


def istio(kind: str, name: str, spec: dict[str, Any], namespace: str = "shop") -> IstioResource:
    return IstioResource("networking.istio.io", "v1", kind, namespace, name, spec)


def cluster(out: Any, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(
        out[e.CLUSTER][name], preserving_proto_field_name=True
    )
    return found


def chains(out: Any) -> dict[str, dict[str, Any]]:
    listener = as_json(out[e.LISTENER][OUTBOUND_INTERNAL])
    return {c["name"]: c for c in listener.get("filterChains", [])}


def test_each_host_is_a_service_with_its_static_endpoints() -> None:
    se = entry(
        hosts=[API, "www.example.com"],
        ports=[HTTP_80, {"number": 5432, "name": "tcp-db", "protocol": "TCP", "targetPort": 6432}],
        resolution="STATIC",
        location="MESH_INTERNAL",
        endpoints=[
            {"address": "10.1.0.1", "labels": {"v": "1"}},
            {"address": "10.1.0.2", "ports": {"http": 8080}, "weight": 3},
            {"address": "not-an-ip"},  # STATIC needs IPs: left out
        ],
    )
    services, slices = derive(se)
    assert [s.hostname() for s in services] == [API, "www.example.com"]
    assert services[0].key == f"shop/{derived_name('api', API)}"
    assert host_of(services[0].name) == API and host_of("web") is None
    assert services[0].entry is not None and not services[0].entry.external
    assert services[0].cluster_ip == ""  # no addresses: reached by port
    # One slice per port mapping: 80 (and 5432 -> its targetPort) by default, or the
    # endpoint's own ports by port name.
    mine = [s for s in slices if s.service == services[0].name]
    assert sorted(tuple(p.port for p in s.ports) for s in mine) == [(80, 6432), (8080, 6432)]
    first = next(s for s in mine if s.ports[0].port == 80).endpoints[0]
    assert (first.addresses, dict(first.labels)) == (("10.1.0.1",), {"v": "1"})
    assert next(s for s in mine if s.ports[0].port == 8080).endpoints[0].weight == 3
    assert derive(entry())[1] == []  # DNS: Envoy resolves, no slices


def test_the_store_keeps_entries_services_up_to_date() -> None:
    s = store()
    s.put_istio(entry())
    svc = s.service_of_entry_host(API)
    assert svc is not None and svc.key in s.services
    # Another entry naming the same host: the first keeps it, until it goes.
    s.put_istio(entry("other", ports=[{"number": 81, "name": "http"}]))
    assert s.service_of_entry_host(API) == svc
    s.delete_istio("ServiceEntry/shop/api")
    moved = s.service_of_entry_host(API)
    assert moved is not None and moved.name == derived_name("other", API)
    assert svc.key not in s.services
    s.delete_istio("ServiceEntry/shop/other")
    assert s.service_of_entry_host(API) is None


def test_a_workload_selector_selects_pods_and_workload_entries_of_its_namespace() -> None:
    s = store()
    selector = {"workloadSelector": {"labels": {"app": "vm"}}, "resolution": "STATIC"}
    s.put_istio(entry(location="MESH_INTERNAL", **selector))
    s.put_pod(Pod("shop", "vm-1", labels={"app": "vm"}, pod_ips=("10.244.1.9",)))
    s.put_pod(Pod("other", "vm-2", labels={"app": "vm"}, pod_ips=("10.244.1.8",)))
    s.put_istio(istio("WorkloadEntry", "vm-3", {"address": "10.9.0.3", "labels": {"app": "vm"}}))
    svc = s.service_of_entry_host(API)
    assert svc is not None
    endpoints = [ep for slice_ in s.slices_of(svc) for ep in slice_.endpoints]
    assert {(ep.addresses[0], ep.pod) for ep in endpoints} == {
        ("10.244.1.9", "shop/vm-1"),
        ("10.9.0.3", ""),
    }
    s.delete_pod("shop/vm-1")
    endpoints = [ep for slice_ in s.slices_of(svc) for ep in slice_.endpoints]
    assert [ep.addresses for ep in endpoints] == [("10.9.0.3",)]


def _inline_routes(listener: dict[str, Any], out: Any) -> dict[str, Any]:
    """LISTENER with each RDS reference replaced by the table itself (validate mode has no
    ADS)."""
    for chain in listener.get("filter_chains", []):
        for f in chain["filters"]:
            rds = f["typed_config"].pop("rds", None)
            if rds is not None:
                table = out[e.ROUTE][rds["route_config_name"]]
                f["typed_config"]["route_config"] = json_format.MessageToDict(
                    table, preserving_proto_field_name=True
                )
    listener.pop("default_filter_chain", None)
    return listener


def test_dns_host_without_addresses_is_routed_by_host_and_tls_originated(
    tmp_path: Path,
) -> None:
    """The canonical egress TLS origination (istio.io/latest/docs/tasks/traffic-management/
    egress/egress-tls-origination/): port 80 to targetPort 443, a DestinationRule SIMPLE. The
    host's STRICT_DNS cluster resolves its name, at 443, with its own TLS socket (SNI the host,
    the entry's subjectAltNames); port 80 of any destination is routed by Host among the port's
    hosts, the rest passed through (ALLOW_ANY)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    s = store()
    s.put_istio(entry(ports=[HTTP_80 | {"targetPort": 443}], subjectAltNames=[API]))
    tls = {"mode": "SIMPLE", "caCertificates": str(ca)}
    level = [{"port": {"number": 80}, "tls": tls}]
    s.put_istio(
        istio(
            "DestinationRule", "api", {"host": API, "trafficPolicy": {"portLevelSettings": level}}
        )
    )
    out = translate(s, [local("a")])
    made = cluster(out, f"outbound|80||{API}")
    assert made["type"] == "STRICT_DNS" and made["dns_lookup_family"] == "V4_ONLY"
    (group,) = made["load_assignment"]["endpoints"]
    address = group["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == (API, 443)
    context = made["transport_socket"]["typed_config"]
    assert context["sni"] == API
    sans = context["common_tls_context"]["combined_validation_context"]
    assert API in str(sans["default_validation_context"])
    port_chain = chains(out)["0.0.0.0_80"]
    assert port_chain["filterChainMatch"] == {"destinationPort": 80}
    table = as_json(out[e.ROUTE]["80"])
    assert [v["name"] for v in table["virtualHosts"]] == [f"{API}:80", "allow_any"]
    assert table["virtualHosts"][0]["domains"] == [API, f"{API}:80"]
    route = table["virtualHosts"][0]["routes"][0]["route"]
    assert route["cluster"] == f"outbound|80||{API}"
    assert f"outbound|80||{API}" not in out[e.ROUTE]  # only inside table 80: nobody asks
    listener = json_format.MessageToDict(
        out[e.LISTENER][OUTBOUND_INTERNAL], preserving_proto_field_name=True
    )
    assert_envoy_accepts_resources(
        tmp_path,
        clusters=[out[e.CLUSTER][f"outbound|80||{API}"], out[e.CLUSTER]["PassthroughCluster"]],
        listeners=[_inline_routes(listener, out)],
        secrets=FileSecrets().sds_secrets(s),
    )


def test_registry_only_answers_other_hosts_with_block_all() -> None:
    s = store(outbound_traffic_policy="REGISTRY_ONLY")
    s.put_istio(entry())
    table = as_json(translate(s, [local("a")])[e.ROUTE]["80"])
    catch_all = table["virtualHosts"][-1]
    assert catch_all["name"] == "block_all" and catch_all["domains"] == ["*"]
    assert catch_all["routes"][0]["directResponse"] == {"status": 502}


def test_addresses_are_the_chain_prefixes_and_external_endpoints_plain() -> None:
    """STATIC with addresses (an IP and a CIDR): one chain matching both; EDS endpoints through
    originate without mTLS (MESH_EXTERNAL), never the same-node fast path; a DestinationRule
    subset selects endpoints by their own labels."""
    s = store()
    se = entry(
        addresses=["240.0.0.1", "192.168.0.0/16"],
        resolution="STATIC",
        endpoints=[{"address": "10.1.0.1", "labels": {"v": "1"}}, {"address": "10.1.0.2"}],
    )
    s.put_istio(se)
    subsets = [{"name": "v1", "labels": {"v": "1"}}]
    s.put_istio(istio("DestinationRule", "api", {"host": API, "subsets": subsets}))
    out = translate(s, [local("a")])
    match = chains(out)[f"outbound|80||{API}"]["filterChainMatch"]
    assert match["prefixRanges"] == [
        {"addressPrefix": "240.0.0.1", "prefixLen": 32},
        {"addressPrefix": "192.168.0.0", "prefixLen": 16},
    ]
    assert "80" not in out[e.ROUTE]  # reached by its addresses, not by Host on the port

    def endpoints(name: str) -> list[dict[str, Any]]:
        cla = as_json(out[e.ENDPOINT][name])
        return [lb for group in cla["endpoints"] for lb in group["lbEndpoints"]]

    every = endpoints(f"outbound|80||{API}")
    assert len(every) == 2
    modes = {lb["metadata"]["filterMetadata"][TLS_MODE_KEY]["tlsMode"] for lb in every}
    assert modes == {"disabled"}
    (v1,) = endpoints(f"outbound|80|v1|{API}")
    assert v1["metadata"]["filterMetadata"][ORIGINAL_DST_META]["local"] == "10.1.0.1:80"


def test_resolution_none_and_dns_round_robin_clusters() -> None:
    """NONE: where the caller dialled (a TCP port without addresses is the host's port);
    DNS_ROUND_ROBIN: LOGICAL_DNS with its first endpoint."""
    s = store()
    tcp = {"number": 9000, "name": "tcp", "protocol": "TCP"}
    s.put_istio(entry("none", hosts=["db.example.com"], ports=[tcp], resolution="NONE"))
    rr = [{"address": "a.example.com"}, {"address": "b.example.com"}]
    s.put_istio(entry("rr", hosts=["rr.example.com"], resolution="DNS_ROUND_ROBIN", endpoints=rr))
    out = translate(s, [local("a")])
    none = cluster(out, "outbound|9000||db.example.com")
    assert none["type"] == "STATIC" and "eds_cluster_config" not in none
    tcp_chain = chains(out)["outbound|9000||db.example.com"]
    assert tcp_chain["filterChainMatch"] == {"destinationPort": 9000}
    proxy = tcp_chain["filters"][-1]["typedConfig"]
    assert proxy["cluster"] == "outbound|9000||db.example.com"
    logical = cluster(out, "outbound|80||rr.example.com")
    assert logical["type"] == "LOGICAL_DNS"
    (group,) = logical["load_assignment"]["endpoints"]
    (only,) = group["lb_endpoints"]
    assert only["endpoint"]["address"]["socket_address"]["address"] == "a.example.com"


def test_export_to_dot_serves_only_its_own_namespace_pods() -> None:
    s = store()
    s.put_istio(entry(namespace="elsewhere", exportTo=["."]))
    assert f"outbound|80||{API}" not in translate(s, [local("a")])[e.CLUSTER]
    caller = local("a")
    other = type(caller)(Pod("elsewhere", "b"), "/run/netns/b")
    assert f"outbound|80||{API}" in translate(s, [caller, other])[e.CLUSTER]


def test_host_routing_follows_entries_coming_and_going_incrementally() -> None:
    """Port 80's Host routing table, built from the served entries' hosts without addresses,
    is at each step what a fresh translation gives (entries added, changed, excluded, gone)."""
    s = store()
    cache = TranslationCache()
    pods = [local("a")]
    other = "other.example.com"
    steps = [
        lambda: s.put_istio(entry()),
        lambda: s.put_istio(entry("other", hosts=[other])),
        lambda: s.put_istio(entry(ports=[HTTP_80 | {"targetPort": 8080}])),
        lambda: s.delete_istio("ServiceEntry/shop/api"),
        lambda: s.delete_istio("ServiceEntry/shop/other"),
    ]
    seen = []
    for step in steps:
        step()
        made = cache.build(s, pods).resources
        assert made == translate(s, pods)
        table = as_json(made[e.ROUTE]["80"]) if "80" in made[e.ROUTE] else {}
        seen.append([v["name"] for v in table.get("virtualHosts", [])])
    api, second = f"{API}:80", f"{other}:80"
    assert seen == [
        [api, "allow_any"],
        [api, second, "allow_any"],
        [api, second, "allow_any"],
        [second, "allow_any"],
        [],
    ]


def test_an_entry_change_rebuilds_only_its_hosts() -> None:
    s = store()
    s.put_istio(entry())
    cache = TranslationCache()
    before = cache.build(s, [local("a")]).resources
    s.put_istio(entry(ports=[HTTP_80 | {"targetPort": 8443}]))
    after = cache.build(s, [local("a")]).resources
    assert cache.full_recomputes == 1
    web = "outbound|80||web.shop.svc.cluster.local"
    assert after[e.CLUSTER][web] is before[e.CLUSTER][web]
    assert after[e.CLUSTER][f"outbound|80||{API}"] != before[e.CLUSTER][f"outbound|80||{API}"]


def test_istios_egress_sample_routes_port_80_to_443_with_tls() -> None:
    """bookinfo/networking/egress-rule-google-apis.yaml: its VirtualService sends port 80 to the
    443 cluster, which its DestinationRule originates TLS on."""
    from nodeagent.sources.directory import DirectorySource

    s = MeshStore()
    s.set_mesh_config(MeshConfig())
    root = istio_data("bookinfo/networking/egress-rule-google-apis.yaml").parent
    source = DirectorySource(root, s)
    source.scan()
    out = translate(s, [local("a")])
    host = "www.googleapis.com"
    (vhost, _) = as_json(out[e.ROUTE]["80"])["virtualHosts"]
    assert vhost["routes"][0]["route"]["cluster"] == f"outbound|443||{host}"
    assert "transport_socket" in cluster(out, f"outbound|443||{host}")
    assert chains(out)[f"outbound|443||{host}"]["filterChainMatch"] == {"destinationPort": 443}


def test_two_hosts_without_addresses_on_one_tcp_port_the_first_keeps_it() -> None:
    """Istio: a port of a host without addresses "must not be shared by any other service";
    the first entry (by key) keeps the port, rather than Envoy refusing the listener."""
    s = store()
    tcp = {"number": 9000, "name": "tcp", "protocol": "TCP"}
    s.put_istio(entry("a", hosts=["a.example.com"], ports=[tcp]))
    s.put_istio(entry("b", hosts=["b.example.com"], ports=[tcp]))
    out = translate(s, [local("a")])
    on_port = [
        c for c in chains(out).values() if c["filterChainMatch"] == {"destinationPort": 9000}
    ]
    assert [c["name"] for c in on_port] == ["outbound|9000||a.example.com"]
    assert "outbound|9000||b.example.com" in out[e.CLUSTER]  # still a cluster (VS may name it)


def test_mesh_internal_selected_pods_get_mtls_and_mesh_external_never() -> None:
    """location MESH_INTERNAL: a selected mesh pod is an mTLS endpoint (auto mTLS, its own
    identity); the same pod behind a MESH_EXTERNAL entry is sent plaintext."""
    for location, mode in (("MESH_INTERNAL", "istio"), ("MESH_EXTERNAL", "disabled")):
        s = store()
        s.put_namespace(Namespace("shop", {"nodeagent.io/mesh": "enabled"}))
        s.put_pod(
            Pod("shop", "vm-1", labels={"app": "vm"}, service_account="vm", pod_ips=("10.244.1.9",))
        )
        selector = {"labels": {"app": "vm"}}
        s.put_istio(entry(location=location, resolution="STATIC", workloadSelector=selector))
        cla = as_json(translate(s, [local("a")])[e.ENDPOINT][f"outbound|80||{API}"])
        (lb,) = cla["endpoints"][0]["lbEndpoints"]
        assert lb["metadata"]["filterMetadata"][TLS_MODE_KEY]["tlsMode"] == mode, location


def test_static_endpoints_rank_by_their_own_locality() -> None:
    """An entry endpoint's locality is its own (istio: endpoints[].locality), not a node's:
    the group Envoy balances it in, for locality load balancing."""
    s = store()
    far = [{"address": "10.1.0.1", "locality": "r2/z9"}, {"address": "10.1.0.2"}]
    s.put_istio(entry(resolution="STATIC", endpoints=far))
    cla = as_json(translate(s, [local("a")])[e.ENDPOINT][f"outbound|80||{API}"])
    where = {
        lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"]: group.get("locality", {})
        for group in cla["endpoints"]
        for lb in group["lbEndpoints"]
    }
    assert where["10.1.0.1:80"] == {"region": "r2", "zone": "z9"}
    assert where["10.1.0.2:80"] == {}


def test_the_oldest_entry_holds_a_host_and_a_kubernetes_service_wins_over_both() -> None:
    """Two entries naming one host: the older (creationTimestamp) holds it, whichever came
    first; a Kubernetes Service of that hostname wins over any entry (as Istio's registry)."""
    s = store()

    def dated(name: str, created: str) -> IstioResource:
        body = {"hosts": [API], "ports": [HTTP_80], "resolution": "DNS"}
        return IstioResource(
            "networking.istio.io", "v1", "ServiceEntry", "shop", name, body, created=created
        )

    s.put_istio(dated("young", "2026-02-01T00:00:00Z"))
    s.put_istio(dated("old", "2026-01-01T00:00:00Z"))
    holder = s.service_of_entry_host(API)
    assert holder is not None and holder.name == derived_name("old", API)
    assert derived_name("young", API) not in {svc.name for svc in s.services.values()}
    s.delete_istio("ServiceEntry/shop/old")
    holder = s.service_of_entry_host(API)
    assert holder is not None and holder.name == derived_name("young", API)

    kube = "web.shop.svc.cluster.local"  # store()'s Kubernetes Service
    s.put_istio(entry("shadow", hosts=[kube, "db.shop.svc.cluster.local"]))
    assert s.service_of_entry_host(kube) is None  # the Service keeps its name
    assert s.service_of_entry_host("db.shop.svc.cluster.local") is not None
    s.put_service(Service("shop", "db", "10.96.0.20", (ServicePort(80, "http"),)))
    assert s.service_of_entry_host("db.shop.svc.cluster.local") is None  # a Service came
    s.delete_service("shop/db")
    assert s.service_of_entry_host("db.shop.svc.cluster.local") is not None


def test_a_virtual_service_on_a_host_routed_entry_changes_its_ports_table() -> None:
    """The port's Host-routing table carries the host's own routes: a VirtualService for the
    host, applied later, is in it at the next build (and gone with it)."""
    s = store()
    s.put_istio(entry(ports=[HTTP_80, {"number": 8080, "name": "http-alt", "protocol": "HTTP"}]))
    cache = TranslationCache()

    def routed_to() -> str:
        table = as_json(cache.build(s, [local("a")]).resources[e.ROUTE]["80"])
        return str(table["virtualHosts"][0]["routes"][0]["route"]["cluster"])

    assert routed_to() == f"outbound|80||{API}"
    to_8080 = {"destination": {"host": API, "port": {"number": 8080}}}
    s.put_istio(istio("VirtualService", "api", {"hosts": [API], "http": [{"route": [to_8080]}]}))
    assert routed_to() == f"outbound|8080||{API}"
    s.delete_istio("VirtualService/shop/api")
    assert routed_to() == f"outbound|80||{API}"
    assert cache.full_recomputes == 1


def _lb_endpoints(out: Any, name: str) -> dict[str, dict[str, Any]]:
    """NAME's endpoints by their address (ip:port, as originate restores it)."""
    cla = as_json(out[e.ENDPOINT][name])
    return {
        lb["metadata"]["filterMetadata"][ORIGINAL_DST_META]["local"]: lb
        for group in cla["endpoints"]
        for lb in group["lbEndpoints"]
    }


def test_an_endpoints_network_is_a_label_subsets_select_and_every_network_is_reached() -> None:
    """Endpoint ``network`` (istio: endpoints[].network, WorkloadEntry network): with no
    multi-network gateways, Istio's EndpointsByNetworkFilter (pilot/pkg/xds/endpoints/
    ep_filters.go) keeps every endpoint, reached directly, whatever its network; AugmentLabels
    (pilot/pkg/serviceregistry/util/label/label.go) labels it topology.istio.io/network (its own
    label of that name wins), which a DestinationRule subset selects by."""
    s = store()
    eps = [
        {"address": "10.1.0.1", "network": "net-a"},
        {"address": "10.1.0.2", "network": "net-b"},
        {"address": "10.1.0.3", "network": "net-b", "labels": {"topology.istio.io/network": "x"}},
        {"address": "10.1.0.4"},
    ]
    s.put_istio(entry(resolution="STATIC", endpoints=eps))
    subsets = [
        {"name": "b", "labels": {"topology.istio.io/network": "net-b"}},
        {"name": "x", "labels": {"topology.istio.io/network": "x"}},
    ]
    s.put_istio(istio("DestinationRule", "api", {"host": API, "subsets": subsets}))
    out = translate(s, [local("a")])
    every = _lb_endpoints(out, f"outbound|80||{API}")
    assert sorted(every) == ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]
    assert sorted(_lb_endpoints(out, f"outbound|80|b|{API}")) == ["10.1.0.2:80"]
    assert sorted(_lb_endpoints(out, f"outbound|80|x|{API}")) == ["10.1.0.3:80"]


def _workload_entry(**spec: Any) -> IstioResource:
    body = {"address": "10.1.0.9", "labels": {"app": "vm"}} | spec
    return istio("WorkloadEntry", "vm-1", body)


def test_a_mesh_internal_endpoints_service_account_is_the_identity_verified() -> None:
    """WorkloadEntry / endpoint ``serviceAccount`` (istio: serviceentry/conversion.go
    convertEndpoint and getTLSModeFromWorkloadEntry): behind a MESH_INTERNAL entry the endpoint
    is sent mTLS (tlsMode istio) and verified as spiffe://<td>/ns/<entry ns>/sa/<account>, plus
    the entry's subjectAltNames (the service's accounts, cluster_tls.go buildIstioMutualTLS);
    its label security.istio.io/tlsMode: disabled turns mTLS off; without an account, or
    behind a MESH_EXTERNAL entry, plaintext."""
    vm = "spiffe://cluster.local/ns/shop/sa/vm"
    extra = "spiffe://cluster.local/ns/shop/sa/legacy"
    cases = [
        ("MESH_INTERNAL", {"serviceAccount": "vm"}, [], "istio", vm),
        ("MESH_INTERNAL", {"serviceAccount": "vm"}, [extra], "istio", f"{vm},{extra}"),
        (
            "MESH_INTERNAL",
            {
                "serviceAccount": "vm",
                "labels": {"app": "vm", "security.istio.io/tlsMode": "disabled"},
            },
            [],
            "disabled",
            None,
        ),
        ("MESH_INTERNAL", {}, [], "disabled", None),
        ("MESH_EXTERNAL", {"serviceAccount": "vm"}, [], "disabled", None),
    ]
    for location, we, sans, mode, verified in cases:
        s = store()
        s.put_istio(_workload_entry(**we))
        s.put_istio(
            entry(
                location=location,
                resolution="STATIC",
                workloadSelector={"labels": {"app": "vm"}},
                subjectAltNames=sans,
            )
        )
        out = translate(s, [local("a")])
        lb = _lb_endpoints(out, f"outbound|80||{API}")["10.1.0.9:80"]
        meta = lb["metadata"]["filterMetadata"]
        assert meta[TLS_MODE_KEY]["tlsMode"] == mode, (location, we)
        assert meta.get(ENDPOINT_META, {}).get("sans") == verified, (location, we)
        # Never the same-node fast path: a WorkloadEntry is no pod on this node.
        assert "envoyInternalAddress" in lb["endpoint"]["address"]
        assert lb["endpoint"]["address"]["envoyInternalAddress"]["serverListenerName"] == (
            "originate"
        )


def test_a_changed_endpoint_identity_is_a_new_envoy_host() -> None:
    """Envoy keeps a host (and its pooled, already verified connections) while its address
    stays, updating only its metadata; Istio puts the SANs on the cluster, whose change drains
    its pools. So the identity an endpoint is verified against is part of its endpoint_id: a
    WorkloadEntry whose serviceAccount changes, or turns plaintext, is another host, and no
    connection verified as the old account serves a request after the change."""

    def endpoint_id(**we: Any) -> str:
        s = store()
        s.put_istio(_workload_entry(**we))
        s.put_istio(
            entry(
                location="MESH_INTERNAL",
                resolution="STATIC",
                workloadSelector={"labels": {"app": "vm"}},
            )
        )
        lb = _lb_endpoints(translate(s, [local("a")]), f"outbound|80||{API}")["10.1.0.9:80"]
        return str(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"])

    vm, other, plain = (
        endpoint_id(serviceAccount="vm"),
        endpoint_id(serviceAccount="other"),
        endpoint_id(),
    )
    assert plain == "10.1.0.9:80"
    assert vm.startswith("10.1.0.9:80#") and other.startswith("10.1.0.9:80#")
    assert len({vm, other, plain}) == 3
    assert endpoint_id(serviceAccount="vm") == vm  # stable: an unchanged endpoint stays one host
