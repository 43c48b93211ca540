"""An agent upgrade whose bpf/ changes the layout of maps an older agent pinned (issue #18): the
new agent starts in eBPF mode, replaces those maps (and unpins one it no longer declares), and
the pod the older agent captured stays captured: re-verified, re-applied onto the new programs
and maps, its outbound still landing on its 127.0.0.1:15001 listener with the dialled
destination, its inbound on 15006.

The "older agent" is this agent run on a copy of bpf/ (NODEAGENT_BPF_DIR) that declares some maps
otherwise: origin_by_peer with other max_entries alone (the programs' code, and so their kernel
tags, which mask map references, stay the same: only the maps they use tell them apart), or a
field more in the origin value struct (both origin maps) and another max_entries for the
listeners sockhash (sk_lookup's, refilled with the pod's inbound listener).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent import ports
from nodeagent.redirect import bpf_sys
from nodeagent.redirect.ebpf import POD_LINKS, bpf_dir, netns_cookie
from nodeagent.redirect.ebpf_maps import listener_key
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import agent_pods, wait_for

pytestmark = pytest.mark.integration

PROBE = str(Path(__file__).with_name("capture_probe.py"))
PY = sys.executable
SERVE = [PY, PROBE, "serve", "15001@127.0.0.1", "15006", "8080"]
NAME = "tbupg"
TOPOLOGY = f"""
name: {NAME}
proxy: false  # the probe pod listens on 15001/15006 where Envoy would
captureMode: ebpf
nodes: [{{name: n1}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
  - {{name: plain}}
pods:
  - name: app
    namespace: mesh
    node: n1
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: client
    namespace: plain
    node: n1
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
"""
PEER, PEER_NOW = "lru_hash key 32 value {} max_entries {} flags 0x0", (20, 262144)
# older bpf/ -> (what its capture.h says instead, the replacements the agent then logs)
OLDER: dict[str, tuple[dict[str, str], list[str]]] = {
    "origin_by_peer-max_entries": (
        {"origin_by_peer, 262144, 0);": "origin_by_peer, 131072, 0);"},
        [f"origin_by_peer: {PEER.format(20, 131072)} -> {PEER.format(*PEER_NOW)}"],
    ),
    "origin-field-and-listeners": (
        {
            "__u16 v4;\n};": "__u16 v4;\n\t__u32 hops;\n};",
            "listeners, 65536, 0);": "listeners, 1024, 0);",
        },
        [
            "listeners: sockhash key 8 value 8 max_entries 1024 flags 0x0"
            " -> sockhash key 8 value 8 max_entries 65536 flags 0x0",
            "origin_by_cookie: lru_hash key 8 value 24 max_entries 65536 flags 0x0"
            " -> lru_hash key 8 value 20 max_entries 65536 flags 0x0",
            f"origin_by_peer: {PEER.format(24, 262144)} -> {PEER.format(*PEER_NOW)}",
        ],
    ),
}


def older_bpf(folder: Path, changes: dict[str, str]) -> Path:
    shutil.copytree(bpf_dir(), folder)
    header = (folder / "capture.h").read_text()
    for new, old in changes.items():
        assert header.count(new) == 1, new
        header = header.replace(new, old)
    (folder / "capture.h").write_text(header)
    return folder


@pytest.fixture(params=sorted(OLDER))
def older(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def testbed(older: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Testbed]:
    """A node whose agent runs the older bpf/ (the environment the testbed's daemons inherit)."""
    monkeypatch.setenv("NODEAGENT_BPF_DIR", str(older_bpf(tmp_path / "bpf", OLDER[older][0])))
    down(NAME)
    try:
        tb = Testbed.up(loads_topology(TOPOLOGY, "test_bpf_upgrade"), TOPOLOGY, "test_bpf_upgrade")
        wait_for(lambda: steered(tb), 5, "the app's inbound listener steered")
        yield tb
    finally:
        down(NAME)


def pins(tb: Testbed) -> Path:
    return layout.bpf_dir(tb.name, "n1")


def map_layout(tb: Testbed, name: str) -> bpf_sys.MapLayout:
    with bpf_sys.pinned(str(pins(tb) / "maps" / name)) as fd:
        return bpf_sys.map_info(fd).layout


def steered(tb: Testbed) -> bool:
    cookie = netns_cookie(Path("/run/netns") / tb.pod_netns("mesh/app"))
    with bpf_sys.pinned(str(pins(tb) / "maps" / "listeners")) as fd:
        return bpf_sys.map_lookup(fd, listener_key(cookie), 8) is not None


def landed(tb: Testbed, pod: str, host: str, port: int) -> dict[str, Any]:
    proc = tb.exec(pod, [PY, PROBE, "connect", host, str(port)])
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def assert_captured(tb: Testbed) -> None:
    for host, port in [("10.96.0.99", 80), ("192.0.2.10", 443)]:
        answer = landed(tb, "mesh/app", host, port)
        assert (answer["pod"], answer["listener"]) == ("app", ports.OUTBOUND_PORT), answer
        assert answer["original_dst"] == f"{host}:{port}", answer
    app_ip = tb.pod_ip("mesh/app")
    inbound = landed(tb, "plain/client", app_ip, 8080)
    assert (inbound["pod"], inbound["listener"]) == ("app", ports.INBOUND_PORT), inbound
    assert inbound["original_dst"] == f"{app_ip}:8080", inbound


def link_programs(tb: Testbed) -> dict[str, int]:
    """The program id each of the app's links runs."""
    folder = pins(tb) / "pods" / tb.state.pods["mesh/app"].uid
    found = {}
    for hook in POD_LINKS:
        with bpf_sys.pinned(str(folder / hook)) as link:
            found[hook] = bpf_sys.link_info(link).prog_id
    return found


def pinned_programs(tb: Testbed) -> dict[str, int]:
    found = {}
    for hook in POD_LINKS:
        with bpf_sys.pinned(str(pins(tb) / "progs" / hook)) as prog:
            found[hook] = bpf_sys.prog_info(prog).id
    return found


def test_an_upgrade_replacing_pinned_maps_keeps_the_pod_captured(
    testbed: Testbed, older: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    replaced = OLDER[older][1]
    assert [str(map_layout(testbed, c.split(":")[0])) for c in replaced] == [
        c.split(": ")[1].split(" -> ")[0] for c in replaced
    ]
    assert_captured(testbed)
    older_programs = link_programs(testbed)
    assert older_programs == pinned_programs(testbed)
    # A map the older bpf/ declared and this one does not.
    with bpf_sys.pinned(str(pins(testbed) / "maps" / "pods")) as fd:
        bpf_sys.obj_pin(fd, str(pins(testbed) / "maps" / "retired"))
    log = layout.logs_dir(testbed.name) / "n1.agent.log"
    before = len(log.read_bytes())

    monkeypatch.delenv("NODEAGENT_BPF_DIR")  # the upgrade: this agent's own bpf/
    testbed.restart_agent("n1")

    said = log.read_bytes()[before:].decode(errors="replace")
    assert "capture mode ebpf: eBPF" in said, said[-3000:]
    logged = re.findall(r"pinned map replaced, its layout changed: ([^\"]+)", said)
    assert sorted(logged) == replaced, said[-3000:]
    assert [str(map_layout(testbed, c.split(":")[0])) for c in replaced] == [
        c.split(" -> ")[1] for c in replaced
    ]
    assert "pinned map retired removed" in said
    assert not (pins(testbed) / "maps" / "retired").exists()
    assert_captured(testbed)
    # re-verified at start: its links ran on the older maps, so it was re-applied onto this
    # agent's programs
    record = agent_pods(testbed.name, "n1")["mesh/app"]
    assert record["state"] == "captured" and "repaired" in record["reason"], record
    new = link_programs(testbed)
    assert new == pinned_programs(testbed) and not set(new.values()) & set(older_programs.values())
    if older == "origin_by_peer-max_entries":  # the maps alone told
        assert "on other maps than this agent's" in record["reason"], record
    assert steered(testbed)
    # and a restart without a change replaces nothing and re-applies nothing
    before = len(log.read_bytes())
    testbed.restart_agent("n1")
    said = log.read_bytes()[before:].decode(errors="replace")
    assert "'maps_replaced': []" in said and "pinned map replaced" not in said
    assert "'repaired': 0" in said, said[-3000:]
    assert link_programs(testbed) == new
    assert_captured(testbed)
