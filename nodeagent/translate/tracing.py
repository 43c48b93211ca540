"""Tracing: the HTTP connection managers' ``tracing`` block and the collector's cluster (pure).

Istio is the specification: istio.io/latest/docs/tasks/observability/distributed-tracing/
(overview: Envoy makes the spans, apps propagate the B3 / W3C headers), istio.io/latest/docs/
reference/config/istio.mesh.v1alpha1/ (extension providers ``zipkin`` and ``opentelemetry``,
``defaultProviders.tracing``), istio.io/latest/docs/reference/config/telemetry/ (``tracing``)
and how istiod builds the block (istio/istio pilot/pkg/networking/core/tracing.go):

- provider ``envoy.tracers.zipkin``: HTTP JSON v2 to ``http://<host><path>`` (path default
  ``/api/v2/spans``) through a ``collector_service`` with the provider's timeout (default 5 s)
  and headers, 128-bit trace ids unless ``enable64bitTraceId``, ``shared_span_context`` false,
  ``trace_context_option`` USE_B3 or USE_B3_WITH_W3C_PROPAGATION (B3 preferred on extraction,
  both B3 and W3C ``traceparent`` injected); ``envoy.tracers.opentelemetry``: OTLP over gRPC
  (``envoy_grpc`` with the host as authority) or HTTP (``<host><path>``), the span's service
  name, the resource detectors;
- sampling: client 100 %, overall 100 %, random = the Telemetry's ``randomSamplingPercentage``,
  else MeshConfig ``defaultConfig.tracing.sampling``, else 1 %;
- tags: Istio's per proxy (``istio.canonical_service``, ``istio.canonical_revision``,
  ``istio.namespace``, ``istio.mesh_id``, ``istio.cluster_id``), the dry-run authorization tags
  (RBAC shadow metadata), then the custom tags, sorted by name; ``maxTagLength`` as
  ``max_path_tag_length``;
- span names: the route's ``<host>:<port>/*`` (istiod's route decorator, getRouteOperation), on
  both the client and the server side.

One Envoy serves every local pod, and a span must name the pod it belongs to, as a sidecar's
does. A pod's inbound connection managers are its own: their tags are literals, and with
OpenTelemetry the span's ``service.name`` is the pod's (``<app>.<namespace>``, Istio's
``tracingServiceName`` default APP_LABEL_AND_NAMESPACE). The outbound connection managers live
in ``outbound-internal``, shared by all local pods (one chain per service port): their tags are
formatters reading what the calling pod's listener stamped into filter state (``stamp``), so
they stay O(1) per pod; their span service name is the node's (a tracer's service name is per
tracer, not per request). Zipkin has no service name setting: its spans' ``localEndpoint`` is the
node Envoy's cluster name on both sides, and the pod is told by the tags (``istio.*``,
``nodeagent.pod``).

The collector is reached from the node Envoy itself (its own network, plaintext), not through
a pod's identity: the tracer's exports are Envoy's own requests, shared by every local pod, and
carry no caller. Its cluster ``tracing|<port>||<host>`` lists the service's endpoints (pod IPs
and ports), as Istio's sample addons run the collector outside the mesh
(samples/addons/jaeger.yaml: ``sidecar.istio.io/inject: "false"``). A collector that requires
mTLS (STRICT) is not reached.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2  # noqa: F401  (typed configs)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.request_id.uuid.v3 import uuid_pb2
from envoy.extensions.tracers.opentelemetry.resource_detectors.v3 import (  # noqa: F401
    dynatrace_resource_detector_pb2,
    environment_resource_detector_pb2,
)
from google.protobuf import json_format

from nodeagent.mesh import telemetry
from nodeagent.mesh import tracing as mesh_tracing
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.telemetry import TracingSpec
from nodeagent.mesh.tracing import CustomTag, TracerProvider
from nodeagent.translate import envoy
from nodeagent.translate.envoy import Cluster, message, typed
from nodeagent.translate.filters import state_value

ZIPKIN_TRACER = "envoy.tracers.zipkin"
OTEL_TRACER = "envoy.tracers.opentelemetry"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ZIPKIN_PATH = "/api/v2/spans"
DEFAULT_TIMEOUT = "5s"  # istiod's for Zipkin (Envoy requires one on an HttpUri)
CLUSTER_ID = "Kubernetes"  # Istio's default cluster name (values.global.multiCluster.clusterName)

# What the calling pod's outbound listener stamps for its spans (read one hop later, in the
# outbound-internal connection managers: ONCE).
SERVICE_KEY = "io.nodeagent.trace.service"
REVISION_KEY = "io.nodeagent.trace.revision"
NAMESPACE_KEY = "io.nodeagent.trace.namespace"
POD_KEY = "io.nodeagent.pod"  # internal.POD_KEY (stamped TRANSITIVE for access logs)
POD_TAG = "nodeagent.pod"

# Istio's dry-run authorization tags (tracing.go optionalPolicyTags): the RBAC filter's shadow
# verdicts, under the prefixes translate/authz.py gives its dry-run rules.
_DRY_RUN_TAGS = (
    (
        "istio.authorization.dry_run.allow_policy.name",
        "istio_dry_run_allow_",
        "shadow_effective_policy_id",
    ),
    (
        "istio.authorization.dry_run.allow_policy.result",
        "istio_dry_run_allow_",
        "shadow_engine_result",
    ),
    (
        "istio.authorization.dry_run.deny_policy.name",
        "istio_dry_run_deny_",
        "shadow_effective_policy_id",
    ),
    (
        "istio.authorization.dry_run.deny_policy.result",
        "istio_dry_run_deny_",
        "shadow_engine_result",
    ),
)


@dataclass(frozen=True)
class Tracer:
    """What a connection manager's tracing is made of (hashable: compared to tell a change)."""

    provider: TracerProvider
    host: str  # the provider's service hostname
    sampling: float  # percent
    custom_tags: tuple[CustomTag, ...] = ()
    istio_tags: bool = True
    max_path_tag_length: int = 0
    mesh_id: str = "cluster.local"
    use_request_id: bool = True

    @property
    def cluster(self) -> str:
        return collector_cluster_name(self.provider.port, self.host)


