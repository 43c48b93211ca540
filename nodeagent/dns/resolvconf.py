"""A pod's original resolver settings: its resolv.conf, as kubelet has the runtime write it.

Where the pod's own file is (``pod_files``, the first that exists):
- a named netns (the testbed, ``ip netns``): ``/etc/netns/<name>/resolv.conf``;
- containerd (CRI): ``/run/containerd/io.containerd.grpc.v1.cri/sandboxes/<sandbox id>/
  resolv.conf``; CRI-O: ``/var/run/containers/storage/overlay-containers/<sandbox id>/
  userdata/resolv.conf``; the sandbox id is the CNI ADD's CNI_CONTAINERID. The DaemonSet mounts
  both directories read-only at the same paths (daemonset/daemonset.yaml).
Without one (a pod found at start has no sandbox id; another runtime), the agent's own
/etc/resolv.conf gives the nameservers (the DaemonSet's ClusterFirstWithHostNet one names
kube-dns, as a pod's does), but not its search list, which is the agent's namespace's: the pod
then gets kubelet's list for its own namespace (``kubernetes_search``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ETC = Path("/etc")
CONTAINERD_SANDBOXES = Path("/run/containerd/io.containerd.grpc.v1.cri/sandboxes")
CRIO_CONTAINERS = Path("/var/run/containers/storage/overlay-containers")
RUNTIME_DIRS = (CONTAINERD_SANDBOXES, CRIO_CONTAINERS)
_NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
# A sandbox id names a directory: never a path of its own (runtimes use 64 hex digits).
_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


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


def kubernetes_search(namespace: str, domain: str) -> tuple[str, ...]:
    """kubelet's ClusterFirst search list for a pod of NAMESPACE (kubernetes
    pkg/kubelet/network/dns/dns.go)."""
    return (f"{namespace}.svc.{domain}", f"svc.{domain}", domain)


def pod_files(
    netns: Path, sandbox: str, etc: Path = ETC, runtime_dirs: tuple[Path, ...] = RUNTIME_DIRS
) -> list[Path]:
    """Where the pod's own resolv.conf may be, in the order they are tried."""
    files = []
    if netns.parent in _NETNS_DIRS:
        files.append(etc / "netns" / netns.name / "resolv.conf")
    if sandbox and _SANDBOX_ID.match(sandbox) and ".." not in sandbox:
        containerd, crio = runtime_dirs
        files += [containerd / sandbox / "resolv.conf", crio / sandbox / "userdata" / "resolv.conf"]
    return files


Locate = Callable[[Path, str], tuple[Path, bool]]


def locate(netns: Path, sandbox: str, etc: Path = ETC) -> tuple[Path, bool]:
    """The resolv.conf to read for a pod, and whether it is the pod's own."""
    for path in pod_files(netns, sandbox, etc):
        if path.is_file():
            return path, True
    return etc / "resolv.conf", False


class PodResolvConf:
    """A pod's resolv.conf, read again whenever it changes (the testbed, like some runtimes,
    writes it after the pod's network is up; a file swapped in later is seen at once)."""

    def __init__(self, netns: Path, sandbox: str = "", find: Locate = locate) -> None:
        self.netns, self.sandbox, self.find = netns, sandbox, find
        self.own = False  # the file read last is the pod's own (else the agent's)
        self._stamp: tuple[Path, int, int, int] | None = None
        self._conf = ResolvConf()

    def current(self) -> ResolvConf:
        path, self.own = self.find(self.netns, self.sandbox)
        try:
            st = path.stat()
            stamp = (path, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._conf, self._stamp = parse(path.read_text()), stamp
        except OSError:
            self._conf, self._stamp = ResolvConf(), None
        return self._conf
