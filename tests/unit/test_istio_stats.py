"""Istio's standard metrics: workload names, the stats loggers' labels (translate/istio_stats.py).

Istio's reference: istio.io/latest/docs/reference/config/metrics/ (metric names and labels);
workload names as Istio's injector derives them from owner references (istio/istio
pkg/kube/util.go GetDeployMetaFromPod); canonical service/revision labels
(istio.io/latest/docs/reference/config/labels/ ``service.istio.io/canonical-name``,
``service.istio.io/canonical-revision``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import yaml

from nodeagent.mesh.workload import Owner, canonical_revision, canonical_service, workload_name
from nodeagent.sources.directory import parse_document, parse_mesh_config
from nodeagent.translate import envoy as e
from nodeagent.translate import istio_stats, translate
from tests.unit.test_translate import as_json, local, store

RS = "ReplicaSet"


@pytest.mark.parametrize(
    ("name", "generate", "labels", "owners", "want"),
    [
        # A Deployment's pod: ReplicaSet <deployment>-<pod-template-hash>.
        ("web-7d4b9c-x2x", "web-7d4b9c-", {"pod-template-hash": "7d4b9c"}, [Owner(RS, "web-7d4b9c", True)], "web"),  # noqa: E501
        # The hash label does not end the ReplicaSet's name: the ReplicaSet is the workload.
        ("rs-abc-x", "rs-abc-", {"pod-template-hash": "zzz"}, [Owner(RS, "rs-abc", True)], "rs-abc"),  # noqa: E501
        # An Argo Rollout's.
        ("ro-5f-x", "ro-5f-", {"rollouts-pod-template-hash": "5f"}, [Owner(RS, "ro-5f", True)], "ro"),  # noqa: E501
        # A CronJob's Job: <cronjob>-<8 to 10 digits>.
        ("nightly-28000000-x", "nightly-28000000-", {}, [Owner("Job", "nightly-28000000", True)], "nightly"),  # noqa: E501
        ("once-x", "once-", {}, [Owner("Job", "once", True)], "once"),
        # OpenShift's DeploymentConfig.
        ("dc-1-x", "dc-1-", {"deploymentconfig": "dc"}, [Owner("ReplicationController", "dc-1", True)], "dc"),  # noqa: E501
        # A DaemonSet's pod: its controller.
        ("ds-x", "ds-", {}, [Owner("DaemonSet", "ds", True)], "ds"),
        # A StatefulSet's pod has no generated name: the pod itself.
        ("db-0", "", {}, [Owner("StatefulSet", "db", True)], "db-0"),
        # An owner that is not the controller does not count.
        ("p-x", "p-", {}, [Owner(RS, "p", False)], "p-x"),
        # A bare pod.
        ("bare", "", {}, [], "bare"),
    ],
)  # fmt: skip
def test_workload_names_follow_istio(
    name: str, generate: str, labels: dict[str, str], owners: list[Owner], want: str
) -> None:
    assert workload_name(name, generate, labels, owners) == want


def test_canonical_service_and_revision_labels_in_istios_order() -> None:
    assert canonical_service({"app": "a", "app.kubernetes.io/name": "k"}, "w") == "k"
    assert canonical_service({"service.istio.io/canonical-name": "c", "app": "a"}, "w") == "c"
    assert canonical_service({}, "w") == "w"
    assert canonical_revision({"version": "v1", "app.kubernetes.io/version": "2"}) == "2"
    assert canonical_revision({"service.istio.io/canonical-revision": "r"}) == "r"
    assert canonical_revision({}) == "latest"


def test_a_pod_object_names_its_deployment_as_its_workload() -> None:
    doc = """
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-5b8f9d-abcde
  generateName: reviews-v1-5b8f9d-
  namespace: default
  labels: {app: reviews, version: v1, pod-template-hash: 5b8f9d}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5b8f9d, uid: u, controller: true}
