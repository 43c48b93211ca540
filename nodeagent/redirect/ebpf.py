"""eBPF capture: cgroup connect hooks instead of NAT for a pod's outbound TCP (bpf/*.c).

Per node, once per agent start: bpf/ is compiled by a short-lived loader process (ebpf_load, so
LLVM never stays in the agent), which pins the programs and maps under PIN_DIR (default
/sys/fs/bpf/nodeagent); the getsockopt program is linked to the cgroup v2 root, where it answers
SO_ORIGINAL_DST for Envoy wherever Envoy runs. Per pod: connect4, connect6 and sockops linked to
the pod's cgroup (kubelet's ``.../pod<UID>``), the links pinned under PIN_DIR/pods/<UID>, and the
pod's exclusions as entries keyed by its netns cookie (ebpf_maps). Pins outlive the agent: a
restart or upgrade keeps every pod captured, and the next start updates the links in place.

Not in eBPF yet, so kept in nftables in this mode (a companion table holding only these):
inbound capture (prerouting redirect to 15006) and DNS capture (UDP/TCP 53 to 15053).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import nodeagent
from nodeagent.redirect import CaptureCheck, bpf_sys
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.discovery import netns_addresses
from nodeagent.redirect.ebpf_maps import MAPS, POD_MAPS, PodEntries, netns_of, pod_entries
from nodeagent.redirect.netns import entered
from nodeagent.redirect.nftables import EBPF_COMPANION_RULES, NftablesBackend

log = logging.getLogger("nodeagent.capture.ebpf")

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/nodeagent")
BPFFS = Path("/sys/fs/bpf")
SO_NETNS_COOKIE = 71
LOADER_TIMEOUT = 120.0
MIN_KERNEL = (5, 15)  # bpf_get_netns_cookie in sockops (5.15); cgroup links (5.7)
# hook -> attach type; the per-pod links, then the node's
POD_HOOKS = {
    "connect4": bpf_sys.CGROUP_INET4_CONNECT,
    "connect6": bpf_sys.CGROUP_INET6_CONNECT,
    "sockops": bpf_sys.CGROUP_SOCK_OPS,
}
NODE_HOOK = ("getsockopt", bpf_sys.CGROUP_GETSOCKOPT)


class EbpfError(RuntimeError):
    """eBPF capture cannot run or failed; the message names what and where."""


def bpf_dir() -> Path:
    """The BPF C sources: $NODEAGENT_BPF_DIR, else bpf/ beside the nodeagent package."""
    env = os.environ.get("NODEAGENT_BPF_DIR")
    return Path(env) if env else Path(nodeagent.__file__).resolve().parents[1] / "bpf"


def cgroup2_root(mounts: str | None = None) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (on a hybrid host: its "unified" mount), if any."""
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def _is_bpffs(path: Path, mounts: str) -> bool:
    return any(
        len(f) > 2 and f[1] == str(path) and f[2] == "bpf"
        for f in (line.split() for line in mounts.splitlines())
    )


