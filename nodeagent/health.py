"""Readiness of the node agent on :15021 (``/healthz/ready``, as Istio's agents answer it)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_readiness(host: str, port: int, ready: Callable[[], str]) -> ThreadingHTTPServer:
    """``ready()`` returns "" when ready, else why not; answered as 200 or 503."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz/ready":
                self.send_error(404)
                return
            problem = ready()
            body = (problem or "ok").encode() + b"\n"
            self.send_response(503 if problem else 200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the agent's log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="readiness", daemon=True).start()
    return server
