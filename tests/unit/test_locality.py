"""DestinationRule localityLbSetting: the node's EDS groups endpoints by their node's locality and
ranks or weights the groups relative to this node's locality, as istiod does for a sidecar
(istio/istio pilot/pkg/networking/core/loadbalancer/loadbalancer.go; the examples are those of
istio.io/latest/docs/reference/config/networking/destination-rule/#LocalityLoadBalancerSetting
and istio.io/latest/docs/tasks/traffic-management/locality-load-balancing/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from nodeagent.mesh.model import (
    REGION_LABEL,
    SUBZONE_LABEL,
    ZONE_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    Locality,
    MeshConfig,
    Namespace,
    Node,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource, ResourceError, parse_mesh_config
from nodeagent.translate import LocalPod, TranslationCache, build
from nodeagent.translate import envoy as e
from nodeagent.translate.destination_rule import check
from nodeagent.translate.internal import ORIGINAL_DST_META

HERE = "here"  # this agent's node
CLUSTER = "outbound|80||hello.shop.svc.cluster.local"


def node(name: str, locality: str) -> Node:
    labels = dict(zip((REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL), locality.split("/"), strict=False))
    return Node(name, labels)


def mesh_view(
    endpoints: dict[str, str], here: str, pod_labels: dict[str, dict[str, str]] | None = None
) -> MeshStore:
    """A store where service shop/hello has one endpoint per entry of ENDPOINTS (pod name ->
    the locality of its node, "" for a node with no labels, "?" for a node never seen), and
    this node's locality is HERE. A client pod runs here."""
    store = MeshStore(HERE)
    store.put_namespace(Namespace("shop", {"istio-injection": "enabled"}))
    store.put_node(node(HERE, here))
    store.put_pod(
        Pod("shop", "client", "u0", HERE, "client", {"app": "client"}, pod_ips=("10.1.0.1",))
    )
    slice_endpoints = []
    for i, (name, locality) in enumerate(sorted(endpoints.items())):
        node_name = f"node-{name}"
        if locality != "?":
            store.put_node(node(node_name, locality))
        ip = f"10.2.0.{i + 1}"
        labels = {"app": "hello", **(pod_labels or {}).get(name, {})}
        store.put_pod(Pod("shop", name, f"u{i}", node_name, "hello", labels, pod_ips=(ip,)))
        slice_endpoints.append(Endpoint((ip,), True, node_name, f"shop/{name}"))
    store.put_service(
        Service("shop", "hello", "10.96.0.10", (ServicePort(80, "http", 8080),), {"app": "hello"})
    )
    store.put_endpoint_slice(
        EndpointSlice(
            "shop", "hello-1", "hello", tuple(slice_endpoints), (EndpointPort(8080, "http"),)
        )
    )
    return store


def destination_rule(policy: dict[str, Any]) -> IstioResource:
    spec = {"host": "hello", "trafficPolicy": policy}
    return IstioResource("networking.istio.io", "v1", "DestinationRule", "shop", "hello", spec)


def local_pods(store: MeshStore) -> list[LocalPod]:
    return [LocalPod(store.pods["shop/client"], "/var/run/netns/client")]


def groups(store: MeshStore, cache: TranslationCache | None = None) -> dict[str, tuple[int, int]]:
    """Pod name -> (priority, weight of its locality group) in the node's EDS for hello:80;
    pods left out (no traffic) are absent."""
    translation = (cache or TranslationCache()).build(store, local_pods(store))
    assignment = json_format.MessageToDict(
        translation.resources[e.ENDPOINT][CLUSTER], preserving_proto_field_name=True
    )
    by_ip = {pod.pod_ips[0]: pod.name for pod in store.pods.values()}
    found: dict[str, tuple[int, int]] = {}
    for group in assignment.get("endpoints", []):
        for lb in group.get("lb_endpoints", []):
            local = lb["metadata"]["filter_metadata"][ORIGINAL_DST_META]["local"]
            found[by_ip[local.split(":")[0]]] = (
                group.get("priority", 0),
                group.get("load_balancing_weight", 0),
            )
    return found


