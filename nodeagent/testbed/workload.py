"""The HTTP fake service that runs inside the testbed's simulated pods.

Modelled on nicholasjackson/fake-service, as used in the Istio workshops: every request is
answered with JSON naming this service, and the answers of the upstream URIs it calls are
embedded in it, so one ``curl`` shows the whole call chain the mesh routed.

Configured through environment variables, like fake-service (see ``FakeServiceConfig.from_env``).
With TLS_CERT and TLS_KEY (PEM files) it serves HTTPS itself, as an app that terminates TLS
behind a DestinationRule ``tls.mode: SIMPLE`` does; TLS_CLIENT_CA (a PEM file) makes it require
a client certificate from that CA (``MUTUAL``). Its answers then tell what the client sent in
the handshake: ``tls: {sni, client_cert: {subject, sans}}``.

Besides, a few paths answer as httpbin does (``/status/<codes>``, ``/delay/<seconds>``,
``/headers``), and ``/requests`` tells how many requests this process served, per path, without
counting itself (see ``FakeServiceHandler``).

Stdlib only and no heavy imports: the testbed starts one process per pod and waits for it.

Run with ``python -m nodeagent.testbed.workload``.
"""

import http.client
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

DEFAULT_PROPAGATE_HEADERS: tuple[str, ...] = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    # Workshops route on these, so they must survive the call chain.
    "user",
    "end-user",
)

HEALTH_PATH = "/health"
REQUESTS_PATH = "/requests"
STATUS_PREFIX, DELAY_PREFIX, HEADERS_PATH = "/status/", "/delay/", "/headers"
# httpbin caps /delay at 10 s (httpbin/core.py, delay_response).
MAX_DELAY = 10.0
# Distinct paths /requests keeps apart; later ones are counted together under OTHER_PATHS.
MAX_COUNTED_PATHS = 1000
OTHER_PATHS = "<other>"
FIB_TRIE_PATH = "/proc/net/fib_trie"

# RFC 9110 token characters: anything else could smuggle a second header into upstream calls.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Keep-alive connections from Envoy would otherwise hold a handler thread forever.
_IDLE_CONNECTION_TIMEOUT = 120.0
_BODY_CHUNK = 64 * 1024
_ERROR_SNIPPET = 200