def collector_cluster_name(port: int, host: str) -> str:
    return f"tracing|{port}||{host}"


def canonical_service(pod: Pod) -> str:
    """Istio's canonical service of POD: label ``service.istio.io/canonical-name``, else
    ``app.kubernetes.io/name``, else ``app``, else the pod's name (istio.io/latest/docs/
    reference/config/labels/)."""
    labels = pod.labels
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return pod.name


def canonical_revision(pod: Pod) -> str:
    """``service.istio.io/canonical-revision``, else ``app.kubernetes.io/version``, else
    ``version``, else ``latest``."""
    labels = pod.labels
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return "latest"


def span_service_name(pod: Pod) -> str:
    """Istio's ``tracingServiceName`` default (APP_LABEL_AND_NAMESPACE): ``<app>.<namespace>``,
    ``istio-proxy`` without an app label."""
    return f"{pod.labels.get('app') or 'istio-proxy'}.{pod.namespace}"


def from_spec(store: MeshStore, spec: TracingSpec | None) -> tuple[Tracer | None, str]:
    """The tracer of a workload's TracingSpec (mesh/telemetry.py: its Telemetry ``tracing``
    merged over ``defaultProviders.tracing``; None: neither configures tracing), and why none
    when a provider is named but unusable (istiod logs it and configures no tracing)."""
    if spec is None or spec.disabled:  # disableSpanReporting, or no provider known
        return None, ""
    mesh = store.mesh_config
    provider = mesh.extension_providers.tracer(spec.provider)
    if provider is None:
        return None, (
            f'tracing provider "{spec.provider}" ({spec.provider_kind}): only zipkin and '
            "opentelemetry providers are supported"
        )
    host, error = lookup(store, provider.service)
    if error:
        return None, f'tracing provider "{spec.provider}": {error}'
    settings = mesh.tracing
    # Telemetry's customTags replace MeshConfig's (tracing.go configureCustomTags).
    problems: list[str] = []
    tags = mesh_tracing.custom_tags(dict(spec.tags), "customTags", problems)
    # provider sampler > Telemetry randomSamplingPercentage > defaultConfig.tracing.sampling
    sampling = spec.random_sampling_percentage
    return (
        Tracer(
            provider,
            host,
            settings.sampling if sampling is None else sampling,
            tags or settings.custom_tags,
            settings.enable_istio_tags,
            provider.max_tag_length or settings.max_path_tag_length,
            mesh.trust_domain,
            spec.use_request_id_for_trace_sampling,
        ),
        "",
    )


