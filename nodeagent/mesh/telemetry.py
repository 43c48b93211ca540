"""Istio's Telemetry API (``telemetry.istio.io`` v1 and v1alpha1): which Telemetry objects apply
to a workload, and the access logging and tracing they add up to (pure).

Istio is the specification:
- istio.io/latest/docs/reference/config/telemetry/ (the kind, ``accessLogging``: ``providers``,
  ``filter.expression`` (CEL), ``match.mode`` CLIENT / SERVER / CLIENT_AND_SERVER, ``disabled``;
  ``tracing``: ``providers``, ``randomSamplingPercentage``, ``customTags``,
  ``disableSpanReporting``, ``useRequestIdForTraceSampling``, ``match.mode``);
- istio.io/latest/docs/tasks/observability/telemetry/ ("Scope, Inheritance, and Overrides"):
  a Telemetry without a selector in the root namespace is the mesh's, one without a selector in
  a namespace is that namespace's, one whose ``selector`` selects the workload in the workload's
  own namespace is the workload's; "any workload-specific selector in the root configuration
  namespace will be ignored". ``targetRef(s)`` attach to gateways and waypoints only, so a
  captured pod ignores such a Telemetry (as RequestAuthentication's, mesh/policy.py).
- istiod's merge, pilot/pkg/model/telemetry.go: ``applicableTelemetries`` (root, namespace,
  workload; of several at one level the oldest counts, the configs sorted by creation time),
  ``AccessLogging``/``mergeLogs`` (a level that names providers replaces the parent's set; a
  level without providers acts on the parent's; ``disabled`` removes them; each provider keeps
  the filter of the last level that named it) with the fix that keeps CLIENT and SERVER apart
  (istio/istio#43371, pull 43372: entries of the other mode neither name nor filter), and
  ``Tracing`` (the last level that sets a field wins; the first provider named counts; no
  provider known: span reporting disabled).

A workload with no Telemetry and no MeshConfig ``defaultProviders.accessLogging`` gets None from
``access_logging``: MeshConfig ``accessLogFile`` / ``accessLogEncoding`` / ``accessLogFormat``
decide then, as at istiod (``AccessLogging`` returns nil, the listener builder falls back to
the mesh config). An empty tuple means access logging is off for it.

A provider name the mesh does not define (MeshConfig ``extensionProviders`` or a built-in one:
mesh/extension_providers.py) is skipped, as istiod's ``fetchProvider`` skips it; a filter
expression that is not CEL leaves its entry out. ``problems`` names both, with the object and
field, for the log: the rest of the object and every other object keep working.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodeagent.mesh.extension_providers import ExtensionProviders
from nodeagent.mesh.model import DefaultProviders, IstioResource, MeshConfig

if TYPE_CHECKING:
    from nodeagent.mesh.store import MeshStore

KIND = "Telemetry"
CLIENT, SERVER, CLIENT_AND_SERVER = "CLIENT", "SERVER", "CLIENT_AND_SERVER"
TEXT, JSON = "TEXT", "JSON"
# The access log provider kind the node builds (Envoy's file access logger).
FILE_ACCESS_LOG = "envoyFileAccessLog"
MESH_FIELDS = ("accessLogFile", "accessLogEncoding", "accessLogFormat", "defaultProviders")
_DEFAULT_PROVIDER_FIELDS = {
    "tracing": "tracing",
    "metrics": "metrics",
    "accessLogging": "access_logging",
}


@dataclass(frozen=True)
class LogProvider:
    """One access log a workload writes for one mode: the provider (its name as the mesh
    defines it, its kind and settings as JSON text) and the CEL filter ("" : every request)."""

    name: str
    kind: str
    settings: str = "{}"
    filter: str = ""

    @property
    def settings_map(self) -> Mapping[str, Any]:
        loaded = json.loads(self.settings)
        return loaded if isinstance(loaded, dict) else {}


@dataclass(frozen=True)
class TracingSpec:
    """The tracing one workload gets for one mode (istiod's ``TracingSpec``). PROVIDER: the
    provider's name as the mesh defines it ("" : none known, and then DISABLED). CUSTOM_TAGS:
    tag name -> its Telemetry ``customTags`` entry as JSON text (hashable)."""

    provider: str = ""
    provider_kind: str = ""
    disabled: bool = False
    random_sampling_percentage: float | None = None  # None: unset (the mesh's default applies)
    custom_tags: tuple[tuple[str, str], ...] = ()
    use_request_id_for_trace_sampling: bool = True

    @property
    def tags(self) -> dict[str, Mapping[str, Any]]:
        return {name: json.loads(text) for name, text in self.custom_tags}


# -- which Telemetry objects apply ----------------------------------------------------------------


def _selector(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    selector = spec.get("selector")
    labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _targeted(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("targetRef")) or bool(spec.get("targetRefs"))


def applicable(store: MeshStore, namespace: str, labels: Mapping[str, str]) -> list[IstioResource]:
    """The Telemetry objects that apply to a workload in NAMESPACE with LABELS, parent first:
    the mesh's (root namespace, no selector), its namespace's (no selector), its own (the
    oldest of its namespace whose selector selects it)."""
    from nodeagent.mesh.policy import creation_order  # policy imports the store, as we do

    root = store.mesh_config.root_namespace
    found: list[IstioResource] = []
    for ns in (root, namespace) if namespace != root else (root,):
        wide = [
            t for t in store.istio_in(KIND, ns) if not _selector(t.spec) and not _targeted(t.spec)
        ]
        if wide:
            found.append(min(wide, key=creation_order))
    if namespace != root:
        selecting = [
            t
            for t in store.istio_in(KIND, namespace)
            if (selector := _selector(t.spec))
            and all(labels.get(str(k)) == str(v) for k, v in selector.items())
        ]
        if selecting:
            found.append(min(selecting, key=creation_order))
    return found


# -- access logging -------------------------------------------------------------------------------


def _entries(res: IstioResource, field: str) -> list[Mapping[str, Any]]:
    value = res.spec.get(field)
    return [e for e in value if isinstance(e, Mapping)] if isinstance(value, list) else []


def _names(entry: Mapping[str, Any]) -> list[str]:
    providers = entry.get("providers")
    if not isinstance(providers, list):
        return []
    return [str(p["name"]) for p in providers if isinstance(p, Mapping) and p.get("name")]


def _matches(entry: Mapping[str, Any], mode: str) -> bool:
    """istiod's matchWorkloadMode: no match, or CLIENT_AND_SERVER, is both."""
    match = entry.get("match")
    chosen = match.get("mode") if isinstance(match, Mapping) else None
    return chosen in (None, "", CLIENT_AND_SERVER) or chosen == mode


def _filter(entry: Mapping[str, Any]) -> str:
    given = entry.get("filter")
    expression = given.get("expression") if isinstance(given, Mapping) else None
    return expression if isinstance(expression, str) else ""


def merge_logs(
    levels: Sequence[Sequence[Mapping[str, Any]]], defaults: Sequence[str], mode: str
) -> dict[str, str]:
    """istiod's mergeLogs: LEVELS (each level's ``accessLogging`` entries, parent first),
    the mesh's default providers and MODE -> provider name -> CEL filter ("" : none)."""
    levels = [level for level in levels if level]
    if not levels:
        return {name: "" for name in defaults}
    names_in_scope = list(defaults)
    filters: dict[str, str] = {}
    for level in levels:
        named: list[str] = []
        for entry in level:
            if not _matches(entry, mode):
                continue
            for name in _names(entry):
                named.append(name)
                filters[name] = _filter(entry)
        if named:
            names_in_scope = named
    in_scope = set(names_in_scope)
    providers: dict[str, str] = {}
    parent = list(defaults)
    for level in levels:
        for entry in level:
            names = _names(entry) or parent
            parent = names
            if not _matches(entry, mode):
                continue
            for name in names:
                if name not in in_scope:  # a parent's provider a lower level replaced
                    continue
                if entry.get("disabled") is True:
                    providers.pop(name, None)
                else:
                    providers[name] = filters.get(name, "")
    return providers


def access_logging(
    store: MeshStore, namespace: str, labels: Mapping[str, str], mode: str
) -> tuple[LogProvider, ...] | None:
    """The access logs a workload writes in MODE (CLIENT: its outbound traffic, SERVER: its
    inbound), sorted by provider name; None when no Telemetry and no default provider
    configures access logging (MeshConfig ``accessLogFile`` decides)."""
    mesh = store.mesh_config
    levels = [_usable(res) for res in applicable(store, namespace, labels)]
    levels = [level for level in levels if level]
    defaults = mesh.default_providers.access_logging
    if not levels and not defaults:
        return None
    out: list[LogProvider] = []
    for name, expression in merge_logs(levels, defaults, mode).items():
        found = mesh.extension_providers.settings(name)
        if found is None:
            continue  # istiod: "fail to fetch provider", skipped
        defined, kind, settings = found
        out.append(LogProvider(defined, kind, json.dumps(settings, sort_keys=True), expression))
    return tuple(sorted(out, key=lambda p: p.name))


def _usable(res: IstioResource) -> list[Mapping[str, Any]]:
    """RES's accessLogging entries, without those whose filter is not CEL (``problems``)."""
    return [e for e in _entries(res, "accessLogging") if not cel_error(_filter(e))]


# -- tracing --------------------------------------------------------------------------------------


def tracing(
    store: MeshStore, namespace: str, labels: Mapping[str, str], mode: str
) -> TracingSpec | None:
    """The tracing a workload gets in MODE (istiod's ``Tracing``: ClientSpec or ServerSpec);
    None when no Telemetry and no ``defaultProviders.tracing`` configure it (MeshConfig's own
    tracing settings decide)."""
    mesh = store.mesh_config
    entries = [e for res in applicable(store, namespace, labels) for e in _entries(res, "tracing")]
    defaults = mesh.default_providers.tracing
    if not entries and not defaults:
        return None
    providers = mesh.extension_providers
    provider = _provider(providers, defaults[0]) if defaults else None
    disabled = False
    sampling: float | None = None
    tags: tuple[tuple[str, str], ...] = ()
    by_request_id = True
    for entry in entries:
        if not _matches(entry, mode):
            continue
        names = _names(entry)
        if names:  # one provider per mode: the first named
            provider = _provider(providers, names[0])
        if isinstance(entry.get("disableSpanReporting"), bool):
            disabled = entry["disableSpanReporting"]
        custom = entry.get("customTags")
        if isinstance(custom, Mapping):  # replaces the parent's tags (a shallow merge)
            tags = tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in custom.items()))
        percentage = entry.get("randomSamplingPercentage")
        if isinstance(percentage, int | float) and not isinstance(percentage, bool):
            sampling = float(percentage)
        if isinstance(entry.get("useRequestIdForTraceSampling"), bool):
            by_request_id = entry["useRequestIdForTraceSampling"]
    name, kind = provider or ("", "")
    return TracingSpec(
        provider=name,
        provider_kind=kind,
        disabled=disabled or not name,
        random_sampling_percentage=sampling,
        custom_tags=tags,
        use_request_id_for_trace_sampling=by_request_id,
    )