@dataclass(frozen=True)
class FakeServiceConfig:
    """What one fake service is called, where it listens, whom it calls and how it misbehaves."""

    name: str = "fake-service"
    version: str = "v1"
    # Empty means "Hello from <name>", so the default follows the name.
    message: str = ""
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    upstream_uris: tuple[str, ...] = ()
    upstream_timeout: float = 5.0
    # Lower-case header names.
    propagate_headers: tuple[str, ...] = DEFAULT_PROPAGATE_HEADERS
    error_rate: float = 0.0
    error_code: int = 500
    delay: float = 0.0
    # Empty means "the first address of this network namespace".
    pod_ip: str = ""
    # PEM files: serve HTTPS with this certificate and key; require client certificates from
    # this CA. Empty: plain HTTP (cert and key), no client certificate (CA).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""

    def __post_init__(self) -> None:
        if not self.message:
            object.__setattr__(self, "message", f"Hello from {self.name}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS_CERT and TLS_KEY: set both (HTTPS) or neither (HTTP)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("TLS_CLIENT_CA: needs TLS_CERT and TLS_KEY (HTTPS)")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "FakeServiceConfig":
        """Parse fake-service's environment variables; raise ValueError naming a bad one.

        A variable that is unset or blank takes its default, except PROPAGATE_HEADERS: set but
        blank, it propagates nothing (to show what the mesh does without trace or user headers).
        """
        name = _text(env, "NAME", "fake-service")
        host, port = _listen_addr(_text(env, "LISTEN_ADDR", "0.0.0.0:8080"))
        headers_raw = env.get("PROPAGATE_HEADERS")
        return cls(
            name=name,
            version=_text(env, "VERSION", "v1"),
            message=_text(env, "MESSAGE", f"Hello from {name}"),
            listen_host=host,
            listen_port=port,
            upstream_uris=_upstream_uris(env.get("UPSTREAM_URIS", "")),
            upstream_timeout=_number(
                env, "UPSTREAM_TIMEOUT", 5.0, "a number of seconds above 0", lambda s: s > 0
            ),
            propagate_headers=(
                DEFAULT_PROPAGATE_HEADERS if headers_raw is None else _header_names(headers_raw)
            ),
            error_rate=_number(
                env, "ERROR_RATE", 0.0, "a number between 0 and 1", lambda r: 0 <= r <= 1
            ),
            error_code=_status_code(env, "ERROR_CODE", 500),
            delay=_number(env, "DELAY", 0.0, "a number of seconds, 0 or more", lambda s: s >= 0),
            pod_ip=_text(env, "POD_IP", ""),
            tls_cert=_text(env, "TLS_CERT", ""),
            tls_key=_text(env, "TLS_KEY", ""),
            tls_client_ca=_text(env, "TLS_CLIENT_CA", ""),
        )


def _text(env: Mapping[str, str], variable: str, default: str) -> str:
    value = env.get(variable, "").strip()
    return value or default


def _invalid(variable: str, value: str, expected: str) -> ValueError:
    return ValueError(f"{variable}={value!r}: expected {expected}")


def _number(
    env: Mapping[str, str],
    variable: str,
    default: float,
    expected: str,
    acceptable: Callable[[float], bool],
) -> float:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(variable, raw, expected) from None
    if not math.isfinite(value) or not acceptable(value):
        raise _invalid(variable, raw, expected)
    return value


def _status_code(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    expected = "an HTTP status code between 100 and 599"
    try:
        code = int(raw)
    except ValueError:
        raise _invalid(variable, raw, expected) from None
    if not 100 <= code <= 599:
        raise _invalid(variable, raw, expected)
    return code


def _listen_addr(raw: str) -> tuple[str, int]:
    expected = "host:port, e.g. 0.0.0.0:8080 or [::]:8080"
    host, sep, port_text = raw.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise _invalid("LISTEN_ADDR", raw, expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        # An unbracketed IPv6 address is ambiguous about where the port starts.
        raise _invalid("LISTEN_ADDR", raw, expected)
    # ":8080" listens everywhere, as in Go.
    return host or "0.0.0.0", int(port_text)


def _upstream_uris(raw: str) -> tuple[str, ...]:
    uris = tuple(part.strip() for part in raw.split(",") if part.strip())
    for uri in uris:
        if not _is_http_url(uri):
            raise _invalid("UPSTREAM_URIS", raw, f"comma-separated http(s) URLs, not {uri!r}")
    return uris


def _is_http_url(uri: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(uri)
        _ = parts.port  # raises ValueError when the port is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _header_names(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    for header in names:
        if not _HEADER_NAME.fullmatch(header):
            raise _invalid(
                "PROPAGATE_HEADERS", raw, f"comma-separated header names, not {header!r}"
            )
    return tuple(dict.fromkeys(names))


def parse_fib_trie(text: str) -> list[str]:
    """Non-loopback IPv4 addresses assigned in the namespace, from /proc/net/fib_trie's text.

    The kernel lists each local address as a leaf (``|-- 10.1.2.3``) followed by a
    ``/32 host LOCAL`` line; addresses appear once per routing table, so they are deduplicated.
    """
    addresses: dict[str, None] = {}
    leaf = ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "|--":
            leaf = fields[1]
        elif fields[:1] == ["/32"] and fields[1:3] == ["host", "LOCAL"] and leaf:
            try:
                if not ipaddress.IPv4Address(leaf).is_loopback:
                    addresses[leaf] = None
            except ValueError:
                pass
    return list(addresses)


def ip_addresses(fib_trie_path: str = FIB_TRIE_PATH) -> list[str]:
    """This network namespace's non-loopback IPv4 addresses, or [] when the kernel won't say.

    /proc/net is per network namespace, so this names the pod's addresses, not the node's.
    """
    try:
        with open(fib_trie_path, encoding="ascii", errors="replace") as trie:
            return parse_fib_trie(trie.read())
    except OSError:
        return []


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _failure(uri: str, code: int, reason: str) -> dict[str, Any]:
    return {"uri": uri, "code": code, "error": reason}


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _ERROR_SNIPPET else text[:_ERROR_SNIPPET] + "..."


def call_upstream(
    opener: urllib.request.OpenerDirector, uri: str, headers: Mapping[str, str], timeout: float
) -> tuple[bool, Any]:
    """GET one upstream; return (succeeded, what to embed under its URI in ``upstream_calls``)."""
    upstream = urllib.request.Request(uri, headers=dict(headers), method="GET")
    try:
        try:
            with opener.open(upstream, timeout=timeout) as response:
                status: int = response.status
                body: bytes = response.read()
        except urllib.error.HTTPError as exc:
            # A non-2xx answer still has a body worth showing (Envoy's "no healthy upstream").
            with exc:
                status, body = exc.code, exc.read()
    except urllib.error.URLError as exc:
        return False, _failure(uri, -1, f"calling upstream: {exc.reason}")
    except (OSError, http.client.HTTPException) as exc:
        return False, _failure(uri, -1, f"calling upstream: {str(exc) or type(exc).__name__}")
    try:
        answer = json.loads(body)
    except ValueError:
        return False, _failure(
            uri, status, f"upstream answered {status}, not JSON: {_snippet(body)!r}"
        )
    if 200 <= status < 300:
        return True, answer
    if isinstance(answer, dict):
        answer.setdefault("code", status)
        answer.setdefault("error", f"upstream answered {status}")
        return False, answer
    failure = _failure(uri, status, f"upstream answered {status}")
    failure["body"] = answer
    return False, failure


class FakeServiceServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the config and the per-process request count."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: FakeServiceConfig) -> None:
        self.config = config
        # Upstream calls go straight to the mesh: an HTTP(S)_PROXY in the environment would
        # route around the node's Envoy and falsify every test.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.random = random.Random()
        self._count_lock = threading.Lock()
        self._request_count = 0
        self._by_path: dict[str, int] = {}
        self.tls_context = _tls_context(config) if config.tls_cert else None
        super().__init__((config.listen_host, config.listen_port), FakeServiceHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """The accepted connection, in TLS when configured. The handshake runs in the request's
        own thread (FakeServiceHandler.setup), so one slow client cannot stall accepting."""
        sock, address = super().get_request()
        if self.tls_context is None:
            return sock, address
        wrapped = self.tls_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def count_request(self, path: str) -> int:
        """Count one served request for PATH; return the count including it."""
        with self._count_lock:
            self._request_count += 1
            if path not in self._by_path and len(self._by_path) >= MAX_COUNTED_PATHS:
                path = OTHER_PATHS  # a client walking many paths must not grow this forever
            self._by_path[path] = self._by_path.get(path, 0) + 1
            return self._request_count

    def request_counts(self) -> dict[str, Any]:
        """What /requests answers: the requests served so far, in total and per path."""
        with self._count_lock:
            return {"count": self._request_count, "by_path": dict(self._by_path)}

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or idles out is routine in a mesh; a traceback is not.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
            _log(f"{self.config.name}: connection from {client_address[0]} ended: {exc!r}")
            return
        super().handle_error(request, client_address)


def _tls_context(config: FakeServiceConfig) -> ssl.SSLContext:
    """The server side of HTTPS; the SNI each client sends is kept on its socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED

    def remember_sni(sock: Any, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.fake_service_sni = server_name or ""

    context.sni_callback = remember_sni
    return context


def tls_of(sock: Any) -> dict[str, Any]:
    """What the client sent in SOCK's handshake: its SNI, and its certificate's subject and SANs."""
    answer: dict[str, Any] = {"sni": getattr(sock, "fake_service_sni", "")}
    cert = sock.getpeercert()
    if cert:
        subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        sans = [f"{kind}:{value}" for kind, value in cert.get("subjectAltName", ())]
        answer["client_cert"] = {"subject": subject, "sans": sans}
    return answer


class _IPv6FakeServiceServer(FakeServiceServer):
    address_family = socket.AF_INET6


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def status_choice(spec: str, rng: random.Random) -> int:
    """The status /status/SPEC answers, as httpbin picks it (httpbin/core.py, view_status):
    one code, or a comma list of ``code`` or ``code:weight`` (weight 1 when absent) from which
    one is drawn at random in proportion to the weights. ValueError when SPEC is not that, or
    names a code outside 200-599 (an informational status cannot carry this answer)."""
    codes: list[int] = []
    weights: list[float] = []
    for part in spec.split(","):
        code_text, sep, weight_text = part.strip().partition(":")
        try:
            code = int(code_text)
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"invalid status code {part.strip()!r}") from None
        if not 200 <= code <= 599:
            raise ValueError(f"status code {code} is outside 200-599")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"invalid weight {weight_text!r} for status code {code}")
        codes.append(code)
        weights.append(weight)
    if len(codes) == 1:
        return codes[0]
    if sum(weights) <= 0:
        raise ValueError(f"the weights of {spec!r} add up to 0")
    return rng.choices(codes, weights)[0]


def delay_seconds(text: str) -> float:
    """The seconds /delay/TEXT waits: a number, at most MAX_DELAY as in httpbin (a larger one
    is cut to it); ValueError for anything else."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"invalid delay {text!r}: expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid delay {text!r}: expected a number of seconds, 0 or more")
    return min(seconds, MAX_DELAY)


class FakeServiceHandler(BaseHTTPRequestHandler):
    """Answers every path with the fake-service JSON, except:

    - ``/health`` (GET/HEAD): readiness probes, not counted.
    - ``/requests`` (GET/HEAD): ``{"count": N, "by_path": {path: n}}``, the requests served so
      far (everything but /health and /requests itself), so a test can tell how many calls
      reached this pod (mirrored ones too) without adding one.
    - httpbin's ``/status/<codes>`` (that status; a comma list picks one at random, weighted
      as ``code:weight``), ``/delay/<seconds>`` (at most 10 s) and ``/headers`` (``{"headers":
      {...}}``, the request headers as received). They answer only what they are asked:
      without the configured DELAY, ERROR_RATE or upstream calls. /status and /delay answer
      the fake-service JSON (so the answer still names the version), /headers httpbin's.
    """

    server: FakeServiceServer
    # HTTP/1.1 keeps Envoy's upstream connections alive, as Go's fake-service does.
    protocol_version = "HTTP/1.1"
    server_version = "fake-service"
    sys_version = ""
    timeout = _IDLE_CONNECTION_TIMEOUT

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # under the idle timeout set above

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def do_PATCH(self) -> None:
        self._answer()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # _answer logs one line with the duration instead.
        pass

    def log_message(self, format: str, *args: Any) -> None:
        _log(f"{self.server.config.name}: {self.address_string()} {format % args}")

    def _answer(self) -> None:
        started = time.monotonic()
        start_time = _now()
        try:
            if not self._discard_body():
                self._log_request(400, started)
                return
            path = urllib.parse.urlsplit(self.path).path
            if path == HEALTH_PATH and self.command in ("GET", "HEAD"):
                code, answer = 200, {"status": "ok"}
            elif path == REQUESTS_PATH and self.command in ("GET", "HEAD"):
                code, answer = 200, self.server.request_counts()
            else:
                code, answer = self._serve(path, start_time, started)
            # Logged before the first byte leaves, so the line precedes the client seeing it.
            self._log_request(code, started)
            self._send_json(code, answer)
        except ConnectionError as exc:
            # The client went away mid-request; nobody is left to tell.
            self.close_connection = True
            _log(f"{self.server.config.name}: client {self.address_string()} went away: {exc!r}")

    def _log_request(self, code: int, started: float) -> None:
        _log(
            f"{self.server.config.name}: {self.command} {self.path} {code} "
            f"{_duration(time.monotonic() - started)}"
        )

    def _serve(self, path: str, start_time: str, started: float) -> tuple[int, dict[str, Any]]:
        request_count = self.server.count_request(path)
        try:
            if path.startswith(STATUS_PREFIX):
                code = status_choice(path[len(STATUS_PREFIX) :], self.server.random)
                return code, self._fake_answer(code, start_time, started, request_count, {})
            if path.startswith(DELAY_PREFIX):
                seconds = delay_seconds(path[len(DELAY_PREFIX) :])
                time.sleep(seconds)
                answer = self._fake_answer(200, start_time, started, request_count, {})
                return 200, {**answer, "delay": seconds}
        except ValueError as exc:
            return 400, {"code": 400, "error": f"{path}: {exc}"}
        if path == HEADERS_PATH:
            return 200, {"headers": self._received_headers()}
        return self._serve_fake(start_time, started, request_count)

    def _serve_fake(
        self, start_time: str, started: float, request_count: int
    ) -> tuple[int, dict[str, Any]]:
        """The fake-service answer, with the configured delay, errors and upstream calls."""
        config = self.server.config
        if config.delay:
            time.sleep(config.delay)
        upstream_calls: dict[str, Any] = {}
        # random() is in [0, 1): ERROR_RATE=1 always fails, ERROR_RATE=0 never does.
        injected = self.server.random.random() < config.error_rate
        code = config.error_code if injected else 200
        if not injected:
            propagated = self._propagated_headers()
            for uri in config.upstream_uris:
                ok, upstream_calls[uri] = call_upstream(
                    self.server.opener, uri, propagated, config.upstream_timeout
                )
                if not ok:
                    code = 500
        answer = self._fake_answer(code, start_time, started, request_count, upstream_calls)
        if injected:
            answer["error"] = f"error injected (ERROR_RATE={config.error_rate:g})"
        return code, answer

    def _fake_answer(
        self,
        code: int,
        start_time: str,
        started: float,
        request_count: int,
        upstream_calls: dict[str, Any],
    ) -> dict[str, Any]:
        config = self.server.config
        addresses = ip_addresses()
        answer: dict[str, Any] = {
            "name": config.name,
            "version": config.version,
            "uri": self.path,
            "method": self.command,
            "type": "HTTP",
            "ip_addresses": addresses,
            "pod_ip": config.pod_ip or (addresses[0] if addresses else ""),
            # The TCP peer this service saw: with the mesh, the caller's pod IP arrives in
            # x-forwarded-for while the peer is the local Envoy's connection.
            "client_ip": self.client_address[0],
            "headers": self._lowercased_headers(),
            "body": config.message,
            "start_time": start_time,
            "end_time": _now(),
            "duration": _duration(time.monotonic() - started),
            "upstream_calls": upstream_calls,
            "code": code,
            "request_count": request_count,
        }
        if isinstance(self.connection, ssl.SSLSocket):
            answer["tls"] = tls_of(self.connection)
        return answer

    def _lowercased_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            name = key.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    def _received_headers(self) -> dict[str, str]:
        """The request headers with their names as the client spelled them (repeats joined)."""
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _propagated_headers(self) -> dict[str, str]:
        propagated: dict[str, str] = {}
        for name in self.server.config.propagate_headers:
            values = self.headers.get_all(name)
            if values:
                propagated[name] = ", ".join(values)
        return propagated

    def _discard_body(self) -> bool:
        """Read the request body so the connection can serve the next request; False on 400."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._discard_chunked_body()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return True
        try:
            remaining = int(length_header)
        except ValueError:
            remaining = -1
        if remaining < 0:
            self.send_error(400, "Bad Content-Length")
            return False
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _BODY_CHUNK))
            if not chunk:
                raise ConnectionResetError("request body cut short")
            remaining -= len(chunk)
        return True

    def _discard_chunked_body(self) -> bool:
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionResetError("chunked request body cut short")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self.send_error(400, "Bad chunk size")
                return False
            if size == 0:
                break
            remaining = size + 2  # the chunk and its CRLF
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _BODY_CHUNK))
                if not chunk:
                    raise ConnectionResetError("chunked request body cut short")
                remaining -= len(chunk)
        # Trailer fields, up to the blank line.
        while self.rfile.readline(8192).strip():
            pass
        return True

    def _send_json(self, code: int, answer: Mapping[str, Any]) -> None:
        # 204 and 304 carry no body (RFC 9110 15.3.5, 15.4.5), e.g. from /status/204.
        payload = b"" if code in (204, 304) else (json.dumps(answer, indent=2) + "\n").encode()
        self.send_response(code)
        if payload:
            self.send_header("Content-Type", "application/json")
        if code != 204:  # a 204 must not have Content-Length either (RFC 9110 8.6)
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.3f}ms"


def build_server(config: FakeServiceConfig) -> FakeServiceServer:
    """Bind the listening socket without serving yet (tests serve it in a thread)."""
    if ":" in config.listen_host:
        return _IPv6FakeServiceServer(config)
    return FakeServiceServer(config)


def serve(config: FakeServiceConfig, ready: threading.Event | None = None) -> None:
    """Serve until interrupted (KeyboardInterrupt; ``main`` turns SIGTERM into one)."""
    with build_server(config) as server:
        # Port 0 asks the kernel for one; name the one it gave.
        port = server.server_address[1]
        _log(f"{config.name}: listening on {config.listen_host}:{port}")
        if ready is not None:
            ready.set()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            _log(f"{config.name}: shutting down")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwinds serve_forever in the main thread, so the listening socket is closed on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: configuration from os.environ; ``argv`` is reserved."""
    del argv
    try:
        config = FakeServiceConfig.from_env(os.environ)
    except ValueError as exc:
        print(f"fake-service: invalid configuration: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(config)
    except OSError as exc:
        print(
            f"{config.name}: cannot listen on {config.listen_host}:{config.listen_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
