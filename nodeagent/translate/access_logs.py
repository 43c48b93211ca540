"""Access logs per MeshConfig and the Telemetry API: the Envoy access loggers of every listener
(pure).

What a workload logs (``sinks``): its effective Telemetry ``accessLogging`` for the mode
(mesh/telemetry.py: SERVER for its inbound chains, CLIENT for its outbound traffic), each
``envoyFileAccessLog`` provider one file logger (``path``, default /dev/stdout; ``logFormat.text``
or ``logFormat.labels`` = JSON; neither: Istio's default text format) with the entry's CEL
``filter.expression`` as Envoy's CEL access log filter; or, where no Telemetry applies, MeshConfig
``accessLogFile`` ("" = none, Istio's default), ``accessLogEncoding`` TEXT/JSON and
``accessLogFormat`` (istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/; istiod's
pilot/pkg/networking/core/accesslog.go falls back to them when ``Telemetries.AccessLogging``
is nil). Other provider kinds (gRPC and OpenTelemetry access log services) are not built.

One node Envoy serves every pod, so each line names the local pod it is about: the default
TEXT format keeps the direction and pod after the start time, a custom TEXT format is prefixed
with them, JSON lines carry ``direction`` and ``pod`` keys. Inbound lines of the default formats
keep the dry-run verdicts (filters.dry_run_fields; JSON: ``dry_run_deny`` / ``dry_run_allow``).

Outbound traffic is served by SHARED listeners (``outbound-internal``, Sidecar scopes'; see
internal.py): their chains log for whichever local pod calls. The node's local pods fall into
a few CLIENT *log classes* (distinct configs; as many as Telemetry makes, never one per pod):
each pod's outbound listener stamps its class into filter state (``LOG_CLASS_KEY``), and the
shared chains have each class's loggers behind a CEL filter on that stamp (Envoy's
``envoy.access_loggers.extension_filters.cel``, attribute ``filter_state``). With one class
(the usual case) the loggers carry no class filter. Config stays O(1) per pod
(docs/o1-config.md): a pod adds one stamp; the shared chains grow with classes, not pods.

The translation cache sets the node's ``Plan`` for the length of one build (``planned``), and
``filters.access_log`` asks ``loggers`` for the listener at hand; the plan's node-wide part is
in the cache's settings and each pod's part in its listeners' memo inputs, so a change rebuilds
what it touches. Outside a build (builders called directly) lines go to stdout as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# Registers the Envoy types used here with the protobuf pool translate/envoy.message parses by.
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401

from nodeagent.mesh import telemetry
from nodeagent.mesh.model import MeshConfig
from nodeagent.translate import internal
from nodeagent.translate.envoy import typed

LOG_CLASS_KEY = internal.LOG_CLASS_KEY  # a pod's CLIENT log class, its outbound listener stamps
STDOUT = "/dev/stdout"
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"

# Istio's default JSON keys (istiod pilot/pkg/model/telemetry_logging.go EnvoyJSONLogFormatIstio).
ISTIO_JSON_FORMAT: Mapping[str, str] = {
    "start_time": "%START_TIME%",
    "route_name": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}


@dataclass(frozen=True)
class Sink:
    """One access logger: PATH, JSON or text, FORMAT ("" : Istio's default; TEXT: a format
    string; JSON: the labels as JSON text) and a CEL FILTER ("" : every request)."""

    path: str = STDOUT
    json: bool = False
    format: str = ""
    filter: str = ""


Sinks = tuple[Sink, ...]


def mesh_sinks(mesh: MeshConfig) -> Sinks:
    """MeshConfig's access log, for workloads no Telemetry configures."""
    if not mesh.access_log_file:
        return ()
    encoded = mesh.access_log_encoding == telemetry.JSON
    return (Sink(mesh.access_log_file, encoded, mesh.access_log_format),)


