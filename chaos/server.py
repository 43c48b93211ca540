"""The chaos load's server: HTTP and TCP, every request it receives logged with who delivered it.

``python server.py HTTP_PORT TCP_PORT`` inside a pod (a testbed ``command`` workload; POD_IP from
its environment, as the downward API gives it). Stdlib only.

The node Envoy delivers every inbound connection from inside the pod's own netns (its upstream
socket is bound there, source address 0.0.0.0): the kernel picks the pod's own address as
source. Any other source address is a peer that reached the application
directly, past the node Envoy: a bypass. HTTP ports also carry x-forwarded-client-cert, which
only the node Envoy sets (from the mTLS peer, or the caller it stamped on the same-node path).

Each request is one JSON line on stdout (the pod's log): ``proto``, ``tag``, ``seq``, ``peer``,
``xfcc`` (HTTP), ``via_mesh``.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import sys
import threading

OWN = os.environ.get("POD_IP", "")
_out = threading.Lock()


def record(proto: str, tag: str, seq: str, peer: str, xfcc: bool | None) -> None:
    via_mesh = peer == OWN and xfcc is not False
    line = {"proto": proto, "tag": tag, "seq": seq, "peer": peer, "own": OWN, "xfcc": xfcc}
    line["via_mesh"] = via_mesh
    with _out:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "chaos":
            xfcc = bool(self.headers.get("x-forwarded-client-cert"))
            record("http", parts[1], parts[2], self.client_address[0], xfcc)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request already, in record()


class Tcp(socketserver.StreamRequestHandler):
    """``CHAOS <tag> <seq> <marker>\\n`` in, ``OK <seq>\\n`` out, then the connection closes."""

    timeout = 5

    def handle(self) -> None:
        try:
            line = self.rfile.readline(512).decode(errors="replace").split()
        except OSError:
            return
        if len(line) < 3 or line[0] != "CHAOS":
            return
        record("tcp", line[1], line[2], self.client_address[0], None)
        self.wfile.write(f"OK {line[2]}\n".encode())


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET


def main(http_port: int, tcp_port: int) -> None:
    tcp = Threaded(("0.0.0.0", tcp_port), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    web = Threaded(("0.0.0.0", http_port), Http)
    web.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
