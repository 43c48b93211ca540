"""Tracing: MeshConfig's tracers and the connection managers' ``tracing`` block (issue #19).

Expected values come from Istio, cited per test: istio.io/latest/docs/reference/config/
istio.mesh.v1alpha1/ (MESH: ``ExtensionProvider.ZipkinTracingProvider``,
``OpenTelemetryTracingProvider``, ``DefaultProviders``, ``Tracing``), istio.io/latest/docs/tasks/
observability/distributed-tracing/ (TASK) and istiod's builder (istio/istio
pilot/pkg/networking/core/tracing.go: TRACING.GO).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh import tracing as mt
from nodeagent.mesh.model import (
    DefaultProviders,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import ResourceError, parse_mesh_config
from nodeagent.translate import envoy as e
from nodeagent.translate import tracing, translate
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import as_json, local, stamps, store

ZIPKIN_HOST = "zipkin.tracing.svc.cluster.local"
ZIPKIN = {"name": "zipkin", "zipkin": {"service": ZIPKIN_HOST, "port": 9411}}
OTEL_GRPC = {"name": "otel", "opentelemetry": {"service": ZIPKIN_HOST, "port": 4317}}
OTEL_HTTP = {
    "name": "otel-http",
    "opentelemetry": {
        "service": f"tracing/{ZIPKIN_HOST}",
        "port": 4318,
        "http": {"path": "/v1/traces", "timeout": "2s", "headers": [{"name": "k", "value": "v"}]},
        "resourceDetectors": {"environment": {}},
    },
}
WEB = local("web", {"app": "web", "version": "v1"})


def mesh_store(provider: str = "zipkin", **mesh: Any) -> MeshStore:
    s = store()
    fields = {
        "extensionProviders": [ZIPKIN, OTEL_GRPC, OTEL_HTTP],
        "defaultProviders": {"tracing": [provider]},
        **mesh,
    }
    s.set_mesh_config(parse_mesh_config(fields))
    s.put_service(
        Service(
            "tracing",
            "zipkin",
            "10.96.0.30",
            (ServicePort(9411, "http"), ServicePort(4317, "grpc"), ServicePort(4318, "http-otlp")),
            {"app": "zipkin"},
        )
    )
    return s


def hcm_tracing(listener: Any, chain: str) -> dict[str, Any]:
    """The tracing block of the HCM of LISTENER's chain CHAIN (proto3 JSON)."""
    for c in as_json(listener).get("filterChains", []):
        if c.get("name") == chain:
            for f in c["filters"]:
                if "tracing" in f["typedConfig"]:
                    block: dict[str, Any] = f["typedConfig"]["tracing"]
                    return block
    raise AssertionError(f"no traced HCM in chain {chain}")


def tag_map(block: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["tag"]: {k: v for k, v in t.items() if k != "tag"} for t in block["customTags"]}


# -- MeshConfig ----------------------------------------------------------------------------------


def test_zipkin_provider_istio_defaults() -> None:
    """MESH ZipkinTracingProvider: traceContextOption USE_B3 by default, 128-bit trace ids unless
    enable64bitTraceId; TRACING.GO zipkinConfig: path /api/v2/spans, timeout 5 s."""
    p = parse_mesh_config({"extensionProviders": [ZIPKIN]}).extension_providers.tracer("zipkin")
    assert p == mt.TracerProvider("zipkin", "zipkin", ZIPKIN_HOST, 9411)
    assert p.trace_context == "USE_B3" and p.trace_id_128bit


