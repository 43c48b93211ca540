"""VirtualService delegation: a rule's ``delegate`` replaced by another VirtualService's rules
(pure).

As Istio merges them (istio/istio pilot/pkg/model/virtualservice.go, mergeVirtualServicesIfNeeded,
mergeHTTPRoute, mergeHTTPMatchRequests, hasConflict; reference: the Delegate section of
https://istio.io/latest/docs/reference/config/networking/virtual-service/): each delegate rule's
matches are narrowed by the root rule's, a delegate match that is not within some root match
drops that rule, and the root's settings fill what the delegate rule leaves unset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh.model import IstioResource

DelegateOf = Callable[[str, str], IstioResource | None]


@dataclass(frozen=True)
class Rule:
    """One http[] rule, after delegation; WHERE names it in errors."""

    spec: Mapping[str, Any]
    where: str


def rules(vs: IstioResource, delegate_of: DelegateOf | None) -> Iterator[Rule]:
    """VS's http[] with every ``delegate`` rule replaced by the delegate's rules, merged with
    it as Istio does (mergeHTTPRoutes). A delegate that is missing (or not visible: DELEGATE_OF
    says None), or that has hosts (so is not a delegate), drops the rule, as in Istio."""
    for i, rule in enumerate(vs.spec.get("http") or []):
        where = f"{vs.key} http[{i}]"
        delegate = rule.get("delegate")
        if not delegate:
            yield Rule(rule, where)
            continue
        if delegate_of is None:
            continue
        namespace = delegate.get("namespace") or vs.namespace
        target = delegate_of(delegate["name"], namespace)
        if target is None or target.spec.get("hosts"):
            continue
        for j, sub in enumerate(target.spec.get("http") or []):
            if sub.get("delegate"):  # a delegate cannot delegate again (Istio validation)
                continue
            merged = _merge_rule(rule, sub)
            if merged is not None:
                yield Rule(merged, f"{where} (delegate {target.key} http[{j}])")


_INHERITED = (
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrorPercent",
    "mirrorPercentage",
    "corsPolicy",
    "headers",
)


def _merge_rule(root: Mapping[str, Any], sub: Mapping[str, Any]) -> dict[str, Any] | None:
    """mergeHTTPRoute: the delegate's rule, its matches narrowed by the root's, and the root's
    settings where the delegate has none. None: the matches conflict (the rule is dropped)."""
    matches = _merge_matches(root.get("match") or [], sub.get("match") or [])
    if matches is None:
        return None
    out = {k: v for k, v in sub.items() if k != "match"}
    if matches:
        out["match"] = matches
    root_name, name = root.get("name", ""), sub.get("name", "")
    if root_name or name:
        out["name"] = f"{root_name}-{name}" if root_name and name else root_name or name
    for key in _INHERITED:
        if key not in out and key in root:
            out[key] = root[key]
    return out


def _merge_matches(
    root: list[Mapping[str, Any]], sub: list[Mapping[str, Any]]
) -> list[dict[str, Any]] | None:
    """mergeHTTPMatchRequests: every delegate match merged with each root match it does not
    conflict with; None when one delegate match conflicts with every root match."""
    if not root:
        return [dict(m) for m in sub]
    if not sub:
        return [dict(m) for m in root]
    out = []
    for leaf in sub:
        found = [_merge_match(r, leaf) for r in root if not _conflict(r, leaf)]
        if not found:
            return None
        out += found
    return out or None


def _merge_match(root: Mapping[str, Any], leaf: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(leaf)
    root_name, name = root.get("name", ""), leaf.get("name", "")
    if root_name or name:
        out["name"] = f"{root_name}-{name}" if root_name and name else root_name or name
    for key in ("uri", "scheme", "method", "authority", "port", "sourceNamespace", "gateways"):
        if not out.get(key) and root.get(key):
            out[key] = root[key]
    for key in ("headers", "withoutHeaders", "queryParams", "sourceLabels"):
        merged = {**(root.get(key) or {}), **(leaf.get(key) or {})}
        if merged:
            out[key] = merged
    return out


def _conflict(root: Mapping[str, Any], leaf: Mapping[str, Any]) -> bool:
    """hasConflict: LEAF is not within ROOT."""
    for key in ("uri", "scheme", "method", "authority"):
        if _string_conflict(root.get(key), leaf.get(key)):
            return True
    for key in ("headers", "withoutHeaders", "queryParams"):
        mine = root.get(key) or {}
        for name, value in (leaf.get(key) or {}).items():
            if _string_conflict(mine.get(name), value):
                return True
    if bool(root.get("ignoreUriCase")) != bool(leaf.get("ignoreUriCase")):
        return True
    if root.get("port") and leaf.get("port") and root["port"] != leaf["port"]:
        return True
    if root.get("sourceNamespace") and leaf.get("sourceNamespace") != root["sourceNamespace"]:
        return True
    mine = root.get("sourceLabels") or {}
    if any(k in mine and mine[k] != v for k, v in (leaf.get("sourceLabels") or {}).items()):
        return True
    gateways, leaf_gateways = root.get("gateways") or [], leaf.get("gateways") or []
    return bool(gateways and leaf_gateways and not set(leaf_gateways) <= set(gateways))


def _string_conflict(root: Mapping[str, Any] | None, leaf: Mapping[str, Any] | None) -> bool:
    """stringMatchConflict: LEAF does not narrow ROOT (a regex only combines with nothing)."""
    if root is None or leaf is None:
        return False
    if root.get("regex") or leaf.get("regex"):
        return True
    if root.get("exact"):
        return bool(leaf.get("prefix")) or leaf.get("exact") != root["exact"]
    if root.get("prefix"):
        if leaf.get("prefix"):
            return not str(leaf["prefix"]).startswith(root["prefix"])
        if leaf.get("exact"):
            return not str(leaf["exact"]).startswith(root["prefix"])
    return True