def filesystem_of(path: Path, mounts: str) -> str:
    """The type of the filesystem PATH is on (its deepest mount point in MOUNTS)."""
    best, kind = "", ""
    for fields in (line.split() for line in mounts.splitlines()):
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def missing_requirements(
    release: str | None = None, mounts: str | None = None, cgroup_root: Path | None = None
) -> list[str]:
    """What this machine lacks for eBPF capture, each naming the missing piece (empty: none).
    The verifier has the last word: the loader's error names a helper or hook it refuses."""
    release = release or platform.release()
    mounts = Path("/proc/self/mounts").read_text() if mounts is None else mounts
    problems = []
    try:
        version = tuple(int(p) for p in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < MIN_KERNEL:
        problems.append(
            f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (needs cgroup"
            " connect4/connect6/sockops/getsockopt links and bpf_get_netns_cookie in sockops)"
        )
    if cgroup_root is not None:
        if filesystem_of(cgroup_root, mounts) != "cgroup2":
            problems.append(f"--cgroup-root {cgroup_root} is not a cgroup v2 mount")
    elif cgroup2_root(mounts) is None:
        problems.append("no cgroup v2 hierarchy is mounted (the hooks attach to pods' cgroups)")
    if not _is_bpffs(BPFFS, mounts) and not BPFFS.is_dir():
        problems.append(f"{BPFFS} does not exist (bpffs, where programs and links are pinned)")
    if not (bpf_dir() / "capture.h").is_file():
        problems.append(f"the BPF sources are not at {bpf_dir()} (set NODEAGENT_BPF_DIR)")
    return problems


def netns_cookie(netns: Path) -> int:
    """The kernel's cookie of the network namespace at NETNS (SO_NETNS_COOKIE, Linux 5.14)."""
    with entered(netns), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    return value


def find_pod_cgroup(uid: str, root: Path, depth: int = 8) -> Path | None:
    """The pod-level cgroup of pod UID below ROOT: kubelet's ``pod<uid>`` (cgroupfs driver) or
    ``*-pod<uid_>.slice`` (systemd driver), as discovery.pod_of_cgroup reads them."""
    names = {f"pod{uid}"}
    suffix = f"pod{uid.replace('-', '_')}.slice"
    level = [root]
    for _ in range(depth):
        deeper = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.name in names or entry.name.endswith(suffix):
                    return Path(entry.path)
                deeper.append(Path(entry.path))
        level = deeper
    return None


class EbpfBackend:
    """RedirectBackend on eBPF (module docstring). ``start`` must run once before any pod."""

    name = "ebpf"

    def __init__(self, pin_dir: Path = DEFAULT_PIN_DIR, cgroup_root: Path | None = None) -> None:
        self.pin_dir = pin_dir
        self.cgroup_root = cgroup_root
        self.companion = NftablesBackend(EBPF_COMPANION_RULES)
        self.loaded: dict[str, object] = {}
        self._tags: dict[str, bytes] = {}
        self._maps: dict[str, int] = {}
        self._cgroups: dict[str, Path] = {}
        # One pod's apply/remove/sweep at a time: stale-key deletion and the sweep see whole pods.
        self._lock = threading.RLock()
        # Pods applied by this process (UID -> netns): the sweep keeps them, registered or not yet
        self._applied: dict[str, Path] = {}

    # -- node -------------------------------------------------------------------------------------

    def start(self) -> dict[str, object]:
        """Check the kernel, compile and pin (loader process), link getsockopt to the root."""
        problems = missing_requirements(cgroup_root=self.cgroup_root)
        if problems:
            raise EbpfError("eBPF capture cannot run here: " + "; ".join(problems))
        mounts = Path("/proc/self/mounts").read_text()
        if filesystem_of(self.pin_dir, mounts) != "bpf":
            if not self.pin_dir.is_relative_to(BPFFS):
                raise EbpfError(f"--bpf-dir {self.pin_dir} is not on a bpffs mount")
            _mount_bpffs()
        root = self.cgroup_root or cgroup2_root()
        assert root is not None
        self.cgroup_root = root
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "nodeagent.redirect.ebpf_load",
                str(bpf_dir()),
                str(self.pin_dir),
            ],
            capture_output=True,
            text=True,
            timeout=LOADER_TIMEOUT,
        )
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            result = {"error": proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}"}
        if proc.returncode != 0 or "error" in result:
            raise EbpfError(f"compiling/loading bpf/ failed: {result.get('error')}")
        self.loaded = dict(result)
        for name in (*POD_HOOKS, NODE_HOOK[0]):
            with bpf_sys.pinned(str(self.pin_dir / "progs" / name)) as fd:
                self._tags[name] = bpf_sys.prog_info(fd).tag
        for name in MAPS:
            self._maps[name] = bpf_sys.obj_get(str(self.pin_dir / "maps" / name))
        self._link(NODE_HOOK[0], NODE_HOOK[1], root, self.pin_dir / "node" / NODE_HOOK[0])
        log.info("eBPF capture loaded: %s", result)
        return self.loaded

    def close(self) -> None:
        for fd in self._maps.values():
            os.close(fd)
        self._maps.clear()

    def _link(self, hook: str, attach_type: int, cgroup: Path, pin: Path) -> None:
        """Link program HOOK to CGROUP, pinned at PIN; an existing link of ours there is
        updated in place (atomically: the cgroup is never without the hook)."""
        pin.parent.mkdir(parents=True, exist_ok=True)
        want = os.stat(cgroup).st_ino  # a cgroup v2 id is its directory's inode number
        with bpf_sys.pinned(str(self.pin_dir / "progs" / hook)) as prog:
            if pin.exists():
                with bpf_sys.pinned(str(pin)) as link:
                    info = bpf_sys.link_info(link)
                    if (info.cgroup_id, info.attach_type) == (want, attach_type):
                        bpf_sys.link_update(link, prog, f"update {hook} link {pin}")
                        return
                    with contextlib.suppress(OSError):
                        bpf_sys.link_detach(link, f"detach {pin}")
                pin.unlink()
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                link = bpf_sys.link_create(prog, fd, attach_type, f"attach {hook} to {cgroup}")
            finally:
                os.close(fd)
            try:
                bpf_sys.obj_pin(link, str(pin))
            finally:
                os.close(link)

    def _link_problem(self, hook: str, attach_type: int, cgroup: Path, pin: Path) -> str:
        try:
            with bpf_sys.pinned(str(pin)) as link:
                info = bpf_sys.link_info(link)
        except FileNotFoundError:
            return f"{hook}: no link pinned at {pin}"
        want = os.stat(cgroup).st_ino
        if info.type != bpf_sys.LINK_TYPE_CGROUP or info.attach_type != attach_type:
            return f"{hook}: {pin} is not a {hook} cgroup link"
        if info.cgroup_id != want:
            return f"{hook}: linked to cgroup id {info.cgroup_id}, not {cgroup} ({want})"
        try:
            tag = bpf_sys.prog_info_by_id(info.prog_id).tag
        except OSError as e:
            return f"{hook}: its program {info.prog_id} cannot be read: {e}"
        if tag != self._tags.get(hook):
            return f"{hook}: runs program {info.prog_id}, not this agent's bpf/{hook}.c"
        return ""

    # -- pods -------------------------------------------------------------------------------------

    def _pod_cgroup(self, uid: str) -> Path:
        if not uid:
            raise EbpfError(
                "eBPF capture needs the pod's UID (CNI_ARGS K8S_POD_UID) to find its cgroup"
            )
        cached = self._cgroups.get(uid)
        if cached is not None and cached.is_dir():
            return cached
        assert self.cgroup_root is not None, "EbpfBackend.start() was not called"
        found = find_pod_cgroup(uid, self.cgroup_root)
        if found is None:
            raise EbpfError(f"no cgroup pod{uid} below {self.cgroup_root} (kubelet's pod cgroup)")
        self._cgroups[uid] = found
        return found

    def _wanted(self, netns: Path, spec: CaptureSpec) -> tuple[int, PodEntries]:
        cookie = netns_cookie(netns)
        return cookie, pod_entries(cookie, spec, sorted(netns_addresses(netns)))

    def _entries_of(self, cookie: int) -> dict[str, set[bytes]]:
        return {
            name: {
                k
                for k in bpf_sys.map_keys(self._maps[name], MAPS[name][0])
                if netns_of(name, k) == cookie
            }
            for name in POD_MAPS
        }

    def apply(self, netns: Path, spec: CaptureSpec, uid: str = "") -> None:
        cgroup = self._pod_cgroup(uid)
        cookie, wanted = self._wanted(netns, spec)
        with self._lock:
            self._applied[uid] = netns
            have = self._entries_of(cookie)
            for name, entries in wanted.maps.items():
                for key, value in entries.items():
                    bpf_sys.map_update(self._maps[name], key, value)
                for stale in have[name] - entries.keys():
                    bpf_sys.map_delete(self._maps[name], stale)
            self.companion.apply(netns, spec)
            for hook, attach_type in POD_HOOKS.items():
                self._link(hook, attach_type, cgroup, self.pin_dir / "pods" / uid / hook)

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        problems = []
        check = self.companion.verify(netns, spec)
        if not check.ok:
            problems.append(f"nftables (inbound/DNS): {check.reason}")
        cgroup = self._pod_cgroup(uid)
        for hook, attach_type in POD_HOOKS.items():
            problems.append(
                self._link_problem(hook, attach_type, cgroup, self.pin_dir / "pods" / uid / hook)
            )
        assert self.cgroup_root is not None
        node_pin = self.pin_dir / "node" / NODE_HOOK[0]
        problems.append(self._link_problem(*NODE_HOOK, self.cgroup_root, node_pin))
        cookie, wanted = self._wanted(netns, spec)
        have = self._entries_of(cookie)
        for name in POD_MAPS:
            want = wanted.maps[name]
            if have[name] != want.keys():
                problems.append(
                    f"map {name}: {len(have[name] - want.keys())} unexpected and"
                    f" {len(want.keys() - have[name])} missing entries for netns {cookie}"
                )
                continue
            for key, value in want.items():
                if bpf_sys.map_lookup(self._maps[name], key, MAPS[name][1]) != value:
                    problems.append(f"map {name}: an entry of netns {cookie} holds another value")
        problems = [p for p in problems if p]
        return CaptureCheck(not problems, "; ".join(problems[:5]))

    def remove(self, netns: Path, uid: str = "") -> None:
        with self._lock:
            self._remove(netns, uid)

    def _remove(self, netns: Path, uid: str) -> None:
        if uid:
            self._applied.pop(uid, None)
            self._unpin_pod(uid)
        if netns.exists():
            cookie = netns_cookie(netns)
            for name, keys in self._entries_of(cookie).items():
                for key in keys:
                    bpf_sys.map_delete(self._maps[name], key)
            self.companion.remove(netns)

    def _unpin_pod(self, uid: str) -> None:
        if uid:
            folder = self.pin_dir / "pods" / uid
            for hook in POD_HOOKS:
                pin = folder / hook
                # a link is defunct once its cgroup is gone: detaching it may fail, unpinning not
                with contextlib.suppress(OSError), bpf_sys.pinned(str(pin)) as link:
                    bpf_sys.link_detach(link, f"detach {pin}")
                pin.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()
            self._cgroups.pop(uid, None)

    def sweep(self, keep: dict[str, Path]) -> list[str]:
        """Unpin the links of every pod not in KEEP (UID -> netns; nor applied by this process
        meanwhile) and delete map entries of every netns but theirs. Returns what went."""
        with self._lock:
            keep = {**self._applied, **keep}
            folder = self.pin_dir / "pods"
            pinned = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            gone = sorted(uid for uid in pinned if uid not in keep)
            for uid in gone:
                self._unpin_pod(uid)
            cookies = set()
            for netns in keep.values():
                with contextlib.suppress(OSError):  # a netns gone: its entries go too
                    cookies.add(netns_cookie(netns))
            stale = 0
            for name in POD_MAPS:
                for key in bpf_sys.map_keys(self._maps[name], MAPS[name][0]):
                    if netns_of(name, key) not in cookies:
                        stale += bpf_sys.map_delete(self._maps[name], key)
        return [f"links of pod {uid}" for uid in gone] + ([f"{stale} map entries"] if stale else [])


def _mount_bpffs() -> None:
    if _is_bpffs(BPFFS, Path("/proc/self/mounts").read_text()):
        return
    proc = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, timeout=10
    )
    if proc.returncode != 0:
        raise EbpfError(f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()}")


def remove_pins(pin_dir: Path) -> None:
    """Detach every link pinned under PIN_DIR, then unpin everything (uninstall, a testbed's
    teardown): nothing of ours stays attached to any cgroup."""
    links = [
        p for p in pin_dir.rglob("*") if "node" in p.parts[-2:-1] or p.parent.parent.name == "pods"
    ]
    for pin in links:
        with contextlib.suppress(OSError), bpf_sys.pinned(str(pin)) as link:
            bpf_sys.link_detach(link, f"detach {pin}")
    shutil.rmtree(pin_dir, ignore_errors=True)
