"""The DNS proxy without privileges: its opt-in, its capture rules, the names it answers, the
addresses it allocates, and real UDP/TCP exchanges on loopback with a stand-in upstream."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from google.protobuf import json_format

from nodeagent.dns import answer
from nodeagent.dns.names import NameTable, build
from nodeagent.dns.resolvconf import (
    PodResolvConf,
    ResolvConf,
    kubernetes_search,
    locate,
    parse,
    pod_files,
)
from nodeagent.dns.server import DnsProxy, PodDns
from nodeagent.mesh.autoallocate import RANGE, AddressAllocator, wants_address
from nodeagent.mesh.model import IstioResource, MeshConfig, Pod, Service, ServicePort
from nodeagent.mesh.proxy_metadata import PROXY_CONFIG_ANNOTATION
from nodeagent.mesh.store import MeshStore
from nodeagent.redirect.capture import CaptureSpec, CaptureSpecError
from nodeagent.redirect.nftables import describe, render
from nodeagent.sources.directory import ResourceError, parse_mesh_config
from nodeagent.translate import envoy as e
from nodeagent.translate import translate
from nodeagent.translate.internal import OUTBOUND_INTERNAL
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import as_json, local, store

DNS_ON = {"ISTIO_META_DNS_CAPTURE": "true"}


def entry(name: str, hosts: list[str], created: str = "", **spec: object) -> IstioResource:
    return IstioResource(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "default",
        name,
        {"hosts": hosts, "resolution": "DNS", **spec},
        created=created,
    )


def annotated(metadata: str) -> dict[str, str]:
    return {PROXY_CONFIG_ANNOTATION: f"proxyMetadata:\n  {metadata}\n"}


# -- opt-in ---------------------------------------------------------------------------------------


def test_dns_capture_is_off_by_default_and_on_by_mesh_default_or_pod_annotation() -> None:
    assert not CaptureSpec.from_annotations({}).dns
    assert CaptureSpec.from_annotations({}, DNS_ON).dns
    on = annotated('ISTIO_META_DNS_CAPTURE: "true"')
    off = annotated('ISTIO_META_DNS_CAPTURE: "false"')
    assert CaptureSpec.from_annotations(on).dns
    assert not CaptureSpec.from_annotations(off, DNS_ON).dns  # the pod overrides the mesh
    spec = CaptureSpec.from_annotations(on)
    assert CaptureSpec.from_json(spec.to_json()) == spec


def test_bad_dns_capture_values_name_where_they_are() -> None:
    with pytest.raises(CaptureSpecError, match=r"proxy\.istio\.io/config.*ISTIO_META_DNS_CAPTURE"):
        CaptureSpec.from_annotations(annotated('ISTIO_META_DNS_CAPTURE: "yes please"'))
    with pytest.raises(CaptureSpecError, match=r"proxy\.istio\.io/config: not YAML"):
        CaptureSpec.from_annotations({PROXY_CONFIG_ANNOTATION: "proxyMetadata: [unclosed"})
    with pytest.raises(CaptureSpecError, match="mesh config defaultConfig"):
        CaptureSpec.from_annotations({}, {"ISTIO_META_DNS_CAPTURE": "maybe"})


def test_mesh_config_reads_default_proxy_metadata() -> None:
    config = parse_mesh_config({"defaultConfig": {"proxyMetadata": DNS_ON}})
    assert config.default_proxy_metadata == DNS_ON
    assert parse_mesh_config({}).default_proxy_metadata == {}
    with pytest.raises(ResourceError, match=r'unknown field "defaultConfig\.concurrency"'):
        parse_mesh_config({"defaultConfig": {"concurrency": 2}})
    with pytest.raises(ResourceError, match=r"proxyMetadata\.ISTIO_META_DNS_CAPTURE: \"on\""):
        parse_mesh_config({"defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "on"}}})
    with pytest.raises(ResourceError, match=r"defaultConfig\.proxyMetadata: expected a mapping"):
        parse_mesh_config({"defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": True}}})


# -- capture rules --------------------------------------------------------------------------------


def output_rules(spec: CaptureSpec) -> list[str]:
    return [
        describe(cmd["add"]["rule"]["expr"])
        for cmd in render(spec)["nftables"]
        if "rule" in cmd.get("add", {}) and cmd["add"]["rule"]["chain"] == "output"
    ]


def test_dns_capture_redirects_udp_and_tcp_53_first_and_only_when_on() -> None:
    dns_rules = [
        "meta mark & 0xfff != 0x539 udp dport 53 redirect to :15053",
        "meta mark & 0xfff != 0x539 tcp dport 53 redirect to :15053",
    ]
    without = output_rules(CaptureSpec())
    assert not any("53 " in rule for rule in without)
    assert output_rules(CaptureSpec(dns=True)) == dns_rules + without
    # no TCP capture asked (includeOutboundIPRanges ""): DNS capture stands alone
    assert output_rules(CaptureSpec(include_outbound_ranges=(), dns=True)) == dns_rules


# -- auto-allocation ------------------------------------------------------------------------------


def test_allocation_gives_stable_addresses_in_istios_range_to_hosts_that_need_one() -> None:
    first = entry("a", ["api.example.com", "*.wild.example.com"])
    assert wants_address(first) == ["api.example.com"]  # wildcard hosts get none
    assert wants_address(entry("s", ["static.example"], addresses=["10.9.9.9"])) == []
    assert wants_address(entry("n", ["none.example"], resolution="NONE")) == []
    allocator = AddressAllocator()
    assert allocator.update(first.key, wants_address(first)) == {"api.example.com"}
    address = allocator.address("api.example.com")
    assert ipaddress.ip_address(address) in RANGE and address.split(".")[3] not in ("0", "255")
    hosts = [f"h{i}.example.org" for i in range(300)]
    for i, host in enumerate(hosts):
        allocator.update(f"ServiceEntry/default/n{i}", [host])
    assert allocator.address("api.example.com") == address  # others come, it keeps its own
    addresses = {allocator.address(h) for h in [*hosts, "api.example.com"]}
    assert len(addresses) == 301  # no two hosts share one
    # a second entry naming the host: one address; it goes when no entry wants it any more
    assert allocator.update("ServiceEntry/other/a", ["api.example.com"]) == set()
    assert allocator.update(first.key, []) == set()
    assert allocator.address("api.example.com") == address
    assert allocator.update("ServiceEntry/other/a", []) == {"api.example.com"}
    assert allocator.address("api.example.com") == ""


# -- names ----------------------------------------------------------------------------------------


def registry(*entries: IstioResource, services: tuple[Service, ...] = ()) -> MeshStore:
    """A store holding SERVICES and ENTRIES (which it turns into services of its own)."""
    store = MeshStore()
    for svc in services:
        store.put_service(svc)
    for res in entries:
        store.put_istio(res)
    return store


def table() -> NameTable:
    store = registry(
        entry("ext", ["api.external.test"]),
        entry("own", ["private.example"], addresses=["192.0.2.8"], exportTo=["."]),
        entry("fixed", ["fixed.example"], addresses=["192.0.2.7", "2001:db8::7", "10.0.0.0/8"]),
        services=(
            Service("default", "web-api", "10.96.0.20", (ServicePort(80),)),
            Service("other", "db", "10.96.0.30", (ServicePort(5432),)),
            Service("default", "headless", "None"),
        ),
    )
    return build(store.services.values(), "cluster.local")


SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")


def ask(
    name: str, qtype: str = "A", *, auto: bool = False, namespace: str = "default"
) -> answer.Reply | answer.Forward:
    query = dns.message.make_query(name, qtype)
    return answer.handle(query.to_wire(), table(), namespace, SEARCH, auto, False)


def records(outcome: answer.Reply | answer.Forward) -> dict[str, list[str]]:
    assert isinstance(outcome, answer.Reply) and outcome.wire is not None
    message = dns.message.from_wire(outcome.wire)
    assert message.rcode() == dns.rcode.NOERROR
    return {
        dns.rdatatype.to_text(rrset.rdtype): sorted(r.to_text() for r in rrset)
        for rrset in message.answer
    }


def test_service_names_answer_as_kubernetes_search_domains_would() -> None:
    assert records(ask("web-api.default.svc.cluster.local")) == {"A": ["10.96.0.20"]}
    assert records(ask("web-api")) == {"A": ["10.96.0.20"]}
    assert records(ask("db.other")) == {"A": ["10.96.0.30"]}
    assert records(ask("DB.other.svc.")) == {"A": ["10.96.0.30"]}
    assert isinstance(ask("db"), answer.Forward)  # another namespace's short name
    assert isinstance(ask("headless"), answer.Forward)  # kube-dns answers with its pods
    # what a resolver with ndots:5 asks first for "db.other": a CNAME saves the NXDOMAINs
    assert records(ask("db.other.default.svc.cluster.local")) == {
        "CNAME": ["db.other.svc.cluster.local."],
        "A": ["10.96.0.30"],
    }


def test_service_entry_hosts_answer_with_their_addresses_or_an_allocated_one() -> None:
    assert records(ask("fixed.example")) == {"A": ["192.0.2.7"]}  # the CIDR is no address
    assert records(ask("fixed.example", "AAAA")) == {"AAAA": ["2001:db8::7"]}
    assert isinstance(ask("api.external.test"), answer.Forward)  # no auto-allocation asked
    allocated = records(ask("api.external.test", auto=True))["A"]
    assert allocated == [
        registry(entry("ext", ["api.external.test"])).allocator.address("api.external.test")
    ]
    assert records(ask("api.external.test", "AAAA", auto=True)) == {}  # known, no IPv6
    assert records(ask("private.example")) == {"A": ["192.0.2.8"]}  # exported to "."
    assert isinstance(ask("private.example", namespace="other"), answer.Forward)
    assert isinstance(ask("web-api", "MX"), answer.Forward)
    assert isinstance(ask("example.org"), answer.Forward)


def test_malformed_queries_get_formerr_and_responses_are_dropped() -> None:
    query = dns.message.make_query("web-api", "A").to_wire()
    reply = answer.handle(query[:14], table(), "default", SEARCH, False, False)
    assert isinstance(reply, answer.Reply) and reply.wire is not None
    message = dns.message.from_wire(reply.wire)
    assert message.rcode() == dns.rcode.FORMERR and message.id == int.from_bytes(query[:2])
    response = dns.message.make_response(dns.message.from_wire(query)).to_wire()
    assert answer.handle(response, table(), "default", SEARCH, False, False) == answer.Reply(None)
    assert answer.handle(b"\x01", table(), "default", SEARCH, False, False) == answer.Reply(None)


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    many = [f"192.0.2.{i}" for i in range(1, 101)]
    big = build(registry(entry("big", ["big.example"], addresses=many)).services.values(), "")
    query = dns.message.make_query("big.example", "A", use_edns=False).to_wire()
    udp = answer.handle(query, big, "default", SEARCH, False, False)
    assert isinstance(udp, answer.Reply) and udp.wire is not None
    truncated = dns.message.from_wire(udp.wire)
    assert truncated.flags & dns.flags.TC and not truncated.answer and len(udp.wire) <= 512
    tcp = answer.handle(query, big, "default", SEARCH, False, True)
    assert len(records(tcp)["A"]) == 100


def test_resolv_conf_gives_nameservers_and_the_last_search_line() -> None:
    text = "search a.b c\nnameserver 10.0.0.10 # kube-dns\nnameserver not-an-ip\nsearch x.y z\n"
    assert parse(text) == ResolvConf(("10.0.0.10",), ("x.y", "z"))


def test_a_pods_own_resolv_conf_is_found_where_its_runtime_keeps_it(tmp_path: Path) -> None:
    containerd, crio = tmp_path / "containerd", tmp_path / "crio"
    sandbox = "4f" * 32

    def find(netns: str, sandbox: str) -> tuple[Path, bool]:
        for path in pod_files(Path(netns), sandbox, tmp_path, (containerd, crio)):
            if path.is_file():
                return path, True
        return tmp_path / "resolv.conf", False

    assert pod_files(Path("/run/netns/pod-a"), "", tmp_path, (containerd, crio)) == [
        tmp_path / "netns" / "pod-a" / "resolv.conf"
    ]
    assert pod_files(Path("/proc/42/ns/net"), sandbox, tmp_path, (containerd, crio)) == [
        containerd / sandbox / "resolv.conf",
        crio / sandbox / "userdata" / "resolv.conf",
    ]
    for bad in ("../../etc", "a/b", ".."):  # a sandbox id is never a path
        assert pod_files(Path("/proc/42/ns/net"), bad, tmp_path, (containerd, crio)) == []
    assert find("/proc/42/ns/net", sandbox) == (tmp_path / "resolv.conf", False)
    cri_o = crio / sandbox / "userdata" / "resolv.conf"
    cri_o.parent.mkdir(parents=True)
    cri_o.write_text("nameserver 10.96.0.10\n")
    assert find("/proc/42/ns/net", sandbox) == (cri_o, True)
    assert locate(Path("/proc/42/ns/net"), "", tmp_path) == (tmp_path / "resolv.conf", False)


def test_a_pods_resolv_conf_written_late_or_changed_is_read_again(tmp_path: Path) -> None:
    watched = PodResolvConf(
        Path("/run/netns/pod-a"), "", lambda netns, sandbox: locate(netns, sandbox, tmp_path)
    )
    assert watched.current() == ResolvConf()
    (tmp_path / "resolv.conf").write_text("nameserver 10.0.0.1\nsearch agents.svc.cluster.local\n")
    assert watched.current() == ResolvConf(("10.0.0.1",), ("agents.svc.cluster.local",))
    assert not watched.own  # the agent's file: its nameservers, not its search list (below)
    own = tmp_path / "netns" / "pod-a" / "resolv.conf"
    own.parent.mkdir(parents=True)
    own.write_text("nameserver 10.0.0.10\nsearch default.svc.cluster.local\n")
    assert watched.current() == ResolvConf(("10.0.0.10",), ("default.svc.cluster.local",))
    assert watched.own
    own.write_text("nameserver 10.0.0.111\n")
    assert watched.current() == ResolvConf(("10.0.0.111",))


def test_without_its_own_file_a_pod_searches_its_own_namespace(tmp_path: Path) -> None:
    (tmp_path / "resolv.conf").write_text("nameserver 10.0.0.1\nsearch agents.svc.cluster.local\n")
    conf = PodResolvConf(
        Path("/proc/1/ns/net"), "", lambda netns, sandbox: locate(netns, sandbox, tmp_path)
    )
    pod = PodDns("shop/web", "shop", Path("/proc/1/ns/net"), False, conf)
    assert pod.search("cluster.local") == kubernetes_search("shop", "cluster.local")
    assert kubernetes_search("shop", "cluster.local") == (
        "shop.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    )


# -- the server, over loopback --------------------------------------------------------------------


class Upstream:
    """A stand-in resolver on loopback: UDP answers truncated, TCP answers whole."""

    def __init__(self) -> None:
        self.udp_queries = self.tcp_queries = 0

    def reply(self, wire: bytes, tcp: bool) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        if tcp:
            name = query.question[0].name
            response.answer.append(dns.rrset.from_text(name, 5, "IN", "A", "198.51.100.9"))
        else:
            response.flags |= dns.flags.TC
        return response.to_wire()


@pytest.fixture
def loopback_proxy(
    tmp_path: Path,
) -> Iterator[tuple[DnsProxy, Upstream, socket.socket, socket.socket]]:
    upstream = Upstream()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp.bind(("127.0.0.1", 0))
    tcp.bind(("127.0.0.1", udp.getsockname()[1]))
    tcp.listen(8)
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\nsearch " + " ".join(SEARCH) + "\n")
    store = MeshStore()
    store.set_mesh_config(MeshConfig())
    store.put_service(Service("default", "web-api", "10.96.0.20", (ServicePort(80),)))

    def listening(_netns: Path, _port: int) -> list[tuple[socket.socket, socket.socket]]:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u.bind(("127.0.0.1", 0))
        t.bind(("127.0.0.1", 0))
        t.listen(8)
        for s in (u, t):
            s.setblocking(False)
        return [(u, t)]

    def upstream_socket(_netns: Path, family: int, kind: int) -> socket.socket:
        s = socket.socket(family, kind)
        s.setblocking(False)
        return s

    proxy = DnsProxy(
        store,
        find_resolv_conf=lambda _netns, _sandbox: (resolv_conf, True),
        upstream_port=udp.getsockname()[1],
        listening_sockets=listening,
        upstream_socket=upstream_socket,
    )
    yield proxy, upstream, udp, tcp
    udp.close()
    tcp.close()


async def serve_upstream(upstream: Upstream, udp: socket.socket, tcp: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    udp.setblocking(False)
    tcp.setblocking(False)

    async def udp_loop() -> None:
        while True:
            data, peer = await loop.sock_recvfrom(udp, 65535)
            upstream.udp_queries += 1
            await loop.sock_sendto(udp, upstream.reply(data, False), peer)

    async def tcp_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(tcp)
            with conn:
                size = struct.unpack("!H", await loop.sock_recv(conn, 2))[0]
                data = await loop.sock_recv(conn, size)
                upstream.tcp_queries += 1
                reply = upstream.reply(data, True)
                await loop.sock_sendall(conn, struct.pack("!H", len(reply)) + reply)

    await asyncio.gather(udp_loop(), tcp_loop())


async def udp_ask(port: int, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_sendto(s, wire, ("127.0.0.1", port))
        async with asyncio.timeout(5):
            data, _ = await loop.sock_recvfrom(s, 65535)
    return data


async def udp_name(port: int, name: str) -> dns.message.Message:
    return dns.message.from_wire(await udp_ask(port, dns.message.make_query(name, "A").to_wire()))


async def tcp_ask(port: int, wire: bytes) -> bytes:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!H", len(wire)) + wire)
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        data = await reader.readexactly(size)
        writer.close()
    return data


def test_proxy_answers_forwards_and_keeps_truncation_over_real_sockets(
    loopback_proxy: tuple[DnsProxy, Upstream, socket.socket, socket.socket],
) -> None:
    asyncio.run(_answers_forwards_truncation(*loopback_proxy))


async def _answers_forwards_truncation(
    proxy: DnsProxy, upstream: Upstream, udp: socket.socket, tcp: socket.socket
) -> None:
    server = asyncio.create_task(serve_upstream(upstream, udp, tcp))
    try:
        await proxy.serve("default/sleep", "default", Path("/run/netns/unused"), False)
        pod = proxy.pods["default/sleep"]
        udp_port = pod.udp[0].get_extra_info("sockname")[1]
        tcp_port = pod.tcp[0].sockets[0].getsockname()[1]

        local = await udp_name(udp_port, "web-api")
        assert [r.to_text() for r in local.answer[0]] == ["10.96.0.20"]
        assert upstream.udp_queries == 0  # answered by the proxy itself

        # garbage first: FORMERR, and the proxy keeps serving
        garbage = dns.message.from_wire(await udp_ask(udp_port, b"\x12\x34\x01\x00\xff"))
        assert garbage.rcode() == dns.rcode.FORMERR and garbage.id == 0x1234

        outside = dns.message.make_query("www.example.org", "A")
        truncated = dns.message.from_wire(await udp_ask(udp_port, outside.to_wire()))
        assert truncated.flags & dns.flags.TC and truncated.id == outside.id
        whole = dns.message.from_wire(await tcp_ask(tcp_port, outside.to_wire()))
        assert [r.to_text() for r in whole.answer[0]] == ["198.51.100.9"]
        assert (upstream.udp_queries, upstream.tcp_queries) == (1, 1)

        # a new Service is answered at once (the table follows the store)
        proxy.store.put_service(Service("default", "new", "10.96.0.99", (ServicePort(80),)))
        fresh = await udp_name(udp_port, "new")
        assert [r.to_text() for r in fresh.answer[0]] == ["10.96.0.99"]
    finally:
        server.cancel()
        await proxy.close()
    assert not proxy.pods


def test_an_unreachable_upstream_is_servfail(
    loopback_proxy: tuple[DnsProxy, Upstream, socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("nodeagent.dns.server.UPSTREAM_TIMEOUT", 0.2)
    # the stand-in upstream is not serving: nobody answers
    asyncio.run(_servfail(loopback_proxy[0]))


async def _servfail(proxy: DnsProxy) -> None:
    await proxy.serve("default/sleep", "default", Path("/run/netns/unused"), False)
    try:
        pod = proxy.pods["default/sleep"]
        port = pod.udp[0].get_extra_info("sockname")[1]
        reply = await udp_name(port, "x.example")
        assert reply.rcode() == dns.rcode.SERVFAIL
    finally:
        await proxy.close()


# -- routing the allocated addresses --------------------------------------------------------------


def test_allocated_addresses_get_chains_of_their_own_next_to_the_port_only_one(
    tmp_path: Path,
) -> None:
    """Two TCP ServiceEntry hosts without addresses on one port: the port alone cannot tell
    them apart, their allocated addresses can (Istio's listener on the allocated address,
    istio.io/latest/docs/ops/configuration/traffic-management/dns-proxy/
    #address-auto-allocation); the port-only chain stays for pods without the DNS proxy."""
    s = store()
    tcp = [{"number": 3306, "name": "tcp", "protocol": "TCP"}]
    for name in ("db-a", "db-b"):
        endpoints = [{"address": "192.0.2.10" if name == "db-a" else "192.0.2.11"}]
        s.put_istio(
            entry(name, [f"{name}.example"], ports=tcp, resolution="STATIC", endpoints=endpoints)
        )
    out = translate(s, [local("a")])
    listener = as_json(out[e.LISTENER][OUTBOUND_INTERNAL])
    found = {
        c["name"]: (
            c["filterChainMatch"],
            c["filters"][-1]["typedConfig"]["cluster"],
        )
        for c in listener["filterChains"]
        if c["filterChainMatch"].get("destinationPort") == 3306
    }
    for name in ("db-a", "db-b"):
        host = f"{name}.example"
        address = s.allocator.address(host)
        assert ipaddress.ip_address(address) in RANGE
        cluster = f"outbound|3306||{host}"
        prefix = {"addressPrefix": address, "prefixLen": 32}
        assert found[f"{cluster}~{address}"] == (
            {"destinationPort": 3306, "prefixRanges": [prefix]},
            cluster,
        )
    # the port-only chain: the first host's (as before), for pods that dial the real address
    assert found["outbound|3306||db-a.example"] == (
        {"destinationPort": 3306},
        found["outbound|3306||db-a.example"][1],
    )
    assert len(found) == 3
    # Envoy takes the three chains on one port in one listener (they differ by prefix)
    shown = json_format.MessageToDict(
        out[e.LISTENER][OUTBOUND_INTERNAL], preserving_proto_field_name=True
    )
    shown["filter_chains"] = [
        c for c in shown["filter_chains"] if c["filter_chain_match"].get("destination_port") == 3306
    ]
    shown.pop("default_filter_chain", None)
    assert_envoy_accepts_resources(tmp_path, listeners=[shown])
    # an entry given addresses gives its allocated one back: its chain goes
    s.put_istio(
        entry("db-b", ["db-b.example"], ports=tcp, resolution="STATIC", addresses=["10.9.9.9"])
    )
    assert s.allocator.address("db-b.example") == ""
    listener = as_json(translate(s, [local("a")])[e.LISTENER][OUTBOUND_INTERNAL])
    names = {c["name"] for c in listener["filterChains"]}
    assert not any(n.startswith("outbound|3306||db-b.example~") for n in names)


def _sidecar(namespace: str, hosts: list[str], **selector: str) -> IstioResource:
    spec: dict[str, object] = {"egress": [{"hosts": hosts}]}
    if selector:
        spec["workloadSelector"] = {"labels": selector}
    return IstioResource("networking.istio.io", "v1", "Sidecar", namespace, "scope", spec)


def test_only_names_in_the_pods_sidecar_scope_are_answered(tmp_path: Path) -> None:
    """Istio's DNS proxy answers from a name table built out of the proxy's Sidecar scope
    (pkg/dns/server/name_table.go BuildNameTable: the scope's egress listeners' services);
    other names go upstream (here none: SERVFAIL). A pod under ``./*`` gets its namespace's
    Service answered, another namespace's Service and a ServiceEntry host of another namespace
    not; a pod the Sidecar does not select gets them all; dropping the Sidecar answers all."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("search " + " ".join(SEARCH) + "\n")  # no upstream at all
    ext = {"hosts": ["api.external.test"], "addresses": ["192.0.2.9"], "resolution": "NONE"}
    store = registry(
        IstioResource("networking.istio.io", "v1", "ServiceEntry", "ext", "api", ext),
        services=(
            Service("default", "web-api", "10.96.0.20", (ServicePort(80),)),
            Service("other", "db", "10.96.0.30", (ServicePort(5432),)),
        ),
    )
    store.set_mesh_config(MeshConfig())
    store.put_istio(_sidecar("default", ["./*"], app="sleep"))
    for name, app in (("sleep", "sleep"), ("free", "free")):
        store.put_pod(Pod("default", name, labels={"app": app}))
    proxy = DnsProxy(store, find_resolv_conf=lambda _netns, _sandbox: (resolv_conf, True))

    def answered(pod_name: str, name: str) -> list[str]:
        resolv = PodResolvConf(Path("/run/netns/x"), "", proxy.find_resolv_conf)
        pod = PodDns(f"default/{pod_name}", "default", Path("/run/netns/x"), False, resolv)
        wire = dns.message.make_query(name, "A").to_wire()
        reply = dns.message.from_wire(asyncio.run(proxy.respond(pod, wire, False)) or b"")
        if reply.rcode() == dns.rcode.SERVFAIL:
            return []
        return [r.to_text() for rrset in reply.answer for r in rrset if rrset.rdtype == 1]

    assert answered("sleep", "web-api") == ["10.96.0.20"]
    assert answered("sleep", "db.other") == []
    assert answered("sleep", "api.external.test") == []
    assert answered("free", "db.other") == ["10.96.0.30"]
    assert answered("free", "api.external.test") == ["192.0.2.9"]
    store.put_istio(_sidecar("default", ["./*", "ext/api.external.test"], app="sleep"))
    assert answered("sleep", "api.external.test") == ["192.0.2.9"]
    store.delete_istio(_sidecar("default", []).key)
    assert answered("sleep", "db.other") == ["10.96.0.30"]
