"""The nftables capture a spec renders (pure: no root, no kernel), and how verify compares it."""

import copy
import ipaddress
from typing import Any

import pytest

from nodeagent.redirect import host
from nodeagent.redirect.capture import (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_RANGES,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_RANGES,
    CaptureSpec,
    CaptureSpecError,
    Network,
)
from nodeagent.redirect.nftables import describe, differences, render, render_new, ruleset

DEFAULT_INBOUND = [
    "meta l4proto != tcp return",
    "ip saddr 169.254.7.127 return",
    "meta mark & 0xfff == 0x539 return",
    "tcp dport 15008 return",
]
DEFAULT_OUTBOUND = [
    "meta l4proto != tcp return",
    "meta mark & 0xfff == 0x539 return",
    "meta oifname lo return",
]
REDIRECT_INBOUND = "meta l4proto tcp redirect to :15006"
REDIRECT_OUTBOUND = "meta l4proto tcp redirect to :15001"


def nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def rules(spec: CaptureSpec, chain: str) -> list[str]:
    return [
        describe(cmd["add"]["rule"]["expr"])
        for cmd in render(spec)["nftables"]
        if "rule" in cmd.get("add", {}) and cmd["add"]["rule"]["chain"] == chain
    ]


def test_transaction_replaces_our_table_and_nothing_else() -> None:
    commands = render(CaptureSpec())["nftables"]
    table = {"family": "inet", "name": "nodeagent"}
    replace = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    assert commands[:3] == replace
    chains = [c["add"]["chain"] for c in commands if "chain" in c.get("add", {})]
    base = {"family": "inet", "table": "nodeagent", "type": "nat", "prio": -100, "policy": "accept"}
    assert chains == [
        {**base, "name": "prerouting", "hook": "prerouting"},
        {**base, "name": "output", "hook": "output"},
    ]
    bodies = [body for c in commands for body in c["add" if "add" in c else "delete"].values()]
    assert {(b["family"], b.get("table", b.get("name"))) for b in bodies} == {("inet", "nodeagent")}


def test_default_spec_captures_all_tcp_both_ways() -> None:
    assert rules(CaptureSpec(), "prerouting") == [*DEFAULT_INBOUND, REDIRECT_INBOUND]
    assert rules(CaptureSpec(), "output") == [*DEFAULT_OUTBOUND, REDIRECT_OUTBOUND]


def test_default_redirect_rules_in_nft_json() -> None:
    commands = render(CaptureSpec())["nftables"]
    exprs = [c["add"]["rule"]["expr"] for c in commands if "rule" in c.get("add", {})]
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    assert [tcp, {"redirect": {"port": 15006}}] in exprs
    assert [tcp, {"redirect": {"port": 15001}}] in exprs
    mark = {"&": [{"meta": {"key": "mark"}}, 0xFFF]}
    assert [{"match": {"op": "==", "left": mark, "right": 0x539}}, {"return": None}] in exprs


def test_excluded_inbound_ports_one_is_a_value_many_a_sorted_set() -> None:
    one = rules(CaptureSpec(exclude_inbound_ports=(9090,)), "prerouting")
    assert one == [*DEFAULT_INBOUND, "tcp dport 9090 return", REDIRECT_INBOUND]
    many = rules(CaptureSpec(exclude_inbound_ports=(9090, 22, 9090)), "prerouting")
    assert many == [*DEFAULT_INBOUND, "tcp dport { 22, 9090 } return", REDIRECT_INBOUND]


def test_included_inbound_ports_return_everything_else() -> None:
    spec = CaptureSpec(include_inbound_ports=(8080, 80), exclude_inbound_ports=(80,))
    assert rules(spec, "prerouting") == [
        *DEFAULT_INBOUND,
        "tcp dport 80 return",
        "tcp dport != { 80, 8080 } return",
        REDIRECT_INBOUND,
    ]


def test_no_included_inbound_ports_captures_no_inbound() -> None:
    spec = CaptureSpec(include_inbound_ports=())
    assert rules(spec, "prerouting") == []
    assert rules(spec, "output") == [*DEFAULT_OUTBOUND, REDIRECT_OUTBOUND]


def test_excluded_outbound_ports() -> None:
    spec = CaptureSpec(exclude_outbound_ports=(5432, 3306))
    assert rules(spec, "output") == [
        *DEFAULT_OUTBOUND,
        "tcp dport { 3306, 5432 } return",
        REDIRECT_OUTBOUND,
    ]
    assert rules(spec, "prerouting") == [*DEFAULT_INBOUND, REDIRECT_INBOUND]


