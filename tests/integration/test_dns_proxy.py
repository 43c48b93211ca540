"""DNS proxying (issue #16 part 2) on a one-node testbed with the real Envoy, once per capture
mode: nftables (the DNS rules in the pod's table) and eBPF (#18: the cgroup connect, sendmsg,
recvmsg and getpeername hooks; the pod holds no nftables table).

default/dns opts in with Istio's pod annotation ``proxy.istio.io/config`` (``proxyMetadata``
ISTIO_META_DNS_CAPTURE and ISTIO_META_DNS_AUTO_ALLOCATE, istio.io/latest/docs/ops/
configuration/traffic-management/dns-proxy/); default/plain on the same node does not. Both
resolve through their own /etc/resolv.conf (the testbed resolver, TTL 5 s), as an app's
resolver library does (tests/integration/dns_probe.py). What the agent's proxy answers itself
carries Istio's TTL, 30 s; what it forwards comes back with the resolver's. ServiceEntry hosts
without addresses get auto-allocated ones (240.240.0.0/16) that the node's Envoy routes.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh.autoallocate import RANGE
from nodeagent.redirect import bpf_sys
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.ebpf import netns_cookie
from nodeagent.redirect.ebpf_maps import POD_CAPTURE_DNS, pod_key
from nodeagent.redirect.nftables import NftablesBackend
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    agent_pods,
    apply_docs,
    pod,
    ruleset,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbdns"
PROBE = str(Path(__file__).with_name("dns_probe.py"))
PROXY_TTL, RESOLVER_TTL = 30, 5
EXTERNAL, OTHER_NAME = "api.external.test", "www.external.test"
ALIAS = "web-alias.example"  # a ServiceEntry host no resolver knows
DNS_ON = 'proxyMetadata: {ISTIO_META_DNS_CAPTURE: "true", ISTIO_META_DNS_AUTO_ALLOCATE: "true"}'


def _topology() -> str:
    dns_pod = pod("dns", "n1", {"app": "dns"})
    dns_pod["annotations"] = {"proxy.istio.io/config": DNS_ON}
    pods = [
        dns_pod,
        pod("plain", "n1", {"app": "plain"}),
        pod("web", "n1", {"app": "web"}, workload={"type": "fake-service", "port": 8080}),
    ]
    text = topology_text(NAME, pods, [service("web", 8080, 8080)], nodes=({"name": "n1"},))
    external = {"name": "api", "names": [EXTERNAL, OTHER_NAME], "httpPort": 80}
    return text + f"externals:\n  - {json.dumps(external)}\n"


@pytest.fixture(scope="module", params=["nftables", "ebpf"])
def tb(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    text = _topology() + f"captureMode: {request.param}\n"
    with running_testbed(text, "test_dns_proxy") as bed:
        yield bed


def ebpf(tb: Testbed) -> bool:
    return tb.topology.capture_mode == "ebpf"


def netns_path(tb: Testbed, who: str) -> Path:
    return Path("/run/netns") / tb.pod_netns(f"default/{who}")


def pod_flags(tb: Testbed, who: str) -> int:
    """WHO's flags in n1's eBPF pods map."""
    pods_map = str(layout.bpf_dir(tb.name, "n1") / "maps" / "pods")
    with bpf_sys.pinned(pods_map) as fd:
        value = bpf_sys.map_lookup(fd, pod_key(netns_cookie(netns_path(tb, who))), 4)
    assert value is not None, f"{who} is not in the pods map"
    flags: int = int.from_bytes(value, sys.byteorder)
    return flags


@pytest.fixture
def entries(tb: Testbed) -> Iterator[Testbed]:
    """Two ServiceEntry hosts without addresses on one TCP port, 80 (STATIC): the external's
    first name, and an alias whose endpoint is the web pod's port 8080. Only their allocated
    addresses tell them apart. Removed again after the test."""
    tcp = [{"number": 80, "name": "tcp", "protocol": "TCP"}]
    web = {"address": tb.pod_ip("default/web"), "ports": {"tcp": 8080}}
    specs = {
        "api": ([EXTERNAL], [{"address": str(tb.topology.external("api").ip)}]),
        "alias": ([ALIAS], [web]),
    }
    kind = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry"}
    docs = [
        {
            **kind,
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": hosts, "ports": tcp, "resolution": "STATIC", "endpoints": eps},
        }
        for name, (hosts, eps) in specs.items()
    ]
    apply_docs(tb, *docs)
    yield tb
    apply_docs(tb)


def resolve(tb: Testbed, who: str, name: str, rdtype: str = "A", tcp: bool = False) -> Any:
    transport = "tcp" if tcp else "udp"
    proc = tb.exec(f"default/{who}", [sys.executable, PROBE, "resolve", name, rdtype, transport])
    assert proc.returncode == 0, f"{who} resolving {name}: {proc.stderr}"
    return json.loads(proc.stdout)


def web_vip(tb: Testbed) -> str:
    return str(next(s.cluster_ip for s in tb.services() if s.name == "web"))


def dns_rules(tb: Testbed, who: str) -> list[str]:
    """The pod's nft rules that name port 53 (as ``nft -j`` lists them)."""
    tables = ruleset(tb.pod_netns(f"default/{who}"))
    assert tables, f"{who} holds no nftables table"
    proc = tb.exec(f"default/{who}", ["nft", "list", "ruleset"])
    return [line.strip() for line in proc.stdout.splitlines() if "dport 53 " in line]


