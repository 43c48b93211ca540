"""PeerAuthentication and DestinationRule TLS resolution, following istiod (SCENARIOS S4)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.mesh import policy
from nodeagent.mesh.model import IstioResource, Service, ServicePort
from nodeagent.mesh.policy import (
    CREATION_TIMESTAMP_ANNOTATION,
    destination_rule_for,
    destination_tls_mode,
    effective_mtls,
    effective_mtls_ports,
    peer_policy,
    pod_default_mode,
)
from nodeagent.mesh.store import MeshStore

HTTPBIN = {"app": "httpbin"}
MESH_NAMESPACES = ("foo", "bar")  # legacy has no proxy: it sends and accepts plaintext only


def pa(
    namespace: str,
    name: str = "default",
    mode: str | None = None,
    selector: dict[str, str] | None = None,
    ports: dict[Any, str | None] | None = None,
    created: str | None = None,
) -> IstioResource:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {k: ({"mode": m} if m else {}) for k, m in ports.items()}
    annotations = {CREATION_TIMESTAMP_ANNOTATION: created} if created else {}
    return IstioResource(
        "security.istio.io", "v1", "PeerAuthentication", namespace, name, spec, {}, annotations
    )


def dr(
    namespace: str,
    name: str,
    host: str,
    mode: str | None = None,
    export_to: list[str] | None = None,
    port_tls: dict[int, str] | None = None,
    created: str | None = None,
    **extra: Any,
) -> IstioResource:
    policy: dict[str, Any] = {}
    if mode is not None:
        policy["tls"] = {"mode": mode}
    if port_tls is not None:
        policy["portLevelSettings"] = [
            {"port": {"number": p}, "tls": {"mode": m}} for p, m in port_tls.items()
        ]
    spec: dict[str, Any] = {"host": host, **extra}
    if policy:
        spec["trafficPolicy"] = policy
    if export_to is not None:
        spec["exportTo"] = export_to
    annotations = {CREATION_TIMESTAMP_ANNOTATION: created} if created else {}
    return IstioResource(
        "networking.istio.io", "v1", "DestinationRule", namespace, name, spec, {}, annotations
    )


def store_of(*resources: IstioResource) -> MeshStore:
    store = MeshStore()
    for res in resources:
        store.put_istio(res)
    return store


def matrix(store: MeshStore) -> dict[tuple[str, str], int]:
    """S4's sleep.<from> -> httpbin.<to>:8000 (container port 80) codes; 0 means reset.

    Mesh clients use auto mTLS, which every mesh server accepts; legacy sends plaintext."""
    codes = {}
    for src in ("foo", "bar", "legacy"):
        for dst in ("foo", "bar", "legacy"):
            strict = dst in MESH_NAMESPACES and effective_mtls(store, dst, HTTPBIN, 80) == "STRICT"
            codes[src, dst] = 0 if strict and src not in MESH_NAMESPACES else 200
    return codes


def failing(store: MeshStore) -> set[tuple[str, str]]:
    return {pair for pair, code in matrix(store).items() if code != 200}


# -- PeerAuthentication ---------------------------------------------------------------------------


def test_no_policy_is_permissive_everywhere() -> None:
    store = store_of()
    assert failing(store) == set()
    assert effective_mtls_ports(store, "foo", HTTPBIN, [80, 8080]) == {
        80: "PERMISSIVE",
        8080: "PERMISSIVE",
    }
    assert pod_default_mode(store, "istio-system", {}) == "PERMISSIVE"


def test_mesh_wide_strict() -> None:
    store = store_of(pa("istio-system", mode="STRICT"))
    assert failing(store) == {("legacy", "foo"), ("legacy", "bar")}
    assert pod_default_mode(store, "bar", HTTPBIN) == "STRICT"


def test_namespace_wide_strict_on_foo_only() -> None:
    store = store_of(pa("foo", mode="STRICT"))
    assert failing(store) == {("legacy", "foo")}
    assert effective_mtls(store, "bar", HTTPBIN, 80) == "PERMISSIVE"


def test_namespace_overrides_mesh() -> None:
    store = store_of(pa("istio-system", mode="STRICT"), pa("bar", mode="PERMISSIVE"))
    assert failing(store) == {("legacy", "foo")}


def test_workload_strict_with_port_80_disabled() -> None:
    store = store_of(
        pa("bar", "httpbin", mode="STRICT", selector=HTTPBIN, ports={80: "DISABLE"}),
    )
    assert effective_mtls_ports(store, "bar", HTTPBIN, [80, 8080]) == {
        80: "DISABLE",
        8080: "STRICT",
    }
    assert pod_default_mode(store, "bar", HTTPBIN) == "STRICT"
    assert failing(store) == set()  # plaintext to port 80 is accepted
    # Other pods in bar are untouched.
    assert effective_mtls(store, "bar", {"app": "sleep"}, 8080) == "PERMISSIVE"


def test_port_level_keys_may_be_strings() -> None:
    store = store_of(pa("bar", "h", mode="STRICT", selector=HTTPBIN, ports={"80": "DISABLE"}))
    assert peer_policy(store, "bar", HTTPBIN).port_modes == {80: "DISABLE"}


def test_port_level_mtls_on_namespace_and_mesh_policies_is_ignored() -> None:
    store = store_of(
        pa("istio-system", mode="PERMISSIVE", ports={8080: "STRICT"}),
        pa("foo", mode="STRICT", ports={80: "DISABLE"}),
    )
    assert effective_mtls(store, "foo", HTTPBIN, 80) == "STRICT"
    assert effective_mtls(store, "bar", HTTPBIN, 8080) == "PERMISSIVE"


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        # UNSET (or no mtls block) at namespace level inherits the mesh's mode.
        ([pa("istio-system", mode="STRICT"), pa("foo", mode="UNSET")], "STRICT"),
        ([pa("istio-system", mode="STRICT"), pa("foo")], "STRICT"),
        # UNSET at mesh level is PERMISSIVE; UNSET at workload level inherits the namespace's.
        ([pa("istio-system", mode="UNSET")], "PERMISSIVE"),
        ([pa("foo", mode="DISABLE"), pa("foo", "w", mode="UNSET", selector=HTTPBIN)], "DISABLE"),
        # The workload level beats the namespace level, which beats the mesh level.
        (
            [
                pa("istio-system", mode="DISABLE"),
                pa("foo", mode="PERMISSIVE"),
                pa("foo", "w", mode="STRICT", selector=HTTPBIN),
            ],
            "STRICT",
        ),
    ],
)
def test_unset_inherits(resources: list[IstioResource], expected: str) -> None:
    assert effective_mtls(store_of(*resources), "foo", HTTPBIN, 80) == expected


def test_unset_port_inherits_the_workload_mode_and_its_parent() -> None:
    store = store_of(
        pa("foo", mode="STRICT"),
        pa("foo", "w", mode="UNSET", selector=HTTPBIN, ports={80: "DISABLE", 81: None}),
    )
    assert effective_mtls_ports(store, "foo", HTTPBIN, [80, 81, 82]) == {
        80: "DISABLE",
        81: "STRICT",
        82: "STRICT",
    }


def test_workload_selector_must_match_every_label() -> None:
    store = store_of(
        pa("foo", mode="PERMISSIVE"),
        pa("foo", "w", mode="STRICT", selector={"app": "httpbin", "version": "v2"}),
        pa("bar", "elsewhere", mode="STRICT", selector=HTTPBIN),  # another namespace
    )
    assert effective_mtls(store, "foo", HTTPBIN, 80) == "PERMISSIVE"
    assert effective_mtls(store, "foo", {**HTTPBIN, "version": "v2", "x": "y"}, 80) == "STRICT"


def test_selector_policies_in_the_root_namespace_are_ignored() -> None:
    store = store_of(pa("istio-system", "w", mode="STRICT", selector=HTTPBIN))
    assert effective_mtls(store, "foo", HTTPBIN, 80) == "PERMISSIVE"
    assert effective_mtls(store, "istio-system", HTTPBIN, 80) == "PERMISSIVE"


def test_empty_match_labels_is_namespace_wide() -> None:
    store = store_of(pa("foo", "all", mode="STRICT", selector={}))
    assert effective_mtls(store, "foo", {"app": "anything"}, 80) == "STRICT"


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        # The oldest policy at a level wins, whatever its name.
        (
            [
                pa("foo", "a", mode="STRICT", created="2024-05-02T00:00:00Z"),
                pa("foo", "b", mode="DISABLE", created="2024-05-01T00:00:00Z"),
            ],
            "DISABLE",
        ),
        (
            [
                pa("foo", "a", mode="STRICT", selector=HTTPBIN, created="2024-05-02T00:00:00Z"),
                pa("foo", "b", mode="DISABLE", selector=HTTPBIN, created="2024-05-01T10:00:00Z"),
            ],
            "DISABLE",
        ),
        # Same age, or no age at all: the name decides.
        (
            [
                pa("foo", "b", mode="DISABLE", created="2024-05-01T00:00:00Z"),
                pa("foo", "a", mode="STRICT", created="2024-05-01T00:00:00+00:00"),
            ],
            "STRICT",
        ),
        (
            [pa("istio-system", "b", mode="STRICT"), pa("istio-system", "a", mode="DISABLE")],
            "DISABLE",
        ),
        # No timestamp counts as the oldest.
        (
            [
                pa("foo", "z", mode="STRICT"),
                pa("foo", "a", mode="DISABLE", created="2020-01-01T00:00:00Z"),
            ],
            "STRICT",
        ),
    ],
)
def test_oldest_policy_wins(resources: list[IstioResource], expected: str) -> None:
    assert effective_mtls(store_of(*resources), "foo", HTTPBIN, 80) == expected


# -- DestinationRule ------------------------------------------------------------------------------

REVIEWS = Service("default", "reviews", "10.0.0.5", (ServicePort(9080),))


def test_no_rule_leaves_it_to_auto_mtls() -> None:
    store = store_of(dr("default", "other", "ratings", mode="DISABLE"))
    assert destination_rule_for(store, "default", REVIEWS) is None
    assert destination_tls_mode(store, "default", REVIEWS, 9080) is None
    store = store_of(dr("default", "lb", "reviews", trafficPolicy={"loadBalancer": {}}))
    assert destination_tls_mode(store, "default", REVIEWS, 9080) is None


@pytest.mark.parametrize("mode", ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"])
def test_rule_sets_the_mode(mode: str) -> None:
    store = store_of(dr("default", "r", "reviews.default.svc.cluster.local", mode=mode))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == mode


def test_tls_block_without_mode_disables() -> None:
    store = store_of(dr("default", "r", "reviews", trafficPolicy={"tls": {}}))
    assert destination_tls_mode(store, "default", REVIEWS, 9080) == "DISABLE"


def test_lookup_order_client_then_service_then_root_namespace() -> None:
    root = dr("istio-system", "root", "reviews.default.svc.cluster.local", mode="SIMPLE")
    service_ns = dr("default", "svc", "reviews", mode="ISTIO_MUTUAL")
    client_ns = dr("sleep", "client", "reviews.default.svc.cluster.local", mode="DISABLE")
    assert destination_tls_mode(store_of(root), "sleep", REVIEWS, 9080) == "SIMPLE"
    assert destination_tls_mode(store_of(root, service_ns), "sleep", REVIEWS, 9080) == (
        "ISTIO_MUTUAL"
    )
    store = store_of(root, service_ns, client_ns)
    assert destination_rule_for(store, "sleep", REVIEWS) == client_ns
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "DISABLE"
    # Other clients do not see the sleep namespace's rule.
    assert destination_tls_mode(store, "web", REVIEWS, 9080) == "ISTIO_MUTUAL"


def test_a_wildcard_in_a_nearer_namespace_beats_an_exact_host_further_away() -> None:
    store = store_of(
        dr("default", "exact", "reviews", mode="ISTIO_MUTUAL"),
        dr("sleep", "all", "*", mode="DISABLE"),
    )
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "DISABLE"


def test_short_host_is_qualified_with_the_rules_namespace() -> None:
    # "reviews" in sleep means reviews.sleep.svc.cluster.local, not the service in default.
    store = store_of(dr("sleep", "r", "reviews", mode="DISABLE"))
    assert destination_rule_for(store, "sleep", REVIEWS) is None
    # Names with a dot are taken as written: "reviews.default" is no service FQDN.
    store = store_of(dr("default", "r", "reviews.default", mode="DISABLE"))
    assert destination_rule_for(store, "default", REVIEWS) is None


def test_cluster_domain_comes_from_mesh_config() -> None:
    store = store_of(dr("default", "r", "reviews", mode="SIMPLE"))
    store.mesh_config = type(store.mesh_config)(cluster_domain="corp.example")
    assert destination_tls_mode(store, "default", REVIEWS, 9080) == "SIMPLE"
    store = store_of(dr("default", "r", "reviews.default.svc.cluster.local", mode="SIMPLE"))
    store.mesh_config = type(store.mesh_config)(cluster_domain="corp.example")
    assert destination_tls_mode(store, "default", REVIEWS, 9080) is None


def test_most_specific_host_wins() -> None:
    everything = dr("default", "a", "*", mode="DISABLE")
    cluster = dr("default", "b", "*.svc.cluster.local", mode="SIMPLE")
    namespace = dr("default", "c", "*.default.svc.cluster.local", mode="MUTUAL")
    exact = dr("default", "d", "reviews", mode="ISTIO_MUTUAL")
    other = dr("default", "e", "*.other.svc.cluster.local", mode="SIMPLE")
    expected = [(everything, "DISABLE"), (cluster, "SIMPLE"), (namespace, "MUTUAL")]
    expected.append((exact, "ISTIO_MUTUAL"))
    rules = [other]
    for rule, mode in expected:
        rules.append(rule)
        assert destination_tls_mode(store_of(*rules), "sleep", REVIEWS, 9080) == mode


def test_wildcard_in_the_root_namespace() -> None:
    store = store_of(dr("istio-system", "mesh", "*.local", mode="ISTIO_MUTUAL"))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "ISTIO_MUTUAL"


def test_port_level_tls_overrides_the_top_level() -> None:
    store = store_of(
        dr("default", "r", "reviews", mode="ISTIO_MUTUAL", port_tls={9080: "DISABLE"}),
    )
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "DISABLE"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9090) == "ISTIO_MUTUAL"
    # Port-level TLS alone, and a port-level entry without tls, which keeps the top level.
    store = store_of(dr("default", "r", "reviews", port_tls={9080: "SIMPLE"}))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "SIMPLE"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9090) is None
    policy = {"tls": {"mode": "MUTUAL"}, "portLevelSettings": [{"port": {"number": 9080}}]}
    store = store_of(dr("default", "r", "reviews", trafficPolicy=policy))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "MUTUAL"


def test_export_to_dot_hides_a_rule_from_other_namespaces() -> None:
    private = dr("default", "r", "reviews", mode="DISABLE", export_to=["."])
    store = store_of(private)
    assert destination_tls_mode(store, "default", REVIEWS, 9080) == "DISABLE"
    assert destination_rule_for(store, "sleep", REVIEWS) is None
    # The root namespace's exported rule serves the others.
    store = store_of(private, dr("istio-system", "mesh", "*", mode="ISTIO_MUTUAL"))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "ISTIO_MUTUAL"
    assert destination_tls_mode(store, "default", REVIEWS, 9080) == "DISABLE"


def test_private_root_rules_apply_only_to_root_namespace_clients() -> None:
    store = store_of(
        dr("istio-system", "private", "*", mode="DISABLE", export_to=["."]),
        dr("istio-system", "public", "reviews.default.svc.cluster.local", mode="SIMPLE"),
    )
    assert destination_tls_mode(store, "istio-system", REVIEWS, 9080) == "DISABLE"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "SIMPLE"


def test_export_to_named_namespaces() -> None:
    store = store_of(dr("default", "r", "reviews", mode="SIMPLE", export_to=["sleep"]))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "SIMPLE"
    assert destination_tls_mode(store, "web", REVIEWS, 9080) is None


def test_rules_for_one_host_merge_oldest_first() -> None:
    older = dr(
        "default",
        "z-older",
        "reviews",
        created="2024-01-01T00:00:00Z",
        subsets=[{"name": "v1", "labels": {"version": "v1"}}],
    )
    newer = dr(
        "default",
        "a-newer",
        "reviews",
        mode="MUTUAL",
        created="2024-02-01T00:00:00Z",
        subsets=[{"name": "v1", "labels": {"version": "x"}}, {"name": "v2"}],
    )
    newest = dr("default", "b-newest", "reviews", mode="SIMPLE", created="2024-03-01T00:00:00Z")
    rule = destination_rule_for(store_of(newest, newer, older), "sleep", REVIEWS)
    assert rule is not None and rule.name == "z-older"
    assert [s["name"] for s in rule.spec["subsets"]] == ["v1", "v2"]
    assert rule.spec["subsets"][0]["labels"] == {"version": "v1"}
    assert destination_tls_mode(store_of(newest, newer, older), "sleep", REVIEWS, 9080) == "MUTUAL"


def test_a_workload_selector_rule_applies_to_the_pods_it_selects_in_its_namespace() -> None:
    """istio.io/latest/docs/reference/config/networking/destination-rule/ (workloadSelector):
    the rule applies to the selected pods of its own namespace only; Istio picks it before the
    namespace's rule without a selector (SidecarScope.DestinationRule, pilot/pkg/model/sidecar.go)
    and never exports it (istio/istio pull 37174)."""
    selected = dr("sleep", "sel", "*", mode="DISABLE", workloadSelector={"matchLabels": {"a": "b"}})
    plain = dr("sleep", "plain", "reviews.default.svc.cluster.local", mode="SIMPLE")
    store = store_of(selected, plain, dr("default", "r", "reviews", mode="ISTIO_MUTUAL"))
    # The exact host is more specific than "*": the selector rule is not in that group.
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, labels={"a": "b"}) == "SIMPLE"
    store = store_of(selected, dr("default", "r", "reviews", mode="ISTIO_MUTUAL"))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, labels={"a": "b", "c": "d"}) == (
        "DISABLE"
    )
    # Other namespaces never see it, whatever their labels.
    assert destination_tls_mode(store, "other", REVIEWS, 9080, labels={"a": "b"}) == "ISTIO_MUTUAL"
    assert policy.selector_labels(store, "sleep", {"a": "b", "c": "d"}) == (("a", "b"),)
    assert policy.selector_labels(store, "sleep", {"a": "x"}) == ()


def test_unselected_pods_get_no_rule_when_their_namespace_has_only_selector_rules() -> None:
    """Istio looks no further than the client namespace when it has rules for the host, even
    if all select other pods (istio/istio#57719, #52691): its other pods get no rule."""
    selected = dr("sleep", "sel", "*", mode="DISABLE", workloadSelector={"matchLabels": {"a": "b"}})
    store = store_of(selected, dr("default", "r", "reviews", mode="ISTIO_MUTUAL"))
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) is None
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, labels={"a": "c"}) is None