def test_excluded_outbound_ranges_per_family_merged_as_nft_lists_them() -> None:
    spec = CaptureSpec(
        exclude_outbound_ranges=nets(
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.168.0.0/25",
            "192.168.0.128/25",
            "172.16.0.0/24",
            "172.16.1.0/24",
            "172.16.2.0/24",
            "1.2.3.4/32",
            "fd00::/8",
            "2001:db8::1/128",
        )
    )
    assert rules(spec, "output") == [
        *DEFAULT_OUTBOUND,
        "ip daddr { 1.2.3.4, 10.0.0.0/8, 172.16.0.0-172.16.2.255, 192.168.0.0/24 } return",
        "ip6 daddr { 2001:db8::1, fd00::/8 } return",
        REDIRECT_OUTBOUND,
    ]


def test_one_excluded_range_is_a_value() -> None:
    spec = CaptureSpec(exclude_outbound_ranges=nets("fd00::/8"))
    assert rules(spec, "output")[3] == "ip6 daddr fd00::/8 return"


def test_included_outbound_ranges_return_other_destinations_and_other_families() -> None:
    v4 = CaptureSpec(include_outbound_ranges=nets("10.96.0.0/12", "10.0.0.0/16"))
    assert rules(v4, "output") == [
        *DEFAULT_OUTBOUND,
        "ip daddr != { 10.0.0.0/16, 10.96.0.0/12 } return",
        "meta nfproto ipv6 return",
        REDIRECT_OUTBOUND,
    ]
    v6 = CaptureSpec(include_outbound_ranges=nets("fd00::/8"), exclude_outbound_ports=(22,))
    assert rules(v6, "output") == [
        *DEFAULT_OUTBOUND,
        "meta nfproto ipv4 return",
        "ip6 daddr != fd00::/8 return",
        "tcp dport 22 return",
        REDIRECT_OUTBOUND,
    ]


def test_excluded_and_included_ranges_together() -> None:
    spec = CaptureSpec(
        exclude_outbound_ranges=nets("10.0.5.0/24"),
        include_outbound_ranges=nets("10.0.0.0/16", "fd00::/8"),
    )
    assert rules(spec, "output") == [
        *DEFAULT_OUTBOUND,
        "ip daddr 10.0.5.0/24 return",
        "ip daddr != 10.0.0.0/16 return",
        "ip6 daddr != fd00::/8 return",
        REDIRECT_OUTBOUND,
    ]


def test_no_included_outbound_ranges_captures_no_outbound() -> None:
    spec = CaptureSpec(include_outbound_ranges=(), exclude_outbound_ports=(22,))
    assert rules(spec, "output") == []
    assert rules(spec, "prerouting") == [*DEFAULT_INBOUND, REDIRECT_INBOUND]


def test_rendering_is_deterministic() -> None:
    spec = CaptureSpec(exclude_outbound_ranges=nets("fd00::/8", "10.0.0.0/8"))
    same = CaptureSpec(exclude_outbound_ranges=nets("10.0.0.0/8", "fd00::/8"))
    assert render(spec) == render(same)


# -- verify's comparison --------------------------------------------------------------------------


def listed(spec: CaptureSpec) -> list[dict[str, Any]]:
    """What ``nft -j list ruleset`` gives back: handles, metainfo, nft's own spellings."""
    objects: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
    for handle, obj in enumerate(copy.deepcopy(ruleset(spec)), start=1):
        next(iter(obj.values()))["handle"] = handle
        objects.append(obj)
    return objects


def test_a_listing_of_what_was_rendered_matches() -> None:
    spec = CaptureSpec(exclude_outbound_ranges=nets("::ffff:0:0/96", "10.0.0.0/8", "192.0.2.0/24"))
    have = listed(spec)
    matches = [o["rule"]["expr"][0]["match"] for o in have if "rule" in o]
    # nft spells a v4-mapped prefix its own way and may order set elements differently
    v6 = next(m for m in matches if m["left"] == {"payload": {"protocol": "ip6", "field": "daddr"}})
    v6["right"] = {"prefix": {"addr": "::ffff:0.0.0.0", "len": 96}}
    v4 = next(m for m in matches if isinstance(m["right"], dict) and "set" in m["right"])
    v4["right"]["set"].reverse()
    other = {"rule": {"family": "ip", "table": "filter", "chain": "x", "handle": 1, "expr": []}}
    assert differences(ruleset(spec), [*have, other]) == []


def test_missing_table() -> None:
    other_table = [{"table": {"family": "ip", "name": "nodeagent", "handle": 1}}]
    assert differences(ruleset(CaptureSpec()), other_table) == ["table inet nodeagent is missing"]


