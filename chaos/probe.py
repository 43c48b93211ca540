"""The chaos checks' positive controls: what each witness must see, sent on purpose.

``python probe.py clear HOST PAYLOAD``: one UDP datagram holding PAYLOAD to HOST (port 9, discard),
in clear: the underlay capture must count it.
``python probe.py bypass HOST PORT TAG MARK``: one HTTP request for ``/chaos/TAG/0`` from a socket
carrying SO_MARK MARK (the node Envoy's own mark, which capture skips): it reaches the server
without the node Envoy, and the server must count it as a bypass. Stdlib only.
"""

from __future__ import annotations

import socket
import sys


def clear(host: str, payload: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload.encode(), (host, 9))


def bypass(host: str, port: int, tag: str, mark: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(5)
        sock.connect((host, port))
        request = f"GET /chaos/{tag}/0 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        answer = sock.recv(100)
    if not answer.startswith(b"HTTP/1.1 200"):
        sys.exit(f"bypass control: unexpected answer {answer!r}")


if __name__ == "__main__":
    if sys.argv[1] == "clear":
        clear(sys.argv[2], sys.argv[3])
    else:
        bypass(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
