"""A trace collector for the tracing test, run as a testbed pod's workload (``command``).

``python trace_collector.py``: HTTP on :9411. It takes spans as a Zipkin server does
(``POST /api/v2/spans``, JSON v2: a list of spans) and as an OpenTelemetry collector does over
OTLP/HTTP (``POST /v1/traces``, a protobuf ``ExportTraceServiceRequest``), and answers
``GET /received`` with every span so far, Zipkin's JSON fields for both (an OTLP span as
{traceId, id, parentId, name, kind, serviceName, tags}), so one test reads both alike.
"""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

PORT = 9411
MAX_SPANS = 10000  # bounded memory: later spans are dropped
_spans: list[dict[str, Any]] = []
_errors: list[str] = []  # the last bodies refused, and why (GET /errors)
_lock = threading.Lock()


def _value(attribute: Any) -> str:
    kind = attribute.value.WhichOneof("value")
    return str(getattr(attribute.value, kind)) if kind else ""


def _otlp(body: bytes) -> list[dict[str, Any]]:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource in request.resource_spans:
        service = next(
            (_value(a) for a in resource.resource.attributes if a.key == "service.name"), ""
        )
        # The venv's opentelemetry-proto predates the name scope_spans (field 2 either way).
        scopes = getattr(resource, "scope_spans", None) or resource.instrumentation_library_spans
        for scope in scopes:
            for span in scope.spans:
                spans.append(
                    {
                        "traceId": span.trace_id.hex(),
                        "id": span.span_id.hex(),
                        "parentId": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": {2: "SERVER", 3: "CLIENT"}.get(span.kind, str(span.kind)),
                        "serviceName": service,
                        "tags": {a.key: _value(a) for a in span.attributes},
                    }
                )
    return spans


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        """The request body: by content-length, or chunked (as Envoy's async client sends)."""
        if "chunked" not in self.headers.get("transfer-encoding", "").lower():
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b""
        for _ in range(100000):  # bounded: at most that many chunks
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, up to the empty line
                    pass
                break
            body += self.rfile.read(size)
            self.rfile.readline()  # the chunk's CRLF
        return body

    def do_POST(self) -> None:
        body = self._body()
        try:
            if self.path.startswith("/api/v2/spans"):
                spans = json.loads(body)
                if not isinstance(spans, list):
                    raise ValueError("not a list of spans")
            elif self.path.startswith("/v1/traces"):
                spans = _otlp(body)
            else:
                with _lock:
                    _errors[:] = [*_errors[-9:], f"{self.path}: no such path"]
                self._answer(404, b"")
                return
        except Exception as e:  # any bad body: a 400, as a collector answers
            with _lock:
                _errors[:] = [*_errors[-9:], f"{self.path} {e!r} {body[:300]!r}"]
            self._answer(400, str(e).encode())
            return
        with _lock:
            _spans.extend(spans[: max(0, MAX_SPANS - len(_spans))])
        self._answer(202, b"")

    def do_GET(self) -> None:
        if self.path not in ("/received", "/errors"):
            self._answer(404, b"")
            return
        with _lock:
            body = json.dumps(_spans if self.path == "/received" else _errors).encode()
        self._answer(200, body, "application/json")

    def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
