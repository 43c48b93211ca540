"""eBPF capture, the pure parts: the maps' key layout (bpf/capture.h), a CaptureSpec turned into
one pod's entries with the exclusions nftables.py applies, the DNS capture flag and its hooks,
the kernel requirement check, finding a pod's cgroup as kubelet lays it out, and finding the process
that holds a pod's inbound listener."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from pathlib import Path

import pytest

from nodeagent import ports
from nodeagent.redirect import ebpf, ebpf_load, ebpf_maps, inbound_listener
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.ebpf_maps import (
    MAPS,
    POD_CAPTURE_DNS,
    POD_CAPTURE_IN,
    POD_CAPTURE_OUT,
    POD_INBOUND_ALL,
    POD_INCLUDE_ALL4,
    POD_INCLUDE_ALL6,
    PORT_IN_EXCLUDED,
    PORT_IN_INCLUDED,
    pod_entries,
)
from nodeagent.redirect.nftables import NODE_RULES, RULE_SETS, describe, ruleset
from nodeagent.testbed.topology import TopologyError, loads_topology

BPF = Path(__file__).resolve().parents[2] / "bpf"
NETNS_A, NETNS_B = 4097, 8193


def spec(**annotations: str) -> CaptureSpec:
    return CaptureSpec.from_annotations(
        {f"traffic.sidecar.istio.io/{k}": v for k, v in annotations.items()}
    )


def test_key_sizes_are_those_bpf_capture_h_declares() -> None:
    header = (BPF / "capture.h").read_text()
    # port_key {u64; u32; u32}, range_key {u32; u32[2]; u32[4]}, peer_key {u64; u32[4]; u32; u32}
    assert "struct range_key {" in header and "__u32 netns[2];" in header  # no padding: 28
    net = ipaddress.ip_network("10.0.0.0/8")
    assert len(ebpf_maps.pod_key(1)) == MAPS["pods"][0]
    assert len(ebpf_maps.port_key(1, 80)) == MAPS["ports_out"][0]
    assert len(ebpf_maps.range_key(1, net)) == MAPS["ranges_ex"][0] == MAPS["ranges_in"][0]
    assert len(ebpf_maps.peer_key(1, "127.0.0.1", 40000)) == MAPS["origin_by_peer"][0]
    assert len(ebpf_maps.addr_key("10.244.1.5")) == MAPS["pod_addrs"][0]
    assert len(ebpf_maps.listener_key(1)) == MAPS["listeners"][0]
    assert "struct addr_key {" in header
    for name in MAPS:
        assert f" {name}, " in header, name


def test_range_keys_prefix_the_netns_cookie_and_map_ipv4_into_ipv6() -> None:
    v4 = ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("10.244.2.0/24"))
    assert struct.unpack_from("=IQ", v4) == (64 + 96 + 24, NETNS_A)
    assert v4[12:] == bytes(10) + b"\xff\xff" + bytes([10, 244, 2, 0])
    v6 = ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("fd00::/8"))
    assert struct.unpack_from("=I", v6)[0] == 64 + 8
    assert v6[12:] == ipaddress.IPv6Address("fd00::").packed
    assert ebpf_maps.netns_of("ranges_ex", v4) == NETNS_A
    assert ebpf_maps.netns_of("ports_out", ebpf_maps.port_key(NETNS_B, 7777)) == NETNS_B


def test_two_pods_with_the_same_spec_and_address_never_share_a_key() -> None:
    """Every pod netns has its own 127.0.0.1: keys carry the netns cookie."""
    same = spec(
        excludeOutboundPorts="7777",
        excludeOutboundIPRanges="10.244.2.0/24",
        includeOutboundIPRanges="10.96.0.0/12",
        excludeInboundPorts="9090",
    )
    a = pod_entries(NETNS_A, same, ["10.244.1.5"])
    b = pod_entries(NETNS_B, same, ["10.244.1.5"])
    for name in ebpf_maps.POD_MAPS:
        if name == "pod_addrs":  # keyed by address (pod IPs are unique on a node), owner inside
            continue
        assert a.keys(name) and not a.keys(name) & b.keys(name), name
    key = ebpf_maps.addr_key("10.244.1.5")
    owners = [ebpf_maps.netns_of("pod_addrs", key, e.maps["pod_addrs"][key]) for e in (a, b)]
    assert owners == [NETNS_A, NETNS_B]
    assert ebpf_maps.peer_key(NETNS_A, "127.0.0.1", 40000) != ebpf_maps.peer_key(
        NETNS_B, "127.0.0.1", 40000
    )


def test_default_spec_captures_every_destination_but_the_pods_own_addresses() -> None:
    entries = pod_entries(NETNS_A, CaptureSpec(), ["10.244.1.5", "fd00::5"])
    flags = POD_CAPTURE_OUT | POD_INCLUDE_ALL4 | POD_INCLUDE_ALL6 | POD_CAPTURE_IN | POD_INBOUND_ALL
    assert entries.maps["pods"] == {ebpf_maps.pod_key(NETNS_A): struct.pack("=I", flags)}
    # inbound: every port, found by the pod's own addresses
    assert entries.maps["pod_addrs"] == {
        ebpf_maps.addr_key("10.244.1.5"): ebpf_maps.pod_key(NETNS_A),
        ebpf_maps.addr_key("fd00::5"): ebpf_maps.pod_key(NETNS_A),
    }
    assert ebpf_maps.addr_key("10.244.1.5") == bytes(10) + b"\xff\xff" + bytes([10, 244, 1, 5])
    assert not entries.keys("ports_in")
    # nftables skips `oifname lo`: the pod dialling its own address stays uncaptured
    assert entries.keys("ranges_ex") == {
        ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("10.244.1.5/32")),
        ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("fd00::5/128")),
    }
    assert not entries.keys("ranges_in") and not entries.keys("ports_out")


def test_annotations_become_exclusions_and_inclusions() -> None:
    entries = pod_entries(
        NETNS_A,
        spec(
            excludeOutboundPorts="7777,15020",
            excludeOutboundIPRanges="10.244.2.0/24",
            includeOutboundIPRanges="10.96.0.0/12",
        ),
    )
    # IPv4 ranges only: IPv6 destinations are captured nowhere (nftables: nfproto ipv6 return)
    flags = POD_CAPTURE_OUT | POD_CAPTURE_IN | POD_INBOUND_ALL
    assert entries.maps["pods"][ebpf_maps.pod_key(NETNS_A)] == struct.pack("=I", flags)
    assert entries.keys("ports_out") == {
        ebpf_maps.port_key(NETNS_A, 7777),
        ebpf_maps.port_key(NETNS_A, 15020),
    }
    assert entries.keys("ranges_ex") == {
        ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("10.244.2.0/24"))
    }
    assert entries.keys("ranges_in") == {
        ebpf_maps.range_key(NETNS_A, ipaddress.ip_network("10.96.0.0/12"))
    }


def test_an_empty_include_list_captures_no_outbound_tcp() -> None:
    entries = pod_entries(NETNS_A, spec(includeOutboundIPRanges=""))
    inbound_only = POD_CAPTURE_IN | POD_INBOUND_ALL
    assert entries.maps["pods"][ebpf_maps.pod_key(NETNS_A)] == struct.pack("=I", inbound_only)


def test_inbound_port_annotations_as_nftables_prerouting_reads_them() -> None:
    """Exclusions first (nftables returns on them before the include check), then inclusions;
    includeInboundPorts "" captures no inbound TCP."""
    listed = pod_entries(NETNS_A, spec(includeInboundPorts="8080,9090", excludeInboundPorts="9090"))
    assert listed.maps["pods"][ebpf_maps.pod_key(NETNS_A)] == struct.pack(
        "=I", POD_CAPTURE_OUT | POD_INCLUDE_ALL4 | POD_INCLUDE_ALL6 | POD_CAPTURE_IN
    )
    assert listed.maps["ports_in"] == {
        ebpf_maps.port_key(NETNS_A, 8080): PORT_IN_INCLUDED,
        ebpf_maps.port_key(NETNS_A, 9090): PORT_IN_EXCLUDED,
    }
    none = pod_entries(NETNS_A, spec(includeInboundPorts=""))
    flags = struct.unpack("=I", none.maps["pods"][ebpf_maps.pod_key(NETNS_A)])[0]
    assert not flags & POD_CAPTURE_IN
    header, program = (BPF / "capture.h").read_text(), (BPF / "sklookup.c").read_text()
    assert f"PORT_IN_EXCLUDED {PORT_IN_EXCLUDED[0]}" in header
    assert f"PORT_IN_INCLUDED {PORT_IN_INCLUDED[0]}" in header
    assert f"POD_CAPTURE_IN {POD_CAPTURE_IN}" in header
    assert f"POD_INBOUND_ALL {POD_INBOUND_ALL}" in header
    # the exceptions nftables' prerouting makes, with nodeagent.ports' numbers
    assert f"HBONE_PORT {ports.HBONE_PORT}" in header
    probe = int(ipaddress.IPv4Address(ports.PROBE_SOURCE))
    assert f"PROBE_SOURCE {probe:#x}" in header
    assert "SK_DROP" in program and "bpf_sk_assign" in program


def test_origin_values_read_back_as_host_and_port() -> None:
    v4 = bytes(10) + b"\xff\xff" + bytes([10, 96, 0, 99]) + struct.pack("!H", 80) + b"\x01\x00"
    assert ebpf_maps.origin(v4) == "10.96.0.99:80"
    v6 = ipaddress.IPv6Address("fd00::1").packed + struct.pack("!H", 443) + b"\x00\x00"
    assert ebpf_maps.origin(v6) == "[fd00::1]:443"


def pod_flags(captured: CaptureSpec) -> int:
    entry = pod_entries(NETNS_A, captured).maps["pods"][ebpf_maps.pod_key(NETNS_A)]
    value: int = struct.unpack("=I", entry)[0]
    return value


def test_dns_capture_is_a_pod_flag_of_its_own() -> None:
    """As nftables' DNS rules, which come before the outbound ones and stand without them: a
    pod that captures no outbound TCP (includeOutboundIPRanges "") still captures DNS."""
    everything = POD_CAPTURE_OUT | POD_INCLUDE_ALL4 | POD_INCLUDE_ALL6
    inbound = POD_CAPTURE_IN | POD_INBOUND_ALL
    assert pod_flags(CaptureSpec()) == everything | inbound
    assert pod_flags(CaptureSpec(dns=True)) == everything | inbound | POD_CAPTURE_DNS
    no_tcp = CaptureSpec(dns=True, include_outbound_ranges=(), include_inbound_ports=())
    assert pod_flags(no_tcp) == POD_CAPTURE_DNS
    node = {describe(o["rule"]["expr"]) for o in ruleset(no_tcp, NODE_RULES) if "rule" in o}
    assert node and all("redirect to :15053" in r for r in node)  # nftables: DNS only, too
    # excludeOutboundPorts does not exempt DNS (nftables' DNS rules come first)
    excluded = CaptureSpec(dns=True, exclude_outbound_ports=(53,))
    assert pod_flags(excluded) & POD_CAPTURE_DNS
    header = (BPF / "capture.h").read_text()
    assert f"POD_CAPTURE_DNS {POD_CAPTURE_DNS}" in header
    assert f"DNS_PORT {ports.DNS_CAPTURED_PORT}" in header
    assert f"DNS_PROXY_PORT {ports.DNS_PORT}" in header
    assert "ebpf-companion" not in RULE_SETS  # DNS capture left nftables in eBPF mode


def test_the_dns_hooks_are_loaded_and_linked_per_pod() -> None:
    """sendmsg/recvmsg/getpeername (program type 18) with the kernel's attach types
    (uapi bpf.h: UDP4_SENDMSG 14, UDP6_SENDMSG 15, UDP4_RECVMSG 19, UDP6_RECVMSG 20,
    INET4_GETPEERNAME 29, INET6_GETPEERNAME 30), each linked to the pod's cgroup."""
    want = {
        "sendmsg4": 14,
        "sendmsg6": 15,
        "recvmsg4": 19,
        "recvmsg6": 20,
        "getpeername4": 29,
        "getpeername6": 30,
    }
    for hook, attach_type in want.items():
        assert ebpf_load.HOOKS[f"{hook}.c"] == (hook, 18, attach_type)
        assert ebpf.POD_HOOKS[hook] == attach_type
        assert (BPF / f"{hook}.c").read_text().startswith("/* cgroup/")
        assert f"int {hook}(struct bpf_sock_addr *ctx)" in ebpf_load.source(BPF)


