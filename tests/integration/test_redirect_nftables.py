"""nftables capture in a real pod network namespace: where connections land, and verify/remove.

Each test wires a "pod" netns to a "peer" netns with a veth pair (10.250.x.0/24, no other route),
runs listeners inside them and dials across, as a user of the mesh would see it.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import queue
import random
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodeagent.redirect import netns as netns_module
from nodeagent.redirect.capture import CaptureSpec, Network
from nodeagent.redirect.host import ProbeSnat
from nodeagent.redirect.netns import NetnsNotFound, entered
from nodeagent.redirect.nftables import NftablesBackend, NftablesError, run_nft

pytestmark = pytest.mark.integration

TIMEOUT = 5.0
SO_ORIGINAL_DST = 80
MESH_MARK = 0x539
OUTBOUND, INBOUND, APP, UPSTREAM = "outbound-capture", "inbound-capture", "app", "upstream"
T = TypeVar("T")


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def in_netns(netns: Path, work: Callable[[], T]) -> T:
    """Run ``work`` on a fresh thread inside ``netns`` (sockets it makes stay in that netns)."""
    answer: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def run() -> None:
        try:
            with entered(netns):
                answer.put((True, work()))
        except BaseException as e:
            answer.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    ok, value = answer.get(timeout=TIMEOUT * 2)
    if not ok:
        raise value
    result: T = value
    return result


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def call(method: Callable[..., T], *args: Any) -> T:
    """A backend call, checking it leaves the calling thread in its own netns, raising or not."""
    before = thread_netns()
    try:
        return method(*args)
    finally:
        assert thread_netns() == before


@dataclass
class Seen:
    """One accepted connection: who dialled, and the destination it dialled (if redirected)."""

    peer: tuple[str, int]
    original_dst: tuple[str, int] | None


def original_dst(conn: socket.socket) -> tuple[str, int] | None:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:  # not NATed
        return None
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


@dataclass
class Server:
    """A listener made inside a netns; answers every connection with its tag."""

    tag: str
    sock: socket.socket
    seen: list[Seen] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stopped.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.seen.append(Seen(peer, original_dst(conn)))
                conn.sendall(self.tag.encode())

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(TIMEOUT)
        self.sock.close()


def dial(netns: Path, host: str, port: int, *, mark: int | None = None) -> str:
    """Connect from inside ``netns``; the tag of the server the connection landed on."""

    def connect() -> str:
        with socket.socket() as sock:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.settimeout(TIMEOUT)
            sock.connect((host, port))
            return sock.recv(64).decode()

    return in_netns(netns, connect)


@dataclass
class Pod:
    """A pod netns and its peer (the rest of the world, or the node) on one veth link."""

    name: str
    peer_name: str
    ip: str
    peer_ip: str
    peer_ip2: str  # a second address on the peer, a destination outside some range
    servers: list[Server] = field(default_factory=list)

    @property
    def netns(self) -> Path:
        return Path("/run/netns") / self.name

    @property
    def peer(self) -> Path:
        return Path("/run/netns") / self.peer_name

    def serve(self, netns: Path, host: str, port: int, tag: str) -> Server:
        def listen() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
            return sock

        server = Server(tag, in_netns(netns, listen))
        self.servers.append(server)
        server.thread = threading.Thread(target=server.serve, daemon=True)
        server.thread.start()
        return server

    def nft(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.name, "nft", *args)

    def listing(self) -> list[dict[str, Any]]:
        """``nft -j list table inet nodeagent`` in the pod, without handles."""
        objects = json.loads(self.nft("-j", "list", "table", "inet", "nodeagent"))["nftables"]
        for obj in objects:
            next(iter(obj.values())).pop("handle", None)
        return [o for o in objects if "metainfo" not in o]


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag, subnet = secrets.token_hex(3), f"10.250.{random.randint(1, 254)}"
    base = f"nat-redir-{tag}"
    pod = Pod(f"{base}-pod", f"{base}-peer", f"{subnet}.2", f"{subnet}.1", f"{subnet}.3")
    made: list[str] = []
    try:
        for name in (pod.name, pod.peer_name):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        veth = ["eth0", "type", "veth", "peer", "name", "eth0", "netns", pod.peer_name]
        sh("ip", "-n", pod.name, "link", "add", *veth)
        for name, addresses in ((pod.name, [pod.ip]), (pod.peer_name, [pod.peer_ip, pod.peer_ip2])):
            for address in addresses:
                sh("ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        # replies to the probe source (169.254.7.127) go back through the peer, as to a node
        sh("ip", "-n", pod.name, "route", "add", "default", "via", pod.peer_ip)
        yield pod
    finally:
        for server in pod.servers:
            server.close()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def backend() -> NftablesBackend:
    return NftablesBackend()


@pytest.fixture
def listeners(pod: Pod) -> dict[str, Server]:
    """Envoy's two capture listeners in the pod, the app, and an upstream on the peer."""
    return {
        OUTBOUND: pod.serve(pod.netns, "127.0.0.1", 15001, OUTBOUND),
        INBOUND: pod.serve(pod.netns, "0.0.0.0", 15006, INBOUND),
        APP: pod.serve(pod.netns, "0.0.0.0", 8080, APP),
        UPSTREAM: pod.serve(pod.peer, "0.0.0.0", 9000, UPSTREAM),
    }


