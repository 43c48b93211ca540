"""eBPF capture: cgroup connect hooks instead of NAT for a pod's outbound TCP, sk_lookup for its
inbound TCP, cgroup connect/sendmsg/recvmsg/getpeername hooks for its DNS (bpf/*.c). A pod in
this mode has no nftables table at all.

Per node, once per agent start: bpf/ is compiled by a short-lived loader process (ebpf_load, so
LLVM never stays in the agent), which pins the programs and maps under PIN_DIR (default
/sys/fs/bpf/nodeagent); the getsockopt program is linked to the cgroup v2 root, where it answers
SO_ORIGINAL_DST for Envoy wherever Envoy runs. Per pod: the cgroup hooks (POD_HOOKS) linked to
the pod's cgroup (kubelet's ``.../pod<UID>``), sklookup linked to the pod's netns, the links
pinned under PIN_DIR/pods/<UID>, and the pod's exclusions as entries keyed by its netns cookie
(ebpf_maps). Pins outlive the agent: a restart or upgrade keeps every pod captured, and the next
start updates the links in place (an upgrade that changes a map's layout replaces the map:
ebpf_load says how pods stay captured meanwhile).

Inbound needs the pod's inbound listener (0.0.0.0:15006 in its netns, Envoy's) in the listeners
sockhash: ``steer`` puts it there (inbound_listener takes a descriptor of Envoy's socket) once
Envoy listens for the pod, and again whenever Envoy made a new one (a restart: the kernel drops
a closed socket's entry); until then sk_lookup drops the pod's captured inbound (fail closed).

DNS capture (the pod flag POD_CAPTURE_DNS): connect4/6 send TCP and connected UDP to port 53 to
the DNS proxy (127.0.0.1:15053, [::1]:15053), sendmsg4/6 unconnected UDP; recvmsg4/6 give the
proxy's replies the resolver's address, getpeername4/6 report it as a connected socket's peer.
An older agent kept DNS capture in a companion nftables table in the pod: ``apply`` deletes a
table it finds (an upgrade), ``verify`` reports one.
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
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import nodeagent
from nodeagent.ports import INBOUND_PORT
from nodeagent.redirect import CaptureCheck, bpf_sys, inbound_listener
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.discovery import netns_addresses
from nodeagent.redirect.ebpf_maps import (
    MAPS,
    POD_MAPS,
    PodEntries,
    listener_key,
    netns_of,
    pod_entries,
)
from nodeagent.redirect.netns import entered
from nodeagent.redirect.nftables import NftablesBackend

log = logging.getLogger("nodeagent.capture.ebpf")

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/nodeagent")
BPFFS = Path("/sys/fs/bpf")
SO_NETNS_COOKIE = 71
LOADER_TIMEOUT = 120.0
STEER_RETRY = 0.5  # s between looks for the inbound listener of a pod that has none yet
# bpf_get_netns_cookie in sockops (5.15); cgroup links (5.7); sk_lookup's ingress_ifindex (5.17);
# recvmsg hooks (5.2), getpeername hooks (5.8)
MIN_KERNEL = (5, 17)
# hook -> attach type; the per-pod links (to its cgroup, to its netns), then the node's
POD_HOOKS = {
    "connect4": bpf_sys.CGROUP_INET4_CONNECT,
    "connect6": bpf_sys.CGROUP_INET6_CONNECT,
    "sockops": bpf_sys.CGROUP_SOCK_OPS,
    "sendmsg4": bpf_sys.CGROUP_UDP4_SENDMSG,
    "sendmsg6": bpf_sys.CGROUP_UDP6_SENDMSG,
    "recvmsg4": bpf_sys.CGROUP_UDP4_RECVMSG,
    "recvmsg6": bpf_sys.CGROUP_UDP6_RECVMSG,
    "getpeername4": bpf_sys.CGROUP_INET4_GETPEERNAME,
    "getpeername6": bpf_sys.CGROUP_INET6_GETPEERNAME,
}
NETNS_HOOK = ("sklookup", bpf_sys.SK_LOOKUP)
POD_LINKS = sorted([*POD_HOOKS, NETNS_HOOK[0]])  # what PIN_DIR/pods/<UID> holds
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
            " connect/sendmsg/recvmsg/getpeername/sockops/getsockopt links,"
            " bpf_get_netns_cookie in sockops, and sk_lookup netns links with ingress_ifindex)"
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

    def __init__(
        self,
        pin_dir: Path = DEFAULT_PIN_DIR,
        cgroup_root: Path | None = None,
        listener_owners: Callable[[], Iterable[int]] = tuple,
    ) -> None:
        self.pin_dir = pin_dir
        self.cgroup_root = cgroup_root
        # pids likely to hold the pods' inbound listeners (the node Envoy's): searched first
        self.listener_owners = listener_owners
        # an older agent's companion table (DNS capture in nftables): deleted, never made
        self.leftover = NftablesBackend()
        self.loaded: dict[str, object] = {}
        self._programs: dict[str, bpf_sys.ProgInfo] = {}  # hook -> this agent's program
        self._maps: dict[str, int] = {}
        self._cgroups: dict[str, Path] = {}
        # One pod's apply/remove/sweep at a time: stale-key deletion and the sweep see whole pods.
        self._lock = threading.RLock()
        # Pods applied by this process (UID -> netns): the sweep keeps them, registered or not yet
        self._applied: dict[str, Path] = {}
        self._cookies: dict[tuple[int, int], int] = {}  # netns (dev, inode) -> its cookie
        self._retry_at: dict[str, float] = {}  # pod UID -> when to look for its listener again

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
        self._open_pins()
        self._link(NODE_HOOK[0], NODE_HOOK[1], root, self.pin_dir / "node" / NODE_HOOK[0])
        log.info("eBPF capture loaded: %s", result)
        # An upgrade's bpf/ changed these maps' layout: the pods' older programs keep the older
        # maps until each pod is re-applied (its verify sees them; ebpf_load says why)
        for change in result.get("maps_replaced") or ():
            log.warning("eBPF capture: pinned map replaced, its layout changed: %s", change)
        for name in result.get("maps_removed") or ():
            log.info("eBPF capture: pinned map %s removed (bpf/ no longer declares it)", name)
        return self.loaded

    def open_pinned(self) -> None:
        """Read what a running (or stopped) agent pinned, to ``verify`` pods without loading
        anything (``nodeagent doctor``); raises FileNotFoundError naming a missing pin."""
        root = self.cgroup_root or cgroup2_root()
        if root is None:
            raise EbpfError("no cgroup v2 hierarchy is mounted")
        self.cgroup_root = root
        self._open_pins()

    def _open_pins(self) -> None:
        for name in (*POD_HOOKS, NETNS_HOOK[0], NODE_HOOK[0]):
            with bpf_sys.pinned(str(self.pin_dir / "progs" / name)) as fd:
                self._programs[name] = bpf_sys.prog_info(fd)
        for name in MAPS:
            self._maps[name] = bpf_sys.obj_get(str(self.pin_dir / "maps" / name))

    def close(self) -> None:
        for fd in self._maps.values():
            os.close(fd)
        self._maps.clear()

    def _link(self, hook: str, attach_type: int, target: Path, pin: Path) -> None:
        """Link program HOOK to TARGET (a cgroup directory, or a netns for sk_lookup), pinned
        at PIN; an existing link of ours there is updated in place (atomically: the target is
        never without the hook)."""
        pin.parent.mkdir(parents=True, exist_ok=True)
        # a cgroup v2 id is its directory's inode number, a netns's id its nsfs inode number
        want = os.stat(target).st_ino
        with bpf_sys.pinned(str(self.pin_dir / "progs" / hook)) as prog:
            if pin.exists():
                with bpf_sys.pinned(str(pin)) as link:
                    info = bpf_sys.link_info(link)
                    if (info.target, info.attach_type) == (want, attach_type):
                        bpf_sys.link_update(link, prog, f"update {hook} link {pin}")
                        return
                    with contextlib.suppress(OSError):
                        bpf_sys.link_detach(link, f"detach {pin}")
                pin.unlink()
            flags = os.O_RDONLY | (os.O_DIRECTORY if target.is_dir() else 0)
            fd = os.open(target, flags)
            try:
                link = bpf_sys.link_create(prog, fd, attach_type, f"attach {hook} to {target}")
            finally:
                os.close(fd)
            try:
                bpf_sys.obj_pin(link, str(pin))
            finally:
                os.close(link)

    def _link_problem(self, hook: str, attach_type: int, target: Path, pin: Path) -> str:
        try:
            with bpf_sys.pinned(str(pin)) as link:
                info = bpf_sys.link_info(link)
        except FileNotFoundError:
            return f"{hook}: no link pinned at {pin}"
        want = os.stat(target).st_ino
        kind = bpf_sys.LINK_TYPE_NETNS if hook == NETNS_HOOK[0] else bpf_sys.LINK_TYPE_CGROUP
        if info.type != kind or info.attach_type != attach_type:
            return f"{hook}: {pin} is not a {hook} link"
        if info.target != want:
            return f"{hook}: linked to {info.target}, not {target} ({want})"
        try:
            running = bpf_sys.prog_info_by_id(info.prog_id)
        except OSError as e:
            return f"{hook}: its program {info.prog_id} cannot be read: {e}"
        ours = self._programs.get(hook)
        if ours is None or running.tag != ours.tag:
            return f"{hook}: runs program {info.prog_id}, not this agent's bpf/{hook}.c"
        if running.map_ids != ours.map_ids:  # the same code, on maps an upgrade replaced
            return f"{hook}: runs program {info.prog_id} on other maps than this agent's"
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
        return {name: self._owned(name, {cookie}) for name in POD_MAPS}

    def _owned(self, name: str, cookies: set[int], keep: bool = True) -> set[bytes]:
        """Keys of per-pod map NAME whose netns cookie is in COOKIES (KEEP False: is not)."""
        key_size, value_size = MAPS[name]
        found = set()
        for key in bpf_sys.map_keys(self._maps[name], key_size):
            value = b""
            if POD_MAPS[name] is None:  # the cookie is in the value
                value = bpf_sys.map_lookup(self._maps[name], key, value_size) or b""
                if not value:
                    continue
            if (netns_of(name, key, value) in cookies) == keep:
                found.add(key)
        return found

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
            # Envoy's listener, when it listens already (a repair); a new pod's comes later
            self._steer(netns, cookie)
            # Entries first, then links: a link updated to this agent's program finds the pod
            # in its maps (after an upgrade replaced a map, the older program kept the older
            # map, and its entries, until now)
            for hook, attach_type in POD_HOOKS.items():
                self._link(hook, attach_type, cgroup, self.pin_dir / "pods" / uid / hook)
            self._link(*NETNS_HOOK, netns, self.pin_dir / "pods" / uid / NETNS_HOOK[0])
            # Last: an older agent's nftables table (inbound, DNS) goes once the hooks have the pod
            if self.leftover.holds_table(netns):
                self.leftover.remove(netns)

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        problems = []
        if self.leftover.holds_table(netns):
            problems.append("nftables: the pod has a table, but nothing of it is in nftables")
        cgroup = self._pod_cgroup(uid)
        for hook, attach_type in POD_HOOKS.items():
            problems.append(
                self._link_problem(hook, attach_type, cgroup, self.pin_dir / "pods" / uid / hook)
            )
        problems.append(
            self._link_problem(*NETNS_HOOK, netns, self.pin_dir / "pods" / uid / NETNS_HOOK[0])
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
        problems.append(self._listener_problem(netns, cookie))
        problems = [p for p in problems if p]
        return CaptureCheck(not problems, "; ".join(problems[:5]))

    # -- the pod's inbound listener ---------------------------------------------------------------

    def steer(self, netns: Path, uid: str = "") -> str:
        """Put the pod's inbound listener (Envoy's 0.0.0.0:15006 in NETNS) in the listeners
        sockhash, so sk_lookup hands the pod's inbound to it; "" when done or already there,
        else why not (no such socket: Envoy does not listen for the pod)."""
        with self._lock:
            return self._steer(netns, netns_cookie(netns))

    def steer_missing(self, pods: dict[str, Path]) -> list[str]:
        """steer, for each of PODS (UID -> netns) whose listeners entry is missing (Envoy made
        new sockets: the kernel dropped the entries of the closed ones). Returns the UIDs
        steered. One map lookup per steered pod: cheap enough to run often."""
        steered = []
        now = time.monotonic()
        for uid, netns in pods.items():
            try:
                cookie = self._cookie(netns)
                present = bpf_sys.map_lookup(self._maps["listeners"], listener_key(cookie), 8)
                if present is not None or self._retry_at.get(uid, 0.0) > now:
                    continue
                with self._lock:
                    problem = self._steer(netns, cookie)
                if problem:  # nothing listens yet: look again a bit later
                    self._retry_at[uid] = now + STEER_RETRY
                else:
                    self._retry_at.pop(uid, None)
                    steered.append(uid)
            except OSError as e:  # the netns went meanwhile
                log.debug("steering the inbound listener of pod %s: %s", uid, e)
        for uid in self._retry_at.keys() - pods.keys():
            del self._retry_at[uid]
        if len(self._cookies) > 2 * len(pods) + 64:  # namespaces gone: remembered afresh
            self._cookies.clear()
        return steered

    def _cookie(self, netns: Path) -> int:
        """netns_cookie, remembered by the namespace's identity (it enters the netns)."""
        st = os.stat(netns)
        key = (st.st_dev, st.st_ino)
        cookie = self._cookies.get(key)
        if cookie is None:
            cookie = self._cookies[key] = netns_cookie(netns)
        return cookie

    def _listener_fds(self, netns: Path) -> tuple[list[int], str]:
        """Descriptors of ours for every socket listening on 0.0.0.0:15006 in NETNS (the caller
        closes them), or why there are none."""
        inodes = inbound_listener.netns_listeners(netns, INBOUND_PORT)
        if not inodes:
            return [], f"nothing listens on 0.0.0.0:{INBOUND_PORT} in {netns}"
        fds = []
        pids = inbound_listener.candidates(self.listener_owners(), netns)
        for inode in inodes:
            found = inbound_listener.owner_fd(pids, [inode])
            if found is not None:
                with contextlib.suppress(OSError):  # the process exited meanwhile
                    fds.append(inbound_listener.take(*found))
        if not fds:
            return [], f"no process holds the socket listening on :{INBOUND_PORT} in {netns}"
        return fds, ""

    def _steer(self, netns: Path, cookie: int) -> str:
        fds, why = self._listener_fds(netns)
        try:
            if fds:  # any one: sk_lookup hands connections to its reuseport group
                bpf_sys.map_update(
                    self._maps["listeners"], listener_key(cookie), struct.pack("=Q", fds[0])
                )
        finally:
            for fd in fds:
                os.close(fd)
        return why

    def _listener_problem(self, netns: Path, cookie: int) -> str:
        """Empty when the listeners entry holds one of the netns's :15006 listening sockets,
        or when there is none (Envoy does not listen for the pod: inbound is dropped)."""
        fds, _ = self._listener_fds(netns)
        try:
            cookies = {bpf_sys.socket_cookie(fd) for fd in fds}
        finally:
            for fd in fds:
                os.close(fd)
        if not cookies:
            return ""
        held = bpf_sys.map_lookup(self._maps["listeners"], listener_key(cookie), 8)
        if held is None:
            return f"the inbound listener on :{INBOUND_PORT} is not in the listeners map"
        if struct.unpack("=Q", held)[0] not in cookies:
            return f"the listeners map holds another socket than the one on :{INBOUND_PORT}"
        return ""

    # -- removal ----------------------------------------------------------------------------------

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
            bpf_sys.map_delete(self._maps["listeners"], listener_key(cookie))
            if self.leftover.holds_table(netns):
                self.leftover.remove(netns)

    def _unpin_pod(self, uid: str) -> None:
        if uid:
            folder = self.pin_dir / "pods" / uid
            for hook in POD_LINKS:
                pin = folder / hook
                # a link is defunct once its target is gone: detaching it may fail, unpinning not
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
                for key in self._owned(name, cookies, keep=False):
                    stale += bpf_sys.map_delete(self._maps[name], key)
            for key in bpf_sys.map_keys(self._maps["listeners"], 8):
                if struct.unpack("=Q", key)[0] not in cookies:
                    stale += bpf_sys.map_delete(self._maps["listeners"], key)
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