def test_mesh_tracing_defaults_and_sampling() -> None:
    """MESH: enableTracing defaults to true; Tracing.sampling 0 keeps PILOT_TRACE_SAMPLING's 1 %,
    a value above 100 counts as 1 % (TRACING.GO proxyConfigSamplingValue)."""
    assert parse_mesh_config({}).tracing == mt.MeshTracing()
    assert mt.MeshTracing().sampling == 1.0
    for given, used in ((0, 1.0), (100, 100.0), (12.5, 12.5), (250, 1.0)):
        config = parse_mesh_config({"defaultConfig": {"tracing": {"sampling": given}}})
        assert config.tracing.sampling == used


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "z", "zipkin": {"service": ZIPKIN_HOST}}, "port"),
        ({"name": "z", "zipkin": {"port": 9411}}, "service"),
        (
            {"name": "z", "zipkin": {"service": "a", "port": 1, "traceContextOption": "W3C"}},
            "traceContextOption",
        ),
        ({"name": "o", "opentelemetry": {"service": "a", "port": 1, "nope": 1}}, "nope"),
        (
            {
                "name": "o",
                "opentelemetry": {"service": "a", "port": 1, "resourceDetectors": {"x": {}}},
            },
            "resourceDetectors",
        ),
    ],
)
def test_bad_tracers_are_refused_naming_the_field(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ResourceError, match=problem):
        parse_mesh_config({"extensionProviders": [entry]})


def test_custom_tags_three_kinds_sorted() -> None:
    """MESH Tracing.customTags: literal, environment (defaultValue), header (defaultValue); sorted
    by name as TRACING.GO sorts them."""
    tags = {
        "z": {"literal": {"value": "x"}},
        "a": {"environment": {"name": "HOME", "defaultValue": "d"}},
        "m": {"header": {"name": "user"}},
    }
    config = parse_mesh_config({"defaultConfig": {"tracing": {"customTags": tags}}})
    assert config.tracing.custom_tags == (
        mt.CustomTag("a", "environment", "HOME", "d"),
        mt.CustomTag("m", "header", "user"),
        mt.CustomTag("z", "literal", "x"),
    )


# -- the connection managers ---------------------------------------------------------------------


def test_no_provider_no_tracing() -> None:
    """Without a tracing provider (defaultProviders.tracing or Telemetry) no HCM traces and no
    collector cluster exists: the legacy bootstrap tracer is not read (module docstring)."""
    out = translate(store(), [WEB])
    assert not any(k.startswith("tracing|") for k in out[e.CLUSTER])
    for listener in out[e.LISTENER].values():
        for chain in as_json(listener).get("filterChains", []):
            assert all("tracing" not in f["typedConfig"] for f in chain["filters"])


def test_zipkin_outbound_block_as_istiod_builds_it() -> None:
    """TRACING.GO zipkinConfig + configureSampling: HTTP_JSON, 128-bit ids, no shared span
    context, a collector_service to http://<host>/api/v2/spans with a 5 s timeout on the
    provider's cluster; client and overall sampling 100 %, random = defaultConfig sampling;
    span name <host>:<port>/* (getRouteOperation)."""
    fields = {
        "defaultConfig": {"tracing": {"sampling": 100}},
        "extensionProviders": [
            {**ZIPKIN, "zipkin": {**ZIPKIN["zipkin"], "traceContextOption": mt.USE_B3_WITH_W3C}}
        ],
    }
    out = translate(mesh_store(**fields), [WEB])
    chain = "outbound|80||web.shop.svc.cluster.local"
    block = hcm_tracing(out[e.LISTENER]["outbound-internal"], chain)
    provider = block["provider"]
    assert provider["name"] == "envoy.tracers.zipkin"
    config = {k: v for k, v in provider["typedConfig"].items() if k != "@type"}
    assert config == {
        "collectorEndpointVersion": "HTTP_JSON",
        "traceId128bit": True,
        "sharedSpanContext": False,
        "collectorService": {
            "httpUri": {
                "uri": f"http://{ZIPKIN_HOST}/api/v2/spans",
                "cluster": f"tracing|9411||{ZIPKIN_HOST}",
                "timeout": "5s",
            }
        },
        "traceContextOption": "USE_B3_WITH_W3C_PROPAGATION",
    }
    assert block["clientSampling"] == block["overallSampling"] == {"value": 100.0}
    assert block["randomSampling"] == {"value": 100.0}
    assert block["operation"] == "web.shop.svc.cluster.local:80/*"
    assert "spawnUpstreamSpan" not in block  # TRACING.GO: only gateways (and SkyWalking)