def _provider(providers: ExtensionProviders, name: str) -> tuple[str, str] | None:
    found = providers.settings(name)
    return (found[0], found[1]) if found is not None else None


# -- metrics --------------------------------------------------------------------------------------

# Istio's standard metrics (Telemetry ``MetricSelector.IstioMetric``) as the node names them
# (translate/istio_stats.py). The two gRPC message counters are not built: overrides of them
# change nothing.
ISTIO_METRICS: Mapping[str, str] = {
    "REQUEST_COUNT": "istio_requests_total",
    "REQUEST_DURATION": "istio_request_duration_milliseconds",
    "REQUEST_SIZE": "istio_request_bytes",
    "RESPONSE_SIZE": "istio_response_bytes",
    "TCP_OPENED_CONNECTIONS": "istio_tcp_connections_opened_total",
    "TCP_CLOSED_CONNECTIONS": "istio_tcp_connections_closed_total",
    "TCP_SENT_BYTES": "istio_tcp_sent_bytes_total",
    "TCP_RECEIVED_BYTES": "istio_tcp_received_bytes_total",
    "GRPC_REQUEST_MESSAGES": "istio_request_messages_total",
    "GRPC_RESPONSE_MESSAGES": "istio_response_messages_total",
}
PROMETHEUS = "prometheus"  # the provider kind the node reports to (its merged :15020)


