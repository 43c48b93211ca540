"""Tracing through the real node Envoys (issue #19 part 4; SCENARIOS S1.1's chain), one testbed.

default/sleep (n1) calls web (n1: the same-node fast path), whose fake service calls backend
(n2: across nodes, mTLS) and propagates the trace headers, as Istio requires of apps
(istio.io/latest/docs/tasks/observability/distributed-tracing/overview/, "Trace context
propagation"). The collector (tests/integration/trace_collector.py) runs as a pod of the
namespace ``tracing``, outside the mesh, as Istio's sample addons run theirs
(samples/addons/jaeger.yaml: ``sidecar.istio.io/inject: "false"``), and takes Zipkin JSON v2 and
OTLP/HTTP. Expected spans are a sidecar mesh's: a client span at the caller's proxy and a server
span at the callee's per hop, one trace id, each span the child of the one before, named
``<host>:<port>/*`` and tagged with the proxy's workload (istio/istio
pilot/pkg/networking/core/tracing.go).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    call,
    pod,
    running_testbed,
    service,
    topology_text,
)

pytestmark = pytest.mark.integration

NAME = "tbtrace"
SLEEP, COLLECTOR = "default/sleep", "tracing/collector"
BACKEND_HEADERS = "http://backend:8080/headers"
COLLECTOR_HOST = "collector.tracing.svc.cluster.local"
PROVIDERS = [
    {
        "name": "zipkin",
        "zipkin": {
            "service": COLLECTOR_HOST,
            "port": 9411,
            "traceContextOption": "USE_B3_WITH_W3C_PROPAGATION",
        },
    },
    {
        "name": "otel",
        "opentelemetry": {"service": COLLECTOR_HOST, "port": 4318, "http": {"path": "/v1/traces"}},
    },
]
WEB_OP = "web.default.svc.cluster.local:8080/*"
BACKEND_OP = "backend.default.svc.cluster.local:8080/*"


def _topology() -> str:
    collector = {
        "type": "command",
        "port": 9411,
        "command": [sys.executable, str(Path(__file__).with_name("trace_collector.py"))],
    }
    web = {"type": "fake-service", "port": 8080, "env": {"UPSTREAM_URIS": BACKEND_HEADERS}}
    pods = [
        pod("sleep", "n1", {"app": "sleep"}),
        pod("web", "n1", {"app": "web", "version": "v1"}, workload=web),
        pod(
            "backend", "n2", {"app": "backend", "version": "v2"}, workload={"type": "fake-service"}
        ),
        pod("collector", "n2", {"app": "collector"}, namespace="tracing", workload=collector),
    ]
    services = [
        service("web", 8080, 8080),
        service("backend", 8080, 8080),
        {
            "name": "collector",
            "namespace": "tracing",
            "selector": {"app": "collector"},
            "ports": [
                {"name": "http-zipkin", "port": 9411, "targetPort": 9411},
                {"name": "http-otlp", "port": 4318, "targetPort": 9411},
            ],
        },
    ]
    return topology_text(NAME, pods, services, outside=("tracing",))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_tracing") as bed:
        yield bed


def _chain(tb: Testbed) -> dict[str, str]:
    """One S1.1 request: the headers backend received (lower-case names)."""
    answer = call(tb, SLEEP, "http://web:8080/")
    upstream = answer["upstream_calls"][BACKEND_HEADERS]
    return {k.lower(): v for k, v in upstream.get("headers", {}).items()}


def _received(tb: Testbed, trace_id: str) -> list[dict[str, Any]]:
    proc = tb.exec(COLLECTOR, ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9411/received"])
    if proc.returncode != 0:
        return []
    return [s for s in json.loads(proc.stdout) if s.get("traceId") == trace_id]


def _trace(
    tb: Testbed, trace_of: Any, want: int = 4, budget: float = 60
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Requests until one's trace (TRACE_OF(backend's headers): its id, "" while the new config
    has not reached both nodes) has WANT spans at the collector; bounded. Envoy's Zipkin tracer
    flushes every 5 s, the OpenTelemetry one every 5 s."""
    deadline = time.monotonic() + budget
    seen: list[Any] = []
    while time.monotonic() < deadline:
        headers = _chain(tb)
        trace_id = trace_of(headers)
        seen = [headers]
        if not trace_id:
            time.sleep(1)
            continue
        until = min(deadline, time.monotonic() + 12)
        while time.monotonic() < until:
            spans = _received(tb, trace_id)
            seen = [headers, spans]
            if len(spans) >= want:
                time.sleep(1)  # late duplicates would show now
                return headers, _received(tb, trace_id)
            time.sleep(0.5)
    raise AssertionError(f"no full trace at the collector within {budget} s: {seen}")


