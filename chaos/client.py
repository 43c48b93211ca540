"""The chaos load's client: steady HTTP and TCP requests, every one counted.

``python client.py HOST HTTP_PORT TCP_PORT TAG RATE SECONDS MARKER OUT STOPFILE`` inside a pod:
two paced loops (HTTP and TCP), RATE requests a second each, each request on a new connection
(so it meets the mesh as it is at that moment: a new mTLS handshake between the node Envoys,
never a connection pooled before a fault). Each request carries MARKER (an HTTP header, the TCP
payload): bytes a capture on the wire between the nodes must never see in clear under STRICT.

Stops after SECONDS or once STOPFILE exists (both bound every loop). One JSON line per request
to OUT as soon as it ends: ``proto``, ``seq``, ``t`` (wall clock when sent), ``ok``, ``error``.
Stdlib only: it runs in a pod's netns with the runner's interpreter.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

TIMEOUT = 2.0  # seconds per request: a refusal fails fast, a hang counts as a failure
_out = threading.Lock()


def http_one(host: str, port: int, tag: str, seq: int, marker: str) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(
            "GET", f"/chaos/{tag}/{seq}", headers={"Connection": "close", "x-chaos": marker}
        )
        response = conn.getresponse()
        body = response.read()
        return "" if response.status == 200 and body == b"ok\n" else f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as e:
        return repr(e)[:200]
    finally:
        conn.close()


def tcp_one(host: str, port: int, tag: str, seq: int, marker: str) -> str:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(f"CHAOS {tag} {seq} {marker}\n".encode())
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < 64:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
        return "" if answer == f"OK {seq}\n".encode() else f"answer {answer[:40]!r}"
    except OSError as e:
        return repr(e)[:200]


def loop(
    proto: str,
    one: Callable[[int], str],
    rate: float,
    seconds: float,
    stop: Path,
    sink: object,
) -> None:
    start = time.monotonic()
    due = start
    seq = 0
    while time.monotonic() - start < seconds and not stop.exists():
        # Paced; after a slow request the schedule moves on instead of bursting to catch up.
        due = max(due, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))
        due += 1 / rate
        sent = time.time()
        error = one(seq)
        line = {"proto": proto, "seq": seq, "t": sent, "ok": not error, "error": error}
        with _out:
            sink.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
        seq += 1


def main(argv: list[str]) -> None:
    host, http_port, tcp_port, tag, rate, seconds, marker, out, stop = argv
    stop_file = Path(stop)
    with Path(out).open("a", buffering=1) as sink:
        loops = [
            ("http", lambda s: http_one(host, int(http_port), tag, s, marker)),
            ("tcp", lambda s: tcp_one(host, int(tcp_port), tag, s, marker)),
        ]
        threads = [
            threading.Thread(target=loop, args=(p, f, float(rate), float(seconds), stop_file, sink))
            for p, f in loops
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


if __name__ == "__main__":
    main(sys.argv[1:])
