"""The testbed's netlink steps, checked against the kernel with iproute2 (root only).

Two namespaces the test makes, wired as the testbed wires a node to its underlay: a bridge with an
address in one, a veth pair born split between them, an address and a route in the other. Traffic
goes only between those two namespaces.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.redirect.netns import entered
from nodeagent.testbed import netlink, netns
from tests.integration.helpers import root_netns_snapshot

pytestmark = pytest.mark.integration


def ip_json(ns: str, *args: str) -> Any:
    proc = subprocess.run(
        ["ip", "-n", ns, "-j", *args], capture_output=True, text=True, check=True, timeout=10
    )
    return json.loads(proc.stdout or "[]")


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    names = (f"nltest-{tag}-a", f"nltest-{tag}-b")
    try:
        yield names
    finally:
        for name in names:
            if netns.exists(name):
                subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def test_namespaces_links_addresses_and_routes_as_iproute2_would_make_them(
    two_netns: tuple[str, str],
) -> None:
    before = root_netns_snapshot()
    root_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    thread_netns = os.readlink("/proc/thread-self/ns/net")
    hub, host = two_netns
    netlink.create_netns(hub)
    netlink.create_netns(host)
    with netlink.session(hub) as nl:
        nl.add_bridge("br0")
        nl.up("br0")
        nl.add_address("br0", "10.251.0.1/24")
        nl.add_veth("ul-1", peer="ul0", peer_netns=host)
        nl.enslave("ul-1", "br0")
    with netlink.session(host) as nl:
        nl.add_address("ul0", "10.251.0.2/24")
        nl.up("ul0")
        nl.add_route("10.252.0.0/24", "10.251.0.1")
    netlink.sysctl(host, {"net.ipv4.ip_forward": "1"})

    # Visible to iproute2 (and so to the CNI plugins) under their names.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert hub in listed.stdout and host in listed.stdout
    links = {link["ifname"]: link for link in ip_json(hub, "link", "show")}
    assert "UP" in links["lo"]["flags"]
    assert links["ul-1"]["master"] == "br0" and "UP" in links["ul-1"]["flags"]
    addresses = {
        (a["ifname"], f"{i['local']}/{i['prefixlen']}")
        for a in ip_json(host, "addr", "show")
        for i in a["addr_info"]
        if i["family"] == "inet"
    }
    assert addresses == {("lo", "127.0.0.1/8"), ("ul0", "10.251.0.2/24")}
    routes = ip_json(host, "route", "show", "10.252.0.0/24")
    assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [
        ("10.252.0.0/24", "10.251.0.1", "ul0")
    ]
    sysctl = ["ip", "netns", "exec", host, "sysctl", "-n", "net.ipv4.ip_forward"]
    assert subprocess.run(sysctl, capture_output=True, text=True).stdout.strip() == "1"

    # The wire carries a TCP connection from the host to the bridge's address.
    with entered(netns.netns_path(hub)):
        server = socket.create_server(("10.251.0.1", 0))
    with entered(netns.netns_path(host)):
        client = socket.socket()
    with server, client:
        client.settimeout(5)
        client.connect(server.getsockname())
        peer, (source, _) = server.accept()
        peer.close()
    assert source == "10.251.0.2"

    # The caller never left its namespace, and the root namespace is untouched.
    assert os.readlink("/proc/thread-self/ns/net") == thread_netns
    assert root_netns_snapshot() == before
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == root_forwarding

    netlink.remove_netns(host)
    assert not netns.exists(host)
    # Once the kernel has dismantled it (asynchronously), the pair went along: nothing in the
    # process still holds the namespace.
    assert _wait_for(lambda: [x["ifname"] for x in ip_json(hub, "link", "show")] == ["lo", "br0"])


def test_a_failed_step_names_the_namespace_and_leaves_it_as_it_was(
    two_netns: tuple[str, str],
) -> None:
    hub, _ = two_netns
    netlink.create_netns(hub)
    missing = pytest.raises(netlink.NetlinkFailure, match=f"{hub}: no link 'br0'")
    with missing, netlink.session(hub) as nl:
        nl.add_address("br0", "10.251.0.1/24")
    with pytest.raises(netlink.NetlinkFailure, match=f"{hub}: already exists"):
        netlink.create_netns(hub)
    gone = pytest.raises(netlink.NetlinkFailure, match="does not exist")
    with gone, netlink.session(f"{hub}-missing"):
        pass
    assert [link["ifname"] for link in ip_json(hub, "link", "show")] == ["lo"]


def test_processes_in_a_namespace_are_found_from_proc(two_netns: tuple[str, str]) -> None:
    hub, _ = two_netns
    netlink.create_netns(hub)
    proc = subprocess.Popen(["ip", "netns", "exec", hub, "sleep", "30"])
    try:
        # `ip netns exec` execs sleep in place: the same pid, once it has entered the namespace.
        assert _wait_for(lambda: proc.pid in netns.pids_in(hub))
        listed = subprocess.run(
            ["ip", "netns", "pids", hub], capture_output=True, text=True, check=True
        )
        assert netns.pids_in(hub) == [int(p) for p in listed.stdout.split()] == [proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert netns.pids_in(hub) == []


def _wait_for(condition: Any, deadline: float = 5.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False
