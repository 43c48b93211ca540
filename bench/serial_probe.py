"""Which certificate a TLS server presents, over time.

Usage: python serial_probe.py HOST PORT SECONDS INTERVAL

Run inside a pod outside the mesh. Every INTERVAL seconds it opens a fresh TCP connection to
HOST:PORT, does a TLS handshake (no certificate of its own, verifying nothing: it only reads the
server's leaf; it offers Istio's ALPN so the node Envoy's mTLS chain answers) and closes. It
prints one JSON line each time the leaf's serial changes:
``{"t": <Unix time the handshake completed>, "serial": "<hex>"}``, and at the end
``{"done": true, "handshakes": N, "errors": N, "last_error": "..."}``. Stops after SECONDS, or
at once on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import time
from types import FrameType

from cryptography import x509


def main() -> int:
    host, port, seconds, interval = (
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]),
        float(sys.argv[4]),
    )
    stopping = False

    def stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # Istio's ALPN, as a mesh client offers it: other TLS on a PERMISSIVE port is the app's own
    # and passes through to the app (Istio's inbound filter chain match).
    context.set_alpn_protocols(["istio-peer-exchange", "istio"])
    last, handshakes, errors, last_error = "", 0, 0, ""
    deadline = time.monotonic() + seconds
    while not stopping and time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with (
                socket.create_connection((host, port), timeout=2) as raw,
                context.wrap_socket(raw, do_handshake_on_connect=True) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                done = time.time()
            if der is None:
                raise ssl.SSLError("no peer certificate")
            serial = f"{x509.load_der_x509_certificate(der).serial_number:x}"
            handshakes += 1
            if serial != last:
                print(json.dumps({"t": done, "serial": serial}), flush=True)
                last = serial
        except (OSError, ValueError) as e:
            errors += 1
            last_error = f"{type(e).__name__}: {e}"
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    print(
        json.dumps(
            {"done": True, "handshakes": handshakes, "errors": errors, "last_error": last_error}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
