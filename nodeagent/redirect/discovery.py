"""Find the network namespaces of pods that were already running when the agent started.

Pods created before nodeagent was installed (or while its CNI entry was missing) never passed
through our CNI plugin, so nothing told the agent where their network namespace is. As istio-cni
does, walk /proc: a process's cgroup path names its pod's UID (kubelet puts every container of a
pod under ``pod<UID>``, with ``-`` or, under the systemd driver, ``_``); its ``ns/net`` is the pod's
network namespace. A candidate is accepted only when that namespace holds one of the pod's IPs, so
a host-network process or a stray cgroup match can never be mistaken for the pod.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.redirect.netns import entered

log = logging.getLogger("nodeagent.discovery")

PROC = Path("/proc")
# Where runtimes keep network namespaces bind-mounted (containerd and CRI-O, iproute2, Docker).
NETNS_DIRS = (Path("/var/run/netns"), Path("/run/netns"), Path("/var/run/docker/netns"))

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# ".../kubepods/besteffort/pod<uid>/<container>" (cgroupfs) or
# ".../kubepods-besteffort-pod<uid_>.slice/cri-containerd-<container>.scope" (systemd).
_POD_CGROUP = re.compile(rf"pod(?P<uid>{_UID})(?:\.slice)?(?:/(?P<container>[^/\n]+))?")
_CONTAINER_PREFIXES = ("cri-containerd-", "crio-", "docker-", "containerd-")


@dataclass(frozen=True)
class PodNetns:
    uid: str
    path: str  # a bind mount of the namespace when the runtime keeps one, else /proc/<pid>/ns/net
    container_id: str  # the container the process found belongs to (may be an app container)
    pid: int


def pod_of_cgroup(cgroup: str) -> tuple[str, str] | None:
    """(pod UID, container id) from the text of /proc/<pid>/cgroup, or None for a non-pod."""
    match = _POD_CGROUP.search(cgroup)
    if match is None:
        return None
    container = match.group("container") or ""
    for prefix in _CONTAINER_PREFIXES:
        container = container.removeprefix(prefix)
    return match.group("uid").replace("_", "-"), container.removesuffix(".scope")


def local_addresses(fib_trie: str, if_inet6: str = "") -> set[str]:
    """The addresses a network namespace owns: IPv4 from its fib_trie, IPv6 from if_inet6."""
    found = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text == "/32 host LOCAL" and last:
            found.add(last)
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            raw = ":".join(fields[0][i : i + 4] for i in range(0, 32, 4))
            found.add(str(ipaddress.IPv6Address(raw)))
    return {a for a in found if not ipaddress.ip_address(a).is_loopback}


def find_pod_netns(
    pods: Mapping[str, Sequence[str]],
    proc: Path = PROC,
    netns_dirs: Iterable[Path] = NETNS_DIRS,
) -> dict[str, PodNetns]:
    """For each pod UID in PODS (UID -> its IPs), the network namespace that holds its IP."""
    wanted = {
        uid.lower(): {str(ipaddress.ip_address(ip)) for ip in ips} for uid, ips in pods.items()
    }
    own = _ns_id(proc / "self/ns/net")
    candidates: dict[str, dict[tuple[int, int], tuple[int, str]]] = {}
    for entry in _pids(proc):
        try:
            owner = pod_of_cgroup((proc / str(entry) / "cgroup").read_text())
        except OSError:
            continue  # the process exited meanwhile
        if owner is None or owner[0] not in wanted:
            continue
        ns = _ns_id(proc / str(entry) / "ns/net")
        if ns is None or ns == own:
            continue  # gone, or the node's own namespace (host network)
        candidates.setdefault(owner[0], {}).setdefault(ns, (entry, owner[1]))

    mounts = _bind_mounts(netns_dirs)
    found: dict[str, PodNetns] = {}
    for uid, by_ns in candidates.items():
        for ns, (pid, container) in by_ns.items():
            try:
                owned = local_addresses(
                    (proc / str(pid) / "net/fib_trie").read_text(),
                    _read_or_empty(proc / str(pid) / "net/if_inet6"),
                )
            except OSError:
                continue
            if owned & wanted[uid]:
                path = mounts.get(ns, str(proc / str(pid) / "ns/net"))
                found[uid] = PodNetns(uid, path, container, pid)
                break
        else:
            log.warning(
                "pod uid %s: %d candidate network namespace(s), none holds the pod's IP %s",
                uid,
                len(by_ns),
                ", ".join(sorted(wanted[uid])),
            )
    return found


def netns_addresses(netns: Path) -> set[str]:
    """The addresses the network namespace at NETNS owns (blocking: run it in a worker thread).

    Read from the calling thread's own view of /proc (thread-self) while it is inside NETNS.
    """
    with entered(netns):
        return local_addresses(
            Path("/proc/thread-self/net/fib_trie").read_text(),
            _read_or_empty(Path("/proc/thread-self/net/if_inet6")),
        )


def _pids(proc: Path) -> list[int]:
    return sorted(int(p) for p in os.listdir(proc) if p.isdigit())


def _ns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _bind_mounts(netns_dirs: Iterable[Path]) -> dict[tuple[int, int], str]:
    """Namespace id -> a path that lives as long as the namespace, not just one process."""
    out: dict[tuple[int, int], str] = {}
    for folder in netns_dirs:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            ns = _ns_id(folder / name)
            if ns is not None:
                out.setdefault(ns, str(folder / name))
    return out


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