def test_missing_requirements_name_what_is_missing(tmp_path: Path) -> None:
    mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"
    assert ebpf.missing_requirements("6.18.44-fc", mounts) == []
    old = ebpf.missing_requirements("5.4.0-100-generic", mounts)
    assert len(old) == 1 and "5.4.0-100-generic is older than 5.17" in old[0]
    assert "sk_lookup" in old[0]
    no_v2 = ebpf.missing_requirements("6.1.0", "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n")
    assert any("no cgroup v2 hierarchy" in p for p in no_v2)
    wrong_root = ebpf.missing_requirements("6.1.0", mounts, cgroup_root=Path("/run/x"))
    assert wrong_root == ["--cgroup-root /run/x is not a cgroup v2 mount"]


def test_the_filesystem_of_a_path_is_its_deepest_mount() -> None:
    mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\ntmpfs /run tmpfs rw 0 0\n"
    assert ebpf.filesystem_of(Path("/sys/fs/bpf/nodeagent/pods"), mounts) == "bpf"
    assert ebpf.filesystem_of(Path("/sys/fs/bpfx"), mounts) == "sysfs"
    assert ebpf.filesystem_of(Path("/run/nodeagent-testbed-bpf/t/n1"), mounts) == "tmpfs"


def test_the_pod_cgroup_is_found_by_uid_in_both_kubelet_layouts(tmp_path: Path) -> None:
    uid = "0f6c3a52-1b2d-4e5f-8a9b-0c1d2e3f4a5b"
    cgroupfs = tmp_path / "a" / "kubepods" / "besteffort" / f"pod{uid}"
    (cgroupfs / "c0ffee").mkdir(parents=True)
    assert ebpf.find_pod_cgroup(uid, tmp_path / "a") == cgroupfs
    systemd = (
        tmp_path
        / "b"
        / "kubepods.slice"
        / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    )
    systemd.mkdir(parents=True)
    assert ebpf.find_pod_cgroup(uid, tmp_path / "b") == systemd
    assert ebpf.find_pod_cgroup("1" + uid[1:], tmp_path) is None


