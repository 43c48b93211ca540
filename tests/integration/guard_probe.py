"""Pod workloads and clients for the Envoy guard tests (tests/integration/test_envoy_guards.py).

``tls-serve PORT CERT KEY``: an app that speaks TLS itself (its own certificate) and echoes
every line it reads, as a TLS server app in a pod would.
``tls-call HOST PORT CAFILE PAYLOAD``: a TLS client trusting only CAFILE; prints one JSON line:
ok, the echo, the SHA-256 of the certificate the server presented, or the error.
``connect HOST PORT``: dials and waits (bounded) for the connection to end; prints one JSON line
with how it ended (refused, closed, reset, timeout, data) and how long that took.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys
import threading
import time

TIMEOUT = 5.0


def tls_serve(port: int, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)

    def echo(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                while data := tls.recv(4096):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass  # a client that is not ours (or a probe): nothing to echo

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def tls_call(host: str, port: int, cafile: str, payload: str) -> dict[str, object]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile)
    try:
        raw = socket.create_connection((host, port), timeout=TIMEOUT)
        with raw, context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True) or b""
            tls.sendall(payload.encode() + b"\n")
            echo = b""
            while not echo.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                echo += chunk
        return {"ok": True, "echo": echo.decode().strip(), "peer": hashlib.sha256(der).hexdigest()}
    except (OSError, ssl.SSLError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def connect(host: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect((host, port))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = sock.recv(4096)
        result = "data" if data else "closed"
    except ConnectionRefusedError:
        result = "refused"
    except ConnectionResetError:
        result = "reset"
    except TimeoutError:
        result = "timeout"
    except OSError as e:
        result = f"error: {e}"
    finally:
        sock.close()
    return {"result": result, "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "tls-serve":
        tls_serve(int(args[0]), args[1], args[2])
    elif command == "tls-call":
        print(json.dumps(tls_call(args[0], int(args[1]), args[2], args[3])))
    elif command == "connect":
        print(json.dumps(connect(args[0], int(args[1]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
