"""What a process inside a pod can reach (issue #20, attack surface): run as any user, in a pod's
network namespace, by the system's python3 with the standard library only (test_attack_surface
passes this file's text with ``-c``, so an unprivileged user needs no access to the checkout).

    connect HOST PORT [mark] [source=IP]   one TCP connect: did the mark stick, was it accepted
    http HOST PORT [mark] PATH...          HTTP/1.1 requests (POST:/x posts): status line, body
    unix PATH...                           connect to each UNIX socket path
    netns                                  this netns's UNIX sockets (abstract ones start with @)
    procs                                  the process ids this process can see

Prints one JSON object. Every operation is bounded by TIMEOUT.
"""

import base64
import errno
import json
import os
import socket
import sys
import time

TIMEOUT = 2.0
MESH_MARK = 0x539  # nodeagent/ports.py MESH_MARK: capture skips packets carrying it


def error_name(e: OSError) -> str:
    if isinstance(e, TimeoutError) or e.errno is None:
        return "timeout"
    return errno.errorcode.get(e.errno, str(e.errno))


def tcp_connect(host, port, mark=False, source=""):
    out = {"mark": "-"}
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    try:
        if mark:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MESH_MARK)
                out["mark"] = "set"
            except OSError as e:
                out["mark"] = error_name(e)
        if source:
            sock.bind((source, 0))
        try:
            sock.connect((host, int(port)))
            out["connect"] = "accepted"
        except ConnectionRefusedError:
            out["connect"] = "refused"
        except OSError as e:
            out["connect"] = error_name(e)
    finally:
        sock.close()
    return out


def complete(data):
    """Whether DATA holds a whole response with a Content-Length (Envoy delays its close)."""
    head, found, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if found else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def http(host, port, path, post=False, mark=False):
    method = "POST" if post else "GET"
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    )
    data = b""
    try:
        with socket.socket() as sock:
            sock.settimeout(TIMEOUT)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MESH_MARK)
            sock.connect((host, int(port)))
            sock.sendall(request.encode())
            while len(data) < (4 << 20) and not complete(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return {"status": "", "error": error_name(e), "body": base64.b64encode(data).decode()}
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    return {"status": status, "body": base64.b64encode(body).decode()}


def unix(paths):
    out = {}
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
            out[path] = "connected"
        except OSError as e:
            out[path] = error_name(e)
        finally:
            sock.close()
    return out


def netns_unix_sockets():
    """/proc/net/unix lists the UNIX sockets of the reader's network namespace only."""
    with open("/proc/net/unix") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return {"sockets": len(rows), "named": sorted({row[7] for row in rows if len(row) > 7})}


def main(argv):
    command, args = argv[0], argv[1:]
    if command == "connect":
        flags = dict(a.split("=", 1) if "=" in a else (a, "1") for a in args[2:])
        result = tcp_connect(args[0], args[1], "mark" in flags, flags.get("source", ""))
    elif command == "http":
        answers = {}
        mark = args[2:3] == ["mark"]
        for path in args[2 + mark :]:
            post = path.startswith("POST:")
            started = time.monotonic()
            answers[path] = http(args[0], args[1], path.removeprefix("POST:"), post, mark)
            answers[path]["seconds"] = round(time.monotonic() - started, 3)
        result = {"answers": answers}
    elif command == "unix":
        result = unix(args)
    elif command == "netns":
        result = netns_unix_sockets()
    elif command == "procs":
        result = {"pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
    else:
        raise SystemExit(f"unknown command {command!r}")
    result["uid"] = os.getuid()
    print(json.dumps(result))


main(sys.argv[1:])
