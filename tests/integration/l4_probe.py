"""Pod workloads and clients for the TCP/TLS route tests (tests/integration/test_tcp_tls_routes.py).

``serve-tcp PORT VERSION``: a server-first TCP app: on each connection it sends ``VERSION\\n``
and closes (a client never speaks first, as with MySQL or SMTP).
``serve-tls PORT CERT KEY VERSION``: a TLS app with its own certificate: after the handshake it
sends ``VERSION\\n`` and closes.
After its version, the TCP app echoes each line the client sends, until the client closes (or
is silent for IDLE seconds): a client may hold the connection (``hold-tcp``).
``call-tcp HOST PORT COUNT`` / ``call-tls HOST PORT SNI COUNT``: COUNT connections, one after
the other (each at most 5 s, all at most 30 s); prints one JSON line: ``versions`` (answer ->
count) and ``errors`` (the first few). The TLS client sends SNI and does not verify the app's
certificate: the route, not the app's identity, is under test.
``call-tls-until HOST PORT SNI STOPFILE SECONDS``: as call-tls, until STOPFILE exists (at most
SECONDS).
``hold-tcp HOST PORT STOPFILE SECONDS``: ONE connection, held: reads the version, says
``connected`` on stderr, then sends a numbered line every 0.1 s and reads its echo, until
STOPFILE exists (or SECONDS passed, or the connection broke); prints one JSON line:
``version``, ``echoes`` (lines echoed back) and ``error`` (what broke it, "" if nothing).

Stdlib only: it runs inside a pod's network namespace with the test's interpreter.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
import time
from collections import Counter

TIMEOUT = 5.0
DEADLINE = 30.0
IDLE = 60.0  # a held connection's silence the TCP app waits out


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    return sock


def serve(port: int, version: str, context: ssl.SSLContext | None) -> None:
    sock = _listen(port)

    def answer(conn: socket.socket) -> None:
        try:
            conn.settimeout(TIMEOUT)
            if context is None:
                with conn:
                    conn.sendall(version.encode() + b"\n")
                    conn.settimeout(IDLE)
                    while data := conn.recv(4096):
                        conn.sendall(data)
                return
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(version.encode() + b"\n")
        except (OSError, ssl.SSLError):
            pass  # a client that went away (or a probe): nothing to answer

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def call(
    host: str, port: int, count: int, sni: str | None, stop: str = "", deadline: float = DEADLINE
) -> dict[str, object]:
    versions: Counter[str] = Counter()
    errors: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    start = time.monotonic()
    for _ in range(count):
        if stop and os.path.exists(stop):
            break
        if time.monotonic() - start > deadline:
            errors.append("deadline")
            break
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
                if sni is None:
                    answer = _read_line(raw)
                else:
                    with context.wrap_socket(raw, server_hostname=sni) as tls:
                        answer = _read_line(tls)
            versions[answer or "<closed>"] += 1
        except (OSError, ssl.SSLError) as e:
            versions["<error>"] += 1
            if len(errors) < 3:
                errors.append(f"{type(e).__name__}: {e}")
    return {"versions": dict(versions), "errors": errors}


def hold(host: str, port: int, stop: str, seconds: float) -> dict[str, object]:
    echoes, error, version = 0, "", ""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")
            version = reader.readline().decode().strip()
            print("connected", file=sys.stderr, flush=True)
            while not os.path.exists(stop) and time.monotonic() - start < seconds:
                line = f"ping {echoes}\n".encode()
                sock.sendall(line)
                answer = reader.readline()
                if answer != line:
                    error = f"after {echoes} echoes: got {answer!r}"
                    break
                echoes += 1
                time.sleep(0.1)
    except OSError as e:
        error = f"after {echoes} echoes: {type(e).__name__}: {e}"
    return {"version": version, "echoes": echoes, "error": error}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "serve-tcp":
        serve(int(args[0]), args[1], None)
    elif command == "serve-tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args[1], args[2])
        serve(int(args[0]), args[3], context)
    elif command == "call-tcp":
        print(json.dumps(call(args[0], int(args[1]), min(int(args[2]), 200), None)))
    elif command == "hold-tcp":
        print(json.dumps(hold(args[0], int(args[1]), args[2], float(args[3]))))
    elif command == "call-tls":
        print(json.dumps(call(args[0], int(args[1]), min(int(args[3]), 200), args[2])))
    elif command == "call-tls-until":
        print(json.dumps(call(args[0], int(args[1]), 20000, args[2], args[3], float(args[4]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