def test_a_removed_rule_an_added_rule_and_a_changed_chain_are_named() -> None:
    have = listed(CaptureSpec())
    have = [o for o in have if "rule" not in o or "redirect" not in str(o["rule"]["expr"])]
    dport = {"payload": {"protocol": "tcp", "field": "dport"}}
    extra = [{"match": {"op": "==", "left": dport, "right": 22}}, {"accept": None}]
    have.append(
        {"rule": {"family": "inet", "table": "nodeagent", "chain": "output", "expr": extra}}
    )
    next(o["chain"] for o in have if "chain" in o)["prio"] = 0
    assert differences(ruleset(CaptureSpec()), have) == [
        "chain output: missing rule `meta l4proto tcp redirect to :15001`",
        "chain output: unexpected rule 4 `tcp dport 22 accept`",
        "chain prerouting: prio is 0, expected -100",
        "chain prerouting: missing rule `meta l4proto tcp redirect to :15006`",
    ]


def test_a_different_spec_differs() -> None:
    problems = differences(ruleset(CaptureSpec(exclude_inbound_ports=(22,))), listed(CaptureSpec()))
    assert problems == ["chain prerouting: missing rule `tcp dport 22 return`"]


def test_a_dormant_table_or_foreign_objects_in_it_differ() -> None:
    have = listed(CaptureSpec())
    next(o["table"] for o in have if "table" in o)["flags"] = "dormant"
    have.append({"set": {"family": "inet", "table": "nodeagent", "name": "s", "type": "ipv4_addr"}})
    assert differences(ruleset(CaptureSpec()), have) == [
        "table inet nodeagent has flags (dormant?): it must have none",
        "unexpected set s",
    ]


# -- annotations and the node's probe SNAT --------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (EXCLUDE_INBOUND_PORTS, "80,http"),
        (INCLUDE_INBOUND_PORTS, "70000"),
        (EXCLUDE_OUTBOUND_RANGES, "10.0.0.0/33"),
        (INCLUDE_OUTBOUND_RANGES, "10.0.0.0/8, not-a-cidr"),
    ],
)
def test_annotation_errors_name_the_annotation(annotation: str, value: str) -> None:
    with pytest.raises(CaptureSpecError, match=annotation.replace(".", r"\.")):
        CaptureSpec.from_annotations({annotation: value})


def test_annotations_render_as_asked() -> None:
    spec = CaptureSpec.from_annotations(
        {INCLUDE_INBOUND_PORTS: "", INCLUDE_OUTBOUND_RANGES: "10.96.0.0/12"}
    )
    assert rules(spec, "prerouting") == []
    assert rules(spec, "output")[3:] == [
        "ip daddr != 10.96.0.0/12 return",
        "meta nfproto ipv6 return",
        REDIRECT_OUTBOUND,
    ]


@pytest.mark.parametrize("rules", ["node", "sidecar"])
def test_a_new_pod_gets_its_table_created_not_replaced(rules: str) -> None:
    """The same table, chains and rules as a replacement, without deleting a table (which costs
    milliseconds in the kernel); "create" fails, changing nothing, where the table exists."""
    new = render_new(CaptureSpec(exclude_inbound_ports=(9090,)), rules)["nftables"]
    replace = render(CaptureSpec(exclude_inbound_ports=(9090,)), rules)["nftables"]
    table = {"table": {"family": "inet", "name": "nodeagent"}}
    assert new[0] == {"create": table}
    assert replace[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    assert new[1:] == replace[3:]


def test_probe_snat_set_holds_ipv4_pod_addresses_only() -> None:
    commands = host.render(["10.0.0.9", "fd00::9", "10.0.0.10", "10.0.0.9"])["nftables"]
    elements = [c["add"]["element"]["elem"] for c in commands if "element" in c.get("add", {})]
    assert elements == [["10.0.0.9", "10.0.0.10"]]
    rule = next(c["add"]["rule"] for c in commands if "rule" in c.get("add", {}))
    assert rule["chain"] == "postrouting"
    assert rule["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {
            "match": {
                "op": "==",
                "left": {"fib": {"flags": ["saddr"], "result": "type"}},
                "right": "local",
            }
        },
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "@captured-pods",
            }
        },
        {"snat": {"addr": "169.254.7.127"}},
    ]
    assert host.render([])["nftables"][-1]["add"].keys() == {"rule"}


def test_probe_snat_change_touches_only_the_set_elements() -> None:
    """A pod's ADD or DEL changes the set's elements in one transaction, never the table (whose
    replacement re-registers the NAT hook: milliseconds per ADD)."""
    commands = host.render_change(["10.0.0.10", "fd00::1", "10.0.0.9"], ["10.0.0.2"])["nftables"]
    where = {"family": "ip", "table": "nodeagent-host", "name": "captured-pods"}
    assert commands == [
        {"delete": {"element": {**where, "elem": ["10.0.0.2"]}}},
        {"add": {"element": {**where, "elem": ["10.0.0.9", "10.0.0.10"]}}},
    ]
    assert host.render_change([], ["fd00::1"]) == {"nftables": []}


def test_probe_snat_rejects_what_is_not_an_address() -> None:
    with pytest.raises(ValueError, match="pod-ip"):
        host.render(["pod-ip"])
