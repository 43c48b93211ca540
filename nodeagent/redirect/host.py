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
from nodeagent.redirect.nftables import Json, NftablesError, run_nft

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


def ipv4_addresses(pod_ips: Iterable[str]) -> list[str]:
    """The IPv4 addresses among POD_IPS, sorted. IPv6 probes are not SNATed (an ip-family
    table); the pod's IPv4 address still is."""
    addresses = sorted({ipaddress.ip_address(ip) for ip in pod_ips}, key=int)
    return [str(a) for a in addresses if a.version == 4]


def render(pod_ips: Iterable[str]) -> Json:
    """The transaction that replaces the whole table, and so the set's content, atomically."""
    v4 = ipv4_addresses(pod_ips)
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
    """``table ip nodeagent-host`` in the agent's own network namespace.

    Replacing the table re-registers its NAT hook in the kernel, which costs 8-20 ms (measured on
    this project's VMs; adding a set element costs 0.2 ms). So only the first sync and the ones
    asked ``whole`` (the agent's reconcile passes, which also repair the table) replace it; the
    others change just the set's elements that differ from what this object wrote last: a pod's
    ADD or DEL pays for its own addresses only.
    """

    def __init__(self) -> None:
        self._held: frozenset[str] | None = None  # the set's content after our last transaction

    def sync(self, pod_ips: Iterable[str], whole: bool = False) -> None:
        """Make ``captured-pods`` hold exactly these pods' IPv4 addresses (others are skipped)."""
        wanted = frozenset(ipv4_addresses(pod_ips))
        if not whole and self._held is not None:
            if wanted == self._held:
                return
            try:
                run_nft(render_change(wanted - self._held, self._held - wanted), _WHERE)
                self._held = wanted
                return
            except NftablesError:
                pass  # the table or an element went missing behind our back: replace it all
        self._held = None
        run_nft(render(wanted), _WHERE)
        self._held = wanted

    def remove(self) -> None:
        self._held = None
        run_nft({"nftables": _replace_table()[:2]}, _WHERE)


def render_change(added: Iterable[str], removed: Iterable[str]) -> Json:
    """The transaction that adds and deletes these elements of the set, nothing else."""
    where = {"family": FAMILY, "table": TABLE, "name": POD_SET}
    commands: list[Json] = []
    if gone := ipv4_addresses(removed):
        commands.append({"delete": {"element": {**where, "elem": gone}}})
    if new := ipv4_addresses(added):
        commands.append({"add": {"element": {**where, "elem": new}}})
    return {"nftables": commands}
