"""Telemetry API: which Telemetry applies to a workload and what access logging and tracing it
adds up to, after Istio's docs and istiod's merge (pilot/pkg/model/telemetry.go).

Examples from istio.io/latest/docs/reference/config/telemetry/ and the tasks
istio.io/latest/docs/tasks/observability/telemetry/ (scope, inheritance, overrides) and
istio.io/latest/docs/tasks/observability/logs/telemetry-api/ (enable mesh-wide, disable for a
workload, filter by workload mode, filter by CEL).
"""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.mesh import extension_providers, telemetry
from nodeagent.mesh.model import DefaultProviders, IstioResource, MeshConfig
from nodeagent.mesh.policy import CREATION_TIMESTAMP_ANNOTATION
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.telemetry import CLIENT, SERVER, LogProvider
from nodeagent.sources.directory import ResourceError, parse_mesh_config

ROOT = "istio-system"
DETAILS = {"app": "details"}


def tel(
    namespace: str,
    name: str,
    spec: dict[str, Any],
    version: str = "v1",
    created: str = "",
) -> IstioResource:
    annotations = {CREATION_TIMESTAMP_ANNOTATION: created} if created else {}
    return IstioResource(
        "telemetry.istio.io", version, "Telemetry", namespace, name, spec, {}, annotations
    )


def store_of(*objects: IstioResource, mesh: dict[str, Any] | None = None) -> MeshStore:
    store = MeshStore()
    store.set_mesh_config(parse_mesh_config(mesh or {}))
    for obj in objects:
        store.put_istio(obj)
    return store


def logs(store: MeshStore, mode: str = SERVER, ns: str = "default", labels: Any = None) -> Any:
    found = telemetry.access_logging(store, ns, labels or {}, mode)
    return None if found is None else {p.name: p.filter for p in found}


ENVOY = {"providers": [{"name": "envoy"}]}


def test_no_telemetry_falls_back_to_the_mesh_config() -> None:
    assert logs(store_of()) is None
    assert telemetry.tracing(store_of(), "default", {}, SERVER) is None


def test_mesh_wide_envoy_provider_logs_every_workload_both_ways() -> None:
    # "Enable access logging": the built-in envoy provider, /dev/stdout, Istio's default format.
    store = store_of(tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}, version="v1alpha1"))
    for mode in (CLIENT, SERVER):
        found = telemetry.access_logging(store, "default", DETAILS, mode)
        assert found == (LogProvider("envoy", "envoyFileAccessLog", '{"path": "/dev/stdout"}', ""),)


def test_workload_disables_what_the_mesh_enables() -> None:
    # "Disable access log for specific workload" (in the workload's namespace: a selector in the
    # root namespace is ignored, istio.io/latest/docs/tasks/observability/telemetry/).
    disable = {"selector": {"matchLabels": DETAILS}, "accessLogging": [{**ENVOY, "disabled": True}]}
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}),
        tel("default", "disable-details-logging", disable),
    )
    assert logs(store, labels=DETAILS) == {}
    assert logs(store, labels={"app": "reviews"}) == {"envoy": ""}
    assert logs(store, ns="other", labels=DETAILS) == {"envoy": ""}


def test_disabled_without_providers_turns_off_the_parents() -> None:
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}),
        tel(
            "default",
            "off",
            {"selector": {"matchLabels": DETAILS}, "accessLogging": [{"disabled": True}]},
        ),
    )
    assert logs(store, labels=DETAILS) == {}


def test_disabled_alone_is_an_empty_config_not_the_mesh_fallback() -> None:
    # No provider anywhere: nothing is enabled, and the Telemetry still decides (access
    # logging off), so MeshConfig accessLogFile does not apply to this workload.
    off = {"selector": {"matchLabels": DETAILS}, "accessLogging": [{"disabled": True}]}
    store = store_of(tel("default", "off", off))
    assert logs(store, labels=DETAILS) == {}
    assert logs(store, labels={"app": "reviews"}) is None