def test_outbound_tags_name_the_calling_pod_from_filter_state() -> None:
    """TRACING.GO buildServiceTags: istio.canonical_service, canonical_revision, namespace,
    mesh_id, cluster_id per proxy. outbound-internal is shared by every local pod, so the
    per-pod ones read what the pod's own listener stamped; O(1) per pod (docs/o1-config.md)."""
    out = translate(mesh_store(), [WEB])
    tags = tag_map(
        hcm_tracing(out[e.LISTENER]["outbound-internal"], "outbound|80||web.shop.svc.cluster.local")
    )
    assert tags["istio.canonical_service"] == {
        "value": f"%FILTER_STATE({tracing.SERVICE_KEY}:PLAIN)%"
    }
    assert tags["istio.namespace"] == {"value": f"%FILTER_STATE({tracing.NAMESPACE_KEY}:PLAIN)%"}
    assert tags["nodeagent.pod"] == {"value": "%FILTER_STATE(io.nodeagent.pod:PLAIN)%"}
    assert tags["istio.mesh_id"] == {"literal": {"value": "cluster.local"}}
    assert tags["istio.cluster_id"] == {"literal": {"value": "Kubernetes"}}
    assert "istio.authorization.dry_run.deny_policy.name" in tags
    stamped = stamps(as_json(out[e.LISTENER]["virtualOutbound/shop/web"]))
    assert stamped[tracing.SERVICE_KEY]["formatString"]["textFormatSource"]["inlineString"] == "web"
    assert stamped[tracing.REVISION_KEY]["formatString"]["textFormatSource"]["inlineString"] == "v1"
    assert (
        stamped[tracing.NAMESPACE_KEY]["formatString"]["textFormatSource"]["inlineString"] == "shop"
    )


def test_inbound_spans_are_the_pods_own() -> None:
    """The pod's inbound (mTLS and plaintext) and fast-path HCMs: literal tags with its own
    canonical service (label app, TRACING.GO via the injector's canonical-name) and revision
    (label version), span name <service host>:<service port>/* (the caller's span name, not the
    container port); custom tags after Istio's, sorted."""
    tags_in = {"defaultConfig": {"tracing": {"customTags": {"a": {"literal": {"value": "x"}}}}}}
    out = translate(mesh_store(**tags_in), [WEB])
    for listener, chain in (
        ("virtualInbound/shop/web", "inbound|8080||-mtls"),
        ("virtualInbound/shop/web", "inbound|8080||"),
        ("inboundInternal/shop/web", "inbound|8080||"),
    ):
        block = hcm_tracing(out[e.LISTENER][listener], chain)
        tags = tag_map(block)
        assert tags["istio.canonical_service"] == {"literal": {"value": "web"}}
        assert tags["istio.canonical_revision"] == {"literal": {"value": "v1"}}
        assert tags["istio.namespace"] == {"literal": {"value": "shop"}}
        assert tags["nodeagent.pod"] == {"literal": {"value": "shop/web"}}
        assert tags["a"] == {"literal": {"value": "x"}}
        assert [t["tag"] for t in block["customTags"]] == sorted(tags)
        assert block["operation"] == "web.shop.svc.cluster.local:80/*"  # the service port