def cluster(store: MeshStore) -> dict[str, Any]:
    translation = build(store, local_pods(store))
    return json_format.MessageToDict(
        translation.resources[e.CLUSTER][CLUSTER], preserving_proto_field_name=True
    )


OUTLIER = {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "1m"}

# The failover task's helloworld: region1.zone1 (the caller's), region1.zone2, region2.zone3,
# region3.zone4, with `failover: [{from: region1, to: region3}]`.
TASK = {
    "hello-z1": "region1/zone1/subzone1",
    "hello-z2": "region1/zone2/subzone2",
    "hello-z3": "region2/zone3/subzone3",
    "hello-z4": "region3/zone4/subzone4",
}


def test_failover_task_ranks_zone_then_region_then_the_failover_region() -> None:
    """tasks/traffic-management/locality-load-balancing/failover: traffic stays in zone1,
    fails over to zone2, then to region3 (the failover target), region2 last."""
    store = mesh_view(TASK, "region1/zone1/subzone1")
    failover = {"failover": [{"from": "region1", "to": "region3"}]}
    store.put_istio(
        destination_rule(
            {"loadBalancer": {"localityLbSetting": failover}, "outlierDetection": OUTLIER}
        )
    )
    assert {pod: p for pod, (p, _) in groups(store).items()} == {
        "hello-z1": 0,
        "hello-z2": 1,
        "hello-z4": 2,
        "hello-z3": 3,
    }
    assert cluster(store)["common_lb_config"]["locality_weighted_lb_config"] == {}


def test_the_mesh_default_fails_over_by_locality_once_outlier_detection_is_set() -> None:
    """MeshConfig's default localityLbSetting is {enabled: true} (pkg/config/mesh/mesh.go): a
    rule with outlierDetection alone gets locality-prioritised failover (subzone, zone,
    region, elsewhere). Istio sets no locality_weighted_lb_config for it."""
    store = mesh_view(TASK, "region1/zone1/subzone1")
    store.put_istio(destination_rule({"outlierDetection": OUTLIER}))
    assert {pod: p for pod, (p, _) in groups(store).items()} == {
        "hello-z1": 0,
        "hello-z2": 1,
        "hello-z3": 2,
        "hello-z4": 2,
    }
    assert "locality_weighted_lb_config" not in cluster(store).get("common_lb_config", {})


