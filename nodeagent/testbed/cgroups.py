"""Per-pod cgroups, laid out as kubelet lays them out, so the agent can tell a pod's processes.

Kubelet (cgroupfs driver) puts each container at ``kubepods/<qos>/pod<UID>/<container id>``; the
node agent finds pods that were running before it by reading that path from /proc/<pid>/cgroup.
The testbed makes the same layout under a folder of its own in the cgroup v2 hierarchy
(``make setup`` mounts one when the machine has none).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from nodeagent.redirect.ebpf import cgroup2_root
from nodeagent.testbed import netns

TESTBEDS = "nodeagent-testbed"


class CgroupError(RuntimeError):
    pass


def v2_root(mounts: str | None = None) -> Path:
    """Where the cgroup v2 hierarchy is mounted (on a hybrid host: its "unified" mount)."""
    root = cgroup2_root(mounts)
    if root is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted (run `make setup`, which mounts one)")
    return root


def testbed_dir(name: str) -> Path:
    return v2_root() / TESTBEDS / name


def pod_dir(testbed: Path, uid: str, container_id: str) -> Path:
    return testbed / "kubepods" / "besteffort" / f"pod{uid}" / container_id


def host_mount(fstype: str, target: Path) -> None:
    """Mount a FSTYPE filesystem (bpf, cgroup2) at TARGET unless one is there already."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1] == str(target) and fields[2] == fstype:
            return
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", fstype, fstype, str(target)], capture_output=True, text=True, timeout=10
    )
    if proc.returncode != 0:
        raise CgroupError(f"cannot mount {fstype} at {target}: {proc.stderr.strip()}")


def in_cgroup(folder: Path, argv: list[str]) -> list[str]:
    """argv that joins FOLDER before it runs (the process keeps its pid through exec)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(folder), *argv]


def remove(folder: Path) -> list[str]:
    """Remove FOLDER and every cgroup below it, killing what still runs there; returns problems."""
    if not folder.is_dir():
        return []
    problems = []
    for path, _dirs, _files in os.walk(folder, topdown=False):
        here = Path(path)
        pids = [(int(p), None) for p in _read(here / "cgroup.procs").split()]
        problems += [f"process {pid} in {here} survived SIGKILL" for pid in netns.terminate(pids)]
        try:
            here.rmdir()
        except OSError as e:
            problems.append(f"cannot remove cgroup {here}: {e}")
    parent = folder.parent
    if parent.name == TESTBEDS:
        with contextlib.suppress(OSError):
            parent.rmdir()  # the last testbed's folder takes the shared one with it
    return problems


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
