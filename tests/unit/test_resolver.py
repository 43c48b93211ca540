"""The testbed resolver's answers (no sockets, no privileges): what a pod's resolver library
gets for Service names, external names and everything else."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode

from nodeagent.testbed.resolver import ZoneFile, answer, resolv_conf, write_zone, zone_records
from nodeagent.testbed.topology import External, Service, ServicePort

WEB = Service(
    "shop",
    "web",
    {"app": "web"},
    (ServicePort("http", 80, 8080),),
    ipaddress.ip_address("10.96.0.10"),
)
API = External(
    "api", ("api.external.test", "www.external.test"), ipaddress.ip_address("172.31.0.251")
)
RECORDS = {k: tuple(v) for k, v in zone_records([WEB], [API], "cluster.local").items()}


def ask(name: str, rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    wire = answer(query.to_wire(), RECORDS)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id and reply.flags & dns.flags.QR
    return reply


def addresses(reply: dns.message.Message) -> list[str]:
    return [r.to_text() for rrset in reply.answer for r in rrset]


def test_services_and_externals_are_answered_with_their_address() -> None:
    assert set(RECORDS) == {
        "web.shop.svc.cluster.local",
        "api.external.test",
        "www.external.test",
    }
    reply = ask("web.shop.svc.cluster.local")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["10.96.0.10"]
    assert reply.flags & dns.flags.AA  # the cluster's own zone, as kube-dns answers it
    assert addresses(ask("WWW.External.Test.")) == ["172.31.0.251"]  # names are case-blind


def test_unknown_names_are_nxdomain_and_other_types_nodata() -> None:
    # A short name is the client's to expand (search list): the resolver takes only FQDNs.
    for name in ("web", "web.shop", "nope.external.test", "example.com"):
        reply = ask(name)
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer, name
    aaaa = ask("api.external.test", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer  # IPv4 only: no data


def test_malformed_queries_get_formerr_and_replies_are_never_answered() -> None:
    query = dns.message.make_query("api.external.test", "A")
    wire = query.to_wire()
    broken = answer(wire[:-3], RECORDS)  # the question cut short
    assert broken is not None
    reply = dns.message.from_wire(broken)
    assert reply.rcode() == dns.rcode.FORMERR and reply.id == query.id
    assert answer(b"\x00\x01", RECORDS) is None  # not even a header
    reflected = bytearray(wire)
    reflected[2] |= 0x80  # QR: a reply; answering it could loop between two servers
    assert answer(bytes(reflected), RECORDS) is None


def test_an_answer_too_big_for_the_client_is_truncated() -> None:
    many = {"big.test": tuple(f"10.1.{i // 250}.{i % 250}" for i in range(100))}
    query = dns.message.make_query("big.test", "A")
    full = answer(query.to_wire(), many)
    assert full is not None and len(dns.message.from_wire(full).answer[0]) == 100
    cut = answer(query.to_wire(), many, max_size=512)
    assert cut is not None and len(cut) <= 512
    reply = dns.message.from_wire(cut)
    assert reply.flags & dns.flags.TC and not reply.answer  # the client retries over TCP


def test_pods_resolv_conf_is_kubelets() -> None:
    # kubernetes pkg/kubelet/network/dns/dns.go: ClusterFirst search list and ndots:5.
    assert resolv_conf("shop", "172.31.0.252", "cluster.local") == (
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 172.31.0.252\n"
        "options ndots:5\n"
    )


def test_the_zone_file_is_reread_when_the_testbed_rewrites_it(tmp_path: Path) -> None:
    path = tmp_path / "zone.json"
    zone = ZoneFile(path)
    assert zone.records() == {}  # none yet: every name is unknown
    write_zone(path, {"a.test": ["10.0.0.1"]})
    assert zone.records() == {"a.test": ("10.0.0.1",)}
    # The rewrite's size differs: seen even within the file system's mtime granularity.
    write_zone(path, {"a.test": ["10.0.0.1"], "b.test": ["10.0.0.2"]})
    assert zone.records()["b.test"] == ("10.0.0.2",)
    path.write_text("{not json")
    assert zone.records()["b.test"] == ("10.0.0.2",)  # a bad file keeps the last good zone