# -- rules in the kernel --------------------------------------------------------------------------


def test_apply_installs_one_table_and_applying_twice_is_identical(
    pod: Pod, backend: NftablesBackend
) -> None:
    spec = CaptureSpec(exclude_outbound_ports=(22, 3306), exclude_inbound_ports=(9090,))
    call(backend.apply, pod.netns, spec)
    first = pod.listing()
    chains = [o["chain"] for o in first if "chain" in o]
    assert [(c["name"], c["hook"], c["prio"]) for c in chains] == [
        ("prerouting", "prerouting", -100),
        ("output", "output", -100),
    ]
    assert "redirect to :15001" in pod.nft("list", "chain", "inet", "nodeagent", "output")
    call(backend.apply, pod.netns, spec)
    assert pod.listing() == first
    assert pod.nft("list", "tables").split() == ["table", "inet", "nodeagent"]


# -- where connections land -----------------------------------------------------------------------


def test_outbound_lands_on_15001_with_the_dialled_address(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    assert dial(pod.netns, pod.peer_ip, 9000) == UPSTREAM  # no capture yet
    call(backend.apply, pod.netns, CaptureSpec())
    assert dial(pod.netns, pod.peer_ip, 9000) == OUTBOUND
    assert listeners[OUTBOUND].seen[-1].original_dst == (pod.peer_ip, 9000)


def test_inbound_lands_on_15006_with_the_dialled_port(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    call(backend.apply, pod.netns, CaptureSpec())
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    assert listeners[INBOUND].seen[-1].original_dst == (pod.ip, 8080)


def ranges(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


EXCLUSIONS: dict[str, tuple[Callable[[Pod], CaptureSpec], list[tuple[str, str, int, str]]]] = {
    # spec, then (from, to, port, where it lands): one not captured, one still captured
    "excluded outbound port": (
        lambda p: CaptureSpec(exclude_outbound_ports=(9000,)),
        [("pod", "peer_ip", 9000, UPSTREAM), ("pod", "peer_ip", 9001, OUTBOUND)],
    ),
    "excluded outbound range": (
        lambda p: CaptureSpec(exclude_outbound_ranges=ranges(f"{p.peer_ip}/32", "fd00::/8")),
        [("pod", "peer_ip", 9000, UPSTREAM), ("pod", "peer_ip2", 9000, OUTBOUND)],
    ),
    "outside the included ranges": (
        lambda p: CaptureSpec(include_outbound_ranges=ranges(f"{p.peer_ip2}/32", "fd00::/8")),
        [("pod", "peer_ip", 9000, UPSTREAM), ("pod", "peer_ip2", 9000, OUTBOUND)],
    ),
    "no included ranges": (
        lambda p: CaptureSpec(include_outbound_ranges=()),
        [("pod", "peer_ip", 9000, UPSTREAM), ("peer", "ip", 8080, INBOUND)],
    ),
    "excluded inbound port": (
        lambda p: CaptureSpec(exclude_inbound_ports=(8080,)),
        [("peer", "ip", 8080, APP), ("peer", "ip", 8081, INBOUND)],
    ),
    "outside the included inbound ports": (
        lambda p: CaptureSpec(include_inbound_ports=(8081,)),
        [("peer", "ip", 8080, APP), ("peer", "ip", 8081, INBOUND)],
    ),
}


@pytest.mark.parametrize("case", list(EXCLUSIONS))
def test_exclusions_reach_the_real_server(
    case: str, pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    make_spec, dials = EXCLUSIONS[case]
    pod.serve(pod.peer, "0.0.0.0", 9001, UPSTREAM)
    call(backend.apply, pod.netns, make_spec(pod))
    for side, target, port, expected in dials:
        netns = pod.netns if side == "pod" else pod.peer
        assert dial(netns, getattr(pod, target), port) == expected, (side, target, port)


def test_envoy_marked_sockets_are_not_captured(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    call(backend.apply, pod.netns, CaptureSpec())
    assert dial(pod.netns, pod.peer_ip, 9000, mark=MESH_MARK) == UPSTREAM
    assert dial(pod.netns, pod.peer_ip, 9000, mark=0x538) == OUTBOUND


def test_loopback_and_the_pods_own_ip_are_not_captured(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    pod.serve(pod.netns, "127.0.0.1", 9100, "local")
    call(backend.apply, pod.netns, CaptureSpec())
    assert dial(pod.netns, "127.0.0.1", 9100) == "local"
    assert dial(pod.netns, pod.ip, 8080) == APP


def test_node_probes_reach_the_app_with_probe_snat(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    # the peer plays the node: ProbeSnat works on the netns of the thread that calls it
    call(backend.apply, pod.netns, CaptureSpec())
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    in_netns(pod.peer, lambda: ProbeSnat().sync([pod.ip, "fd00::2"]))
    assert dial(pod.peer, pod.ip, 8080) == APP
    assert listeners[APP].seen[-1].peer[0] == "169.254.7.127"
    in_netns(pod.peer, lambda: ProbeSnat().sync([]))
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    in_netns(pod.peer, lambda: ProbeSnat().sync([pod.ip]))
    assert dial(pod.peer, pod.ip, 8080) == APP
    in_netns(pod.peer, ProbeSnat().remove)
    in_netns(pod.peer, ProbeSnat().remove)
    assert dial(pod.peer, pod.ip, 8080) == INBOUND


def test_probe_snat_changes_elements_and_repairs_what_went_missing(
    pod: Pod, backend: NftablesBackend, listeners: dict[str, Server]
) -> None:
    """One ProbeSnat as the agent keeps it: after its first sync, syncs change only the set's
    elements; if the table vanished behind its back, the next sync puts the whole table back,
    and a whole sync (the agent's reconcile pass) rewrites a table someone emptied."""
    call(backend.apply, pod.netns, CaptureSpec())
    snat = ProbeSnat()
    in_netns(pod.peer, lambda: snat.sync(["10.9.9.9"]))
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    in_netns(pod.peer, lambda: snat.sync(["10.9.9.9", pod.ip]))
    assert dial(pod.peer, pod.ip, 8080) == APP
    in_netns(pod.peer, lambda: snat.sync(["10.9.9.9"]))
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    in_netns(pod.peer, ProbeSnat().remove)  # someone else deleted the table
    in_netns(pod.peer, lambda: snat.sync([pod.ip]))
    assert dial(pod.peer, pod.ip, 8080) == APP
    flush = {"flush": {"chain": {"family": "ip", "table": "nodeagent-host", "name": "postrouting"}}}
    in_netns(pod.peer, lambda: run_nft({"nftables": [flush]}, "test"))  # the SNAT rule is gone
    assert dial(pod.peer, pod.ip, 8080) == INBOUND
    in_netns(pod.peer, lambda: snat.sync([pod.ip], whole=True))
    assert dial(pod.peer, pod.ip, 8080) == APP
    in_netns(pod.peer, snat.remove)


# -- verify and remove ----------------------------------------------------------------------------


def test_verify_sees_what_was_lost_or_added_by_hand(pod: Pod, backend: NftablesBackend) -> None:
    spec = CaptureSpec(exclude_outbound_ports=(22,))
    assert not call(backend.verify, pod.netns, spec).ok
    call(backend.apply, pod.netns, spec)
    assert call(backend.verify, pod.netns, spec).ok

    pod.nft("delete", "table", "inet", "nodeagent")
    check = call(backend.verify, pod.netns, spec)
    assert (check.ok, check.reason) == (False, "table inet nodeagent is missing")

    call(backend.apply, pod.netns, spec)
    listed = json.loads(pod.nft("-j", "list", "chain", "inet", "nodeagent", "output"))
    last = [o["rule"] for o in listed["nftables"] if "rule" in o][-1]
    pod.nft("delete", "rule", "inet", "nodeagent", "output", "handle", str(last["handle"]))
    check = call(backend.verify, pod.netns, spec)
    assert not check.ok
    assert check.reason == "chain output: missing rule `meta l4proto tcp redirect to :15001`"

    call(backend.apply, pod.netns, spec)
    pod.nft("insert", "rule", "inet", "nodeagent", "prerouting", "tcp", "dport", "8080", "accept")
    check = call(backend.verify, pod.netns, spec)
    assert not check.ok
    assert check.reason == "chain prerouting: unexpected rule 1 `tcp dport 8080 accept`"

    call(backend.apply, pod.netns, spec)
    pod.nft("add", "table", "inet", "nodeagent", "{", "flags", "dormant", ";", "}")
    check = call(backend.verify, pod.netns, spec)
    assert not check.ok
    assert check.reason == "table inet nodeagent has flags (dormant?): it must have none"

    call(backend.apply, pod.netns, spec)
    pod.nft("add", "table", "inet", "other")  # not ours: no business of verify
    assert call(backend.verify, pod.netns, spec).ok
    different = call(backend.verify, pod.netns, CaptureSpec(exclude_outbound_ports=(22, 23)))
    assert not different.ok
    assert "23" in different.reason


def verify_round_trip_specs(p: Pod) -> list[CaptureSpec]:
    return [
        CaptureSpec(),
        CaptureSpec(include_inbound_ports=(), include_outbound_ranges=()),
        CaptureSpec(exclude_inbound_ports=(22, 9090), include_inbound_ports=(8080, 8081)),
        CaptureSpec(
            exclude_outbound_ranges=ranges(
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.0.0/25",
                "192.168.0.128/25",
                "172.16.0.0/24",
                "172.16.1.0/24",
                "172.16.2.0/24",
                "1.2.3.4/32",
                "255.255.255.255/32",
                "fd00::/8",
                "::ffff:0:0/96",
                "2001:db8::1/128",
            ),
            include_outbound_ranges=ranges("0.0.0.0/0", "::/0"),
            exclude_outbound_ports=(15020, 15021, 15090),
        ),
        CaptureSpec(include_outbound_ranges=ranges("fd00::/8", "fd00::1/128")),
        CaptureSpec(include_outbound_ranges=ranges(f"{p.peer_ip2}/32")),
        CaptureSpec(dns=True),  # DNS capture (ISTIO_META_DNS_CAPTURE)
        CaptureSpec(include_outbound_ranges=(), dns=True),
    ]


def test_verify_is_ok_right_after_apply_for_many_specs(pod: Pod, backend: NftablesBackend) -> None:
    specs = verify_round_trip_specs(pod)
    for spec in specs:
        call(backend.apply, pod.netns, spec)
        check = call(backend.verify, pod.netns, spec)
        assert check.ok, (spec, check.reason)
        assert all(not call(backend.verify, pod.netns, s).ok for s in specs if s != spec)


def test_remove_and_missing_netns(pod: Pod, backend: NftablesBackend) -> None:
    call(backend.apply, pod.netns, CaptureSpec())
    pod.nft("add", "table", "ip", "mine")
    call(backend.remove, pod.netns)
    assert pod.nft("list", "tables").split() == ["table", "ip", "mine"]
    call(backend.remove, pod.netns)
    assert not call(backend.verify, pod.netns, CaptureSpec()).ok

    gone = Path("/run/netns") / f"nat-redir-{secrets.token_hex(3)}-gone"
    with pytest.raises(NetnsNotFound, match=str(gone)):
        call(backend.apply, gone, CaptureSpec())
    with pytest.raises(NetnsNotFound, match=str(gone)):
        call(backend.verify, gone, CaptureSpec())
    with pytest.raises(NetnsNotFound, match=str(gone)):
        call(backend.remove, gone)


def test_nft_errors_name_the_netns_and_leave_the_thread_home(
    pod: Pod, backend: NftablesBackend
) -> None:
    with pytest.raises(NftablesError, match=str(pod.netns)):
        call(backend.apply, pod.netns, CaptureSpec(exclude_outbound_ports=(70000,)))
    assert pod.nft("list", "tables") == ""  # the failed transaction left nothing behind


def test_concurrent_calls_each_stay_in_their_own_pod(pod: Pod, backend: NftablesBackend) -> None:
    specs = {pod.netns: CaptureSpec(exclude_inbound_ports=(1,)), pod.peer: CaptureSpec()}
    errors: list[BaseException] = []

    def work(netns: Path) -> None:
        try:
            for _ in range(10):
                call(backend.apply, netns, specs[netns])
                assert call(backend.verify, netns, specs[netns]).ok
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(ns,)) for ns in [*specs] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert errors == []
    assert call(backend.verify, pod.netns, specs[pod.netns]).ok
    assert call(backend.verify, pod.peer, specs[pod.peer]).ok


# -- entering a pod's netns -----------------------------------------------------------------------


def netns_id(path: Path) -> str:
    return f"net:[{os.stat(path).st_ino}]"


def test_entered_moves_only_the_calling_thread(pod: Pod) -> None:
    home = thread_netns()
    inside = in_netns(pod.netns, thread_netns)
    assert inside == netns_id(pod.netns) != home
    assert thread_netns() == home


def test_a_thread_that_cannot_come_back_says_so(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    real_setns, calls = netns_module._setns, []

    def setns_failing_on_return(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EPERM, "denied")
        real_setns(fd)

    monkeypatch.setattr(netns_module, "_setns", setns_failing_on_return)
    outcome: queue.Queue[tuple[str, str]] = queue.Queue()

    def stranded() -> None:  # a throwaway thread: it really is left in the pod
        try:
            with entered(pod.netns):
                pass
        except RuntimeError as e:
            outcome.put((str(e), thread_netns()))

    threading.Thread(target=stranded, daemon=True).start()
    message, where = outcome.get(timeout=TIMEOUT)
    assert "this thread is unusable" in message and str(pod.netns) in message
    assert where == netns_id(pod.netns)
