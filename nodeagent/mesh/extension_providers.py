"""MeshConfig ``extensionProviders``: the external authorizers CUSTOM policies name (pure).

Istio is the specification: istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/
(``MeshConfig.ExtensionProvider``, ``EnvoyExternalAuthorizationHttpProvider``,
``EnvoyExternalAuthorizationGrpcProvider``, ``EnvoyExternalAuthorizationRequestBody``) and
istiod's checks of them (istio/istio pkg/config/validation
``ValidateExtensionProviderEnvoyExtAuthz*`` and pilot/pkg/security/authz/builder/extauthz.go:
port in [1, 65535], statusOnError an Envoy HTTP status code, pathPrefix starting with "/", no
single "*" in a header list).

Only the two ext_authz kinds are parsed here (AuthorizationPolicy CUSTOM, translate/extauthz.py),
and the tracers ``zipkin`` and ``opentelemetry`` also in mesh/tracing.py (translate/tracing.py);
the other kinds Istio knows (tracers, access loggers, Prometheus, ...) are Telemetry's: kept with
their settings as given (``ExtensionProviders.settings``), read by mesh/telemetry.py and the
translators of those kinds. Istio's built-in providers (``envoy``: a file access log on
/dev/stdout; ``prometheus``; ``stackdriver``) exist unless an entry of the same name replaces
them, as istiod adds them to every mesh config (pkg/config/mesh/mesh.go DefaultMeshConfig).
A bad entry is an error naming its index, name and field: the whole mesh config is refused
(the source keeps the last good one), as istiod's mesh watcher refuses a MeshConfig that fails
validation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh import tracing

HTTP, GRPC = "envoyExtAuthzHttp", "envoyExtAuthzGrpc"
# Istio's other provider kinds (MeshConfig.ExtensionProvider's oneof): accepted, used by
# Telemetry (#19), not by anything here.
OTHER_KINDS = frozenset(
    {
        "zipkin",
        "lightstep",
        "datadog",
        "stackdriver",
        "opencensus",
        "skywalking",
        "opentelemetry",
        "prometheus",
        "envoyFileAccessLog",
        "envoyHttpAls",
        "envoyTcpAls",
        "envoyOtelAls",
        "sds",
    }
)
# Istio's built-in providers (pkg/config/mesh/mesh.go DefaultMeshConfig): name, kind, settings.
BUILT_IN: tuple[tuple[str, str, str], ...] = (
    ("prometheus", "prometheus", "{}"),
    ("stackdriver", "stackdriver", "{}"),
    ("envoy", "envoyFileAccessLog", '{"path": "/dev/stdout"}'),
)
_BODY_FIELDS = ("maxRequestBytes", "allowPartialMessage", "packAsBytes")
_COMMON_FIELDS = (
    "service",
    "port",
    "timeout",
    "failOpen",
    "clearRouteCache",
    "statusOnError",
    "includeRequestBodyInCheck",
)
_HTTP_FIELDS = (
    *_COMMON_FIELDS,
    "pathPrefix",
    "includeRequestHeadersInCheck",
    "includeHeadersInCheck",  # deprecated: used only when includeRequestHeadersInCheck is unset
    "includeAdditionalHeadersInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnAllow",
    "headersToDownstreamOnDeny",
)
_HEADER_LISTS = (
    "includeRequestHeadersInCheck",
    "includeHeadersInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnAllow",
    "headersToDownstreamOnDeny",
)
# envoy.type.v3.StatusCode's values (api envoy/type/v3/http_status.proto), 0 ("Empty") aside:
# Envoy refuses it in HttpStatus.
STATUS_CODES = frozenset(
    {100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307}
    | {308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415}
    | {416, 417, 421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506}
    | {507, 508, 510, 511}
)
_DURATION = re.compile(r"^(\d+(\.\d{1,9})?)s$")  # proto3 JSON Duration, as MeshConfig reads it


class ProviderError(ValueError):
    """A bad extensionProviders entry; the message names where and what."""


@dataclass(frozen=True)
class RequestBody:
    """``includeRequestBodyInCheck`` (Envoy ext_authz ``with_request_body``)."""

    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


@dataclass(frozen=True)
class ExtAuthzProvider:
    """One ``envoyExtAuthzHttp`` or ``envoyExtAuthzGrpc`` provider (hashable: MeshConfig is
    compared to tell a change). Field names as Istio's, in snake case."""

    name: str
    grpc: bool
    service: str  # "host" or "namespace/host"
    port: int
    timeout: str = "600s"  # Istio's default when unset (extauthz.go timeoutOrDefault)
    fail_open: bool = False
    clear_route_cache: bool = False
    status_on_error: int = 0  # 0: unset (Envoy answers 403)
    include_request_body: RequestBody | None = None
    path_prefix: str = ""
    include_request_headers: tuple[str, ...] = ()
    include_additional_headers: tuple[tuple[str, str], ...] = ()
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtensionProviders:
    """The mesh's providers: ext_authz ones parsed, the other kinds' names and settings."""

    ext_authz: tuple[ExtAuthzProvider, ...] = ()
    other: tuple[str, ...] = ()
    # The other kinds' entries: (name, kind, settings as JSON text; kept hashable).
    other_settings: tuple[tuple[str, str, str], ...] = ()
    # zipkin and opentelemetry (mesh/tracing.py), kept by name in OTHER too.
    tracers: tuple[tracing.TracerProvider, ...] = ()

    def find(self, name: str) -> ExtAuthzProvider | None:
        return next((p for p in self.ext_authz if p.name == name), None)

    def settings(self, name: str) -> tuple[str, str, Mapping[str, Any]] | None:
        """(its name as defined, kind, settings) of the provider NAME, a built-in one too;
        None when the mesh has none. Names compare case-insensitively, as istiod's
        ``fetchProvider`` does (pilot/pkg/model/telemetry.go, strings.EqualFold)."""
        wanted = name.lower()
        for p in self.ext_authz:
            if p.name.lower() == wanted:
                return p.name, HTTP if not p.grpc else GRPC, {}
        defined = {n.lower() for n in self.other} | {p.name.lower() for p in self.ext_authz}
        built_in = tuple(b for b in BUILT_IN if b[0] not in defined)
        for entry_name, kind, text in (*self.other_settings, *built_in):
            if entry_name.lower() == wanted:
                loaded = json.loads(text)
                return entry_name, kind, loaded if isinstance(loaded, dict) else {}
        return None

    def tracer(self, name: str) -> tracing.TracerProvider | None:
        return next((p for p in self.tracers if p.name == name), None)

    def names(self) -> list[str]:
        return sorted([p.name for p in self.ext_authz] + list(self.other))