def provider_sink(provider: telemetry.LogProvider) -> Sink | None:
    """An ``envoyFileAccessLog`` provider's logger (istiod's fileAccessLogFromTelemetry);
    None for the kinds not built."""
    if provider.kind != telemetry.FILE_ACCESS_LOG:
        return None
    settings = provider.settings_map
    path = settings.get("path") or STDOUT
    log_format = settings.get("logFormat")
    log_format = log_format if isinstance(log_format, Mapping) else {}
    labels = log_format.get("labels")
    if isinstance(labels, Mapping):  # JSON; empty labels: Istio's default keys
        keys = json.dumps(labels, sort_keys=True) if labels else ""
        return Sink(str(path), True, keys, provider.filter)
    text = log_format.get("text")
    return Sink(str(path), False, text if isinstance(text, str) else "", provider.filter)


def sinks(store: Any, namespace: str, labels: Mapping[str, str], mode: str) -> Sinks:
    """What a workload in NAMESPACE with LABELS logs in MODE (telemetry.CLIENT or SERVER)."""
    providers = telemetry.access_logging(store, namespace, labels, mode)
    if providers is None:
        return mesh_sinks(store.mesh_config)
    made = [provider_sink(p) for p in providers]
    return tuple(s for s in made if s is not None)


def log_class(client: Sinks, metrics: telemetry.MetricsSpec = telemetry.REPORTED) -> str:
    """The name of a CLIENT class: a digest of its sinks and metrics (a pod's stamp and the
    shared loggers' filter agree on it without a table)."""
    text = json.dumps([vars(s) for s in client], sort_keys=True)
    if metrics != telemetry.REPORTED:
        text += repr(metrics)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class NodeLogs:
    """The node-wide part: the distinct CLIENT sinks of the local pods (sorted by class
    name), each class's CLIENT metrics (Istio's standard metrics, mesh/telemetry.metrics; in
    the same order), and what a pod the plan does not know logs (the mesh config's)."""

    classes: tuple[tuple[str, Sinks], ...] = ()
    fallback: Sinks = ()
    metrics: tuple[telemetry.MetricsSpec, ...] = ()

    def metric_classes(self) -> list[tuple[telemetry.MetricsSpec, tuple[str, ...]]]:
        """Each distinct CLIENT metrics config, with the classes that have it."""
        grouped: dict[telemetry.MetricsSpec, list[str]] = {}
        for (name, _), spec in zip(self.classes, self.metrics, strict=True):
            grouped.setdefault(spec, []).append(name)
        return [(spec, tuple(names)) for spec, names in grouped.items()]


@dataclass(frozen=True)
class Plan:
    node: NodeLogs
    # pod key ("namespace/name") -> (CLIENT sinks, SERVER sinks)
    pods: Mapping[str, tuple[Sinks, Sinks]] = field(default_factory=dict)
    # pod key -> (CLIENT metrics, SERVER metrics)
    metrics: Mapping[str, tuple[telemetry.MetricsSpec, telemetry.MetricsSpec]] = field(
        default_factory=dict
    )

    def stamp(self, pod: str) -> str:
        """The class POD's outbound listener stamps ("" : none needed, one class)."""
        if len(self.node.classes) < 2 or pod not in self.pods:
            return ""
        return log_class(self.pods[pod][0], self.metrics[pod][0])


def plan(store: Any, pods: Sequence[tuple[str, str, Mapping[str, str]]]) -> Plan:
    """The node's plan for its local PODS (key, namespace, labels)."""
    per_pod = {
        key: (
            sinks(store, namespace, labels, telemetry.CLIENT),
            sinks(store, namespace, labels, telemetry.SERVER),
        )
        for key, namespace, labels in pods
    }
    metrics = {
        key: (
            telemetry.metrics(store, namespace, labels, telemetry.CLIENT),
            telemetry.metrics(store, namespace, labels, telemetry.SERVER),
        )
        for key, namespace, labels in pods
    }
    fallback = mesh_sinks(store.mesh_config)
    # No local pod yet: the mesh config's class, which the first pod most likely joins (a
    # change of classes rebuilds every shared chain).
    clients = [(per_pod[key][0], metrics[key][0]) for key in per_pod] or [
        (fallback, telemetry.mesh_metrics(store.mesh_config))
    ]
    unique = {log_class(*client): client for client in clients}
    classes = {name: unique[name] for name in sorted(unique)}
    node = NodeLogs(
        tuple((name, chosen) for name, (chosen, _) in classes.items()),
        fallback,
        tuple(spec for _, spec in classes.values()),
    )
    return Plan(node, per_pod, metrics)