def _by_role(
    spans: list[dict[str, Any]], pod_tag: str = "nodeagent.pod"
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s.get("kind", ""), s.get("tags", {}).get(pod_tag, "")): s for s in spans}


def _linked_spans(spans: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The four spans of one request (sleep's client span, web's server and client spans,
    backend's server span), each the child of the one before: n2's the child of n1's."""
    assert len(spans) == 4, spans
    roles = _by_role(spans)
    chain = (
        roles[("CLIENT", "default/sleep")],
        roles[("SERVER", "default/web")],
        roles[("CLIENT", "default/web")],
        roles[("SERVER", "default/backend")],
    )
    assert not chain[0].get("parentId")  # the root: curl sent no trace headers
    for parent, child in itertools.pairwise(chain):
        assert child["parentId"] == parent["id"], (parent, child)
    return chain


def test_zipkin_spans_of_one_chain_b3_and_w3c(tb: Testbed) -> None:
    """MeshConfig only (istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/: a zipkin
    extension provider with traceContextOption USE_B3_WITH_W3C_PROPAGATION, defaultProviders
    .tracing, defaultConfig.tracing.sampling 100): the collector gets the chain's four spans,
    one trace id, each the child of the one before across both nodes; names <host>:<port>/*;
    tags naming each span's pod (istio.canonical_service, istio.namespace, nodeagent.pod); the
    app behind the last hop received B3 and W3C traceparent for the same trace and span."""
    tb.set_mesh_config(
        {
            "extensionProviders": PROVIDERS,
            "defaultProviders": {"tracing": ["zipkin"]},
            "defaultConfig": {"tracing": {"sampling": 100}},
        }
    )
    try:
        headers, spans = _trace(tb, lambda h: h.get("x-b3-traceid", ""))
    finally:
        tb.set_mesh_config({})
    trace_id = headers["x-b3-traceid"]
    assert len(trace_id) == 32  # 128-bit ids (Istio's default)
    sleep_out, web_in, web_out, backend_in = _linked_spans(spans)
    assert [s["name"] for s in (sleep_out, web_in, web_out, backend_in)] == [WEB_OP] * 2 + [
        BACKEND_OP
    ] * 2
    nodes = [s["tags"]["node_id"] for s in (sleep_out, web_in, web_out, backend_in)]
    assert nodes[0] == nodes[1] == nodes[2] != nodes[3], nodes
    for span, service_name, revision in (
        (sleep_out, "sleep", "latest"),
        (web_in, "web", "v1"),
        (web_out, "web", "v1"),
        (backend_in, "backend", "v2"),
    ):
        assert span["tags"]["istio.canonical_service"] == service_name
        assert span["tags"]["istio.canonical_revision"] == revision
        assert span["tags"]["istio.namespace"] == "default"
        assert span["tags"]["istio.mesh_id"] == "cluster.local"
    # What the backend app received from n2's server span: B3 and W3C, same trace and span.
    assert headers["x-b3-spanid"] == backend_in["id"]
    assert headers["x-b3-parentspanid"] == web_out["id"]
    assert headers["x-b3-sampled"] == "1"
    assert headers["traceparent"] == f"00-{trace_id}-{backend_in['id']}-01"


def test_opentelemetry_by_telemetry_names_each_pods_service(tb: Testbed) -> None:
    """The Telemetry API (istio.io/latest/docs/reference/config/telemetry/): a mesh-wide
    Telemetry in the root namespace names the opentelemetry provider (OTLP/HTTP) with
    randomSamplingPercentage 100, no defaultProviders. One trace id, W3C traceparent across
    both nodes, the chain's parent links; each server span's service.name is its pod's
    (<app>.<namespace>, Istio's tracingServiceName default)."""
    tb.set_mesh_config({"extensionProviders": PROVIDERS})
    telemetry = {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": "mesh-default", "namespace": "istio-system"},
        "spec": {"tracing": [{"providers": [{"name": "otel"}], "randomSamplingPercentage": 100}]},
    }
    apply_docs(tb, telemetry)

    def trace_of(headers: dict[str, str]) -> str:
        # W3C only (Envoy's OpenTelemetry tracer): no B3 left from the Zipkin test's config.
        parent = headers.get("traceparent", "")
        return "" if "x-b3-traceid" in headers else parent.split("-")[1] if parent else ""

    try:
        headers, spans = _trace(tb, trace_of)
    finally:
        apply_docs(tb)
        tb.set_mesh_config({})
    _, web_in, _, backend_in = _linked_spans(spans)
    assert (web_in["serviceName"], backend_in["serviceName"]) == ("web.default", "backend.default")
    assert headers["traceparent"].split("-")[2] == backend_in["id"]
