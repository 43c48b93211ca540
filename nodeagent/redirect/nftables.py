"""nftables capture inside a pod's network namespace: one table of our own, ``inet nodeagent``.

Modelled on Istio ambient's in-pod rules (istio/istio cni/pkg/nftables): plain REDIRECT, so
Envoy's ``original_dst`` filter reads the address the app dialled with ``SO_ORIGINAL_DST``.

``render`` is pure and emits rules in exactly the form ``nft -j list`` gives them back (sets of
one element written as a scalar, address intervals merged as nft merges them), so ``verify`` can
compare what the kernel holds with what a spec asks for, with no state kept between calls.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nftables  # type: ignore[import-untyped]

from nodeagent.ports import (
    DNS_CAPTURED_PORT,
    DNS_PORT,
    HBONE_PORT,
    INBOUND_PASSTHROUGH_SOURCE,
    INBOUND_PORT,
    MESH_MARK,
    OUTBOUND_PORT,
    PROBE_SOURCE,
    PROXY_UID,
    SIDECAR_INBOUND_EXCLUDED,
)
from nodeagent.redirect import CaptureCheck
from nodeagent.redirect.capture import CaptureSpec, Network
from nodeagent.redirect.netns import entered

Json = dict[str, Any]

FAMILY = "inet"
TABLE = "nodeagent"
DSTNAT = -100  # nft's "dstnat" priority; listed back as a number
# The two rule sets: the per-node model's (Istio ambient's in-pod rules: Envoy's sockets are
# skipped by mark) and the sidecar model's (istio-init's: Envoy runs in the pod as uid 1337).
NODE_RULES, SIDECAR_RULES = "node", "sidecar"
RULE_SETS = (NODE_RULES, SIDECAR_RULES)
MARK_MASK = 0xFFF  # as Istio: only the low bits, so other users of the mark don't hide Envoy's

# libnftables does not document thread safety; serialise our (millisecond) calls.
_nft_lock = threading.Lock()


class NftablesError(RuntimeError):
    """libnftables refused a command; carries nft's own error text and where it ran."""


def run_nft(document: Json, where: str) -> list[Json]:
    """Run an nft JSON document (one transaction) in the calling thread's current netns.

    A fresh context each time: its netlink socket is opened in whatever netns the thread is in.
    Returns the listed objects, if the document lists anything.
    """
    with _nft_lock:
        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, output, error = nft.json_cmd(document)
    if rc != 0:
        raise NftablesError(f"nft in {where}: {str(error).strip() or f'exit status {rc}'}")
    if not output:
        return []
    objects: list[Json] = output.get("nftables", [])
    return objects


# -- rendering (pure) -----------------------------------------------------------------------------


