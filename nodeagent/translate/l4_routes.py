"""A TCP or TLS service port whose route depends on the caller or the SNI: its routes listener
(pure).

A service port's chain in ``outbound-internal`` ends in one tcp_proxy, shared by every local
caller: it cannot choose per caller, nor read the SNI (a TLS inspector there would stall every
server-first protocol on every port). So such a port's chain hops to an internal listener of its
own, ``outbound-routes|<port>||<host>``, whose ``filter_chain_matcher`` (Envoy's unified matcher:
api-v3/config/listener/v3/listener.proto ``filter_chain_matcher``; inputs from
api-v3/extensions/matching/common_inputs/network/v3/network_inputs.proto: ``ServerNameInput``
and ``FilterStateInput``) picks, per connection, the first of the VirtualService's rules that
holds (Istio's order), from:

- the caller's labels and SPIFFE ID, stamped TRANSITIVE by its own outbound listener
  (internal.stamp_caller), which the hop carries across like every internal hop;
- the SNI, read by a TLS inspector that only TLS ports' routes listeners have.

Each rule is one filter chain: a tcp_proxy to its (weighted) clusters, or the black hole where
Istio's sidecar would have no chain for the connection. Ports whose routing is the same for
everyone keep their one chain, without the hop. Config stays O(1) per pod: one listener per such
port, whatever the number of callers (docs/o1-config.md).

The hop restamps the original destination (``envoy.filters.listener.original_dst.local_ip``,
TRANSITIVE as stamp_caller's), so the routes listener's connection shows the service VIP:port,
as outbound-internal's did (access logs, %DOWNSTREAM_LOCAL_ADDRESS%), and a DestinationRule
PASSTHROUGH cluster behind it still finds where the caller dialled (passthrough.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nodeagent.translate import internal
from nodeagent.translate.envoy import Cluster, Listener, message, typed
from nodeagent.translate.filters import (
    ORIGINAL_DST_FILTER,
    set_filter_state,
    state_value,
    tcp_proxy,
)
from nodeagent.translate.listeners import TLS_INSPECTOR, outbound_chain
from nodeagent.translate.services import BLACKHOLE, ServiceTarget
from nodeagent.translate.virtual_service import SNI, Condition, L4Rule

ROUTES_PREFIX = "outbound-routes"
_NETWORK_INPUTS = "envoy.extensions.matching.common_inputs.network.v3"


def routes_name(target: ServiceTarget) -> str:
    """The routes listener of TARGET, and the cluster that reaches it."""
    return f"{ROUTES_PREFIX}|{target.port.port}||{target.host}"


def hop_chain(target: ServiceTarget) -> dict[str, Any]:
    """TARGET's chain in outbound-internal: to its routes listener, the destination restamped."""
    chain = outbound_chain(target, internal.POD_FORMAT)
    name = routes_name(target)
    restore = state_value(
        f"{internal.ORIGINAL_DST_META}.local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%", "TRANSITIVE"
    )
    chain["filters"] = [
        set_filter_state(restore),
        tcp_proxy(target.cluster, name, "outbound", internal.POD_FORMAT),
    ]
    return chain


def routes_cluster(target: ServiceTarget) -> Cluster:
    return internal.internal_cluster(routes_name(target))


def _input(key: str) -> dict[str, Any]:
    if key == SNI:
        return {"name": "sni", "typed_config": typed(f"{_NETWORK_INPUTS}.ServerNameInput")}
    return {"name": key, "typed_config": typed(f"{_NETWORK_INPUTS}.FilterStateInput", key=key)}


def _one_of(predicates: list[dict[str, Any]], combine: str) -> dict[str, Any]:
    if len(predicates) == 1:
        return predicates[0]
    return {combine: {"predicate": predicates}}


def _value_match(matcher: dict[str, Any]) -> dict[str, Any]:
    """A route StringMatcher as the matcher API's (xds.type.matcher.v3.StringMatcher), whose
    regex names its engine."""
    if "safe_regex" in matcher:
        return {**matcher, "safe_regex": {"google_re2": {}, **matcher["safe_regex"]}}
    return matcher


def _condition(condition: Condition) -> dict[str, Any]:
    return _one_of(
        [
            {
                "single_predicate": {
                    "input": _input(condition.input),
                    "value_match": _value_match(matcher),
                }
            }
            for matcher in condition.matchers
        ],
        "or_matcher",
    )


def predicate(when: Sequence[Sequence[Condition]]) -> dict[str, Any]:
    """WHEN (any alternative, each every condition) as a matcher predicate."""
    return _one_of(
        [_one_of([_condition(c) for c in conditions], "and_matcher") for conditions in when],
        "or_matcher",
    )


def _use(chain: str) -> dict[str, Any]:
    return {
        "action": {
            "name": chain,
            "typed_config": typed("google.protobuf.StringValue", value=chain),
        }
    }


def routes_listener(target: ServiceTarget, rules: Sequence[L4Rule]) -> Listener:
    """TARGET's routes listener: RULES in order, the first that holds takes the connection; the
    last must hold always (what is left: the port's own cluster, or closed)."""
    if not rules or rules[-1].when:
        raise ValueError(f"{routes_name(target)}: the last rule must take every connection")
    name = routes_name(target)
    who = internal.POD_FORMAT
    chains = []
    for i, rule in enumerate(rules):
        filters = (
            tcp_proxy(name, name, "outbound", who, rule.route)
            if rule.route is not None
            else tcp_proxy(BLACKHOLE, BLACKHOLE, "outbound", who)
        )
        chains.append({"name": f"{name}#{i}", "filters": [filters]})
    matchers = [
        {"predicate": predicate(rule.when), "on_match": _use(f"{name}#{i}")}
        for i, rule in enumerate(rules[:-1])
    ]
    reads_sni = any(c.input == SNI for rule in rules for alt in rule.when for c in alt)
    listener_filters = [ORIGINAL_DST_FILTER, *([TLS_INSPECTOR] if reads_sni else [])]
    return message(
        Listener,
        {
            "name": name,
            "internal_listener": {},
            "listener_filters": listener_filters,
            "filter_chains": chains,
            "filter_chain_matcher": {
                "matcher_list": {"matchers": matchers},
                "on_no_match": _use(f"{name}#{len(rules) - 1}"),
            },
            "traffic_direction": "OUTBOUND",
        },
    )