def test_selector_in_the_root_namespace_is_ignored() -> None:
    disable = {"selector": {"matchLabels": DETAILS}, "accessLogging": [{**ENVOY, "disabled": True}]}
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}),
        tel(ROOT, "disable-details-logging", disable),
    )
    assert logs(store, labels=DETAILS) == {"envoy": ""}
    assert telemetry.problems(
        store.istio["Telemetry/istio-system/disable-details-logging"],
        store.mesh_config.extension_providers,
        ROOT,
    ) == [
        "Telemetry istio-system/disable-details-logging: selector: a workload selector in the"
        " root namespace is ignored by Istio; this Telemetry applies to nothing (put it in the"
        " workload's namespace)"
    ]


def test_workload_mode_keeps_client_and_server_apart() -> None:
    # "Filter access log with workload mode": no inbound log for details; and each mode keeps
    # its own filter (istio/istio#43371).
    server_off = {
        "selector": {"matchLabels": DETAILS},
        "accessLogging": [{**ENVOY, "match": {"mode": "SERVER"}, "disabled": True}],
    }
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}), tel("default", "d", server_off)
    )
    assert logs(store, SERVER, labels=DETAILS) == {}
    assert logs(store, CLIENT, labels=DETAILS) == {"envoy": ""}
    two = {
        "accessLogging": [
            {
                **ENVOY,
                "match": {"mode": "CLIENT"},
                "filter": {"expression": "response.code >= 400"},
            },
            {
                **ENVOY,
                "match": {"mode": "SERVER"},
                "filter": {"expression": "response.code >= 500"},
            },
        ]
    }
    store = store_of(tel("default", "two", two))
    assert logs(store, CLIENT) == {"envoy": "response.code >= 400"}
    assert logs(store, SERVER) == {"envoy": "response.code >= 500"}


def test_filter_of_the_nearest_level_wins() -> None:
    # "Filter access log with CEL expression": a namespace's filter replaces the mesh's.
    store = store_of(
        tel(
            ROOT,
            "mesh-default",
            {"accessLogging": [{**ENVOY, "filter": {"expression": "response.code >= 400"}}]},
        ),
        tel(
            "default",
            "ns",
            {"accessLogging": [{**ENVOY, "filter": {"expression": "response.code >= 500"}}]},
        ),
    )
    assert logs(store) == {"envoy": "response.code >= 500"}
    assert logs(store, ns="other") == {"envoy": "response.code >= 400"}


def test_a_level_naming_providers_replaces_the_parents_set() -> None:
    mesh = {
        "extensionProviders": [
            {
                "name": "json",
                "envoyFileAccessLog": {
                    "path": "/dev/stdout",
                    "logFormat": {"labels": {"code": "%RESPONSE_CODE%"}},
                },
            }
        ]
    }
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}),
        tel("default", "ns", {"accessLogging": [{"providers": [{"name": "json"}]}]}),
        mesh=mesh,
    )
    found = telemetry.access_logging(store, "default", {}, SERVER)
    assert found is not None and [p.name for p in found] == ["json"]
    assert found[0].settings_map["logFormat"] == {"labels": {"code": "%RESPONSE_CODE%"}}
    assert logs(store, ns="other") == {"envoy": ""}


def test_default_providers_apply_without_any_telemetry() -> None:
    store = store_of(mesh={"defaultProviders": {"accessLogging": ["envoy"]}})
    assert logs(store) == {"envoy": ""}
    off = {"selector": {"matchLabels": DETAILS}, "accessLogging": [{"disabled": True}]}
    store = store_of(
        tel("default", "off", off), mesh={"defaultProviders": {"accessLogging": ["envoy"]}}
    )
    assert logs(store, labels=DETAILS) == {}
    assert logs(store) == {"envoy": ""}


