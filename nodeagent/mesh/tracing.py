"""MeshConfig's tracing settings: the ``zipkin`` and ``opentelemetry`` extension providers,
``enableTracing`` and ``defaultConfig.tracing`` (pure). Which provider a workload uses
(``defaultProviders.tracing``, Telemetry ``tracing``) is mesh/telemetry.py's.

Istio is the specification: istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/
(``MeshConfig.ExtensionProvider.ZipkinTracingProvider``, ``OpenTelemetryTracingProvider``,
``MeshConfig.DefaultProviders``, ``enableTracing``), istio.io/latest/docs/reference/config/
istio.mesh.v1alpha1/#Tracing (ProxyConfig ``tracing``: ``sampling``, ``customTags``,
``maxPathTagLength``) and istiod's use of them (istio/istio pilot/pkg/networking/core/tracing.go).
Defaults as Istio's: ``enableTracing`` true, sampling 1 % (PILOT_TRACE_SAMPLING), a ``sampling``
above 100 counts as 1 %, Zipkin ``traceContextOption`` USE_B3, ``timeout`` 5 s, 128-bit ids.

Istio's legacy tracer (``defaultConfig.tracing.zipkin.address``, a bootstrap-level tracer) is not
read: a tracer is only ever a provider the mesh names (``defaultProviders.tracing`` or a
Telemetry resource), as with Istio's Telemetry API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ZIPKIN, OPENTELEMETRY = "zipkin", "opentelemetry"
USE_B3, USE_B3_WITH_W3C = "USE_B3", "USE_B3_WITH_W3C_PROPAGATION"
DEFAULT_SAMPLING = 1.0  # percent: PILOT_TRACE_SAMPLING's default
_ZIPKIN_FIELDS = (
    "service",
    "port",
    "maxTagLength",
    "enable64bitTraceId",
    "path",
    "traceContextOption",
    "timeout",
    "headers",
)
_OTEL_FIELDS = ("service", "port", "maxTagLength", "http", "grpc", "resourceDetectors")
_DETECTORS = ("environment", "dynatrace")
_TAG_KINDS = ("literal", "environment", "header")


class TracingError(ValueError):
    """A bad tracing setting; the message names where and what."""


@dataclass(frozen=True)
class Header:
    """An ``HttpHeader`` (name, and its value; ``envName``'s value read from the agent's
    environment when the mesh config is read, as istiod reads its own)."""

    name: str
    value: str


@dataclass(frozen=True)
class TracerProvider:
    """One ``zipkin`` or ``opentelemetry`` extension provider. HTTP (OpenTelemetry only):
    OTLP/HTTP to PATH, else OTLP/gRPC."""

    name: str
    kind: str
    service: str  # "host" or "namespace/host"
    port: int
    max_tag_length: int = 0
    trace_id_128bit: bool = True  # Zipkin: not enable64bitTraceId
    path: str = ""  # Zipkin: "/api/v2/spans" when unset; OTLP/HTTP: the traces path
    trace_context: str = USE_B3
    timeout: str = ""  # "": Zipkin's 5 s, none for OpenTelemetry
    headers: tuple[Header, ...] = ()  # HTTP headers, or gRPC initial metadata
    http: bool = False
    resource_detectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class CustomTag:
    """A tracing custom tag: KIND literal (VALUE), environment (VALUE the variable) or header
    (VALUE the request header); DEFAULT for the last two."""

    tag: str
    kind: str
    value: str
    default: str = ""


@dataclass(frozen=True)
class MeshTracing:
    """The mesh-wide tracing settings."""

    enabled: bool = True  # enableTracing
    sampling: float = DEFAULT_SAMPLING  # defaultConfig.tracing.sampling, percent
    custom_tags: tuple[CustomTag, ...] = ()  # defaultConfig.tracing.customTags
    max_path_tag_length: int = 0
    enable_istio_tags: bool = True  # defaultConfig.tracing.enableIstioTags


def parse_provider(
    name: str, kind: str, spec: Any, at: str, env: Mapping[str, str]
) -> TracerProvider:
    """One ``zipkin`` or ``opentelemetry`` entry (SPEC), checked as istiod's validation checks it
    (pkg/config/validation: a service, a port in [1, 65535])."""
    if not isinstance(spec, dict):
        raise TracingError(f"{at}: expected a mapping, got {type(spec).__name__}")
    known = _ZIPKIN_FIELDS if kind == ZIPKIN else _OTEL_FIELDS
    problems = [
        f'{at}: unknown field "{k}" (known: {", ".join(known)})' for k in spec if k not in known
    ]
    service = spec.get("service")
    if not isinstance(service, str) or not service or service.count("/") > 1:
        problems.append(f'{at}.service: expected "<host>" or "<namespace>/<host>", got {service!r}')
    port = _uint(spec.get("port"))
    if port is None or not 1 <= port <= 65535:
        problems.append(f"{at}.port: must be in the range [1, 65535], got {spec.get('port')!r}")
    tag_length = _uint(spec.get("maxTagLength", 0))
    if tag_length is None:
        problems.append(f"{at}.maxTagLength: expected a uint32, got {spec.get('maxTagLength')!r}")
    fields: dict[str, Any] = {}
    if kind == ZIPKIN:
        option = spec.get("traceContextOption", USE_B3) or USE_B3
        if option not in (USE_B3, USE_B3_WITH_W3C):
            problems.append(
                f"{at}.traceContextOption: one of {USE_B3}, {USE_B3_WITH_W3C}, got {option!r}"
            )
        fields = {
            "trace_id_128bit": not bool(spec.get("enable64bitTraceId", False)),
            "path": str(spec.get("path") or ""),
            "trace_context": option,
            "timeout": _duration(spec.get("timeout"), f"{at}.timeout", problems),
            "headers": _headers(spec.get("headers"), f"{at}.headers", env, problems),
        }
    else:
        http, grpc = spec.get("http"), spec.get("grpc")
        if http is not None and not isinstance(http, dict):
            problems.append(f"{at}.http: expected a mapping")
            http = None
        if grpc is not None and not isinstance(grpc, dict):
            problems.append(f"{at}.grpc: expected a mapping")
            grpc = None
        chosen = http if http is not None else (grpc or {})
        heads = "headers" if http is not None else "initialMetadata"
        detectors = spec.get("resourceDetectors") or {}
        if not isinstance(detectors, dict) or any(k not in _DETECTORS for k in detectors):
            problems.append(f"{at}.resourceDetectors: known detectors are {', '.join(_DETECTORS)}")
            detectors = {}
        fields = {
            "http": http is not None,
            "path": str(chosen.get("path") or "") if http is not None else "",
            "timeout": _duration(
                chosen.get("timeout"),
                f"{at}.{'http' if http is not None else 'grpc'}.timeout",
                problems,
            ),
            "headers": _headers(chosen.get(heads), f"{at}.{heads}", env, problems),
            "resource_detectors": tuple(sorted(detectors)),
        }
    if problems:
        raise TracingError("\n".join(problems))
    assert port is not None and isinstance(service, str)
    return TracerProvider(name, kind, service, port, tag_length or 0, **fields)


def parse_mesh(data: Mapping[str, Any], env: Mapping[str, str]) -> MeshTracing:
    """MeshConfig DATA's tracing fields (``enableTracing``, ``defaultConfig.tracing``;
    ``defaultProviders`` is mesh/telemetry.py's); TracingError lists every problem."""
    problems: list[str] = []
    enabled = data.get("enableTracing", True)
    if not isinstance(enabled, bool):
        problems.append(f"enableTracing: expected true or false, got {enabled!r}")
        enabled = True
    config = (
        (data.get("defaultConfig") or {}).get("tracing")
        if isinstance(data.get("defaultConfig"), dict)
        else None
    )
    tags: tuple[CustomTag, ...] = ()
    sampling, length, istio_tags = DEFAULT_SAMPLING, 0, True
    if config is not None:
        if not isinstance(config, dict):
            problems.append("defaultConfig.tracing: expected a mapping")
        else:
            at = "defaultConfig.tracing"
            value = config.get("sampling", 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                problems.append(f"{at}.sampling: expected a percentage, got {value!r}")
            elif value:  # proxyConfigSamplingValue: 0 keeps the default, above 100 is 1 %
                sampling = float(value) if value <= 100 else DEFAULT_SAMPLING
            tags = custom_tags(config.get("customTags"), f"{at}.customTags", problems)
            length = _uint(config.get("maxPathTagLength", 0)) or 0
            flag = config.get("enableIstioTags", True)
            istio_tags = flag if isinstance(flag, bool) else True
    if problems:
        raise TracingError("\n".join(problems))
    return MeshTracing(enabled, sampling, tags, length, istio_tags)


def custom_tags(data: Any, at: str, problems: list[str]) -> tuple[CustomTag, ...]:
    """A ``customTags`` map (ProxyConfig's or Telemetry's): tag -> one of literal {value},
    environment {name, defaultValue}, header {name, defaultValue}; sorted by tag, as istiod
    sorts them."""
    if data is None:
        return ()
    if not isinstance(data, dict):
        problems.append(f"{at}: expected a map of tag names")
        return ()
    tags = []
    for tag, spec in sorted(data.items()):
        kinds = [k for k in (spec or {}) if k in _TAG_KINDS] if isinstance(spec, dict) else []
        if len(kinds) != 1 or not isinstance(spec[kinds[0]], dict):
            problems.append(f"{at}.{tag}: expected exactly one of {', '.join(_TAG_KINDS)}")
            continue
        kind, body = kinds[0], spec[kinds[0]]
        value = body.get("value" if kind == "literal" else "name")
        if not isinstance(value, str):
            problems.append(
                f"{at}.{tag}.{kind}: expected a string {'value' if kind == 'literal' else 'name'}"
            )
            continue
        tags.append(CustomTag(str(tag), kind, value, str(body.get("defaultValue") or "")))
    return tuple(tags)


def _uint(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < 2**32 else None


def _duration(value: Any, at: str, problems: list[str]) -> str:
    """A proto3 JSON Duration ("0.5s"), kept as text; "" when unset."""
    if value is None:
        return ""
    text = str(value)
    try:
        ok = text.endswith("s") and float(text[:-1]) >= 0
    except ValueError:
        ok = False
    if not ok:
        problems.append(f'{at}: expected a duration such as "5s", got {value!r}')
        return ""
    return text


def _headers(data: Any, at: str, env: Mapping[str, str], problems: list[str]) -> tuple[Header, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.append(f"{at}: expected a list of {{name, value | envName}}")
        return ()
    out = []
    for i, entry in enumerate(data):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{at}[{i}].name: must be a non-empty string")
            continue
        value = entry.get("value")
        if value is None and "envName" in entry:
            value = env.get(str(entry["envName"]), "")
        out.append(Header(name, str(value or "")))
    return tuple(out)
