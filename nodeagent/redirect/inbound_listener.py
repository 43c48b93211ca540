"""Find a pod's inbound listener, the socket listening on 0.0.0.0:15006 in its netns, and take a
file descriptor of it for eBPF capture's sk_lookup sockhash (ebpf.py).

The node's Envoy binds that socket inside the pod's netns (``network_namespace_filepath``); the
agent does not own it, so it finds the socket's inode in the netns's /proc/net/tcp, the process
holding that inode among its file descriptors (the Envoy pid it knows first, then processes in the
pod's netns, then any), and copies the descriptor with pidfd_getfd(2). With SO_REUSEPORT Envoy
holds one such socket per worker: any one of them will do, sk_lookup hands a connection to the
socket's reuseport group, which spreads connections over the workers as it does without us.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nodeagent.redirect import bpf_sys
from nodeagent.redirect.netns import entered

TCP_LISTEN = "0A"


def listening_inodes(proc_net_tcp: str, port: int) -> list[int]:
    """The inodes of the sockets listening on 0.0.0.0:PORT in a /proc/net/tcp listing, in order."""
    want = f"00000000:{port:04X}"
    found = []
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[1] == want and fields[3] == TCP_LISTEN and fields[9] != "0":
            found.append(int(fields[9]))
    return found


def netns_listeners(netns: Path, port: int) -> list[int]:
    """The inodes of the sockets listening on 0.0.0.0:PORT in NETNS (blocking)."""
    with entered(netns):
        return listening_inodes(Path("/proc/thread-self/net/tcp").read_text(), port)


def _pids(proc: Path) -> list[int]:
    return sorted(int(p) for p in os.listdir(proc) if p.isdigit())


def _in_netns(pid: int, netns_ino: int, proc: Path) -> bool:
    try:
        return os.stat(proc / str(pid) / "ns/net").st_ino == netns_ino
    except OSError:
        return False


def candidates(hints: Iterable[int], netns: Path, proc: Path = Path("/proc")) -> list[int]:
    """Who may hold the listener, most likely first: HINTS (the node Envoy's pid), processes in
    NETNS (an Envoy that runs in the pod, or whatever listens there), then every other one."""
    ino = os.stat(netns).st_ino
    pids = _pids(proc)
    first = [p for p in hints if p]
    inside = [p for p in pids if p not in first and _in_netns(p, ino, proc)]
    rest = [p for p in pids if p not in first and p not in inside]
    return first + inside + rest


def owner_fd(
    pids: Iterable[int], inodes: Iterable[int], proc: Path = Path("/proc")
) -> tuple[int, int] | None:
    """(pid, fd) of the first of PIDS holding one of the socket INODES, or None."""
    links = {f"socket:[{i}]" for i in inodes}
    if not links:
        return None
    for pid in pids:
        folder = proc / str(pid) / "fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(folder / fd) in links:
                    return pid, int(fd)
            except OSError:
                continue
    return None


def take(pid: int, fd: int) -> int:
    """A descriptor of our own for PID's descriptor FD (close it when done)."""
    pidfd = os.pidfd_open(pid)
    try:
        return bpf_sys.pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