def test_oldest_of_one_level_wins() -> None:
    older = tel("default", "b", {"accessLogging": [ENVOY]}, created="2024-01-01T00:00:00Z")
    newer = tel(
        "default",
        "a",
        {"accessLogging": [{"disabled": True, **ENVOY}]},
        created="2025-01-01T00:00:00Z",
    )
    assert logs(store_of(newer, older)) == {"envoy": ""}


def test_target_refs_do_not_apply_to_captured_pods() -> None:
    gateway = {
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}],
        "accessLogging": [ENVOY],
    }
    assert logs(store_of(tel("default", "gw", gateway))) is None


def test_unknown_provider_and_bad_cel_are_named_and_skipped() -> None:
    bad = {
        "accessLogging": [
            {"providers": [{"name": "nope"}]},
            {**ENVOY, "filter": {"expression": "response.code >="}},
        ]
    }
    store = store_of(
        tel(ROOT, "mesh-default", {"accessLogging": [ENVOY]}), tel("default", "bad", bad)
    )
    found = telemetry.problems(
        store.istio["Telemetry/default/bad"], store.mesh_config.extension_providers, ROOT
    )
    assert found[0].startswith(
        'Telemetry default/bad: accessLogging[0].providers[0].name: unknown provider "nope"'
    )
    assert found[1].startswith(
        "Telemetry default/bad: accessLogging[1].filter.expression: not a CEL expression"
    )
    assert len(found) == 2
    # The namespace level names only "nope" (unknown, skipped); the bad entry is left out.
    assert logs(store) == {}
    assert logs(store, ns="other") == {"envoy": ""}


def test_provider_names_compare_case_insensitively() -> None:
    store = store_of(tel(ROOT, "m", {"accessLogging": [{"providers": [{"name": "Envoy"}]}]}))
    assert logs(store) == {"envoy": ""}


# -- tracing (istio.io/latest/docs/reference/config/telemetry/ examples) --------------------------

ZIPKIN = {
    "extensionProviders": [
        {
            "name": "localtrace",
            "zipkin": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411},
        },
        {"name": "alt", "zipkin": {"service": "alt.istio-system.svc.cluster.local", "port": 9411}},
    ],
    "defaultProviders": {"tracing": ["localtrace"]},
}


def test_tracing_sampling_mesh_wide_and_disabled_for_one_workload() -> None:
    foo = {"service.istio.io/canonical-name": "foo"}
    store = store_of(
        tel(ROOT, "mesh-default", {"tracing": [{"randomSamplingPercentage": 10.0}]}),
        tel(
            "bar",
            "foo-tracing",
            {"selector": {"matchLabels": foo}, "tracing": [{"disableSpanReporting": True}]},
        ),
        tel(
            "baz",
            "foo-tracing-alternate",
            {"selector": {"matchLabels": foo}, "tracing": [{"providers": [{"name": "alt"}]}]},
        ),
        mesh=ZIPKIN,
    )
    spec = telemetry.tracing(store, "default", {}, SERVER)
    assert spec is not None
    assert (spec.provider, spec.provider_kind, spec.random_sampling_percentage) == (
        "localtrace",
        "zipkin",
        10.0,
    )
    assert not spec.disabled and spec.use_request_id_for_trace_sampling
    off = telemetry.tracing(store, "bar", foo, CLIENT)
    assert off is not None and off.disabled and off.random_sampling_percentage == 10.0
    alt = telemetry.tracing(store, "baz", foo, SERVER)
    assert alt is not None and alt.provider == "alt" and not alt.disabled


def test_tracing_custom_tags_and_mode() -> None:
    tags = {"my_tag_header": {"header": {"name": "host"}}}
    store = store_of(
        tel(
            ROOT, "mesh-default", {"tracing": [{"customTags": {"a": {"literal": {"value": "1"}}}}]}
        ),
        tel(
            "default",
            "ns",
            {
                "tracing": [
                    {
                        "match": {"mode": "SERVER"},
                        "customTags": tags,
                        "useRequestIdForTraceSampling": False,
                    }
                ]
            },
        ),
        mesh=ZIPKIN,
    )
    server = telemetry.tracing(store, "default", {}, SERVER)
    client = telemetry.tracing(store, "default", {}, CLIENT)
    assert server is not None and client is not None
    assert server.tags == tags and not server.use_request_id_for_trace_sampling
    assert (
        client.tags == {"a": {"literal": {"value": "1"}}}
        and client.use_request_id_for_trace_sampling
    )


