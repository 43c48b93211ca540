"""The agent's own checks of a CNI ADD (issue #20, attack surface): its socket refuses
oversized fields and netns paths that are relative, unclean or symbolic links, naming the field,
before the capture manager sees the pod. No privileges: paths are files under tmp_path."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import inputs, wire
from nodeagent.cni.server import CniServer
from nodeagent.metrics import AgentMetrics
from nodeagent.redirect.netns import entered

OWN_NETNS = f"/proc/{os.getpid()}/ns/net"


def pod(netns: str, **fields: Any) -> dict[str, Any]:
    return {
        "namespace": "shop",
        "name": "web-1",
        "uid": "3f0c6a1e-5b7d-4c2a-9e8f-0a1b2c3d4e5f",
        "containerId": "c0ffee",
        "netns": netns,
        "ifname": "eth0",
        "ips": ["10.244.1.7"],
        "network": "k8s-pod-network",
        **fields,
    }


def test_a_namespace_file_and_the_kernels_proc_paths_are_accepted(tmp_path: Path) -> None:
    bind_mount = tmp_path / "cni-1234"
    bind_mount.touch()
    for netns in (str(bind_mount), OWN_NETNS, "/host/proc/42/ns/net", "/proc/7/task/8/ns/net"):
        assert inputs.add_problem(pod(netns)) == "", netns
    # A path that does not exist is the capture's to report (it says "does not exist").
    assert inputs.netns_problem(str(tmp_path / "gone")) == ""


@pytest.mark.parametrize(
    ("netns", "words"),
    [
        ("", "not an absolute path"),
        ("run/netns/pod", "not an absolute path"),
        ("/run/netns/../netns/pod", "not a canonical path"),
        ("//run/netns/pod", "not a canonical path"),
        ("/run/netns//pod", "not a canonical path"),
        ("/run/netns/pod/", "not a canonical path"),
        ("/proc/self/ns/net", "symbolic link"),
    ],
)
def test_relative_and_unclean_paths_are_refused(netns: str, words: str) -> None:
    problem = inputs.add_problem(pod(netns))
    assert problem.startswith("field 'netns'") and words in problem


def test_symbolic_links_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "pod-netns"
    link.symlink_to("/proc/1/ns/net")  # the node's namespace
    problem = inputs.netns_problem(str(link))
    assert "is a symbolic link (to /proc/1/ns/net)" in problem
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "pod").touch()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    problem = inputs.netns_problem(str(tmp_path / "linked" / "pod"))
    assert f"goes through a symbolic link (it is {tmp_path / 'real' / 'pod'})" in problem


@pytest.mark.parametrize(
    ("field", "limit"),
    [(field, limit) for field, limit in inputs.MAX_BYTES.items() if field != "netns"],
)
def test_each_field_is_bounded(field: str, limit: int) -> None:
    assert inputs.add_problem(pod(OWN_NETNS, **{field: "x" * limit})) == ""
    problem = inputs.add_problem(pod(OWN_NETNS, **{field: "x" * (limit + 1)}))
    assert problem == f"field {field!r} is {limit + 1} bytes long, more than {limit}"


def test_netns_length_types_and_ips_are_bounded() -> None:
    long = "/" + "n" * inputs.MAX_BYTES["netns"]
    assert "field 'netns' is 4096 bytes long" in inputs.add_problem(pod(long))
    assert "must be a string" in inputs.add_problem(pod(OWN_NETNS, name=["web"]))
    ips = [f"10.0.0.{i}" for i in range(inputs.MAX_IPS + 1)]
    assert "field 'ips'" in inputs.add_problem(pod(OWN_NETNS, ips=ips))


def test_entering_refuses_a_link_swapped_in_after_the_check(tmp_path: Path) -> None:
    """The capture opens the namespace without following a final link (O_NOFOLLOW), so a path
    checked as a file and replaced by a link to another namespace is not entered."""
    link = tmp_path / "pod-netns"
    link.symlink_to("/proc/1/ns/net")
    with pytest.raises(OSError) as raised, entered(link):
        pass
    assert raised.value.errno == errno.ELOOP and "symbolic link" in str(raised.value)


class RecordingManager:
    def __init__(self) -> None:
        self.added: list[dict[str, Any]] = []

    async def add(self, pod: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.added.append(pod)
        return {"ok": True, "state": "captured"}


def test_the_socket_refuses_before_the_manager_sees_the_pod(tmp_path: Path) -> None:
    link = tmp_path / "pod-netns"
    link.symlink_to("/proc/1/ns/net")

    async def scenario() -> list[dict[str, Any]]:
        manager = RecordingManager()
        server = CniServer(tmp_path / "run" / "cni.sock", manager, AgentMetrics())  # type: ignore[arg-type]
        await server.start()
        path = str(tmp_path / "run" / "cni.sock")
        try:
            answers = []
            for fields in (
                {"netns": str(link)},
                {"netns": "run/netns/pod"},
                {"netns": OWN_NETNS, "name": "p" * 254},
                {"netns": OWN_NETNS},
            ):
                message = {"command": "ADD", "pod": pod(**fields), "timeout": 5}
                answers.append(await asyncio.to_thread(wire.request, path, message, 5))
            # Beyond the socket's message bound: answered, not read into memory whole.
            huge = {"command": "ADD", "pod": pod(OWN_NETNS, pad="x" * wire.MAX_MESSAGE)}
            answers.append(await asyncio.to_thread(wire.request, path, huge, 5))
        finally:
            await server.stop()
        assert manager.added == [pod(OWN_NETNS)]
        return answers

    answers = asyncio.run(scenario())
    assert [a["ok"] for a in answers] == [False, False, False, True, False]
    assert "symbolic link" in answers[0]["reason"]
    assert "not an absolute path" in answers[1]["reason"]
    assert "field 'name' is 254 bytes long" in answers[2]["reason"]
    assert "malformed request" in answers[4]["reason"]