def server_tracer(store: MeshStore, pod: Pod) -> tuple[Tracer | None, str]:
    """POD's inbound tracer (Telemetry mode SERVER)."""
    return from_spec(store, telemetry.tracing(store, pod.namespace, pod.labels, telemetry.SERVER))


def client_tracer(store: MeshStore, pods: Sequence[Pod]) -> tuple[Tracer | None, str]:
    """The tracer of the node's shared outbound side (Telemetry mode CLIENT): the one every local
    pod (PODS) gets when they all get the same, else the mesh's (the root namespace's Telemetry
    and ``defaultProviders``). One connection manager serves every pod's calls to a service
    port, and Envoy samples per connection manager, not per caller."""
    specs = {telemetry.tracing(store, p.namespace, p.labels, telemetry.CLIENT) for p in pods}
    if len(specs) != 1:
        root = store.mesh_config.root_namespace
        specs = {telemetry.tracing(store, root, {}, telemetry.CLIENT)}
    return from_spec(store, specs.pop())


# store -> (its generation, {service: lookup's answer}): every local pod's tracer names the same
# provider, and a lookup scans the services (once per store change, not once per pod).
_looked_up: weakref.WeakKeyDictionary[MeshStore, tuple[int, dict[str, tuple[str, str]]]] = (
    weakref.WeakKeyDictionary()
)


def lookup(store: MeshStore, service: str) -> tuple[str, str]:
    """(hostname, error) of a provider's SERVICE, as for ext_authz providers (LookupCluster)."""
    from nodeagent.translate.extauthz import _lookup

    generation, answers = _looked_up.get(store, (-1, {}))
    if generation != store.generation:
        answers = {}
        _looked_up[store] = (store.generation, answers)
    if service not in answers:
        answers[service] = _lookup(store, service)
    return answers[service]


def collector_cluster(store: MeshStore, tracer: Tracer) -> Cluster:
    """The collector's endpoints, plaintext from the node Envoy's own network."""
    from nodeagent.translate.endpoints import load_assignment
    from nodeagent.translate.services import service_targets

    domain = store.mesh_config.cluster_domain
    name = tracer.cluster
    targets = [
        target
        for svc in store.services.values()
        if svc.hostname(domain) == tracer.host
        for target in service_targets(svc, domain)
        if target.port.port == tracer.provider.port
    ]
    fields: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name},
    }
    if tracer.provider.kind == mesh_tracing.OPENTELEMETRY and not tracer.provider.http:
        fields["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        }
    cluster = message(Cluster, fields)
    if targets:
        cluster.load_assignment.CopyFrom(
            load_assignment(
                store, targets[0], lambda _pod, _port: False, via_originate=False, cluster=name
            )
        )
    return cluster


def stamp(pod: Pod) -> list[dict[str, Any]]:
    """The filter state entries the pod's outbound listener adds for its spans' tags."""
    return [
        state_value(SERVICE_KEY, canonical_service(pod), "ONCE", "envoy.string"),
        state_value(REVISION_KEY, canonical_revision(pod), "ONCE", "envoy.string"),
        state_value(NAMESPACE_KEY, pod.namespace, "ONCE", "envoy.string"),
    ]


def _headers(provider: TracerProvider) -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": h.name, "value": h.value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
        for h in provider.headers
    ]


def _http_service(tracer: Tracer, uri: str) -> dict[str, Any]:
    """The collector at URI, over HTTP (Zipkin's collector_service, OTLP's http_service)."""
    p = tracer.provider
    service: dict[str, Any] = {
        "http_uri": {"uri": uri, "cluster": tracer.cluster, "timeout": p.timeout or DEFAULT_TIMEOUT}
    }
    if p.headers:
        service["request_headers_to_add"] = _headers(p)
    return service


