"""Per-pod keys in the stat names of the authorization filters, so the node's metrics count each
pod's denials from the node Envoy's own counters (pure).

Istio's sidecar counts denials in its own Envoy, one per pod. Here one Envoy serves every pod,
and the HTTP RBAC filter counts under its connection manager's prefix, which pods share
(``inbound|<port>||``, ``inboundInternal|<port>||``). So each authorization filter of a pod's
chains carries a key naming the pod and the path the caller came by, in the part of the stat
name Envoy lets a filter choose (envoyproxy.io docs, RBAC HTTP filter and RBAC network filter,
"Statistics"; source/extensions/filters/common/rbac/utility.cc generateStats):

- HTTP RBAC ``rules_stat_prefix``: ``http.<hcm prefix>.rbac.<key>_<action>_.denied`` (HTTP 403);
- network RBAC ``stat_prefix``: ``tcp.<key>_<action>.rbac.denied`` (TCP connection closed);
- HTTP ext_authz (CUSTOM) ``stat_prefix``: ``http.<hcm prefix>.ext_authz.<key>_custom_.denied``
  (envoyproxy.io docs, ext_authz HTTP filter "Statistics" and its ``stat_prefix`` field;
  source/extensions/filters/http/ext_authz/ext_authz.h generateStats). That filter also counts
  each denial under the route's cluster, ``cluster.<cluster>.ext_authz.<key>_custom_.denied``
  (the same name in the cluster's scope, createPoolStatName): ``parse`` skips ``cluster.``
  names, or every CUSTOM denial would count twice;
- network ext_authz ``stat_prefix``: ``ext_authz.<key>_custom.denied`` (ext_authz network filter
  "Statistics"; source/extensions/filters/network/ext_authz/ext_authz.cc generateStats).

A key is ``nodeagent_<digest>_<path>``: the digest is the first 16 hex digits of SHA-256 over
``<namespace>/<pod>`` (pod names may hold dots, which would split a stat name; the agent maps a
digest back through the pods it holds, so a deleted pod's series goes with it), the path one of
``mtls`` (another node's pod, over mTLS), ``fast`` (a pod of this node, the same-node fast path)
and ``plaintext`` (no mesh mTLS: a caller outside the mesh, or with its own TLS). The action is
the filter's: ``deny`` (a DENY policy matched), ``allow`` (no ALLOW policy matched), ``custom``
(CUSTOM: the provider denied the check, or, for a provider in error, the RBAC filter that denies
what the CUSTOM rules match; translate/extauthz.py). A check that fails (the provider unreachable,
or too slow) is counted in ext_authz's ``error`` counter, not here: the request gets
statusOnError, or passes under failOpen. AUDIT never denies.

Dry-run (shadow) decisions are not denials and are not read: their counters and dynamic metadata
keep Istio's ``istio_dry_run_<action>_`` prefix (which the access log reads, filters.py).

The key also prefixes the RBAC filter's ``<key>_<action>_enforced_*`` dynamic metadata (Envoy
prepends ``rules_stat_prefix``); nothing reads it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MTLS, FAST, PLAINTEXT = "mtls", "fast", "plaintext"
PATHS = (MTLS, FAST, PLAINTEXT)
DENY, ALLOW, CUSTOM = "deny", "allow", "custom"  # the actions whose filters deny
ACTIONS = (DENY, ALLOW, CUSTOM)
_PREFIX = "nodeagent_"
_CLUSTER_SCOPE = "cluster."
_DIGITS = 16

# Envoy's admin ``/stats?filter=`` (a regex searched in each name): only keyed counters.
STATS_FILTER = rf"{_PREFIX}[0-9a-f]{{{_DIGITS}}}_"
_STAT = re.compile(
    rf"(?:^|\.){_PREFIX}(?P<digest>[0-9a-f]{{{_DIGITS}}})_(?P<path>{'|'.join(PATHS)})"
    rf"_(?P<action>{'|'.join(ACTIONS)})_?\.(?:rbac\.)?denied$"
)


def digest(namespace: str, pod: str) -> str:
    return hashlib.sha256(f"{namespace}/{pod}".encode()).hexdigest()[:_DIGITS]


def stat_key(namespace: str, pod: str, path: str) -> str:
    """The key of POD's filters on PATH (one of PATHS)."""
    if path not in PATHS:
        raise ValueError(f"denial path {path!r}: expected one of {', '.join(PATHS)}")
    return f"{_PREFIX}{digest(namespace, pod)}_{path}"


def stat_prefix(key: str, action: str) -> str:
    """The HTTP filter's stat prefix of KEY for ACTION (an AuthorizationPolicy action)."""
    return f"{key}_{action.lower()}_"


def network_stat_prefix(key: str, action: str) -> str:
    """The network RBAC filter's ``stat_prefix`` of KEY for ACTION (Envoy adds ``rbac.``)."""
    return f"tcp.{key}_{action.lower()}."


def network_ext_authz_prefix(key: str) -> str:
    """The network ext_authz filter's ``stat_prefix`` of KEY (Envoy: ``ext_authz.<it>.``)."""
    return f"{key}_{CUSTOM}"


@dataclass(frozen=True)
class DenialStat:
    digest: str
    path: str
    protocol: str  # http or tcp
    action: str


def parse(name: str) -> DenialStat | None:
    """The keyed denial counter NAME (an Envoy stat name) counts, or None for any other stat
    (allowed, shadow counters, another filter's)."""
    if name.startswith(_CLUSTER_SCOPE):  # ext_authz's second count of a denial (docstring)
        return None
    found = _STAT.search(name)
    if found is None:
        return None
    protocol = "http" if name.startswith("http.") else "tcp"
    return DenialStat(found["digest"], found["path"], protocol, found["action"])


__all__ = [
    "ACTIONS",
    "PATHS",
    "STATS_FILTER",
    "DenialStat",
    "digest",
    "network_ext_authz_prefix",
    "network_stat_prefix",
    "parse",
    "stat_key",
    "stat_prefix",
]