def test_without_outlier_detection_failover_is_ignored_and_istio_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failover needs outlier detection, or Envoy never leaves the local endpoints: Istio
    does not apply it (ApplyLocalityLoadBalancer's enableFailover) and its validation warns."""
    store = mesh_view(TASK, "region1/zone1/subzone1")
    failover = {"failover": [{"from": "region1", "to": "region3"}]}
    with caplog.at_level(logging.WARNING, "nodeagent.mesh.store"):
        store.put_istio(destination_rule({"loadBalancer": {"localityLbSetting": failover}}))
    assert "outlier detection policy must be provided for failover" in caplog.text
    assert {p for p, _ in groups(store).values()} == {0}
    assert "locality_weighted_lb_config" not in cluster(store).get("common_lb_config", {})


def test_distribute_reference_example_weights_80_20() -> None:
    """The reference page's example: from us-west/zone1/* 80% to zone1, 20% to zone2."""
    endpoints = {"a": "us-west/zone1/s1", "b": "us-west/zone1/s2", "c": "us-west/zone2/s1"}
    store = mesh_view(endpoints, "us-west/zone1/s1")
    distribute = [
        {"from": "us-west/zone1/*", "to": {"us-west/zone1/*": 80, "us-west/zone2/*": 20}},
        {"from": "us-west/zone2/*", "to": {"us-west/zone1/*": 20, "us-west/zone2/*": 80}},
    ]
    store.put_istio(
        destination_rule({"loadBalancer": {"localityLbSetting": {"distribute": distribute}}})
    )
    # zone1's 80 is split over its two localities by endpoint count (ceil(1*80/2) each).
    assert groups(store) == {"a": (0, 40), "b": (0, 40), "c": (0, 20)}
    assert cluster(store)["common_lb_config"]["locality_weighted_lb_config"] == {}
    # A caller in zone2 matches the second rule.
    store.put_node(node(HERE, "us-west/zone2/s1"))
    assert groups(store) == {"a": (0, 10), "b": (0, 10), "c": (0, 80)}


def test_distribute_task_leaves_unnamed_localities_out() -> None:
    """tasks/.../locality-load-balancing/distribute: region1/zone1 70, region1/zone2 20,
    region3/zone4 10; region2/zone3 is named by no `to`, so it gets no traffic."""
    store = mesh_view(TASK, "region1/zone1/subzone1")
    to = {"region1/zone1/*": 70, "region1/zone2/*": 20, "region3/zone4/*": 10}
    setting = {"distribute": [{"from": "region1/zone1/*", "to": to}]}
    store.put_istio(destination_rule({"loadBalancer": {"localityLbSetting": setting}}))
    assert groups(store) == {"hello-z1": (0, 70), "hello-z2": (0, 20), "hello-z4": (0, 10)}


def test_a_caller_no_distribute_rule_matches_gets_plain_locality_groups() -> None:
    store = mesh_view(TASK, "region9/zone1")
    setting = {"distribute": [{"from": "region1/zone1/*", "to": {"region1/*": 100}}]}
    store.put_istio(destination_rule({"loadBalancer": {"localityLbSetting": setting}}))
    assert groups(store) == {pod: (0, 1) for pod in TASK}


def test_enabled_false_in_the_rule_turns_the_mesh_setting_off() -> None:
    store = mesh_view(TASK, "region1/zone1/subzone1")
    store.set_mesh_config(
        MeshConfig(
            locality_lb_setting=json.dumps({"failover": [{"from": "region1", "to": "region3"}]})
        )
    )
    store.put_istio(destination_rule({"outlierDetection": OUTLIER}))
    assert max(p for p, _ in groups(store).values()) == 3  # the mesh's failover applies
    off = {"loadBalancer": {"localityLbSetting": {"enabled": False}}, "outlierDetection": OUTLIER}
    store.put_istio(destination_rule(off))
    assert {p for p, _ in groups(store).values()} == {0}


def test_mesh_config_disabled_turns_locality_failover_off() -> None:
    store = mesh_view(TASK, "region1/zone1/subzone1")
    store.set_mesh_config(MeshConfig(locality_lb_setting='{"enabled": false}'))
    store.put_istio(destination_rule({"outlierDetection": OUTLIER}))
    assert {p for p, _ in groups(store).values()} == {0}


def test_failover_priority_by_topology_labels() -> None:
    """The reference page's failoverPriority (network, region, zone, subzone): an endpoint
    matching all is P0, one differing first at the zone P1 (len - 2 = 2 before renumbering)."""
    store = mesh_view(TASK, "region1/zone1/subzone1")
    priority = ["topology.istio.io/network", REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL]
    setting = {"failoverPriority": priority}
    store.put_istio(
        destination_rule(
            {"loadBalancer": {"localityLbSetting": setting}, "outlierDetection": OUTLIER}
        )
    )
    assert {pod: p for pod, (p, _) in groups(store).items()} == {
        "hello-z1": 0,
        "hello-z2": 1,
        "hello-z3": 2,
        "hello-z4": 2,
    }


def test_failover_priority_with_a_value_splits_a_locality() -> None:
    """ "label=value" ranks by that value, not the proxy's: v2 endpoints first, also within
    one locality (applyFailoverPriorityPerLocality splits it)."""
    endpoints = {"v1-a": "r1/z1", "v2-a": "r1/z1", "v2-b": "r1/z2"}
    versions = {name: {"version": name.split("-")[0]} for name in endpoints}
    store = mesh_view(endpoints, "r1/z1", versions)
    setting = {"failoverPriority": ["version=v2"]}
    store.put_istio(
        destination_rule(
            {"loadBalancer": {"localityLbSetting": setting}, "outlierDetection": OUTLIER}
        )
    )
    assert groups(store) == {"v2-a": (0, 1), "v2-b": (0, 1), "v1-a": (1, 1)}


def test_endpoints_of_unknown_nodes_rank_last() -> None:
    """An endpoint whose node is unknown (or has no labels) has the empty locality: another
    region for the caller, and below the failover region."""
    endpoints = {"near": "r1/z1", "far": "r2/z1", "lost": "?", "bare": ""}
    store = mesh_view(endpoints, "r1/z1")
    failover = {"failover": [{"from": "r1", "to": "r2"}]}
    store.put_istio(
        destination_rule(
            {"loadBalancer": {"localityLbSetting": failover}, "outlierDetection": OUTLIER}
        )
    )
    assert {pod: p for pod, (p, _) in groups(store).items()} == {
        "near": 0,
        "far": 1,
        "lost": 2,
        "bare": 2,
    }


def test_a_node_label_change_reprioritises_only_what_it_touches() -> None:
    store = mesh_view({"a": "r1/z1", "b": "r1/z2"}, "r1/z1")
    store.put_service(
        Service("shop", "other", "10.96.0.11", (ServicePort(80, "http"),), {"app": "x"})
    )
    store.put_istio(destination_rule({"outlierDetection": OUTLIER}))
    cache = TranslationCache()
    assert groups(store, cache) == {"a": (0, 1), "b": (1, 1)}
    other = "outbound|80||other.shop.svc.cluster.local"
    before = cache.build(store, local_pods(store)).resources[e.ENDPOINT][other]
    store.put_node(node("node-b", "r1/z1"))  # b's node joins this node's zone
    assert groups(store, cache) == {"a": (0, 2), "b": (0, 2)}  # one locality of two
    assert cache.build(store, local_pods(store)).resources[e.ENDPOINT][other] is before
    store.put_node(node("node-b", "r1/z2"))
    store.put_node(node(HERE, "r1/z2"))  # this node moves: every service is ranked anew
    assert groups(store, cache) == {"a": (1, 1), "b": (0, 1)}
    assert cache.full_recomputes == 1


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        (
            {
                "distribute": [{"from": "a/*", "to": {"a/*": 100}}],
                "failover": [{"from": "a", "to": "b"}],
            },
            "simultaneously",
        ),
        ({"distribute": [{"from": "a/*", "to": {"a/*": 60, "b/*": 30}}]}, "!= 100"),
        ({"distribute": [{"from": "a/*/b", "to": {"a/*": 100}}]}, "last segment"),
        ({"failover": [{"from": "a", "to": "a"}]}, "different regions"),
        ({"failover": [{"from": "a/z", "to": "b"}]}, "only names regions"),
        (
            {"failover": [{"from": "a", "to": "b"}], "failoverPriority": [ZONE_LABEL]},
            "topology label",
        ),
    ],
)
def test_settings_istio_rejects_are_errors_naming_the_field(
    setting: dict[str, Any], problem: str
) -> None:
    """pkg/config/validation/validation.go validateLocalityLbSetting."""
    spec = {"host": "hello", "trafficPolicy": {"loadBalancer": {"localityLbSetting": setting}}}
    with pytest.raises(ValueError, match=problem) as raised:
        check(spec)
    assert "trafficPolicy.loadBalancer.localityLbSetting" in str(raised.value)