def test_ebpf_capture_without_the_pod_uid_is_an_error_naming_it() -> None:
    backend = ebpf.EbpfBackend(cgroup_root=Path("/nonexistent"))
    with pytest.raises(ebpf.EbpfError, match="K8S_POD_UID"):
        backend.apply(Path("/run/netns/x"), CaptureSpec(), uid="")


def test_topology_capture_mode() -> None:
    base = "name: t\nnodes: [{name: a}]\n"
    assert loads_topology(base, "t.yaml").capture_mode == "nftables"
    assert loads_topology(base + "captureMode: ebpf\n", "t.yaml").capture_mode == "ebpf"
    with pytest.raises(TopologyError, match="captureMode"):
        loads_topology(base + "captureMode: bpf\n", "t.yaml")
    with pytest.raises(TopologyError, match="nftables only"):
        loads_topology(base + "captureMode: ebpf\nproxyModel: sidecar\n", "t.yaml")
    mixed = loads_topology("name: t\nnodes: [{name: a, captureMode: ebpf}, {name: b}]\n", "t")
    assert (mixed.capture_mode_of("a"), mixed.capture_mode_of("b")) == ("ebpf", "nftables")
    with pytest.raises(TopologyError, match=r"nodes\[0\]\.captureMode"):
        loads_topology("name: t\nnodes: [{name: a, captureMode: tc}]\n", "t")