def test_the_oldest_selecting_rule_wins_and_merges_with_rules_of_the_same_selector() -> None:
    """SidecarScope.DestinationRule returns the first selecting rule; rules with equal
    selectors merge (PushContext.mergeDestinationRule)."""
    sel = {"matchLabels": {"a": "b"}}
    older = dr(
        "sleep",
        "older",
        "reviews.default.svc.cluster.local",
        mode="DISABLE",
        created="2024-01-01T00:00:00Z",
        workloadSelector=sel,
    )
    same = dr(
        "sleep",
        "same",
        "reviews.default.svc.cluster.local",
        created="2024-02-01T00:00:00Z",
        workloadSelector=sel,
        subsets=[{"name": "v2", "labels": {"version": "v2"}}],
    )
    wider = dr(
        "sleep",
        "wider",
        "reviews.default.svc.cluster.local",
        mode="SIMPLE",
        created="2024-03-01T00:00:00Z",
        workloadSelector={"matchLabels": {"c": "d"}},
    )
    store = store_of(wider, same, older)
    rule = destination_rule_for(store, "sleep", REVIEWS, {"a": "b", "c": "d"})
    assert rule is not None and rule.name == "older"
    assert [s["name"] for s in rule.spec["subsets"]] == ["v2"]
    rule = destination_rule_for(store, "sleep", REVIEWS, {"c": "d"})
    assert rule is not None and rule.name == "wider"


