"""Many HTTP requests from inside a pod, tallied: which version answered, with which status.

``python route_tally.py URL COUNT [CONCURRENCY] [-H 'Name: value']...``: sends COUNT GETs to URL
(CONCURRENCY threads, each on its own keep-alive connection; a new connection after an error or
a ``Connection: close``), at most 60 s in all. Prints one JSON object: ``status`` (code ->
count, 0 for a transport error), ``version`` (the fake service's ``version`` -> count), ``slowest``
and ``fastest`` (seconds), ``sent``; with ``--timeline``, also ``timeline``: ``[sent, version]``
per request in the order answered (``sent``: wall clock, seconds since the epoch).

Stdlib only: it runs inside a pod's network namespace with the test's interpreter.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

DEADLINE = 60.0  # seconds for the whole run
TIMEOUT = 15.0  # per request: the slowest tests inject a 7 s delay


def main(argv: list[str]) -> None:
    headers: dict[str, str] = {}
    args: list[str] = []
    timeline: list[tuple[float, str]] | None = None
    it = iter(argv)
    for arg in it:
        if arg == "--timeline":
            timeline = []
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        else:
            args.append(arg)
    url, count = urlsplit(args[0]), min(int(args[1]), 5000)
    concurrency = min(int(args[2]) if len(args) > 2 else 1, 50)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    status: Counter[int] = Counter()
    version: Counter[str] = Counter()
    durations: list[float] = []
    lock = threading.Lock()
    left = [count]
    stop = time.monotonic() + DEADLINE

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < stop:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, TIMEOUT)
            started = time.monotonic()
            sent = time.time()
            code, answered = 0, ""
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                code = response.status
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                with contextlib.suppress(ValueError, AttributeError):
                    answered = str(json.loads(body).get("version", ""))
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            took = time.monotonic() - started
            with lock:
                status[code] += 1
                if answered:
                    version[answered] += 1
                durations.append(took)
                if timeline is not None:
                    timeline.append((sent, answered or str(code)))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary: dict[str, object] = {
        "status": {str(k): v for k, v in sorted(status.items())},
        "version": dict(sorted(version.items())),
        "slowest": max(durations, default=0.0),
        "fastest": min(durations, default=0.0),
        "sent": len(durations),
    }
    if timeline is not None:
        summary["timeline"] = timeline
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
