"""The latency and pod-start scenarios' deployment models: per-node/eBPF shares per-node's
testbed on nodes of its own, in eBPF mode (#18), and nothing else changes capture mode."""

from __future__ import annotations

from pathlib import Path

from bench import latency, podstart
from nodeagent.testbed.topology import loads_topology


def test_latency_hosts_per_node_ebpf_on_per_node_testbed_nodes_in_ebpf_mode() -> None:
    beds = {
        bed: loads_topology(latency.topology("t", bed, Path("/c"), Path("/p")), "t")
        for bed in latency.BEDS
    }
    modes = {
        bed: {n.name: top.capture_mode_of(n.name) for n in top.nodes} for bed, top in beds.items()
    }
    assert modes["per-node"] == {"n1": "nftables", "n2": "nftables", "n3": "ebpf", "n4": "ebpf"}
    assert modes["no-mesh"] == modes["sidecar"] == {"n1": "nftables", "n2": "nftables"}
    shared = beds["per-node"]
    for name in ("per-node", "per-node-ebpf"):
        model = latency.MODELS[name]
        server = shared.find_pod(f"bench/web{model.suffix}")
        same, cross = (shared.find_pod(model.client(p)) for p in latency.PLACEMENTS)
        assert server.node == same.node == model.nodes[0] != cross.node == model.nodes[1]
        # each model's clients call their own server's Service, on their own nodes
        service = next(s for s in shared.services if model.url == f"http://{s.name}.bench/")
        assert service.selector == server.labels
    assert latency.MODELS["per-node-ebpf"].bed == "per-node"


def test_podstart_puts_per_node_ebpf_on_an_ebpf_node_of_per_node_testbed() -> None:
    top = loads_topology(podstart._topology("per-node"), "t")
    bed, node = podstart.PLACES["per-node-ebpf"]
    assert (bed, top.capture_mode_of(node)) == ("per-node", "ebpf")
    assert top.capture_mode_of(podstart.PLACES["per-node"][1]) == "nftables"
    for other in ("no-mesh", "sidecar"):
        one = loads_topology(podstart._topology(other), "t")
        assert [one.capture_mode_of(n.name) for n in one.nodes] == ["nftables"]