def provider_config(tracer: Tracer, service_name: str) -> dict[str, Any]:
    """The HCM's ``tracing.provider``; SERVICE_NAME: OpenTelemetry's span service name."""
    p = tracer.provider
    if p.kind == mesh_tracing.ZIPKIN:
        service = _http_service(tracer, f"http://{tracer.host}{p.path or ZIPKIN_PATH}")
        config = typed(
            "envoy.config.trace.v3.ZipkinConfig",
            collector_endpoint_version="HTTP_JSON",
            trace_id_128bit=p.trace_id_128bit,
            shared_span_context=False,
            collector_service=service,
            trace_context_option=p.trace_context,
        )
        return {"name": ZIPKIN_TRACER, "typed_config": config}
    fields: dict[str, Any] = {"service_name": service_name}
    if p.http:
        path = p.path if p.path.startswith("/") else f"/{p.path}"
        fields["http_service"] = _http_service(tracer, f"{tracer.host}{path}")
    else:
        grpc: dict[str, Any] = {
            "envoy_grpc": {"cluster_name": tracer.cluster, "authority": tracer.host}
        }
        if p.timeout:
            grpc["timeout"] = p.timeout
        if p.headers:
            grpc["initial_metadata"] = [{"key": h.name, "value": h.value} for h in p.headers]
        fields["grpc_service"] = grpc
    if p.resource_detectors:
        fields["resource_detectors"] = [
            {
                "name": f"envoy.tracers.opentelemetry.resource_detectors.{d}",
                "typed_config": typed(
                    "envoy.extensions.tracers.opentelemetry.resource_detectors.v3."
                    + (
                        "EnvironmentResourceDetectorConfig"
                        if d == "environment"
                        else "DynatraceResourceDetectorConfig"
                    )
                ),
            }
            for d in p.resource_detectors
        ]
    return {
        "name": OTEL_TRACER,
        "typed_config": typed("envoy.config.trace.v3.OpenTelemetryConfig", **fields),
    }


def _literal(tag: str, value: str) -> dict[str, Any]:
    return {"tag": tag, "literal": {"value": value}}


def _custom(tag: CustomTag) -> dict[str, Any]:
    if tag.kind == "literal":
        return _literal(tag.tag, tag.value)
    kind = "environment" if tag.kind == "environment" else "request_header"
    body = {"name": tag.value}
    if tag.default:
        body["default_value"] = tag.default
    return {"tag": tag.tag, kind: body}


def tags(tracer: Tracer, pod: Pod | None) -> list[dict[str, Any]]:
    """Istio's tags and the custom ones, sorted by name: POD's own values (an inbound connection
    manager), or (None) the calling pod's, from the filter state it stamped (outbound)."""
    out: list[dict[str, Any]] = []
    if tracer.istio_tags:
        if pod is not None:
            out += [
                _literal("istio.canonical_service", canonical_service(pod)),
                _literal("istio.canonical_revision", canonical_revision(pod)),
                _literal("istio.namespace", pod.namespace),
                _literal(POD_TAG, pod.key),
            ]
        else:
            out += [
                {"tag": tag, "value": f"%FILTER_STATE({key}:PLAIN)%"}
                for tag, key in (
                    ("istio.canonical_service", SERVICE_KEY),
                    ("istio.canonical_revision", REVISION_KEY),
                    ("istio.namespace", NAMESPACE_KEY),
                    (POD_TAG, POD_KEY),
                )
            ]
        out += [_literal("istio.mesh_id", tracer.mesh_id), _literal("istio.cluster_id", CLUSTER_ID)]
        out += [
            {
                "tag": tag,
                "metadata": {
                    "kind": {"request": {}},
                    "metadata_key": {
                        "key": "envoy.filters.http.rbac",
                        "path": [{"key": prefix + key}],
                    },
                },
            }
            for tag, prefix, key in _DRY_RUN_TAGS
        ]
    out += [_custom(tag) for tag in tracer.custom_tags]
    return sorted(out, key=lambda t: str(t["tag"]))