def test_opentelemetry_grpc_and_http() -> None:
    """TRACING.GO otelConfig: gRPC through envoy_grpc (authority the host) on an HTTP/2 cluster,
    or HTTP to <host><path> with the provider's timeout and headers; resource detectors; the
    span service name the pod's (ProxyConfig tracingServiceName APP_LABEL_AND_NAMESPACE)."""
    out = translate(mesh_store("otel"), [WEB])
    block = hcm_tracing(out[e.LISTENER]["virtualInbound/shop/web"], "inbound|8080||")
    config = block["provider"]["typedConfig"]
    assert block["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert config["serviceName"] == "web.shop"
    assert config["grpcService"] == {
        "envoyGrpc": {"clusterName": f"tracing|4317||{ZIPKIN_HOST}", "authority": ZIPKIN_HOST}
    }
    cluster = as_json(out[e.CLUSTER][f"tracing|4317||{ZIPKIN_HOST}"])
    assert "http2ProtocolOptions" in str(cluster["typedExtensionProtocolOptions"])
    out = translate(mesh_store("otel-http"), [WEB])
    config = hcm_tracing(out[e.LISTENER]["virtualInbound/shop/web"], "inbound|8080||")["provider"][
        "typedConfig"
    ]
    assert config["httpService"] == {
        "httpUri": {
            "uri": f"{ZIPKIN_HOST}/v1/traces",
            "cluster": f"tracing|4318||{ZIPKIN_HOST}",
            "timeout": "2s",
        },
        "requestHeadersToAdd": [
            {"header": {"key": "k", "value": "v"}, "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
    }
    assert config["resourceDetectors"][0]["name"].endswith("resource_detectors.environment")


def test_collector_cluster_lists_the_service_endpoints_plaintext() -> None:
    """The collector is reached from the node Envoy's own network, plaintext, at the service's
    endpoints (module docstring); an unknown service configures no tracing (TRACING.GO: "could
    not find cluster for tracing provider")."""
    s = mesh_store()
    s.put_endpoint_slice(
        EndpointSlice(
            "tracing",
            "zipkin-1",
            "zipkin",
            (Endpoint(("10.1.2.3",), pod="tracing/zipkin-0"),),
            (EndpointPort(9411, "http"),),
        )
    )
    out = translate(s, [WEB])
    cluster = as_json(out[e.CLUSTER][f"tracing|9411||{ZIPKIN_HOST}"])
    assert cluster["type"] == "STATIC" and "transportSocket" not in cluster
    address = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert address["socketAddress"] == {"address": "10.1.2.3", "portValue": 9411}
    s.delete_service("tracing/zipkin")
    missing = f"could not find service {ZIPKIN_HOST} in the service registry"
    assert tracing.client_tracer(s, [WEB.pod]) == (None, f'tracing provider "zipkin": {missing}')


def test_envoy_accepts_every_block(tmp_path: Path) -> None:
    """Envoy 1.40 validates the outbound and inbound blocks of each provider, with the collector
    clusters."""
    listeners: list[Any] = []
    clusters: list[Any] = []
    for i, provider in enumerate(("zipkin", "otel", "otel-http")):
        mesh = {"defaultConfig": {"tracing": {"customTags": {"h": {"header": {"name": "user"}}}}}}
        out = translate(mesh_store(provider, **mesh), [WEB])
        clusters += [c for name, c in out[e.CLUSTER].items() if name.startswith("tracing|")]
        blocks = [
            hcm_tracing(
                out[e.LISTENER]["outbound-internal"], "outbound|80||web.shop.svc.cluster.local"
            ),
            hcm_tracing(out[e.LISTENER]["virtualInbound/shop/web"], "inbound|8080||"),
        ]
        for j, block in enumerate(blocks):
            hcm = e.typed(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                stat_prefix="h",
                tracing=block,
                route_config={
                    "virtual_hosts": [
                        {
                            "name": "v",
                            "domains": ["*"],
                            "routes": [
                                {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
                            ],
                        }
                    ]
                },
                http_filters=[
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": e.typed("envoy.extensions.filters.http.router.v3.Router"),
                    }
                ],
            )
            listeners.append(
                {
                    "name": f"l{i}{j}",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": 10090 + 2 * i + j}
                    },
                    "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
                }
            )
    assert_envoy_accepts_resources(tmp_path, clusters=clusters, listeners=listeners)


# -- the Telemetry API ---------------------------------------------------------------------------
# istio.io/latest/docs/reference/config/telemetry/ (TELEMETRY): Tracing providers,
# randomSamplingPercentage, customTags, disableSpanReporting, useRequestIdForTraceSampling,
# match.mode; istio.io/latest/docs/tasks/observability/telemetry/ (scopes: root namespace,
# namespace, workload selector).


def telemetry(ns: str, name: str, tracing_: list[dict[str, Any]], **spec: Any) -> IstioResource:
    return IstioResource(
        "telemetry.istio.io", "v1", "Telemetry", ns, name, {"tracing": tracing_, **spec}
    )


def test_telemetry_sampling_tags_and_request_id() -> None:
    """TELEMETRY: a mesh-wide Telemetry (root namespace) naming the provider sets the random
    sampling (over defaultConfig's), its customTags replace MeshConfig's (tracing.go
    configureCustomTags), useRequestIdForTraceSampling false reaches the x-request-id
    extension; no defaultProviders needed."""
    s = mesh_store(defaultConfig={"tracing": {"customTags": {"m": {"literal": {"value": "x"}}}}})
    s.set_mesh_config(replace(s.mesh_config, default_providers=DefaultProviders()))
    assert tracing.client_tracer(s, [WEB.pod]) == (None, "")
    spec = {
        "providers": [{"name": "otel"}],
        "randomSamplingPercentage": 42.5,
        "customTags": {"t": {"header": {"name": "user", "defaultValue": "-"}}},
        "useRequestIdForTraceSampling": False,
    }
    s.put_istio(telemetry("istio-system", "mesh-default", [spec]))
    out = translate(s, [WEB])
    for listener, chain in (
        ("outbound-internal", "outbound|80||web.shop.svc.cluster.local"),
        ("virtualInbound/shop/web", "inbound|8080||"),
    ):
        block = hcm_tracing(out[e.LISTENER][listener], chain)
        assert block["provider"]["name"] == "envoy.tracers.opentelemetry"
        assert block["randomSampling"] == {"value": 42.5}
        tags = tag_map(block)
        assert tags["t"] == {"requestHeader": {"name": "user", "defaultValue": "-"}}
        assert "m" not in tags
        for c in as_json(out[e.LISTENER][listener])["filterChains"]:
            for f in c["filters"]:
                if "tracing" in f["typedConfig"]:
                    extension = f["typedConfig"]["requestIdExtension"]["typedConfig"]
                    assert extension["useRequestIdForTraceSampling"] is False


def test_workload_telemetry_disables_one_pods_server_spans() -> None:
    """TELEMETRY disableSpanReporting with match.mode SERVER on a workload selector: that pod's
    inbound side reports no spans; another pod's does; the shared outbound side keeps the
    mesh's (Envoy samples per connection manager: a per-workload CLIENT setting applies there
    only when every local pod gets the same, translate/tracing.py client_tracer)."""
    s = mesh_store()
    s.put_istio(
        telemetry(
            "shop",
            "quiet-web",
            [{"match": {"mode": "SERVER"}, "disableSpanReporting": True}],
            selector={"matchLabels": {"app": "web"}},
        )
    )
    other = local("other", {"app": "other"})
    out = translate(s, [WEB, other])
    with pytest.raises(AssertionError, match="no traced HCM"):
        hcm_tracing(out[e.LISTENER]["virtualInbound/shop/web"], "inbound|8080||")
    assert hcm_tracing(
        out[e.LISTENER]["outbound-internal"], "outbound|80||web.shop.svc.cluster.local"
    )
    s.put_istio(
        telemetry(
            "shop", "quiet-client", [{"match": {"mode": "CLIENT"}, "disableSpanReporting": True}]
        )
    )
    assert tracing.client_tracer(s, [WEB.pod, other.pod])[0] is None  # both pods: the same
    s.put_istio(
        IstioResource("telemetry.istio.io", "v1", "Telemetry", "other", "x", {"tracing": [{}]})
    )
    elsewhere = local("elsewhere", {"app": "e"})
    elsewhere = replace(elsewhere, pod=replace(elsewhere.pod, namespace="other"))
    assert tracing.client_tracer(s, [WEB.pod, elsewhere.pod])[0] is not None  # the mesh's