def test_tracing_without_a_known_provider_is_disabled() -> None:
    store = store_of(tel(ROOT, "m", {"tracing": [{"randomSamplingPercentage": 50}]}))
    spec = telemetry.tracing(store, "default", {}, SERVER)
    assert spec is not None and spec.disabled and spec.provider == ""


# -- MeshConfig ------------------------------------------------------------------------------------


def test_mesh_config_access_log_fields() -> None:
    config = parse_mesh_config(
        {
            "accessLogFile": "/dev/stdout",
            "accessLogEncoding": "JSON",
            "accessLogFormat": '{"code": "%RESPONSE_CODE%"}',
            "defaultProviders": {"accessLogging": ["envoy"], "tracing": ["zipkin"]},
        }
    )
    assert (config.access_log_file, config.access_log_encoding) == ("/dev/stdout", "JSON")
    assert config.default_providers == DefaultProviders(
        tracing=("zipkin",), access_logging=("envoy",)
    )
    assert MeshConfig().access_log_file == ""  # Istio's default: no access log


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"accessLogEncoding": "XML"}, "accessLogEncoding: 'XML' is not one of TEXT, JSON"),
        (
            {"accessLogEncoding": "JSON", "accessLogFormat": "[%START_TIME%]"},
            "accessLogFormat: with accessLogEncoding JSON, not a JSON object",
        ),
        ({"defaultProviders": {"logs": []}}, 'unknown field "defaultProviders.logs"'),
    ],
)
def test_mesh_config_access_log_errors(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ResourceError) as e:
        parse_mesh_config(fields)
    assert any(p.startswith(problem) for p in e.value.problems)


def test_provider_settings_are_kept_and_built_ins_can_be_replaced() -> None:
    providers = extension_providers.parse(
        [{"name": "envoy", "envoyFileAccessLog": {"path": "/tmp/x.log"}}]
    )
    assert providers.settings("envoy") == ("envoy", "envoyFileAccessLog", {"path": "/tmp/x.log"})
    assert extension_providers.ExtensionProviders().settings("ENVOY") == (
        "envoy",
        "envoyFileAccessLog",
        {"path": "/dev/stdout"},
    )
    assert providers.settings("zipkin") is None


# -- metrics (istio.io/latest/docs/reference/config/telemetry/#Metrics, #MetricsOverrides; the
# task istio.io/latest/docs/tasks/observability/metrics/customize-metrics/; istiod's
# mergeMetrics, pilot/pkg/model/telemetry.go) ----------------------------------------------------

PROM = [{"name": "prometheus"}]
REQUESTS = "istio_requests_total"


def spec_of(store: MeshStore, mode: str, ns: str = "default", labels: Any = None) -> Any:
    return telemetry.metrics(store, ns, labels or {}, mode)


def test_metrics_default_to_the_mesh_default_providers() -> None:
    for mode in (CLIENT, SERVER):
        assert spec_of(store_of(), mode) == telemetry.REPORTED
        off = store_of(mesh={"defaultProviders": {"metrics": []}})
        assert spec_of(off, mode) == telemetry.OFF


def test_disabling_all_metrics_for_a_workload() -> None:
    # The reference's "disable all metrics for a workload": no match is every metric, both modes.
    disable = {
        "selector": {"matchLabels": DETAILS},
        "metrics": [{"providers": PROM, "overrides": [{"disabled": True}]}],
    }
    store = store_of(tel("default", "no-metrics", disable))
    assert spec_of(store, SERVER, labels=DETAILS) == telemetry.OFF
    assert spec_of(store, CLIENT, labels=DETAILS) == telemetry.OFF
    assert spec_of(store, SERVER, labels={"app": "reviews"}) == telemetry.REPORTED