def parse(
    data: Any, where: str = "extensionProviders", env: Mapping[str, str] | None = None
) -> ExtensionProviders:
    """DATA, MeshConfig's ``extensionProviders`` list (None: none); ProviderError lists every
    problem found. ENV: where a tracer header's ``envName`` is read (None: none)."""
    if data is None:
        return ExtensionProviders()
    if not isinstance(data, list):
        raise ProviderError(f"{where}: expected a list, got {type(data).__name__}")
    problems: list[str] = []
    seen: set[str] = set()
    ext_authz: list[ExtAuthzProvider] = []
    other: list[str] = []
    other_settings: list[tuple[str, str, str]] = []
    tracers: list[tracing.TracerProvider] = []
    for index, entry in enumerate(data):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: expected a mapping, got {type(entry).__name__}")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{at}.name: must be a non-empty string")
            continue
        at = f"{where}[{index}] ({name})"
        if name in seen:
            problems.append(f"{at}.name: must be unique, found a duplicate")
        seen.add(name)
        kinds = [key for key in entry if key != "name"]
        if len(kinds) != 1:
            problems.append(f"{at}: expected exactly one provider kind, found {sorted(kinds)}")
            continue
        kind = kinds[0]
        if kind in (HTTP, GRPC):
            try:
                ext_authz.append(_ext_authz(name, kind, entry[kind], f"{at}.{kind}"))
            except ProviderError as e:
                problems.extend(str(e).split("\n"))
        elif kind in (tracing.ZIPKIN, tracing.OPENTELEMETRY):
            other.append(name)
            settings = entry[kind] if isinstance(entry[kind], dict) else {}
            other_settings.append((name, kind, json.dumps(settings, sort_keys=True)))
            try:
                tracers.append(
                    tracing.parse_provider(name, kind, entry[kind], f"{at}.{kind}", env or {})
                )
            except tracing.TracingError as e:
                problems.extend(str(e).split("\n"))
        elif kind in OTHER_KINDS:
            other.append(name)
            settings = entry[kind] if isinstance(entry[kind], dict) else {}
            other_settings.append((name, kind, json.dumps(settings, sort_keys=True)))
        else:
            known = ", ".join(sorted({HTTP, GRPC} | OTHER_KINDS))
            problems.append(f'{at}: unknown provider kind "{kind}" (known: {known})')
    if problems:
        raise ProviderError("\n".join(problems))
    return ExtensionProviders(
        tuple(ext_authz), tuple(other), tuple(other_settings), tracers=tuple(tracers)
    )


