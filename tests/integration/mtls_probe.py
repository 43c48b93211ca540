"""One mTLS handshake with a mesh server, as a peer Envoy makes it: does it accept our certificate?

``python mtls_probe.py HOST PORT CHAIN KEY CAFILE``: connects to HOST:PORT offering Istio's ALPN
(without it a PERMISSIVE port passes TLS through to the application), presents CHAIN/KEY (PEM
files), verifies the server's chain against CAFILE (no host name: mesh certificates carry a
SPIFFE URI only), then sends one HTTP/1.1 request through the tunnel. Prints JSON:
``status`` (the application's HTTP status, or null when the exchange failed) and ``error``.

With TLS 1.3 a server that refuses the client's certificate says so after the client's side of
the handshake completed: only the answer (or the alert instead of it) tells.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

TIMEOUT = 5.0


def main(host: str, port: int, chain: str, key: str, cafile: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile)
    context.load_cert_chain(chain, key)
    context.set_alpn_protocols(["istio-peer-exchange", "istio"])
    status: int | None = None
    error = ""
    try:
        with (
            socket.create_connection((host, port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /probe HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        head = answer.split(b"\r\n", 1)[0].split()
        if len(head) >= 2 and head[1].isdigit():
            status = int(head[1])
        else:
            error = f"no HTTP answer: {answer[:80]!r}"
    except (OSError, ssl.SSLError) as e:
        error = repr(e)[:300]
    print(json.dumps({"status": status, "error": error}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:6])