@dataclass(frozen=True)
class MetricsSpec:
    """Istio's standard metrics one workload reports in one mode (istiod's ``metricsConfig``
    for its Prometheus provider). REPORTED: any at all. DISABLED: stat names not reported.
    TAGS: stat name -> ((label, CEL value; "" : removed), ...), sorted."""

    reported: bool = True
    disabled: frozenset[str] = frozenset()
    tags: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def tags_of(self, stat: str) -> tuple[tuple[str, str], ...]:
        return dict(self.tags).get(stat, ())


REPORTED = MetricsSpec()  # every standard metric, Istio's labels (no Telemetry overrides)
OFF = MetricsSpec(reported=False)


def _metric_names(match: Mapping[str, Any]) -> list[str]:
    """istiod's getMatches: the stats an override's selector names (none: all). A
    ``customMetric`` names no standard metric: ``problems`` reports it."""
    if "customMetric" in match:
        return []
    metric = match.get("metric", "ALL_METRICS")
    if metric == "ALL_METRICS":
        return list(ISTIO_METRICS.values())
    return [ISTIO_METRICS[metric]] if metric in ISTIO_METRICS else []


def _modes(match: Mapping[str, Any]) -> tuple[str, ...]:
    mode = match.get("mode")
    return (mode,) if mode in (CLIENT, SERVER) else (CLIENT, SERVER)