def test_auto_falls_back_to_nftables_and_ebpf_mode_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nodeagent import agent

    missing = ["kernel 5.4.0 is older than 5.15 (needs ...)"]
    monkeypatch.setattr(ebpf, "missing_requirements", lambda **_: missing)
    config = agent.AgentConfig(node_name="n1", capture_mode="auto")
    assert asyncio.run(agent._capture_backend(config, False)).name == "nftables"
    config.capture_mode = "ebpf"
    with pytest.raises(ebpf.EbpfError, match=r"--capture-mode ebpf: .*kernel 5\.4\.0 is older"):
        asyncio.run(agent._capture_backend(config, False))
    assert asyncio.run(agent._capture_backend(config, True)).name == "nftables"  # sidecar model


TCP = """  sl  local_address rem_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4101 1
   1: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4102 1
   2: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4103 1
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4104 1
   4: 0501F40A:3A9E 0601F40A:9C41 01 00000000:00000000 00:00000000 00000000     0        0 4105 1
"""


def test_the_inbound_listeners_are_the_sockets_listening_on_any_address_port_15006() -> None:
    """Envoy with SO_REUSEPORT: one listening socket per worker, any of them will do."""
    assert inbound_listener.listening_inodes(TCP, ports.INBOUND_PORT) == [4102, 4103]
    assert inbound_listener.listening_inodes(TCP, 8080) == [4104]
    assert inbound_listener.listening_inodes(TCP, 9090) == []


