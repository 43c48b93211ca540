"""Kubernetes Services on the testbed: endpoints and the node's service proxy (kube-proxy's job).

Each node network namespace gets one nftables table that DNATs a service's virtual IP:port to one
of its endpoints, picked at random like kube-proxy's nftables mode. A pod calling a service whose
chosen endpoint sits on the same bridge is masqueraded, or the reply would bypass the node and
never be un-NATed. Rendering is pure; applying runs ``nft -f -`` inside the node's namespace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nodeagent.testbed import netns
from nodeagent.testbed.topology import Node, Pod, Service

TABLE = "testbed-services"


@dataclass(frozen=True)
class Endpoint:
    pod: str  # namespace/name
    ip: str
    port: int


def endpoints(
    service: Service, pods: Sequence[Pod], pod_ips: Mapping[str, str]
) -> dict[int, list[Endpoint]]:
    """Endpoints per service port: the selected pods that have an address."""
    selected = [p for p in pods if service.selects(p) and p.key in pod_ips]
    return {
        sp.port: [Endpoint(p.key, pod_ips[p.key], sp.target_port) for p in selected]
        for sp in service.ports
    }


def render_ruleset(
    services: Sequence[Service], pods: Sequence[Pod], node: Node, pod_ips: Mapping[str, str]
) -> str:
    """The node's service table as an nft script; loading it atomically replaces the old one."""
    lines = [
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  chain services {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    chains: list[str] = []
    for i, svc in enumerate(services):
        for port, eps in endpoints(svc, pods, pod_ips).items():
            match = f"ip daddr {svc.cluster_ip} tcp dport {port}"
            comment = f'comment "{svc.key}:{port}"'
            if not eps:
                # kube-proxy answers a service without endpoints with a reset, not a black hole.
                lines.append(f"    {match} reject with tcp reset {comment}")
                continue
            chain = f"svc-{i}-{port}"
            lines.append(f"    {match} jump {chain} {comment}")
            picks = ", ".join(f"{j} : jump {chain}-ep{j}" for j in range(len(eps)))
            chains.append(
                f"  chain {chain} {{\n    numgen random mod {len(eps)} vmap {{ {picks} }}\n  }}"
            )
            for j, ep in enumerate(eps):
                chains.append(
                    f"  chain {chain}-ep{j} {{\n"
                    f'    meta l4proto tcp dnat to {ep.ip}:{ep.port} comment "{ep.pod}"\n'
                    "  }"
                )
    lines.append("  }")
    lines.extend(chains)
    lines += [
        "  chain hairpin {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ct status dnat ip saddr {node.pod_cidr} ip daddr {node.pod_cidr} masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(netns_name: str, ruleset: str) -> None:
    netns.run(netns.in_netns(netns_name, ["nft", "-f", "-"]), input=ruleset)
