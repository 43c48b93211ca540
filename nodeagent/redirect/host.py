"""The node's side of capture: kubelet probes reach captured pods from PROBE_SOURCE.

Inbound capture sends every TCP connection to Envoy, but a kubelet probe must reach the app
itself. As in Istio ambient, the node SNATs its own TCP connections to captured pods to
169.254.7.127, and the pod's rules let that source through. This is the one table the agent
keeps in its own (on a node, the host's) network namespace.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from nodeagent.ports import PROBE_SOURCE
from nodeagent.redirect.nftables import Json, run_nft

FAMILY = "ip"
TABLE = "nodeagent-host"
POD_SET = "captured-pods"
SRCNAT = 100  # nft's "srcnat" priority
_WHERE = "the node's network namespace"


def _table() -> Json:
    return {"table": {"family": FAMILY, "name": TABLE}}


def _replace_table() -> list[Json]:
    return [{"add": _table()}, {"delete": _table()}, {"add": _table()}]


def _equals(left: Json, right: str) -> Json:
    return {"match": {"op": "==", "left": left, "right": right}}


def render(pod_ips: Iterable[str]) -> Json:
    """The transaction that replaces the whole table, and so the set's content, atomically."""
    addresses = sorted({ipaddress.ip_address(ip) for ip in pod_ips}, key=int)
    # IPv6 probes are not SNATed (an ip-family table); the pod's IPv4 address still is.
    v4 = [str(a) for a in addresses if a.version == 4]
    where = {"family": FAMILY, "table": TABLE}
    snat = [
        _equals({"meta": {"key": "l4proto"}}, "tcp"),
        # node-originated only: pods' traffic forwarded through the node keeps its source
        _equals({"fib": {"flags": ["saddr"], "result": "type"}}, "local"),
        _equals({"payload": {"protocol": "ip", "field": "daddr"}}, f"@{POD_SET}"),
        {"snat": {"addr": PROBE_SOURCE}},
    ]
    chain = {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": SRCNAT}
    commands: list[Json] = [
        *_replace_table(),
        {"add": {"set": {**where, "name": POD_SET, "type": "ipv4_addr"}}},
        {"add": {"chain": {**where, **chain, "policy": "accept"}}},
        {"add": {"rule": {**where, "chain": "postrouting", "expr": snat}}},
    ]
    if v4:
        commands.append({"add": {"element": {**where, "name": POD_SET, "elem": v4}}})
    return {"nftables": commands}


class ProbeSnat:
    """``table ip nodeagent-host`` in the agent's own network namespace."""

    def sync(self, pod_ips: Iterable[str]) -> None:
        """Make ``captured-pods`` hold exactly these pods' IPv4 addresses (others are skipped)."""
        run_nft(render(pod_ips), _WHERE)

    def remove(self) -> None:
        run_nft({"nftables": _replace_table()[:2]}, _WHERE)