def _ext_authz(name: str, kind: str, spec: Any, at: str) -> ExtAuthzProvider:
    if not isinstance(spec, dict):
        raise ProviderError(f"{at}: expected a mapping, got {type(spec).__name__}")
    grpc = kind == GRPC
    known = _COMMON_FIELDS if grpc else _HTTP_FIELDS
    listed = ", ".join(known)
    problems = [f'{at}: unknown field "{k}" (known: {listed})' for k in spec if k not in known]
    service = spec.get("service")
    if not isinstance(service, str) or not service or service.count("/") > 1:
        problems.append(f'{at}.service: expected "<host>" or "<namespace>/<host>", got {service!r}')
    port = _port(spec.get("port"))
    if port is None:
        problems.append(f"{at}.port: must be in the range [1, 65535], got {spec.get('port')!r}")
    timeout = spec.get("timeout", "600s")
    if not isinstance(timeout, str) or not _DURATION.match(timeout):
        problems.append(f'{at}.timeout: expected a duration such as "0.5s", got {timeout!r}')
    status = spec.get("statusOnError", "")
    code = 0
    if status not in ("", None):
        try:
            code = int(str(status))
        except ValueError:
            code = -1
        if code not in STATUS_CODES:
            problems.append(
                f"{at}.statusOnError: {status!r} is not an HTTP status code Envoy supports"
            )
    flags = {}
    for flag in ("failOpen", "clearRouteCache"):
        value = spec.get(flag, False)
        if not isinstance(value, bool):
            problems.append(f"{at}.{flag}: expected true or false, got {value!r}")
        flags[flag] = bool(value)
    body = _body(spec.get("includeRequestBodyInCheck"), f"{at}.includeRequestBodyInCheck", problems)
    path_prefix = spec.get("pathPrefix", "")
    if not isinstance(path_prefix, str) or (path_prefix and not path_prefix.startswith("/")):
        problems.append(f"{at}.pathPrefix: must begin with /, got {path_prefix!r}")
    lists = {key: _headers(spec.get(key), f"{at}.{key}", problems) for key in _HEADER_LISTS}
    additional = spec.get("includeAdditionalHeadersInCheck") or {}
    if not isinstance(additional, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in additional.items()
    ):
        problems.append(f"{at}.includeAdditionalHeadersInCheck: expected a map of strings")
        additional = {}
    if problems:
        raise ProviderError("\n".join(problems))
    assert port is not None and isinstance(service, str) and isinstance(timeout, str)
    return ExtAuthzProvider(
        name=name,
        grpc=grpc,
        service=service,
        port=port,
        timeout=timeout,
        fail_open=flags["failOpen"],
        clear_route_cache=flags["clearRouteCache"],
        status_on_error=code,
        include_request_body=body,
        path_prefix=str(path_prefix),
        # The deprecated includeHeadersInCheck counts only when the new field is unset.
        include_request_headers=lists["includeRequestHeadersInCheck"]
        or lists["includeHeadersInCheck"],
        include_additional_headers=tuple(sorted(additional.items())),
        headers_to_upstream_on_allow=lists["headersToUpstreamOnAllow"],
        headers_to_downstream_on_allow=lists["headersToDownstreamOnAllow"],
        headers_to_downstream_on_deny=lists["headersToDownstreamOnDeny"],
    )


def _port(value: Any) -> int | None:
    """uint32 in MeshConfig: a number, or (proto JSON) a string of one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= 65535:
        return value
    return None


def _headers(value: Any, at: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{at}: expected a list of header names")
        return ()
    if "*" in value:
        problems.append(
            f'{at}: a single wildcard ("*") is not supported, use a prefix or suffix match'
        )
    return tuple(value)


def _body(value: Any, at: str, problems: list[str]) -> RequestBody | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"{at}: expected a mapping, got {type(value).__name__}")
        return None
    problems += [
        f'{at}: unknown field "{key}" (known: {", ".join(_BODY_FIELDS)})'
        for key in value
        if key not in _BODY_FIELDS
    ]
    size = value.get("maxRequestBytes", 0)
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**32:
        problems.append(f"{at}.maxRequestBytes: expected a uint32, got {size!r}")
        size = 0
    flags = [value.get(key, False) for key in _BODY_FIELDS[1:]]
    for key, flag in zip(_BODY_FIELDS[1:], flags, strict=True):
        if not isinstance(flag, bool):
            problems.append(f"{at}.{key}: expected true or false, got {flag!r}")
    return RequestBody(int(size), bool(flags[0]), bool(flags[1]))


__all__: Sequence[str] = (
    "GRPC",
    "HTTP",
    "ExtAuthzProvider",
    "ExtensionProviders",
    "ProviderError",
    "RequestBody",
    "parse",
)