_PLAN: ContextVar[Plan | None] = ContextVar("nodeagent_access_log_plan", default=None)


@contextlib.contextmanager
def planned(current: Plan) -> Iterator[None]:
    """Builders called within use CURRENT (see the module's docstring)."""
    token = _PLAN.set(current)
    try:
        yield
    finally:
        _PLAN.reset(token)


def active() -> Plan | None:
    return _PLAN.get()


# -- Envoy config ---------------------------------------------------------------------------------


def loggers(
    current: Plan, direction: str, pod: str, tcp: bool, default_text: str, dry_run: str
) -> list[dict[str, Any]]:
    """The access loggers of a chain of DIRECTION for POD (a pod key, or a formatter naming
    the caller: a shared chain). DEFAULT_TEXT: Istio's text format with the direction and pod
    (filters.py); DRY_RUN: the inbound dry-run fields appended to it ("" elsewhere)."""
    known = current.pods.get(pod)
    if known is not None:
        chosen = known[1] if direction == "inbound" else known[0]
        return [_logger(s, direction, pod, tcp, default_text, dry_run) for s in chosen]
    if pod.startswith("%"):  # a shared chain: each class's sinks, for its callers only
        classes = current.node.classes
        if len(classes) == 1:
            return [_logger(s, direction, pod, tcp, default_text, dry_run) for s in classes[0][1]]
        return [
            _logger(s, direction, pod, tcp, default_text, dry_run, name)
            for name, chosen in classes
            for s in chosen
        ]
    return [_logger(s, direction, pod, tcp, default_text, dry_run) for s in current.node.fallback]


def _format(
    sink: Sink, direction: str, pod: str, tcp: bool, default_text: str, dry_run: str
) -> dict[str, Any]:
    if sink.json:
        labels: dict[str, Any] = json.loads(sink.format) if sink.format else dict(ISTIO_JSON_FORMAT)
        if not sink.format and dry_run:
            rbac = "envoy.filters.network.rbac" if tcp else "envoy.filters.http.rbac"
            labels["dry_run_deny"] = (
                f"%DYNAMIC_METADATA({rbac}:istio_dry_run_deny_shadow_effective_policy_id)%"
            )
            labels["dry_run_allow"] = (
                f"%DYNAMIC_METADATA({rbac}:istio_dry_run_allow_shadow_engine_result)%"
            )
        labels.update(direction=direction, pod=pod)
        return {"json_format": labels}
    if sink.format:
        text = f"{direction} {pod} {sink.format}"
        text = text if text.endswith("\n") else text + "\n"
    else:
        text = default_text.rstrip("\n") + dry_run + "\n"
    return {"text_format_source": {"inline_string": text}}


def _logger(
    sink: Sink,
    direction: str,
    pod: str,
    tcp: bool,
    default_text: str,
    dry_run: str,
    log_class_name: str = "",
) -> dict[str, Any]:
    log_format = _format(sink, direction, pod, tcp, default_text, dry_run)
    if sink.path == STDOUT:
        logger = {
            "name": "envoy.access_loggers.stdout",
            "typed_config": typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format=log_format
            ),
        }
    else:
        logger = {
            "name": "envoy.access_loggers.file",
            "typed_config": typed(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                path=sink.path,
                log_format=log_format,
            ),
        }
    expressions = []
    if log_class_name:
        expressions.append(class_expression((log_class_name,)))
    if sink.filter:
        expressions.append(sink.filter)
    if len(expressions) == 1:
        logger["filter"] = _cel(expressions[0])
    elif expressions:
        logger["filter"] = {"and_filter": {"filters": [_cel(e) for e in expressions]}}
    return logger


def class_expression(names: Sequence[str]) -> str:
    """CEL: the caller's stamped class is one of NAMES."""
    if len(names) == 1:
        return f"filter_state['{LOG_CLASS_KEY}'] == b'{names[0]}'"
    return f"filter_state['{LOG_CLASS_KEY}'] in [{', '.join(f'b{n!r}' for n in names)}]"


def client_filter(names: Sequence[str]) -> dict[str, Any]:
    """The access log filter that keeps the callers of the classes NAMES."""
    return _cel(class_expression(names))


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": CEL_FILTER,
            "typed_config": typed(
                "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                expression=expression,
            ),
        }
    }