def test_the_listener_is_taken_from_the_process_holding_it(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    netns = tmp_path / "netns-of-pod"
    netns.write_text("")
    for pid, links in {"10": ["pipe:[1]", "socket:[999]"], "20": ["socket:[4103]"]}.items():
        (proc / pid / "fd").mkdir(parents=True)
        for fd, link in enumerate(links):
            (proc / pid / "fd" / str(fd)).symlink_to(link)
    (proc / "self").mkdir()
    assert inbound_listener.owner_fd([10, 20], [4102, 4103], proc) == (20, 0)
    assert inbound_listener.owner_fd([10], [4102, 4103], proc) is None
    assert inbound_listener.owner_fd([10, 20], [], proc) is None
    # the hinted pid (the node's Envoy) first, then the others
    (proc / "20" / "ns").mkdir()
    (proc / "20" / "ns" / "net").symlink_to(netns)  # a process inside the pod's netns
    assert inbound_listener.candidates([30], netns, proc) == [30, 20, 10]


def test_the_loader_reuses_each_pinned_map_and_creates_the_missing_ones() -> None:
    assert ebpf_load.HOOKS["sklookup.c"] == ("sklookup", 30, 36)  # SK_LOOKUP, BPF_SK_LOOKUP
    assert set(ebpf_load.MAP_NAMES) == set(MAPS)
    text = ebpf_load.prelude(Path("/sys/fs/bpf/x/maps"), {"pods"})
    pinned = 'BPF_TABLE_PINNED(t, k, v, n, m, "/sys/fs/bpf/x/maps/pods", f)'
    assert f"#define BPF_MAYBE_pods(t, k, v, n, m, f) {pinned}" in text
    assert "#define BPF_MAYBE_listeners(t, k, v, n, m, f) BPF_F_TABLE(t, k, v, n, m, f)" in text
    assert "sklookup" in ebpf_load.source(BPF)
    assert ebpf.POD_LINKS == [
        "connect4",
        "connect6",
        "getpeername4",
        "getpeername6",
        "recvmsg4",
        "recvmsg6",
        "sendmsg4",
        "sendmsg6",
        "sklookup",
        "sockops",
    ]
