"""An external authorizer that behaves like Istio's sample (istio/istio samples/extauthz: the
ext-authz server of istio.io/latest/docs/tasks/security/authorization/authz-custom/), run as a
mesh pod of the testbed (a ``command`` workload).

``python ext_authz_server.py``: HTTP on :8000 and gRPC ``envoy.service.auth.v3.Authorization`` on
:9000. A check is allowed when the request carries ``x-ext-authz: allow``; otherwise it is denied
with 403 and ``x-ext-authz-check-result: denied`` (allowed: ``x-ext-authz-check-result:
allowed``), as the sample answers. An allowed check also returns
``x-ext-authz-check-received``: the x-forwarded-client-cert the check itself arrived with (the
mesh identity of whoever called the authorizer), for the protected app to see.
"""

from __future__ import annotations

import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

HTTP_PORT, GRPC_PORT = 8000, 9000
CHECK_HEADER, ALLOW = "x-ext-authz", "allow"
RESULT, RECEIVED = "x-ext-authz-check-result", "x-ext-authz-check-received"
DENIED_BODY = "denied by ext_authz for not found header `x-ext-authz: allow` in the request"


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _check(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.headers.get(CHECK_HEADER) == ALLOW:
            self.send_response(200)
            self.send_header(RESULT, "allowed")
            self.send_header(RECEIVED, self.headers.get("x-forwarded-client-cert", ""))
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = DENIED_BODY.encode()
        self.send_response(403)
        self.send_header(RESULT, "denied")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _check

    def log_message(self, format: str, *args: Any) -> None:
        print("http check", self.command, self.path, flush=True)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(  # the gRPC method's name
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        print("grpc check", http.method, http.path, flush=True)
        if http.headers.get(CHECK_HEADER) == ALLOW:
            caller = dict(context.invocation_metadata()).get("x-forwarded-client-cert", "")
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[_header(RESULT, "allowed"), _header(RECEIVED, str(caller))]
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=[_header(RESULT, "denied")],
                body=DENIED_BODY,
            ),
        )


def main() -> None:
    rpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(), rpc)
    rpc.add_insecure_port(f"0.0.0.0:{GRPC_PORT}")
    rpc.start()
    web = ThreadingHTTPServer(("0.0.0.0", HTTP_PORT), Http)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=web.serve_forever, daemon=True).start()
    print("ext-authz serving", flush=True)
    stop.wait()
    web.shutdown()
    rpc.stop(1)


if __name__ == "__main__":
    main()
