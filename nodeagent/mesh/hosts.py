"""Istio host names as rules write them (pure): qualifying short names, matching wildcards."""

from __future__ import annotations

import ipaddress


def qualify(host: str, namespace: str, domain: str) -> str:
    """HOST as Istio resolves it in NAMESPACE: a short name gets ``.<ns>.svc.<domain>``; a name
    with a dot, an IP and ``*`` are taken as they are (pilot/pkg/model/config.go
    ``ResolveShortnameToFQDN``)."""
    if not host or host == "*" or "." in host:
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"{host}.{namespace}.svc.{domain}"
    return host


def host_match(pattern: str, hostname: str) -> tuple[int, int] | None:
    """How closely PATTERN names HOSTNAME (greater wins: exact, then the longer wildcard), or
    None when it does not."""
    if pattern == hostname:
        return (1, 0)
    if pattern.startswith("*") and hostname.endswith(pattern[1:]):
        return (0, len(pattern))
    return None