def _tag_value(override: Any) -> str | None:
    """A tagOverrides entry: "" removes the label, an expression upserts it; None: unusable
    (``problems`` names it)."""
    if not isinstance(override, Mapping):
        return None
    if override.get("operation", "UPSERT") == "REMOVE":
        return ""
    value = override.get("value")
    if not isinstance(value, str) or not value or cel_error(value) or ")%" in value:
        return None
    return value


def metrics(store: MeshStore, namespace: str, labels: Mapping[str, str], mode: str) -> MetricsSpec:
    """What a workload in NAMESPACE with LABELS reports in MODE, as istiod's mergeMetrics
    (pilot/pkg/model/telemetry.go) computes it: a level naming providers replaces its parent's
    (a level naming none acts on its parent's); overrides apply in order, per metric and mode,
    a later ``disabled`` or tag over an earlier one; ``ALL_METRICS`` disabled turns the mode off
    until a later override of that mode (a namespace re-enabling what the root disabled)
    (istio.io/latest/docs/reference/config/telemetry/#MetricsOverrides)."""
    mesh = store.mesh_config
    entries = [e for res in applicable(store, namespace, labels) for e in _entries(res, "metrics")]
    defaults = list(mesh.default_providers.metrics)
    in_scope = set(defaults)
    for entry in entries:
        if names := _names(entry):
            in_scope = set(names)
    # provider -> stat -> (disabled, {label: value; "" removes it}), for MODE only
    merged: dict[str, dict[str, tuple[bool, dict[str, str]]]] = {}
    mode_off: set[str] = set()
    if not entries:
        merged = {name: {} for name in defaults}
    parent = defaults
    for entry in entries:
        names = _names(entry) or parent
        parent = names
        for name in names:
            if name not in in_scope:  # a parent's provider a lower level replaced
                continue
            stats = merged.setdefault(name, {})
            for override in _overrides(entry):
                match = override.get("match")
                match = match if isinstance(match, Mapping) else {}
                if mode not in _modes(match):
                    continue
                disabled = override.get("disabled")
                everything = "customMetric" not in match and (
                    match.get("metric", "ALL_METRICS") == "ALL_METRICS"
                )
                if everything and disabled is True:
                    mode_off.add(name)
                    continue
                mode_off.discard(name)
                tags = override.get("tagOverrides")
                tags = tags if isinstance(tags, Mapping) else {}
                for stat in _metric_names(match):
                    was_disabled, was_tags = stats.get(stat, (False, {}))
                    if isinstance(disabled, bool):
                        was_disabled = disabled
                    for label, given in tags.items():
                        if (value := _tag_value(given)) is not None:
                            was_tags = {**was_tags, str(label): value}
                    stats[stat] = (was_disabled, was_tags)
    for name in sorted(set(merged) - mode_off):
        found = mesh.extension_providers.settings(name)
        if found is None or found[1] != PROMETHEUS:
            continue  # istiod skips a provider it cannot fetch; other kinds are not built
        stats = merged[name]
        return MetricsSpec(
            disabled=frozenset(s for s, (off, _) in stats.items() if off),
            tags=tuple(sorted((s, tuple(sorted(t.items()))) for s, (_, t) in stats.items() if t)),
        )
    return OFF


