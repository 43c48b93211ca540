"""Locality load balancing in EDS: endpoints grouped by locality, with the priority and weight of
each group relative to the calling proxy's locality (pure).

This is what istiod computes per proxy (istio/istio ``pilot/pkg/xds/endpoints/
endpoint_builder.go`` BuildClusterLoadAssignment: one ``LocalityLbEndpoints`` per locality,
sorted by its "region/zone/subzone" label, weighted by its endpoint count; then
``pilot/pkg/networking/core/loadbalancer/loadbalancer.go`` ApplyLocalityLoadBalancer,
applyLocalityWeights, applyLocalityFailover, applyFailoverPriorities, and
``pilot/pkg/networking/util/util.go`` LbPriority / LocalityMatch). On the node the calling
proxy is the node: every local pod shares one locality (its node's), so one assignment per
cluster serves them all.

failoverPriority compares labels of the proxy with labels of each endpoint (its pod's labels
plus its node's topology labels, as Istio augments them). The node's own labels stand for the
proxy's: a label that only the calling pod carries cannot be told on a shared assignment, so
such a label matches only endpoints without it (see mesh/enforcement.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.mesh.model import LOCALITY_LABELS, Locality

CLUSTER_LABEL = "topology.istio.io/cluster"
CLUSTER_ID = "Kubernetes"  # Istio's default cluster ID (one cluster here)


@dataclass(frozen=True)
class Balancing:
    """How a cluster's endpoints are prioritised for the calling proxy: its locality and
    labels, the effective localityLbSetting (None: off), whether the cluster has
    outlierDetection (failover applies only then)."""

    proxy: Locality = field(default_factory=Locality)
    proxy_labels: Mapping[str, str] = field(default_factory=dict)
    setting: Mapping[str, Any] | None = None
    enable_failover: bool = False


@dataclass
class Group:
    """The endpoints of one locality: their LbEndpoint dicts and, per endpoint, the labels
    failoverPriority compares (LABELS[i] belongs to ENDPOINTS[i])."""

    locality: Locality
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    labels: list[Mapping[str, str]] = field(default_factory=list)


def topology_labels(locality: Locality) -> dict[str, str]:
    """The labels Istio adds to an endpoint's (and a proxy's) labels for its locality
    (pkg/kube/labels AugmentLabels): region, zone, subzone when known, and the cluster."""
    values = (locality.region, locality.zone, locality.sub_zone)
    labels = {label: value for label, value in zip(LOCALITY_LABELS, values, strict=True) if value}
    return labels | {CLUSTER_LABEL: CLUSTER_ID}


def lb_priority(proxy: Locality, endpoint: Locality) -> int:
    """util.LbPriority: 0 same subzone, 1 same zone, 2 same region, 3 another region."""
    if proxy.region != endpoint.region:
        return 3
    if proxy.zone != endpoint.zone:
        return 2
    return 0 if proxy.sub_zone == endpoint.sub_zone else 1


def locality_match(locality: Locality, rule: str) -> bool:
    """util.LocalityMatch: LOCALITY is within RULE ("region/zone/subzone", ``*`` or a missing
    zone/subzone matches any; the region must be given or ``*``)."""
    region, zone, sub_zone = [*rule.split("/"), "", ""][:3]
    return (
        (region == "*" or locality.region == region)
        and (zone in ("*", "") or locality.zone == zone)
        and (sub_zone in ("*", "") or locality.sub_zone == sub_zone)
    )


def locality_endpoints(
    groups: Sequence[Group],
    proxy: Locality,
    proxy_labels: Mapping[str, str],
    setting: Mapping[str, Any] | None,
    enable_failover: bool,
) -> list[dict[str, Any]]:
    """The ``endpoints`` (LocalityLbEndpoints, proto3 JSON) of a ClusterLoadAssignment.

    GROUPS: one per locality (any order). SETTING: the effective localityLbSetting (None:
    off). ENABLE_FAILOVER: the cluster has outlierDetection (Istio applies failover only
    then: without it Envoy never finds the local endpoints unhealthy). ``distribute`` wins
    over failover; with neither, the default failover ranks by locality."""
    ordered = sorted((g for g in groups if g.endpoints), key=lambda g: g.locality.label)
    out = [_entry(g.locality, g.endpoints, 0) for g in ordered]
    if setting is None:
        return out
    distribute = setting.get("distribute") or []
    if distribute:
        _apply_weights(proxy, out, ordered, distribute)
    elif enable_failover:
        priorities = list(setting.get("failoverPriority") or [])
        failover = list(setting.get("failover") or [])
        if priorities:
            out = _apply_failover_priorities(ordered, proxy_labels, priorities)
            if failover:
                _apply_failover(proxy, out, failover)
        else:
            _apply_failover(proxy, out, failover)
    return out


def _entry(locality: Locality, endpoints: list[dict[str, Any]], priority: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "locality": {
            k: v
            for k, v in (
                ("region", locality.region),
                ("zone", locality.zone),
                ("sub_zone", locality.sub_zone),
            )
            if v
        },
        "lb_endpoints": endpoints,
        "load_balancing_weight": len(endpoints),
    }
    if priority:
        entry["priority"] = priority
    return entry


def _locality(entry: Mapping[str, Any]) -> Locality:
    where = entry["locality"]
    return Locality(where.get("region", ""), where.get("zone", ""), where.get("sub_zone", ""))


def _apply_weights(
    proxy: Locality,
    out: list[dict[str, Any]],
    groups: Sequence[Group],
    distribute: Sequence[Mapping[str, Any]],
) -> None:
    """applyLocalityWeights: the first rule whose ``from`` matches the proxy gives each ``to``
    locality's groups WEIGHT, split over them by their endpoint counts (rounded up); groups
    no ``to`` names get no traffic (their endpoints are left out)."""
    for rule in distribute:
        if not locality_match(proxy, str(rule.get("from") or "")):
            continue
        unmatched = set(range(len(out)))
        for target, weight in dict(rule.get("to") or {}).items():
            originals: dict[int, int] = {}
            for i in sorted(unmatched):
                if locality_match(groups[i].locality, str(target)):
                    originals[i] = int(out[i]["load_balancing_weight"])
            unmatched -= originals.keys()
            total = sum(originals.values())
            for i, original in originals.items():
                share = original * int(weight) / total
                if share > 0:
                    out[i]["load_balancing_weight"] = math.ceil(share)
        for i in unmatched:
            out[i]["lb_endpoints"] = []
        return


def _apply_failover(
    proxy: Locality, out: list[dict[str, Any]], failover: Sequence[Mapping[str, Any]]
) -> None:
    """applyLocalityFailover: priority by how much of the proxy's locality a group shares
    (0 subzone .. 3 none); a group of another region that the proxy region's ``failover``
    rule does not name drops to 4. Added to a failoverPriority rank (x5), then renumbered
    0..N without gaps, as Envoy wants."""
    ranks: list[int] = []
    for entry in out:
        locality = _locality(entry)
        priority = lb_priority(proxy, locality)
        if priority == 3:
            for rule in failover:
                if rule.get("from") == proxy.region:
                    if locality.region != rule.get("to"):
                        priority = 4
                    break
        ranks.append(int(entry.get("priority", 0)) * 5 + priority)
    _renumber(out, ranks)


def _apply_failover_priorities(
    groups: Sequence[Group], proxy_labels: Mapping[str, str], labels: Sequence[str]
) -> list[dict[str, Any]]:
    """applyFailoverPriorities: each group split by how many of LABELS (in order) an endpoint
    shares with the proxy; "label=value" compares with VALUE instead of the proxy's. An
    endpoint sharing all is priority 0; one differing first at the j-th label ranks
    len(LABELS)-j. Priorities are then renumbered 0..N over all groups."""
    names = [label.split("=", 1)[0] for label in labels]
    overrides = dict(label.split("=", 1) for label in labels if "=" in label)
    lowest = len(names)
    out: list[dict[str, Any]] = []
    ranks: list[int] = []
    for group in groups:
        by_rank: dict[int, list[dict[str, Any]]] = {}
        for endpoint, endpoint_labels in zip(group.endpoints, group.labels, strict=True):
            rank = 0
            for j, name in enumerate(names):
                wanted = overrides.get(name, proxy_labels.get(name, ""))
                if wanted != endpoint_labels.get(name, ""):
                    rank = lowest - j
                    break
            by_rank.setdefault(rank, []).append(endpoint)
        for rank in sorted(by_rank):
            out.append(_entry(group.locality, by_rank[rank], 0))
            ranks.append(rank)
    _renumber(out, ranks)
    return out


def _renumber(out: list[dict[str, Any]], ranks: list[int]) -> None:
    """Priorities 0..N without gaps, in the order of RANKS (Envoy rejects gaps)."""
    dense = {rank: i for i, rank in enumerate(sorted(set(ranks)))}
    for entry, rank in zip(out, ranks, strict=True):
        if dense[rank]:
            entry["priority"] = dense[rank]
        else:
            entry.pop("priority", None)
