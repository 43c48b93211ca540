"""Finding the network namespace of a pod that ran before the agent, from a /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeagent.redirect.discovery import find_pod_netns, local_addresses, pod_of_cgroup

UID = "cc129eea-930a-4108-96ba-7c63bb95f37f"
OTHER = "0f5e2a61-1d2b-4c6e-9a3b-5b7a9e4d2c10"

# What /proc/<pid>/net/fib_trie shows in a pod holding 10.244.1.3 (and loopback).
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        +-- 10.244.1.0/30 2 0 2
           |-- 10.244.1.0
              /24 link UNICAST
           |-- 10.244.1.3
              /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.244.1.0/24 2 0 2
           |-- 10.244.1.3
              /32 host LOCAL
"""
IF_INET6 = (
    "fd000000000000000000000000000003 02 40 00 80     eth0\n"
    "00000000000000000000000000000001 01 80 10 80       lo\n"
)


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # cgroup v2, kubelet's cgroupfs driver
        (f"0::/kubepods/besteffort/pod{UID}/abc123\n", (UID, "abc123")),
        # cgroup v2, systemd driver, containerd
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID.replace('-', '_')}.slice/cri-containerd-abc123.scope\n",
            (UID, "abc123"),
        ),
        # cgroup v1 (hybrid host), CRI-O, guaranteed QoS (no QoS folder)
        (
            f"12:memory:/kubepods/pod{UID}/crio-def456.scope\n0::/\n",
            (UID, "def456"),
        ),
        ("0::/system.slice/containerd.service\n", None),
        ("0::/user.slice/user-0.slice/session-1.scope\n", None),
    ],
)
def test_pod_uid_and_container_from_cgroup(cgroup: str, expected: tuple[str, str] | None) -> None:
    assert pod_of_cgroup(cgroup) == expected


def test_local_addresses_ignore_loopback_network_and_broadcast() -> None:
    assert local_addresses(FIB_TRIE, IF_INET6) == {"10.244.1.3", "fd00::3"}


class FakeProc:
    """A /proc tree: every process has cgroup, net/fib_trie and ns/net (a file per namespace)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "namespaces").mkdir(parents=True)
        self.add_netns("host")
        (root / "self" / "ns").mkdir(parents=True)
        os.symlink(root / "namespaces" / "host", root / "self" / "ns" / "net")

    def add_netns(self, name: str) -> Path:
        path = self.root / "namespaces" / name
        path.touch()
        return path

    def add_process(self, pid: int, cgroup: str, netns: str, fib_trie: str = "") -> None:
        folder = self.root / str(pid)
        (folder / "ns").mkdir(parents=True)
        (folder / "net").mkdir()
        (folder / "cgroup").write_text(cgroup)
        (folder / "net" / "fib_trie").write_text(fib_trie)
        os.symlink(self.root / "namespaces" / netns, folder / "ns" / "net")


def test_finds_the_netns_holding_the_pods_ip_and_prefers_its_bind_mount(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    mounted = proc.add_netns("pod-a")
    proc.add_netns("pod-b")
    cgroup = f"0::/kubepods/besteffort/pod{UID}/"
    proc.add_process(100, cgroup + "sandbox", "pod-a", FIB_TRIE)
    proc.add_process(101, cgroup + "app", "pod-a", FIB_TRIE)
    proc.add_process(200, f"0::/kubepods/besteffort/pod{OTHER}/x", "pod-b", "")  # no such IP
    proc.add_process(300, "0::/system.slice/kubelet.service", "host", FIB_TRIE)
    netns_dir = tmp_path / "run-netns"
    netns_dir.mkdir()
    os.symlink(mounted, netns_dir / "cni-1234")  # what `stat` of a bind mount resolves to

    found = find_pod_netns(
        {UID: ["10.244.1.3"], OTHER: ["10.244.1.9"]}, proc=proc.root, netns_dirs=[netns_dir]
    )
    assert set(found) == {UID}
    assert found[UID].path == str(netns_dir / "cni-1234")
    assert (found[UID].pid, found[UID].container_id) == (100, "sandbox")


def test_host_network_processes_and_unmounted_namespaces(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add_netns("pod-a")
    # A host-network pod's processes live in the node's own namespace: never a candidate.
    proc.add_process(100, f"0::/kubepods/besteffort/pod{OTHER}/c", "host", FIB_TRIE)
    # No bind mount for this namespace: the process's own ns path is used.
    proc.add_process(200, f"0::/kubepods/besteffort/pod{UID}/c", "pod-a", FIB_TRIE)
    found = find_pod_netns(
        {UID: ["10.244.1.3"], OTHER: ["10.244.1.3"]}, proc=proc.root, netns_dirs=[]
    )
    assert set(found) == {UID}
    assert found[UID].path == str(proc.root / "200" / "ns" / "net")


def test_finds_pods_in_this_machines_own_proc() -> None:
    """Against the real /proc: no pod matches, and the scan neither fails nor finds anything."""
    assert find_pod_netns({UID: ["10.244.1.3"]}) == {}