spec: {nodeName: n1}
"""
    (parsed,) = parse_document(yaml.safe_load(doc), "pod.yaml", 0)
    assert parsed.record.workload_name == "reviews-v1"  # type: ignore[union-attr]


def _tags(logger: dict[str, Any]) -> dict[str, str]:
    config = logger["typedConfig"]
    stat = (config.get("counters") or config["histograms"])[0]["stat"]
    return {t["name"]: t["valueFormat"] for t in stat["tags"]}


def _loggers(filt: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        log
        for log in filt["typedConfig"]["accessLog"]
        if log["name"] == "envoy.access_loggers.stats"
    ]


def test_source_reporter_in_every_outbound_internal_chain() -> None:
    out = translate(store(), [local("a", labels={"app": "web", "version": "v1"})])
    listener = as_json(out[e.LISTENER]["outbound-internal"])
    chains = [*listener["filterChains"], listener["defaultFilterChain"]]
    for chain in chains:
        (last,) = [f for f in chain["filters"] if "typedConfig" in f][-1:]
        loggers = _loggers(last)
        assert loggers, chain["name"]
        tags = _tags(loggers[0])
        assert tags["reporter"] == "source"
        assert tags["source_workload"] == "%FILTER_STATE(io.nodeagent.peer.workload:PLAIN)%"
        assert tags["destination_workload"] == "%METADATA(UPSTREAM_HOST:istio:workload)%"
        assert tags["connection_security_policy"] == "unknown"
        # Bounded labels: nothing per request but codes and flags.
        assert not any("ADDRESS" in v or "PATH" in v for v in tags.values()), tags


def test_destination_reporter_names_the_pod_and_its_callers_per_path() -> None:
    pod = local("web", labels={"app": "web", "version": "v1"})
    out = translate(store(), [pod])
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web"])
    fast = as_json(out[e.LISTENER]["inboundInternal/shop/web"])
    seen = set()
    for listener, path in ((inbound, "inbound"), (fast, "fast")):
        for chain in listener["filterChains"]:
            for filt in chain["filters"]:
                for logger in _loggers(filt) if "accessLog" in filt.get("typedConfig", {}) else []:
                    tags = _tags(logger)
                    assert tags["reporter"] == "destination"
                    assert tags["destination_workload"] == "web"
                    assert tags["destination_app"] == "web"
                    assert tags["destination_version"] == "v1"
                    security = tags["connection_security_policy"]
                    seen.add((path, chain["name"], security))
                    if chain["name"].endswith("-mtls") or path == "fast":
                        assert security == "mutual_tls"
                    else:
                        assert security == "none"
                        assert tags["source_workload"] == "unknown"
    assert any(p == "fast" for p, _, _ in seen) and any(s == "none" for *_, s in seen), seen


def test_mtls_chains_take_the_callers_side_from_its_nodes_headers_first() -> None:
    out = translate(store(), [local("web", labels={"app": "web"})])
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web"])
    for chain in inbound["filterChains"]:
        for filt in chain["filters"]:
            if not filt["name"].endswith("http_connection_manager"):
                continue
            names = [f["name"] for f in filt["typedConfig"]["httpFilters"]]
            # First: a request RBAC denies is still counted with its caller.
            assert (names[0] == istio_stats.PEER_FILTER) == chain["name"].endswith("-mtls")
    routes = out[e.ROUTE]
    outbound = [as_json(r) for name, r in routes.items() if name.startswith("outbound|")]
    assert outbound
    for table in outbound:
        added = {h["header"]["key"] for h in table.get("requestHeadersToAdd", [])}
        assert set(istio_stats.PEER_HEADERS.values()) <= added, table["name"]
    inbound_routes = [as_json(r) for name, r in routes.items() if name.startswith("inbound|")]
    for table in inbound_routes:
        assert set(istio_stats.PEER_HEADERS.values()) <= set(table["requestHeadersToRemove"])


def _all_stats_loggers(out: dict[str, Any]) -> int:
    text = json.dumps([as_json(r) for r in out[e.LISTENER].values()])
    return text.count('"envoy.access_loggers.stats"')


def test_default_providers_metrics_turns_them_on_and_off_as_istio() -> None:
    """MeshConfig ``defaultProviders.metrics`` (istio.io/latest/docs/reference/config/
    istio.mesh.v1alpha1/#MeshConfig-DefaultProviders): Istio's default mesh config names
    ``prometheus``; ``[]`` reports nothing; setting another field keeps the default."""
    pod = [local("web", labels={"app": "web"})]
    assert _all_stats_loggers(translate(store(), pod)) > 0
    off = parse_mesh_config({"defaultProviders": {"metrics": []}})
    assert _all_stats_loggers(translate(store(**_fields(off)), pod)) == 0
    kept = parse_mesh_config({"defaultProviders": {"accessLogging": ["envoy"]}})
    assert kept.default_providers.metrics == ("prometheus",)


def _fields(mesh: Any) -> dict[str, Any]:
    return {f.name: getattr(mesh, f.name) for f in dataclasses.fields(mesh)}


# -- Telemetry metrics overrides (istio.io/latest/docs/reference/config/telemetry/#MetricsOverrides,
# istio.io/latest/docs/tasks/observability/metrics/customize-metrics/) ---------------------------


def _stats_of(listener: dict[str, Any]) -> list[dict[str, Any]]:
    chains = [*listener.get("filterChains", []), listener.get("defaultFilterChain", {})]
    return [
        logger
        for chain in chains
        for filt in chain.get("filters", [])
        if "accessLog" in filt.get("typedConfig", {})
        for logger in _loggers(filt)
    ]


def _stat_tags(logger: dict[str, Any]) -> dict[str, dict[str, str]]:
    config = logger["typedConfig"]
    return {
        s["stat"]["name"]: {t["name"]: t["valueFormat"] for t in s["stat"]["tags"]}
        for s in (*config.get("counters", []), *config.get("histograms", []))
    }


def test_a_workloads_server_overrides_shape_its_inbound_stats_only() -> None:
    from tests.unit.test_access_logs import build, tel
    from tests.unit.test_access_logs import store as log_store

    override = {
        "selector": {"matchLabels": {"app": "web"}},
        "metrics": [
            {
                "providers": [{"name": "prometheus"}],
                "overrides": [
                    {
                        "match": {"metric": "REQUEST_DURATION", "mode": "SERVER"},
                        "disabled": True,
                    },
                    {
                        "match": {"mode": "SERVER"},
                        "tagOverrides": {
                            "request_host": {"value": "request.host"},
                            "grpc_response_status": {"operation": "REMOVE"},
                        },
                    },
                ],
            }
        ],
    }
    listeners = build(log_store(None, tel("web-metrics", override)))
    web = _stats_of(listeners["virtualInbound/shop/web-1"])
    assert web
    for logger in web:
        for stat, tags in _stat_tags(logger).items():
            assert stat != "istio_request_duration_milliseconds"
            if not stat.startswith("istio_tcp"):
                assert tags["request_host"] == "%CEL(request.host)%", stat
                assert "grpc_response_status" not in tags
    # Every caller's side (CLIENT) keeps Istio's defaults, web's own calls too.
    client = [_stat_tags(logger) for logger in _stats_of(listeners["outbound-internal"])]
    assert any("istio_request_duration_milliseconds" in tags for tags in client)
    assert all("request_host" not in t for tags in client for t in tags.values())


def test_callers_whose_client_metrics_differ_are_told_apart_by_their_class() -> None:
    from tests.unit.test_access_logs import build, stamp_of, tel
    from tests.unit.test_access_logs import store as log_store

    quiet = {
        "selector": {"matchLabels": {"app": "b"}},
        "metrics": [{"overrides": [{"match": {"mode": "CLIENT"}, "disabled": True}]}],
    }
    listeners = build(log_store(None, tel("b-quiet", quiet)))
    reporting, silent = stamp_of(listeners, "a"), stamp_of(listeners, "b")
    assert reporting and silent and reporting != silent
    assert stamp_of(listeners, "web-1") == reporting
    shared = _stats_of(listeners["outbound-internal"])
    assert shared
    for logger in shared:
        expression = json.dumps(logger["filter"])
        assert f"b'{reporting}'" in expression and silent not in expression
    # With one class again (no such Telemetry), the shared chains filter on nothing.
    plain = _stats_of(build(log_store(None))["outbound-internal"])
    assert all("filter" not in logger or "logTypeFilter" in logger["filter"] for logger in plain)


def test_envoy_accepts_overridden_and_class_filtered_stats_loggers(tmp_path: Any) -> None:
    """Envoy's own verdict on what an override builds: CEL tag values, removed tags, disabled
    stats, and the class filter of shared chains (alone and with TCP's log type filter)."""
    from nodeagent.mesh.telemetry import MetricsSpec
    from nodeagent.translate import access_logs, internal
    from tests.unit.envoy_validate import assert_envoy_accepts_resources

    spec = MetricsSpec(
        disabled=frozenset({"istio_request_bytes", "istio_tcp_sent_bytes_total"}),
        tags=(
            ("istio_requests_total", (("request_host", "request.host"), ("response_flags", ""))),
            ("istio_tcp_connections_opened_total", (("x_port", "destination.port"),)),
        ),
    )
    when = access_logs.client_filter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    me = istio_stats.peer("shop", "web", {"app": "web"}, "spiffe://cluster.local/ns/shop/sa/w", "K")
    http = [
        *istio_stats.source_loggers(internal.CALLER_KEY, False, spec, when),
        *istio_stats.destination_loggers(me, None, "mtls", False, spec=spec),
    ]
    tcp = [
        *istio_stats.source_loggers(internal.CALLER_KEY, True, spec, when),
        *istio_stats.destination_loggers(me, None, "mtls", True, spec=spec),
    ]
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": e.typed("envoy.extensions.filters.http.router.v3.Router"),
    }
    hcm = e.typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="s",
        route_config={"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"]}]},
        http_filters=[router],
        access_log=http,
    )
    proxy = e.typed(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        stat_prefix="t",
        cluster="c",
        access_log=tcp,
    )
    listeners = [
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": name, "typed_config": config}]}],
        }
        for name, port, config in (("h", 10081, hcm), ("t", 10082, proxy))
    ]
    cluster = {"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c"}}
    assert_envoy_accepts_resources(tmp_path, clusters=[cluster], listeners=listeners)