def _match(left: Json, right: object, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


_RETURN: Json = {"return": None}
_TCP = _match(_meta("l4proto"), "tcp")
_NOT_TCP = _match(_meta("l4proto"), "tcp", "!=")
_MESH_MARKED = _match({"&": [_meta("mark"), MARK_MASK]}, MESH_MARK)
_DPORT = _payload("tcp", "dport")


def _one_or_set(elements: Sequence[object]) -> object:
    # nft lists a one-element anonymous set as the bare value.
    return elements[0] if len(elements) == 1 else {"set": elements}


def _ports(ports: Iterable[int]) -> object:
    return _one_or_set(sorted(set(ports)))


def _addresses(nets: Sequence[Network]) -> object:
    """Networks of one family as nft lists them: merged intervals, sorted by address."""
    bits = nets[0].max_prefixlen
    intervals: list[list[int]] = []
    for net in sorted(nets, key=lambda n: int(n.network_address)):
        first, last = int(net.network_address), int(net.broadcast_address)
        if intervals and first <= intervals[-1][1] + 1:
            intervals[-1][1] = max(intervals[-1][1], last)
        else:
            intervals.append([first, last])
    elements: list[object] = []
    for first, last in intervals:
        low, high = _address(first, bits), _address(last, bits)
        size = last - first + 1
        if size == 1:
            elements.append(low)
        elif size & (size - 1) == 0 and first % size == 0:  # exactly one CIDR block
            elements.append({"prefix": {"addr": low, "len": bits - size.bit_length() + 1}})
        else:
            elements.append({"range": [low, high]})
    return _one_or_set(elements)


def _address(value: int, bits: int) -> str:
    return str(ipaddress.IPv4Address(value) if bits == 32 else ipaddress.IPv6Address(value))


def _by_family(nets: Iterable[Network]) -> dict[str, list[Network]]:
    families: dict[str, list[Network]] = {"ip": [], "ip6": []}
    for net in nets:
        families["ip" if net.version == 4 else "ip6"].append(net)
    return families


def _prerouting(spec: CaptureSpec) -> list[list[Json]]:
    """Inbound: everything TCP to the pod goes to Envoy's inbound listener, but..."""
    if spec.include_inbound_ports == ():
        return []
    rules = [
        [_NOT_TCP, _RETURN],
        # kubelet probes, SNATed by the node (ProbeSnat), reach the app directly
        [_match(_payload("ip", "saddr"), PROBE_SOURCE), _RETURN],
        [_MESH_MARKED, _RETURN],
        [_match(_DPORT, HBONE_PORT), _RETURN],
    ]
    if spec.exclude_inbound_ports:
        rules.append([_match(_DPORT, _ports(spec.exclude_inbound_ports)), _RETURN])
    if spec.include_inbound_ports is not None:
        rules.append([_match(_DPORT, _ports(spec.include_inbound_ports), "!="), _RETURN])
    rules.append([_TCP, {"redirect": {"port": INBOUND_PORT}}])
    return rules


def _dns(spec: CaptureSpec) -> list[list[Json]]:
    """DNS capture: UDP and TCP to port 53, to any resolver, go to the agent's DNS proxy in the
    pod, but not its own upstream queries (marked, as Envoy's sockets). Istio's DNS redirect
    (tools/istio-iptables: --redirect-dns, ambient's in-pod rules capture every resolver)."""
    if not spec.dns:
        return []
    not_ours = _match({"&": [_meta("mark"), MARK_MASK]}, MESH_MARK, "!=")
    return [
        [not_ours, _match(_payload(protocol, "dport"), DNS_CAPTURED_PORT), _redirect(DNS_PORT)]
        for protocol in ("udp", "tcp")
    ]


def _redirect(port: int) -> Json:
    return {"redirect": {"port": port}}


def _output(spec: CaptureSpec) -> list[list[Json]]:
    """Outbound: everything TCP the app sends goes to Envoy's outbound listener, but..."""
    if spec.include_outbound_ranges == ():
        return _dns(spec)
    rules = [
        *_dns(spec),
        [_NOT_TCP, _RETURN],
        [_MESH_MARKED, _RETURN],  # Envoy's own upstream sockets
        # loopback, including the app dialling its own pod IP (routed via lo), as in Istio
        [_match(_meta("oifname"), "lo"), _RETURN],
    ]
    for protocol, nets in _by_family(spec.exclude_outbound_ranges).items():
        if nets:
            rules.append([_match(_payload(protocol, "daddr"), _addresses(nets)), _RETURN])
    if spec.include_outbound_ranges is not None:
        for protocol, nets in _by_family(spec.include_outbound_ranges).items():
            if nets:
                rules.append([_match(_payload(protocol, "daddr"), _addresses(nets), "!="), _RETURN])
            else:  # ranges given for the other family only: capture none of this one
                nfproto = "ipv4" if protocol == "ip" else "ipv6"
                rules.append([_match(_meta("nfproto"), nfproto), _RETURN])
    if spec.exclude_outbound_ports:
        rules.append([_match(_DPORT, _ports(spec.exclude_outbound_ports)), _RETURN])
    rules.append([_TCP, {"redirect": {"port": OUTBOUND_PORT}}])
    return rules


# -- the sidecar model: istio-init's rule set (istio/istio tools/istio-nftables, sidecar defaults)


def _jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


IN_CHAIN, REDIRECT_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN = (
    "istio-inbound",
    "istio-redirect",
    "istio-in-redirect",
    "istio-output",
)


def _sidecar_chains(spec: CaptureSpec) -> dict[str, list[list[Json]]]:
    """istio-init as Istio's sidecar injector runs it (``-p 15001 -z 15006 -u 1337 -g 1337
    -m REDIRECT -i '*' -b '*' -d 15090,15021,15020``, IPv4), with the pod's annotations in place
    of the defaults. Rules are written in the form nft lists them back (``meta l4proto tcp``
    folds into a following ``tcp dport``), which is the same rule in the kernel."""
    inbound: list[list[Json]] = [[_match(_DPORT, HBONE_PORT), _RETURN]]
    chains: dict[str, list[list[Json]]] = {}
    if spec.include_inbound_ports != ():
        chains["prerouting"] = [[_TCP, _jump(IN_CHAIN)]]
        if spec.include_inbound_ports is None:  # "*": every port but the excluded ones
            excluded = list(SIDECAR_INBOUND_EXCLUDED)
            excluded += [p for p in spec.exclude_inbound_ports if p not in excluded]
            inbound += [[_match(_DPORT, port), _RETURN] for port in excluded]
            inbound.append([_TCP, _jump(IN_REDIRECT_CHAIN)])
        else:  # a list of ports (exclusions then do not apply, as in istio-init)
            inbound += [
                [_match(_DPORT, port), _jump(IN_REDIRECT_CHAIN)]
                for port in spec.include_inbound_ports
            ]
    chains["output"] = [[_jump(OUTPUT_CHAIN)]]
    loopback = _match(_meta("oifname"), "lo")
    output: list[list[Json]] = []
    for port in spec.exclude_outbound_ports:
        output.append([_match(_DPORT, port), _RETURN])
        output.append([_match(_payload("udp", "dport"), port), _RETURN])
    # Envoy's inbound connections to the app leave from 127.0.0.6
    output.append([loopback, _match(_payload("ip", "saddr"), INBOUND_PASSTHROUGH_SOURCE), _RETURN])
    includes = spec.include_outbound_ranges
    loopback_included = includes is not None and any(n.is_loopback for n in includes)
    for owner in ("skuid", "skgid"):
        # Envoy calling its own pod (a service VIP answered by this pod): back through inbound
        output.append(
            [
                loopback,
                _match(_payload("ip", "daddr"), "127.0.0.1", "!="),
                _match(_DPORT, HBONE_PORT, "!="),
                _match(_meta(owner), PROXY_UID),
                _jump(IN_REDIRECT_CHAIN),
            ]
        )
        if not loopback_included:  # the app calling itself by its own address
            output.append([loopback, _match(_meta(owner), PROXY_UID, "!="), _RETURN])
        output.append([_match(_meta(owner), PROXY_UID), _RETURN])  # Envoy's own traffic
    output.append([_match(_payload("ip", "daddr"), "127.0.0.1"), _RETURN])
    for protocol, nets in _by_family(spec.exclude_outbound_ranges).items():
        output += [[_match(_payload(protocol, "daddr"), _addresses([n])), _RETURN] for n in nets]
    if includes is None:
        output.append([_jump(REDIRECT_CHAIN)])
    else:
        for protocol, nets in _by_family(includes).items():
            output += [
                [_match(_payload(protocol, "daddr"), _addresses([n])), _jump(REDIRECT_CHAIN)]
                for n in nets
            ]
    chains[IN_CHAIN] = inbound
    chains[REDIRECT_CHAIN] = [[_TCP, {"redirect": {"port": OUTBOUND_PORT}}]]
    chains[IN_REDIRECT_CHAIN] = [[_TCP, {"redirect": {"port": INBOUND_PORT}}]]
    chains[OUTPUT_CHAIN] = output
    return chains


def _table() -> Json:
    return {"table": {"family": FAMILY, "name": TABLE}}


def ruleset(spec: CaptureSpec, rules: str = NODE_RULES) -> list[Json]:
    """Table, chains and rules that ``spec`` asks for, in the form nft lists them (no handles).

    RULES: NODE_RULES (the per-node model) or SIDECAR_RULES (istio-init's, for the sidecar
    model); both live in the same table, so switching models replaces one with the other.
    """
    if rules == NODE_RULES:
        chains = {"prerouting": _prerouting(spec), "output": _output(spec)}
    elif rules == SIDECAR_RULES:
        chains = _sidecar_chains(spec)
    else:
        raise ValueError(f"unknown capture rule set {rules!r} (expected one of {RULE_SETS})")
    objects = [_table()]
    for name in chains:
        chain: Json = {"family": FAMILY, "table": TABLE, "name": name}
        if name in ("prerouting", "output"):
            chain |= {"type": "nat", "hook": name, "prio": DSTNAT, "policy": "accept"}
        objects.append({"chain": chain})
    for name, chain_rules in chains.items():
        for expr in chain_rules:
            objects.append(
                {"rule": {"family": FAMILY, "table": TABLE, "chain": name, "expr": expr}}
            )
    return objects


def render(spec: CaptureSpec, rules: str = NODE_RULES) -> Json:
    """The nft JSON transaction that (re)installs the pod's capture from scratch, atomically."""
    objects = ruleset(spec, rules)[1:]
    return {"nftables": [*_replace_table(), *({"add": obj} for obj in objects)]}


def render_new(spec: CaptureSpec, rules: str = NODE_RULES) -> Json:
    """The transaction that installs the pod's capture where our table does not exist yet (a new
    pod), atomically; it fails, changing nothing, when the table exists."""
    objects = ruleset(spec, rules)[1:]
    return {"nftables": [{"create": _table()}, *({"add": obj} for obj in objects)]}


def _replace_table() -> list[Json]:
    # "add" makes sure the table exists so that "delete" cannot fail; then it starts afresh.
    return [{"add": _table()}, {"delete": _table()}, {"add": _table()}]


# -- verifying (pure) -----------------------------------------------------------------------------

_PLACEMENT = ("family", "table", "chain", "handle")


def _normal(value: Any) -> Any:
    """Canonical JSON: set elements sorted, addresses spelt one way (nft and Python differ)."""
    if isinstance(value, dict):
        body = {k: _normal(v) for k, v in value.items()}
        if isinstance(body.get("set"), list):
            body["set"] = sorted(body["set"], key=lambda e: json.dumps(e, sort_keys=True))
        return body
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value


class _Listing:
    """Our table's objects out of a ruleset listing, canonical and without handles."""

    def __init__(self, objects: Iterable[Json]) -> None:
        self.table: Json | None = None
        self.chains: dict[str, Json] = {}
        self.rules: dict[str, list[str]] = {}
        self.others: list[str] = []
        for obj in objects:
            for kind, body in obj.items():
                if kind == "table" and (body["family"], body["name"]) == (FAMILY, TABLE):
                    self.table = {k: _normal(v) for k, v in body.items() if k != "handle"}
                elif _in_our_table(body):
                    self._add(kind, body)

    def _add(self, kind: str, body: Json) -> None:
        if kind == "chain":
            skip = (*_PLACEMENT, "name")
            self.chains[body["name"]] = {k: _normal(v) for k, v in body.items() if k not in skip}
        elif kind == "rule":
            rule = {k: _normal(v) for k, v in body.items() if k not in _PLACEMENT}
            # a bare expression list, unless the rule carries more (a comment, say)
            text = json.dumps(rule["expr"] if len(rule) == 1 else rule, sort_keys=True)
            self.rules.setdefault(body["chain"], []).append(text)
        else:  # sets, maps, counters...: we make none
            self.others.append(f"{kind} {body.get('name', '?')}")


def _in_our_table(body: object) -> bool:
    return isinstance(body, dict) and (body.get("family"), body.get("table")) == (FAMILY, TABLE)


def _attributes(what: str, want: Json, have: Json) -> list[str]:
    return [
        f"{what}: {key} is {have.get(key)!r}, expected {want.get(key)!r}"
        for key in sorted(want.keys() | have.keys())
        if want.get(key) != have.get(key)
    ]


def _value(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        (kind, body), compact = next(iter(value.items())), None
        if kind == "meta":
            compact = f"meta {body['key']}"
        elif kind == "payload" and "protocol" in body:
            compact = f"{body['protocol']} {body['field']}"
        elif kind == "&" and len(body) == 2:
            compact = f"{_value(body[0])} & {_hex(body[1])}"
        elif kind == "set":
            compact = "{ " + ", ".join(_value(e) for e in body) + " }"
        elif kind == "prefix":
            compact = f"{body['addr']}/{body['len']}"
        elif kind == "range":
            compact = f"{body[0]}-{body[1]}"
        if compact is not None:
            return compact
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _hex(value: Any) -> str:
    return hex(value) if isinstance(value, int) else _value(value)


def describe(expr: Sequence[Json]) -> str:
    """A rule's JSON expression in nft-like words, for people reading a verify failure."""
    words = []
    for statement in expr:
        kind, body = next(iter(statement.items()))
        if kind == "match":
            left = _value(body["left"])
            op = "" if body["op"] in ("==", "in") and " & " not in left else f"{body['op']} "
            right = _hex(body["right"]) if "mark" in left else _value(body["right"])
            words.append(f"{left} {op}{right}")
        elif kind == "redirect" and isinstance(body, dict) and set(body) == {"port"}:
            words.append(f"redirect to :{body['port']}")
        elif kind in ("jump", "goto") and isinstance(body, dict) and set(body) == {"target"}:
            words.append(f"{kind} {body['target']}")
        elif body is None:
            words.append(kind)
        else:
            words.append(json.dumps(statement, separators=(",", ":")))
    return " ".join(words)


def _readable(rule_text: str) -> str:
    rule = json.loads(rule_text)
    # a rule with more than an expression (a comment, say) is shown exactly
    return describe(rule) if isinstance(rule, list) else rule_text


def _rule_changes(chain: str, want: list[str], have: list[str]) -> list[str]:
    changes = []
    matcher = difflib.SequenceMatcher(a=want, b=have, autojunk=False)
    for tag, w1, w2, h1, h2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            changes += [
                f"chain {chain}: missing rule `{_readable(want[i])}`" for i in range(w1, w2)
            ]
        if tag in ("insert", "replace"):
            changes += [
                f"chain {chain}: unexpected rule {i + 1} `{_readable(have[i])}`"
                for i in range(h1, h2)
            ]
    return changes


def differences(want: Iterable[Json], have: Iterable[Json]) -> list[str]:
    """What differs between two listings of our table (other tables are ignored)."""
    expected, found = _Listing(want), _Listing(have)
    if found.table is None:
        return [f"table {FAMILY} {TABLE} is missing"]
    if found.table.pop("flags", None) is not None:
        # nft 1.0.6 lists table flags as garbage text, so only their presence is told
        problems = [f"table {FAMILY} {TABLE} has flags (dormant?): it must have none"]
    else:
        problems = []
    problems += _attributes(f"table {FAMILY} {TABLE}", expected.table or {}, found.table)
    problems += [
        f"chain {name} is missing" for name in sorted(expected.chains.keys() - found.chains)
    ]
    problems += [
        f"unexpected chain {name}" for name in sorted(found.chains.keys() - expected.chains)
    ]
    for name in sorted(expected.chains.keys() & found.chains.keys()):
        problems += _attributes(f"chain {name}", expected.chains[name], found.chains[name])
        problems += _rule_changes(name, expected.rules.get(name, []), found.rules.get(name, []))
    problems += [f"unexpected {other}" for other in found.others]
    return problems


def _list_our_table(where: str) -> list[Json]:
    # Only our table: a pod's other tables may hold what this nft version cannot list.
    try:
        return run_nft({"nftables": [{"list": _table()}]}, where)
    except NftablesError:
        listed = run_nft({"nftables": [{"list": {"tables": None}}]}, where)
        tables = [(o["table"]["family"], o["table"]["name"]) for o in listed if "table" in o]
        if (FAMILY, TABLE) in tables:
            raise
        return []  # missing, as differences() will say


# -- the backend ----------------------------------------------------------------------------------


class NftablesBackend:
    """RedirectBackend on nftables: ``table inet nodeagent`` inside each pod's netns, holding
    the rule set of the agent's proxy model (RULES: NODE_RULES or SIDECAR_RULES). UID is not
    needed here."""

    name = "nftables"

    def __init__(self, rules: str = NODE_RULES) -> None:
        if rules not in RULE_SETS:
            raise ValueError(f"unknown capture rule set {rules!r} (expected one of {RULE_SETS})")
        self.rules = rules

    def apply(self, netns: Path, spec: CaptureSpec, uid: str = "") -> None:
        with entered(netns):
            # A new pod has no table of ours: creating it costs 0.4 ms, where a transaction that
            # deletes a table costs 8-16 ms (measured on this project's VMs), most of a pod's
            # ADD. Only when the table exists (a retried ADD, a repair) is it replaced.
            try:
                run_nft(render_new(spec, self.rules), str(netns))
            except NftablesError:
                run_nft(render(spec, self.rules), str(netns))

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        with entered(netns):
            listed = _list_our_table(str(netns))
        problems = differences(ruleset(spec, self.rules), listed)
        if problems:
            shown = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
            return CaptureCheck(False, "; ".join(shown))
        return CaptureCheck(True)

    def remove(self, netns: Path, uid: str = "") -> None:
        with entered(netns):
            run_nft({"nftables": _replace_table()[:2]}, str(netns))

    def holds_table(self, netns: Path) -> bool:
        """Whether NETNS has our table (of any content)."""
        with entered(netns):
            return bool(_list_our_table(str(netns)))
