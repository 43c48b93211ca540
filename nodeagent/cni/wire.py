"""The plugin <-> agent protocol on the agent's root-only UNIX socket (standard library only).

One request per connection: a JSON object on one line, answered by one JSON object on one line.
Requests: ``{"command": "ADD"|"DEL"|"CHECK"|"GC"|"STATUS", ...}``; answers carry ``ok`` and, when
not ok, a ``reason`` meant for the person reading the CNI error.
"""

from __future__ import annotations

import json
import socket
from typing import Any

DEFAULT_SOCKET = "/run/nodeagent/cni.sock"
MAX_MESSAGE = 1 << 20


class AgentUnreachable(OSError):
    """The agent's socket could not be reached (not running, not yet started, wrong path)."""


class ProtocolError(ValueError):
    """A message that is not one JSON object on one line."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    except RecursionError:  # "[[[[...": the parser's stack, not a message
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    if b"\\u" in line:  # an escape may spell half a surrogate pair: no text, no pod name
        try:
            json.dumps(message, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ProtocolError("not JSON text: a string holds an unpaired surrogate") from None
    return message


def request(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send MESSAGE to the agent at PATH and wait up to TIMEOUT seconds for its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise AgentUnreachable(
                f"nodeagent is unreachable at {path}: {e.strerror or e}"
            ) from None
        sock.sendall(encode(message))
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"nodeagent at {path} closed the connection without answering")
            answer += chunk
            if len(answer) > MAX_MESSAGE:
                raise ProtocolError(f"answer from {path} exceeds {MAX_MESSAGE} bytes")
        return decode(answer)
    finally:
        sock.close()
