"""Fuzzing the agent's CNI socket (nodeagent/cni/server.py, wire.py) with what a plugin, or
anything else on the node, may write to it.

Each example opens connections to a running CniServer (a real CaptureManager with a recording
backend, as in test_capture_manager) and writes one frame on each: random bytes, JSON that is no
object, requests with fields of other types, lines beyond the 1 MiB limit, deep nesting, bytes
that are not UTF-8. Property: every connection gets one JSON answer with ``ok`` and, when not ok,
a reason (``malformed request: ...`` for a frame that is no JSON object); no request ends in the
server's "internal error" path; a valid STATUS request is served right after. Budget: see
fuzzing.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fuzzing import budget, json_values
from hypothesis import example, given
from hypothesis import strategies as st
from test_capture_manager import Node

from nodeagent.cni import wire
from nodeagent.cni.server import CniServer
from nodeagent.mesh.model import Pod

JSON_VALUES = json_values(max_leaves=10)
COMMANDS = ["ADD", "DEL", "CHECK", "GC", "STATUS", "PROXY_STATUS"]


@st.composite
def request(draw: st.DrawFn) -> dict[str, Any]:
    pod = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "namespace": st.sampled_from(["shop", "plain", "kube-system"]) | JSON_VALUES,
                "name": st.sampled_from(["web", "db"]) | JSON_VALUES,
                "uid": JSON_VALUES,
                "containerId": st.just("c0ffee") | JSON_VALUES,
                "netns": st.sampled_from(["NETNS", "relative/netns", "/proc/self/ns/net"])
                | JSON_VALUES,
                "ips": st.lists(st.sampled_from(["10.244.1.7", "fd00::7", "x"]) | JSON_VALUES)
                | JSON_VALUES,
                "network": JSON_VALUES,
            },
        )
    )
    return draw(
        st.fixed_dictionaries(
            {"command": st.sampled_from(COMMANDS) | JSON_VALUES},
            optional={
                "pod": st.just(pod) | JSON_VALUES,
                "timeout": st.sampled_from([0.5, 1]) | JSON_VALUES,
                "validContainerIds": st.lists(st.text(max_size=5) | JSON_VALUES) | JSON_VALUES,
                "network": JSON_VALUES,
            },
        )
    )


HUGE = b'{"command": "ADD", "x": "' + b"a" * (wire.MAX_MESSAGE + 10) + b'"}\n'
DEEP = b"[" * 100_000 + b"]" * 100_000 + b"\n"
FRAMES = (
    st.builds(lambda r: json.dumps(r).encode() + b"\n", request())
    | st.binary(max_size=100)
    | st.sampled_from([HUGE, DEEP, b'{"command": "\xff"}\n', b"\n", b"", b"{}\n", b"null\n"])
    | st.builds(lambda v: json.dumps(v).encode() + b"\n", JSON_VALUES)
)


def _half_pair(frame: bytes) -> bool:
    """Whether FRAME's first line is JSON whose strings hold half a surrogate pair."""
    try:
        json.dumps(json.loads(frame.split(b"\n", 1)[0]), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def _is_object(frame: bytes) -> bool:
    """Whether FRAME's first line is one JSON object (what wire.decode takes)."""
    line = frame.split(b"\n", 1)[0]
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


async def _exchange(path: str, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path, limit=2 * wire.MAX_MESSAGE)
    try:
        writer.write(frame)
        writer.write_eof()  # the plugin's end: nothing more comes on this connection
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()


# Defects found: a deeply nested frame raised RecursionError out of wire.decode, answered as an
# "internal error" with a traceback in the log; the unpaired surrogate (found in the directory
# source's fuzzing) reached the capture manager as a pod name.
@budget(200)
@example(frames=[DEEP])
@example(
    frames=[
        b'{"command": "ADD", "timeout": 1, "pod": {"namespace": "shop", "name": "web", '
        b'"containerId": "c0ffee", "netns": "relative/netns", "ips": ["10.244.1.7"]}}\n'
    ]
)
@example(frames=[b'{"command": "DEL", "pod": {}, "network": {"\\ud800\\udc00": null}}\n'])
@example(frames=[b'{"command": "DEL", "pod": {"namespace": "shop", "name": "\\ud800"}}\n'])
@given(frames=st.lists(FRAMES, min_size=1, max_size=3))
def test_any_frame_gets_an_answer_and_the_server_keeps_serving(
    tmp_path: Path, frames: list[bytes]
) -> None:
    async def scenario(node: Node) -> None:
        node.manager.pod_wait = 0.01
        node.store.put_pod(Pod("shop", "web", pod_ips=("10.244.1.7",)))
        node.store.put_pod(Pod("plain", "db"))
        netns = node.netns("web")
        node.addresses[Path(netns)] = {"10.244.1.7"}
        # Were a relative path taken, it would name a namespace holding the pod's IP.
        node.addresses[Path("relative/netns")] = {"10.244.1.7"}
        server = CniServer(tmp_path / "run" / "cni.sock", node.manager, node.metrics)
        await server.start()
        server.ready = True
        path = str(server.path)
        try:
            for frame in frames:
                frame = frame.replace(b"NETNS", netns.encode())
                answer = await _exchange(path, frame)
                assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer[:300]
                decoded = wire.decode(answer)
                assert isinstance(decoded.get("ok"), bool), decoded
                if b'"netns": "relative/netns"' in frame and b'"command": "ADD"' in frame:
                    assert decoded["ok"] is False, decoded  # resolved in the agent's cwd
                if _half_pair(frame):  # half a surrogate pair names no pod
                    assert decoded["ok"] is False, decoded
                if not decoded["ok"]:
                    reason = decoded.get("reason")
                    assert isinstance(reason, str) and reason, decoded
                    assert not reason.startswith("internal error"), decoded
                    if not _is_object(frame) or _half_pair(frame):
                        assert reason.startswith("malformed request: "), decoded
            status = wire.decode(await _exchange(path, wire.encode({"command": "STATUS"})))
            assert status["ok"] is True and isinstance(status["pods"], list), status
        finally:
            await server.stop()

    node_dir = tmp_path / f"node-{len(list(tmp_path.iterdir()))}"  # a fresh node per example
    node_dir.mkdir()
    asyncio.run(scenario(Node(node_dir)))