def test_a_subsets_tls_mode_replaces_the_rules() -> None:
    """A subset's trafficPolicy.tls replaces the rule's for that subset's cluster
    (istio.io/latest/docs/reference/config/networking/destination-rule/#Subset; Istio's
    MergeSubsetTrafficPolicy), port-level settings first."""
    rule = dr(
        "sleep",
        "r",
        "reviews.default.svc.cluster.local",
        mode="ISTIO_MUTUAL",
        subsets=[
            {"name": "v1", "labels": {"v": "1"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}},
            {"name": "v2", "labels": {"v": "2"}},
            {
                "name": "v3",
                "labels": {"v": "3"},
                "trafficPolicy": {
                    "tls": {"mode": "DISABLE"},
                    "portLevelSettings": [{"port": {"number": 9080}, "tls": {"mode": "SIMPLE"}}],
                },
            },
        ],
    )
    store = store_of(rule)
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080) == "ISTIO_MUTUAL"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, "v1") == "DISABLE"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, "v2") == "ISTIO_MUTUAL"
    assert destination_tls_mode(store, "sleep", REVIEWS, 9080, "v3") == "SIMPLE"


def test_s4_destination_rule_against_a_strict_server() -> None:
    """S4: DISABLE from a mesh client to a STRICT server fails; ISTIO_MUTUAL works."""
    httpbin = Service("foo", "httpbin", "10.0.0.9", (ServicePort(8000, target_port=80),))
    for mode, works in (("DISABLE", False), ("ISTIO_MUTUAL", True)):
        store = store_of(
            pa("foo", mode="STRICT"), dr("bar", "h", "httpbin.foo.svc.cluster.local", mode=mode)
        )
        client_mode = destination_tls_mode(store, "bar", httpbin, 8000)
        server_mode = effective_mtls(store, "foo", HTTPBIN, 80)
        assert client_mode == mode
        assert (server_mode != "STRICT" or client_mode != "DISABLE") is works
