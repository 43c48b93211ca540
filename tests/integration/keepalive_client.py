"""One long-lived HTTP/1.1 connection, used for SECONDS: does it survive config changes?
With ``fresh`` as 4th argument, a new connection per request instead (a handshake each time).

Prints a JSON summary: requests sent, failures, the local ports used (one port = one connection
all along) and which pods answered. Says "answered" on stderr at the first answer, so a test
knows the connection is up (``helpers.first_answer``).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections import Counter


def main(host: str, port: int, seconds: float, fresh: bool = False) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    answered: Counter[str] = Counter()
    ports: set[int] = set()
    failures: list[str] = []
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        sent += 1
        try:
            conn.request("GET", "/keepalive")
            response = conn.getresponse()
            raw = response.read()
            if response.status != 200:
                failures.append(f"{time.monotonic() - start:.2f}s: {response.status} {raw[:120]!r}")
                continue
            if not answered:
                print("answered", file=sys.stderr, flush=True)
            answered[str(json.loads(raw).get("pod_ip"))] += 1
            if conn.sock is not None:
                ports.add(conn.sock.getsockname()[1])
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(repr(e))
            conn.close()
        if fresh:
            conn.close()
        time.sleep(0.05)  # pacing: about 20 requests a second
    print(
        json.dumps(
            {"sent": sent, "failures": failures, "ports": sorted(ports), "answered": dict(answered)}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:] == ["fresh"])