def test_mesh_config_reads_locality_lb_setting() -> None:
    setting = {"failover": [{"from": "r1", "to": "r2"}]}
    config = parse_mesh_config({"localityLbSetting": setting})
    assert config.locality_lb == setting
    assert MeshConfig().locality_lb == {"enabled": True}  # Istio's default
    with pytest.raises(ResourceError, match="different regions"):
        parse_mesh_config({"localityLbSetting": {"failover": [{"from": "r1", "to": "r1"}]}})


def test_the_directory_source_keeps_only_a_nodes_locality_labels(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels:\n"
        f"    {REGION_LABEL}: eu\n    {ZONE_LABEL}: eu-1a\n    kubernetes.io/hostname: n1\n"
    )
    store = MeshStore("n1")
    DirectorySource(tmp_path, store).scan()
    assert store.nodes["n1"].labels == {REGION_LABEL: "eu", ZONE_LABEL: "eu-1a"}
    assert store.locality_of("n1") == Locality("eu", "eu-1a")
    generation = store.generation
    (tmp_path / "node.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels:\n"
        f"    {REGION_LABEL}: eu\n    {ZONE_LABEL}: eu-1a\n    other: label\n"
    )
    DirectorySource(tmp_path, store).scan()
    assert store.generation == generation  # another label: nothing to recompute
