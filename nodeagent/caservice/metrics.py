"""The CA's Prometheus metrics and its monitoring port (istiod's :15014): ``/metrics`` and
``/ready``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from nodeagent.caservice.refusal import REASONS


class CAMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refusals = Counter(
            "nodeagent_ca_refusals",
            "Certificate requests refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.refusals.labels(reason)  # every reason shown, at 0 until it happens
        self.issued = Counter(
            "nodeagent_ca_certificates_issued",
            "Workload certificates signed.",
            registry=self.registry,
        )
        self.errors = Counter(
            "nodeagent_ca_errors",
            "Certificate requests answered UNAVAILABLE (the API server failed, no signer yet).",
            registry=self.registry,
        )
        # From the request's arrival in the handler to its answer: TokenReview, node
        # authorization, the CSR check and the signature (not TLS or gRPC framing).
        self.request_seconds = Histogram(
            "nodeagent_ca_request_duration_seconds",
            "CreateCertificate handling time, by outcome (issued, refused, unavailable).",
            ["outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=self.registry,
        )
        self.root_expiry = Gauge(
            "nodeagent_ca_root_expiry_timestamp_seconds",
            "When the first root of the CA's bundle expires (Unix time).",
            registry=self.registry,
        )


def serve_monitoring(
    host: str, port: int, metrics: CAMetrics, ready: Callable[[], str]
) -> ThreadingHTTPServer:
    """``ready()`` returns "" when ready, else why not (200 or 503 on /ready)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                status, body, kind = 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif self.path == "/ready":
                problem = ready()
                status, kind = (503 if problem else 200), "text/plain"
                body = (problem or "ok").encode() + b"\n"
            else:
                self.send_error(404)
                return
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes and scrapes would drown the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ca-monitoring", daemon=True).start()
    return server
