"""DestinationRule ``loadBalancer.localityLbSetting``: which setting applies, and whether it is
valid (pure).

Istio is the reference: istio.io/latest/docs/reference/config/networking/destination-rule/
#LocalityLoadBalancerSetting, istio/istio ``pilot/pkg/networking/core/loadbalancer/
loadbalancer.go`` GetLocalityLbSetting, ``pkg/config/validation/validation.go``
validateLocalityLbSetting. The EDS side (priorities and weights) is translate/locality.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.mesh.model import LOCALITY_LABELS


def effective(
    mesh: Mapping[str, Any] | None, rule: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The setting a cluster uses (GetLocalityLbSetting): the DestinationRule's when its
    loadBalancer sets one (``enabled: false`` there turns locality load balancing off, mesh
    setting or not), else the mesh config's (Istio's default: ``{enabled: true}``, which only
    prioritises by locality once a rule adds outlierDetection); None: off."""
    if rule is not None:
        return None if rule.get("enabled") is False else rule
    if mesh is None or mesh.get("enabled") is False:
        return None
    return mesh


def of_policy(policy: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The localityLbSetting a merged traffic policy's loadBalancer sets (None: unset)."""
    balancer = policy.get("loadBalancer")
    if not isinstance(balancer, Mapping):
        return None
    setting = balancer.get("localityLbSetting")
    return setting if isinstance(setting, Mapping) else None


def check(setting: Mapping[str, Any], at: str) -> None:
    """ValueError naming the field, for what Istio's validation rejects
    (validateLocalityLbSetting): ``distribute`` together with ``failover``; ``failover``
    together with a topology label in ``failoverPriority``; weights outside 1..100 or not
    summing to 100 per ``from``; ``*`` anywhere but the last segment of a locality; a
    locality given twice; failover between the same region, or naming a zone or a wildcard."""
    distribute = list(setting.get("distribute") or [])
    failover = list(setting.get("failover") or [])
    priority = list(setting.get("failoverPriority") or [])
    if distribute and failover:
        raise ValueError(f"{at}: can not simultaneously specify 'distribute' and 'failover'")
    if failover:
        for label in priority:
            if label in LOCALITY_LABELS:
                raise ValueError(
                    f"{at}.failoverPriority: can not simultaneously set 'failover' and "
                    f"topology label {label!r}"
                )
    sources = []
    for i, rule in enumerate(distribute):
        where = f"{at}.distribute[{i}]"
        sources.append(str(rule.get("from") or ""))
        to = dict(rule.get("to") or {})
        for locality, weight in to.items():
            if not isinstance(weight, int) or not 1 <= weight <= 100:
                raise ValueError(f"{where}.to[{locality}]: weight must be in range [1, 100]")
        if sum(to.values()) != 100:
            raise ValueError(f"{where}.to: total locality weight {sum(to.values())} != 100")
        _localities(list(to), f"{where}.to")
    _localities(sources, f"{at}.distribute[].from")
    for i, rule in enumerate(failover):
        where = f"{at}.failover[{i}]"
        source, target = str(rule.get("from") or ""), str(rule.get("to") or "")
        if source == target:
            raise ValueError(f"{where}: failover must specify different regions")
        if "/" in source or "/" in target:
            raise ValueError(f"{where}: failover only names regions")
        if "*" in source or "*" in target:
            raise ValueError(f"{where}: failover region must not contain '*'")


def _localities(localities: list[str], at: str) -> None:
    seen: set[str] = set()
    for locality in localities:
        if not locality:
            raise ValueError(f"{at}: empty locality")
        parts = locality.split("/")
        last = len(parts) - 1
        if any("*" in part and (part != "*" or i != last) for i, part in enumerate(parts)):
            raise ValueError(f"{at}: locality {locality!r}: '*' is only allowed as last segment")
        if locality in seen:
            raise ValueError(f"{at}: locality {locality!r} given twice")
        seen.add(locality)


def warnings(setting: Mapping[str, Any] | None, outlier: Any) -> list[str]:
    """What Istio warns about: failover without outlierDetection never fails over (Envoy
    never sees the local endpoints unhealthy), so Istio does not apply it."""
    if setting and (setting.get("failover") or setting.get("failoverPriority")) and not outlier:
        return ["outlier detection policy must be provided for failover (failover ignored)"]
    return []