def test_one_metric_off_in_one_mode() -> None:
    # The task's "disable REQUEST_COUNT for the client" (mode CLIENT only).
    spec = {
        "metrics": [
            {
                "providers": PROM,
                "overrides": [
                    {"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"}, "disabled": True}
                ],
            }
        ]
    }
    store = store_of(tel(ROOT, "mesh-default", spec))
    assert spec_of(store, CLIENT).disabled == {REQUESTS}
    assert spec_of(store, SERVER) == telemetry.REPORTED


def test_a_namespace_enables_what_the_root_disabled() -> None:
    # istiod: "root namespace disables all, but then enables them by namespace scoped".
    root = {"metrics": [{"providers": PROM, "overrides": [{"disabled": True}]}]}
    again = {
        "metrics": [
            {"overrides": [{"match": {"metric": "ALL_METRICS"}, "disabled": False}]},
        ]
    }
    store = store_of(tel(ROOT, "mesh-default", root), tel("bookinfo", "on", again))
    assert spec_of(store, SERVER) == telemetry.OFF
    assert spec_of(store, SERVER, ns="bookinfo").reported
    assert spec_of(store, SERVER, ns="bookinfo").disabled == frozenset()


def test_tag_overrides_merge_per_tag_later_levels_winning() -> None:
    # The task's tagOverrides: UPSERT (the default operation) a CEL value, REMOVE a label.
    root = {
        "metrics": [
            {
                "providers": PROM,
                "overrides": [
                    {
                        "match": {"metric": "REQUEST_COUNT"},
                        "tagOverrides": {
                            "request_host": {"value": "request.host"},
                            "request_protocol": {"operation": "REMOVE"},
                        },
                    }
                ],
            }
        ]
    }
    namespace = {
        "metrics": [
            {
                "overrides": [
                    {
                        "match": {"metric": "REQUEST_COUNT", "mode": "SERVER"},
                        "tagOverrides": {"request_host": {"value": "request.headers['host']"}},
                    }
                ]
            }
        ]
    }
    store = store_of(tel(ROOT, "mesh-default", root), tel("default", "ns", namespace))
    assert spec_of(store, CLIENT).tags_of(REQUESTS) == (
        ("request_host", "request.host"),
        ("request_protocol", ""),
    )
    assert spec_of(store, SERVER).tags_of(REQUESTS) == (
        ("request_host", "request.headers['host']"),
        ("request_protocol", ""),
    )
    assert spec_of(store, SERVER).tags_of("istio_request_bytes") == ()


def test_a_level_naming_another_provider_replaces_prometheus() -> None:
    # A level's providers replace its parent's; the node reports to Prometheus providers only.
    spec = {"metrics": [{"providers": [{"name": "stackdriver"}]}]}
    store = store_of(tel("default", "sd", spec))
    assert spec_of(store, SERVER) == telemetry.OFF
    assert spec_of(store, SERVER, ns="other") == telemetry.REPORTED


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"match": {"customMetric": "my_metric"}}, "customMetric: custom metrics are not built"),
        ({"tagOverrides": {"x": {"value": "request.host +"}}}, "tagOverrides.x: an UPSERT needs"),
        ({"tagOverrides": {"x": {"operation": "UPSERT"}}}, "(no value)"),
    ],
)
def test_metrics_overrides_the_node_cannot_build_are_named(
    override: dict[str, Any], problem: str
) -> None:
    res = tel("default", "bad", {"metrics": [{"providers": PROM, "overrides": [override]}]})
    found = telemetry.problems(res, extension_providers.ExtensionProviders())
    where = "Telemetry default/bad: metrics[0].overrides[0]"
    assert any(problem in p and where in p for p in found), found
    # The rest still applies: what the override could not say changes nothing.
    assert spec_of(store_of(res), SERVER) == telemetry.REPORTED