def hcm_tracing(
    tracer: Tracer, pod: Pod | None, operation: str = "", service_name: str = ""
) -> dict[str, Any]:
    """The HCM ``tracing`` block for POD's inbound side (None: the shared outbound side).
    OPERATION: the span name (``<host>:<port>/*``); SERVICE_NAME: OpenTelemetry's."""
    block: dict[str, Any] = {
        "provider": provider_config(tracer, service_name or "nodeagent"),
        "client_sampling": {"value": 100.0},
        "overall_sampling": {"value": 100.0},
        "random_sampling": {"value": tracer.sampling},
        "custom_tags": tags(tracer, pod),
    }
    if tracer.max_path_tag_length:
        block["max_path_tag_length"] = tracer.max_path_tag_length
    if operation:
        block["operation"] = operation
    return block


def operation(host: str, port: int) -> str:
    """istiod's span name for a route to HOST:PORT (getRouteOperation, no path match)."""
    return f"{host}:{port}/*"


# -- putting the block into built listeners -------------------------------------------------------


def _hcms(listener: envoy.Listener) -> Iterable[tuple[Any, Any]]:
    """(filter chain, HCM filter) of each HTTP connection manager of LISTENER."""
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url.endswith("/" + HCM):
                yield chain, f


def _set(f: Any, block: Mapping[str, Any], tracer: Tracer) -> None:
    """F's HTTP connection manager with BLOCK as its ``tracing``, and the x-request-id's say in
    sampling as TRACER's Telemetry wants it (``useRequestIdForTraceSampling``)."""
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    hcm.ClearField("tracing")
    json_format.ParseDict(dict(block), hcm.tracing)
    if not tracer.use_request_id:
        uuid = uuid_pb2.UuidRequestIdConfig()
        uuid.use_request_id_for_trace_sampling.value = False
        hcm.request_id_extension.typed_config.Pack(uuid)
    f.typed_config.Pack(hcm, deterministic=True)


def trace_outbound(listener: envoy.Listener, tracer: Tracer) -> envoy.Listener:
    """LISTENER (outbound-internal, a Sidecar scope's) with tracing in each HTTP connection
    manager: span name ``<host>:<port>/*`` of the chain's service port (a chain named
    ``outbound|<port>||<host>``), else the request's authority."""
    for chain, f in _hcms(listener):
        parts = chain.name.split("|")
        name = (
            operation(parts[3], int(parts[1]))
            if len(parts) == 4 and parts[0] == "outbound" and parts[1].isdigit()
            else "%REQ(:AUTHORITY)%/*"
        )
        _set(f, hcm_tracing(tracer, None, name), tracer)
    return listener


def trace_inbound(
    listener: envoy.Listener, tracer: Tracer, pod: Pod, hosts: Mapping[int, str]
) -> envoy.Listener:
    """POD's inbound or fast-path LISTENER with tracing in each HTTP connection manager: span
    name ``<host>:<port>/*`` of the service port that names the chain's port (HOSTS, from
    ``inbound_hosts``: container port -> ``<host>:<service port>``), else the chain's name."""
    service_name = span_service_name(pod)
    for chain, f in _hcms(listener):
        parts = chain.name.split("-")[0].split("|")
        port = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        name = f"{hosts[port]}/*" if port in hosts else chain.name
        _set(f, hcm_tracing(tracer, pod, name, service_name), tracer)
    return listener


def inbound_hosts(store: MeshStore, pod: Pod) -> dict[int, str]:
    """Container port -> ``<host>:<port>`` of the first service (by key) that names it for POD:
    the service port, as the caller's span names it (istiod's inbound route operation)."""
    from nodeagent.translate.services import service_targets

    domain = store.mesh_config.cluster_domain
    hosts: dict[int, str] = {}
    for svc in store.services_selecting(pod.namespace, pod.labels):
        for target in service_targets(svc, domain):
            port = target.port.target_port or target.port.port
            if isinstance(port, int):
                hosts.setdefault(port, f"{target.host}:{target.port.port}")
    return hosts


__all__: Sequence[str] = (
    "Tracer",
    "client_tracer",
    "collector_cluster",
    "from_spec",
    "hcm_tracing",
    "server_tracer",
    "stamp",
    "trace_inbound",
    "trace_outbound",
)
