"""A pod's original resolver settings: its resolv.conf, as kubelet writes it (pure parse).

Where the file is: the testbed (and ``ip netns``) keeps a named netns's files in
``/etc/netns/<name>/``; otherwise the agent's own /etc/resolv.conf serves (on Kubernetes the
DaemonSet's ClusterFirstWithHostNet resolv.conf names kube-dns, which is what a pod's names).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
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


class PodResolvConf:
    """A pod's resolv.conf, read again whenever it changes (the testbed, like some runtimes,
    writes it after the pod's network is up; a file swapped in later is seen at once)."""

    def __init__(self, netns: Path, locate: Callable[[Path], Path] = path_for) -> None:
        self.netns = netns
        self.locate = locate
        self._stamp: tuple[Path, int, int, int] | None = None
        self._conf = ResolvConf()

    def current(self) -> ResolvConf:
        path = self.locate(self.netns)
        try:
            st = path.stat()
            stamp = (path, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._conf, self._stamp = parse(path.read_text()), stamp
        except OSError:
            self._conf, self._stamp = ResolvConf(), None
        return self._conf