def test_only_the_opted_in_pod_captures_dns(tb: Testbed) -> None:
    if ebpf(tb):  # the hooks take DNS by the pod's flag: no nftables table at all
        for who in ("dns", "plain"):
            proc = tb.exec(f"default/{who}", ["nft", "list", "tables"])
            assert (proc.returncode, proc.stdout) == (0, ""), (who, proc.stderr)
        assert pod_flags(tb, "dns") & POD_CAPTURE_DNS
        assert not pod_flags(tb, "plain") & POD_CAPTURE_DNS
        return
    assert dns_rules(tb, "dns") == [
        "meta mark & 0x00000fff != 0x00000539 udp dport 53 redirect to :15053",
        "meta mark & 0x00000fff != 0x00000539 tcp dport 53 redirect to :15053",
    ]
    assert dns_rules(tb, "plain") == []


def test_the_proxy_answers_service_names_with_the_pods_search_domains(tb: Testbed) -> None:
    fqdn = "web.default.svc.cluster.local"
    for tcp in (False, True):
        got = resolve(tb, "dns", "web", tcp=tcp)
        want = {"rcode": "NOERROR", "addresses": [web_vip(tb)], "ttl": PROXY_TTL, "name": fqdn}
        assert got == want, tcp
    # the same question from the pod without DNS capture reaches the testbed resolver
    untouched = resolve(tb, "plain", "web")
    assert (untouched["addresses"], untouched["ttl"]) == ([web_vip(tb)], RESOLVER_TTL)


def test_queries_to_any_resolver_over_ipv4_or_ipv6_reach_the_proxy(tb: Testbed) -> None:
    """Capture takes port 53 whatever the resolver (as ambient's in-pod rules): a query to an
    address no resolver has, to the pod's IPv6 loopback, or to an IPv4 address from a dual-stack
    socket, is answered by the proxy; sent as resolver libraries send it (unconnected UDP,
    connected UDP, TCP), and the reply comes from the resolver dialled, which a connected socket
    also reports as its peer (libraries drop replies from elsewhere)."""
    fqdn = "web.default.svc.cluster.local"
    servers, hows = ("192.0.2.53", "::1", "::ffff:192.0.2.53"), ("sendto", "connected", "tcp")
    argv = [sys.executable, PROBE, "asks", fqdn, ",".join(servers), ",".join(hows)]
    proc = tb.exec("default/dns", argv)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    for server in servers:
        for how in hows:
            got = answers[f"{server} {how}"]
            assert (got["addresses"], got["ttl"]) == ([web_vip(tb)], PROXY_TTL), (server, how)
            assert got["source"] == [server, 53], (server, how)
            assert got["peer"] == (None if how == "sendto" else [server, 53]), (server, how)


def test_other_names_go_to_the_pods_own_resolver(tb: Testbed) -> None:
    external_ip = str(tb.topology.external("api").ip)
    for tcp in (False, True):
        got = resolve(tb, "dns", OTHER_NAME, tcp=tcp)
        assert (got["addresses"], got["ttl"]) == ([external_ip], RESOLVER_TTL), tcp
    assert resolve(tb, "dns", "nowhere.external.test")["rcode"] == "NXDOMAIN"
    # a malformed query gets FORMERR from the proxy, which keeps answering
    proc = tb.exec("default/dns", [sys.executable, PROBE, "garbage"])
    assert json.loads(proc.stdout) == {"rcode": "FORMERR"}, proc.stderr
    assert resolve(tb, "dns", "web")["ttl"] == PROXY_TTL


def test_service_entry_hosts_without_addresses_get_one_each_and_are_reached_by_it(
    entries: Testbed,
) -> None:
    tb = entries
    external_ip = str(tb.topology.external("api").ip)

    def allocated(host: str) -> list[str]:
        return list(resolve(tb, "dns", host)["addresses"])

    wait_for(
        lambda: allocated(EXTERNAL) != [external_ip] and allocated(ALIAS),
        30,
        f"the proxy answering {EXTERNAL} and {ALIAS}",
    )
    (api,), (alias,) = allocated(EXTERNAL), allocated(ALIAS)
    assert api != alias and {ipaddress.ip_address(a) in RANGE for a in (api, alias)} == {True}
    assert resolve(tb, "dns", EXTERNAL, "AAAA")["addresses"] == []  # known host, no IPv6
    # without DNS capture the pod still gets the external's own address from its resolver
    assert resolve(tb, "plain", EXTERNAL)["addresses"] == [external_ip]
    assert resolve(tb, "plain", ALIAS)["rcode"] == "NXDOMAIN"
    # TCP to each allocated address (same port): captured, through the node's Envoy by that
    # address's own chain to its entry's endpoint: the external server, the web pod
    for host, answerer in ((EXTERNAL, "api"), (ALIAS, "web")):
        proc = tb.exec("default/dns", ["curl", "-sS", "--max-time", "5", f"http://{host}/"])
        assert proc.returncode == 0, f"{host}: {proc.stderr}"
        assert json.loads(proc.stdout)["name"] == answerer, host


def test_an_older_agents_dns_table_goes_on_restart(tb: Testbed) -> None:
    """eBPF mode: an agent before #18's DNS hooks kept DNS capture in a companion nftables table
    (the node rule set's DNS rules alone). The upgraded agent's verify flags it and the repair
    deletes it; DNS stays captured by the hooks."""
    if not ebpf(tb):
        pytest.skip("eBPF mode's upgrade")
    netns = netns_path(tb, "dns")
    older = CaptureSpec(dns=True, include_outbound_ranges=(), include_inbound_ports=())
    NftablesBackend().apply(netns, older)
    assert NftablesBackend().holds_table(netns)
    tb.restart_agent("n1")
    record = agent_pods(tb.name, "n1")["default/dns"]
    assert record["state"] == "captured" and "repaired" in record["reason"], record
    assert "nftables: the pod has a table" in record["reason"], record
    assert not NftablesBackend().holds_table(netns)
    assert resolve(tb, "dns", "web")["ttl"] == PROXY_TTL
