"""Steady traffic at a bounded rate, every request recorded: does the mesh keep serving?

``python steady_client.py HOST PORT TAG RATE SECONDS OUT STOPFILE``: sends ``GET /steady/TAG/SEQ``
to HOST:PORT RATE times a second, each on a new connection (``Connection: close``), so behind a
TCP service port every request is a new mTLS handshake between the node Envoys: it sees the
certificates and trust bundles of that moment, never a connection pooled before a change.
Stops after SECONDS or once STOPFILE exists. Appends one JSON line per request to OUT as soon as
it is answered (the test reads it while it runs): ``seq``, ``t`` (wall clock, seconds since the
epoch, when sent), ``ok`` (HTTP 200 from the application), ``status`` and ``error``.

Stdlib only: it runs inside a pod's network namespace with the test's interpreter.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

TIMEOUT = 2.0  # seconds per request: a handshake the mesh refuses fails fast, a hang is a failure


def one(host: str, port: int, path: str) -> tuple[int | None, str]:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status, ""
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)[:200]
    finally:
        conn.close()


def main(
    host: str, port: int, tag: str, rate: float, seconds: float, out: Path, stop: Path
) -> None:
    start = time.monotonic()
    due = start
    seq = 0
    with out.open("a", buffering=1) as sink:
        while time.monotonic() - start < seconds and not stop.exists():
            # Paced; after a slow request the schedule moves on instead of bursting to catch up.
            due = max(due, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
            due += 1 / rate
            sent = time.time()
            status, error = one(host, port, f"/steady/{tag}/{seq}")
            line = {"seq": seq, "t": sent, "ok": status == 200, "status": status, "error": error}
            sink.write(json.dumps(line) + "\n")
            seq += 1


if __name__ == "__main__":
    h, p, tag, rate, seconds, out, stop = sys.argv[1:8]
    main(h, int(p), tag, float(rate), float(seconds), Path(out), Path(stop))
