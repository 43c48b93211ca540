"""A pod workload and client that show where a TCP connection really landed.

``serve PORT[@ADDR] ...``: listens on each port and answers every connection with one JSON line:
the listener's port, the peer, the connection's original destination (SO_ORIGINAL_DST) and its
local address (what Envoy's original_dst keeps when there is no SO_ORIGINAL_DST: sk_lookup steers
without NAT), so a client sees whether in-pod capture redirected it and what it had dialled.
``connect HOST PORT [--mark N]``: connects (optionally with SO_MARK; an IPv6 HOST from an
AF_INET6 socket) and prints that line, with the peer the app's own socket reports (``app_peer``).
``burst HOST FIRST_PORT COUNT SOURCE_PORT``: COUNT connections at once, the i-th to
FIRST_PORT+i from local port SOURCE_PORT+i; prints a JSON list of {dialled, answer or error}.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def original_dst(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return ""
    port, packed = struct.unpack_from("!2xH4s", raw)
    return f"{socket.inet_ntoa(packed)}:{port}"


def serve_one(addr: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(256)
    while True:
        conn, peer = sock.accept()
        with conn:
            line = {
                "pod": os.environ.get("POD_NAME", ""),
                "listener": port,
                "peer": f"{peer[0]}:{peer[1]}",
                "original_dst": original_dst(conn),
                "local": "{}:{}".format(*conn.getsockname()[:2]),
            }
            conn.sendall(json.dumps(line).encode() + b"\n")


def serve(specs: list[str]) -> None:
    threads = []
    for spec in specs:
        port, _, addr = spec.partition("@")
        t = threading.Thread(target=serve_one, args=(addr or "0.0.0.0", int(port)), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def connect(host: str, port: int, mark: int | None) -> None:
    # an IPv6 host (e.g. ::ffff:a.b.c.d, IPv4 on a dual-stack socket) gets an AF_INET6 socket
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.connect((host, port))
    line = json.loads(read_line(sock))
    line["app_peer"] = "{}:{}".format(*sock.getpeername()[:2])
    sys.stdout.write(json.dumps(line) + "\n")


def read_line(sock: socket.socket) -> bytes:
    """What the peer sends up to its first newline (or until it closes)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def burst(host: str, first_port: int, count: int, source_port: int) -> None:
    results: list[dict[str, object]] = [{} for _ in range(count)]
    ready = threading.Barrier(count)

    def one(i: int) -> None:
        dialled = f"{host}:{first_port + i}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.settimeout(20)
                sock.bind(("0.0.0.0", source_port + i))
                ready.wait(20)  # every socket bound, then all connect together
                sock.connect((host, first_port + i))
                data = read_line(sock)
            results[i] = {"dialled": dialled, "answer": json.loads(data)}
        except (OSError, ValueError, threading.BrokenBarrierError) as e:
            results[i] = {"dialled": dialled, "error": repr(e)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2:])
    elif sys.argv[1] == "burst":
        burst(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        mark = int(sys.argv[5], 0) if len(sys.argv) > 5 and sys.argv[4] == "--mark" else None
        connect(sys.argv[2], int(sys.argv[3]), mark)