def mesh_metrics(mesh: MeshConfig) -> MetricsSpec:
    """What a workload no Telemetry configures reports: all, if MeshConfig
    ``defaultProviders.metrics`` names a Prometheus provider (Istio's default mesh config says
    ``[prometheus]``; ``[]`` turns them off:
    istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/#MeshConfig-DefaultProviders)."""
    providers = mesh.extension_providers
    reported = any(
        (found := providers.settings(name)) is not None and found[1] == PROMETHEUS
        for name in mesh.default_providers.metrics
    )
    return REPORTED if reported else OFF


def _overrides(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    given = entry.get("overrides")
    return [o for o in given if isinstance(o, Mapping)] if isinstance(given, list) else []


# -- bad input ------------------------------------------------------------------------------------


def cel_error(expression: str) -> str:
    """Why EXPRESSION is not a CEL expression ("" : it parses, or is empty). Parsed only:
    Envoy knows the attributes (request.*, response.*, connection.*, ...), cel-python not."""
    return _cel_error(expression) if expression else ""


@functools.cache
def _cel_error(expression: str) -> str:
    import celpy  # the CEL parser mesh/cel.py uses for the CRDs' rules

    limit = sys.getrecursionlimit()  # celpy raises it for the whole process: keep ours
    try:
        celpy.Environment().compile(expression)
    except Exception as e:  # celpy's parser errors have no common base
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        sys.setrecursionlimit(limit)
    return ""


def problems(res: IstioResource, providers: ExtensionProviders, root: str = "") -> list[str]:
    """What in the Telemetry RES has no effect because it is wrong, each naming the object
    and field: a selector in the ROOT namespace (the object applies to nothing), a filter that
    is not CEL (the entry is left out), a provider the mesh does not define (skipped, as
    istiod skips it)."""
    if res.kind != KIND:
        return []
    where = f"Telemetry {res.namespace}/{res.name}"
    found: list[str] = []
    if root and res.namespace == root and _selector(res.spec):
        found.append(
            f"{where}: selector: a workload selector in the root namespace is ignored by Istio;"
            " this Telemetry applies to nothing (put it in the workload's namespace)"
        )
    for field in ("accessLogging", "tracing", "metrics"):
        for index, entry in enumerate(_entries(res, field)):
            for p, name in enumerate(_names(entry)):
                if providers.settings(name) is None:
                    known = ", ".join(_known(providers))
                    found.append(
                        f'{where}: {field}[{index}].providers[{p}].name: unknown provider "{name}"'
                        f" (MeshConfig extensionProviders and built-in: {known}); skipped"
                    )
            if field == "accessLogging" and (why := cel_error(_filter(entry))):
                found.append(
                    f"{where}: accessLogging[{index}].filter.expression: not a CEL expression"
                    f" ({why}); this entry is left out"
                )
    for index, entry in enumerate(_entries(res, "metrics")):
        found += _metrics_problems(f"{where}: metrics[{index}]", entry)
    return found


def _metrics_problems(where: str, entry: Mapping[str, Any]) -> list[str]:
    found = []
    if entry.get("reportingInterval") is not None:
        found.append(
            f"{where}.reportingInterval: not supported (TCP metrics are reported when a"
            " connection closes); ignored"
        )
    for o, override in enumerate(_overrides(entry)):
        match = override.get("match")
        if isinstance(match, Mapping) and "customMetric" in match:
            found.append(
                f"{where}.overrides[{o}].match.customMetric: custom metrics are not built;"
                " this override changes nothing"
            )
        tags = override.get("tagOverrides")
        for label, given in tags.items() if isinstance(tags, Mapping) else ():
            if _tag_value(given) is None:
                value = given.get("value") if isinstance(given, Mapping) else given
                why = cel_error(value) if isinstance(value, str) and value else "no value"
                found.append(
                    f"{where}.overrides[{o}].tagOverrides.{label}: an UPSERT needs a CEL"
                    f" expression as its value ({why or 'not usable in a format string'});"
                    " left out"
                )
    return found


def _known(providers: ExtensionProviders) -> list[str]:
    from nodeagent.mesh.extension_providers import BUILT_IN

    return sorted(set(providers.names()) | {name for name, _, _ in BUILT_IN})


# -- MeshConfig -----------------------------------------------------------------------------------


def mesh_settings(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """MeshConfig's ``accessLogFile``, ``accessLogEncoding``, ``accessLogFormat`` and
    ``defaultProviders`` (istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/) as
    MeshConfig keyword arguments, and the problems found (each naming its field)."""
    values: dict[str, Any] = {}
    problems_found: list[str] = []
    for field, attr in (
        ("accessLogFile", "access_log_file"),
        ("accessLogFormat", "access_log_format"),
    ):
        value = data.get(field, "")
        if not isinstance(value, str):
            problems_found.append(f"{field}: expected a string, got {value!r}")
        else:
            values[attr] = value
    encoding = data.get("accessLogEncoding", TEXT)
    if encoding not in (TEXT, JSON):
        problems_found.append(f"accessLogEncoding: {encoding!r} is not one of TEXT, JSON")
    else:
        values["access_log_encoding"] = encoding
    if (fmt := values.get("access_log_format")) and values.get("access_log_encoding") == JSON:
        try:
            parsed = json.loads(fmt)
        except ValueError as e:
            problems_found.append(
                f"accessLogFormat: with accessLogEncoding JSON, not a JSON object: {e}"
            )
        else:
            if not isinstance(parsed, dict):
                problems_found.append(
                    "accessLogFormat: with accessLogEncoding JSON, not a JSON object"
                )
    given = data.get("defaultProviders")
    if given is not None:
        if not isinstance(given, Mapping):
            problems_found.append(f"defaultProviders: expected a mapping, got {given!r}")
        else:
            lists: dict[str, tuple[str, ...]] = {}
            for key, value in given.items():
                if key not in _DEFAULT_PROVIDER_FIELDS:
                    known = ", ".join(_DEFAULT_PROVIDER_FIELDS)
                    problems_found.append(
                        f'unknown field "defaultProviders.{key}" (known: {known})'
                    )
                elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    problems_found.append(
                        f"defaultProviders.{key}: expected a list of provider names"
                    )
                else:
                    lists[_DEFAULT_PROVIDER_FIELDS[key]] = tuple(value)
            values["default_providers"] = DefaultProviders(**lists)
    return values, problems_found
