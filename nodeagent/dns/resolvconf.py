"""A pod's original resolver settings: its resolv.conf, as kubelet writes it (pure parse).

Where the file is: the testbed (and ``ip netns``) keeps a named netns's files in
``/etc/netns/<name>/``; otherwise the agent's own /etc/resolv.conf serves (on Kubernetes the
DaemonSet's ClusterFirstWithHostNet resolv.conf names kube-dns, which is what a pod's names).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

HOST_RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


def parse(text: str) -> ResolvConf:
    """nameserver and search lines (resolv.conf(5)); the last search line wins; bad
    nameserver addresses are skipped as the C library skips them."""
    nameservers: list[str] = []
    search: tuple[str, ...] = ()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                nameservers.append(str(ipaddress.ip_address(words[1])))
            except ValueError:
                continue
        elif words and words[0] in ("search", "domain"):
            search = tuple(words[1:])
    return ResolvConf(tuple(nameservers), search)


def path_for(netns: Path, etc: Path = Path("/etc")) -> Path:
    """The resolv.conf the pod in NETNS uses (see the module docstring)."""
    if netns.parent == Path("/run/netns") or netns.parent == Path("/var/run/netns"):
        own = etc / "netns" / netns.name / "resolv.conf"
        if own.exists():
            return own
    return etc / "resolv.conf"


def read_for(netns: Path, etc: Path = Path("/etc")) -> ResolvConf:
    try:
        return parse(path_for(netns, etc).read_text())
    except OSError:
        return ResolvConf()
