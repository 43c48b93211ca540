"""Keeps the node's one Envoy running, across Envoy crashes and across agent restarts.

Managed mode (the default): Envoy is started detached (its own session, output to a log file) and
is never stopped when the agent exits: pods keep their traffic while the agent restarts. The
pidfile records the pid and the kernel's start time of the process, so a restarted agent adopts
the very same Envoy and never a process that merely got its pid recycled.

External mode: someone else runs Envoy (the DaemonSet's ``envoy`` container, ``nodeagent envoy``)
and the supervisor only watches it through its admin API: it never starts, restarts or signals a
process, and reports whether Envoy is there and LIVE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.envoy.admin import EnvoyAdmin, EnvoyAdminError
from nodeagent.envoy.launch import NODE_ENVOY_ARGS, envoy_argv
from nodeagent.supervise import TaskSupervisor

log = logging.getLogger("nodeagent.envoy")

MANAGED, EXTERNAL = "managed", "external"  # who runs Envoy: this supervisor, or someone else
POLL_INTERVAL = 0.2  # how quickly a dead Envoy is noticed
ADMIN_POLL_INTERVAL = 0.5  # external mode: how often Envoy's admin /ready is asked
HEALTHY_RUN = 60.0  # an Envoy that ran this long resets the restart backoff
TERM_GRACE = 5.0  # SIGTERM, then SIGKILL after this long
PIDFILE = "envoy.pid"


@dataclass(frozen=True)
class ProcessStat:
    state: str  # "R", "S", ... "Z" for an exited child nobody has reaped yet
    start_time: int  # clock ticks after boot: with the pid, it names one process for good


def process_stat(pid: int) -> ProcessStat | None:
    """Fields 3 and 22 of /proc/PID/stat; None when no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcessStat(state=fields[0], start_time=int(fields[19]))


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


class EnvoySupervisor:
    def __init__(
        self,
        binary: Path,
        bootstrap_path: Path,
        run_dir: Path,
        log_path: Path,
        admin: EnvoyAdmin,
        extra_args: Sequence[str] = NODE_ENVOY_ARGS,
        backoff: tuple[float, float] = (0.5, 30.0),
        on_restart: Callable[[], None] | None = None,
        mode: str = MANAGED,
        prefix: Sequence[str] = (),
        tasks: TaskSupervisor | None = None,
        critical: bool = True,
    ) -> None:
        if mode not in (MANAGED, EXTERNAL):
            raise ValueError(f"Envoy mode must be {MANAGED!r} or {EXTERNAL!r}, not {mode!r}")
        self.binary = binary
        self.bootstrap_path = bootstrap_path
        self.pidfile = run_dir / PIDFILE
        self.log_path = log_path
        self.admin = admin
        self.extra_args = tuple(extra_args)
        self.backoff = backoff
        self.on_restart = on_restart
        self.mode = mode
        # What Envoy is started through, e.g. nsenter + setpriv for a sidecar in a pod's netns
        # (each execs the next, so the pid and /proc/PID/cmdline end up Envoy's own).
        self.prefix = tuple(prefix)
        # The watch below is what restarts a dead Envoy: it must itself never die silently.
        self.tasks = tasks or TaskSupervisor()
        self.critical = critical
        self.restarts = 0  # managed: Envoys restarted; external: Envoys seen coming back
        self.last_exit = ""  # exit code of the last Envoy that died, or "gone" if not our child
        self.adopted = False
        self._pid: int | None = None
        self._start_time = -1
        self._child: subprocess.Popen[bytes] | None = None  # set only for an Envoy we spawned
        self._running_since = 0.0
        self._delay = backoff[0]
        self._monitor: asyncio.Task[None] | None = None
        # External mode: what Envoy's admin /ready last said ("LIVE", "INITIALIZING", ...; "" when
        # nothing answered), the error when nothing did, and whether an Envoy ever answered.
        self.state = ""
        self.admin_error = ""
        self._seen = False
        self._lost_at: float | None = None

    @property
    def pid(self) -> int | None:
        """The managed Envoy's pid; None while it is not running, and always in external mode
        (Envoy's container has a pid namespace of its own)."""
        return self._pid

    def argv(self) -> list[str]:
        return [*self.prefix, *envoy_argv(self.binary, self.bootstrap_path, self.extra_args)]

    def problem(self) -> str:
        """Empty while the node's Envoy can serve; otherwise why not (readiness, proxy-status)."""
        if self.mode == MANAGED:
            if self._pid is not None:
                return ""
            if self.last_exit:
                return f"Envoy not ready: it exited ({self.last_exit}) and is being restarted"
            return "Envoy not ready: not started yet"
        if self.state == "LIVE":
            return ""
        if self.state:
            return f"Envoy not ready: it is {self.state} (admin {self.admin.address}/ready)"
        where = (
            f"its admin {self.admin.address} stopped answering"
            if self._seen
            else f"no Envoy answers on its admin {self.admin.address} yet"
        )
        return (
            f"Envoy not ready: {where} ({self.admin_error}); it runs in its own container"
            " (`nodeagent envoy`): the agent never starts it"
        )

    async def start(self) -> None:
        """Managed: adopt the Envoy the pidfile names if it is still ours, else start one.
        External: look at the Envoy that someone else runs. Then watch it."""
        if self._monitor is not None:
            return
        if self.mode == EXTERNAL:
            log.info(
                "Envoy runs in its own container (external mode): watching it on its admin %s",
                self.admin.address,
            )
            await self._observe()
            self._monitor = self.tasks.spawn(
                "envoy-watch", self._watch_external, critical=self.critical
            )
            return
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        if self._adopt():
            log.info("adopted Envoy pid %d", self._pid)
        else:
            self._spawn()
            log.info("started Envoy pid %d with %s", self._pid, self.bootstrap_path)
        self._monitor = self.tasks.spawn("envoy-supervisor", self._watch, critical=self.critical)

    async def wait_ready(self, timeout: float) -> bool:
        """Polls the admin /ready until Envoy is LIVE; False if it is not within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(asyncio.to_thread(self.admin.ready), remaining):
                    return True
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))

    async def stop(self, kill_envoy: bool = False) -> None:
        """Stops watching. Envoy keeps serving unless ``kill_envoy`` (node teardown, tests), which
        only ever applies to an Envoy this supervisor manages."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if not kill_envoy or self.mode != MANAGED:
            return
        if self._pid is not None and self._alive():
            await self._terminate(self._pid)
        self.pidfile.unlink(missing_ok=True)
        self._pid = None

    def _adopt(self) -> bool:
        try:
            record = json.loads(self.pidfile.read_text())
            pid, start_time = int(record["pid"]), int(record["start_time"])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable Envoy pidfile %s: %s", self.pidfile, exc)
            return False
        stat = process_stat(pid)
        if stat is None or stat.state == "Z" or stat.start_time != start_time:
            log.info("Envoy pid %d from %s is gone; starting a new Envoy", pid, self.pidfile)
            return False
        args = process_cmdline(pid)
        if not any(Path(a).name == self.binary.name for a in args) or (
            str(self.bootstrap_path) not in args
        ):
            log.warning(
                "pid %d is not Envoy with %s; starting a new Envoy", pid, self.bootstrap_path
            )
            return False
        self._pid, self._start_time, self._child = pid, start_time, None
        self._running_since = asyncio.get_running_loop().time()
        self.adopted = True
        return True

    def _spawn(self) -> None:
        argv = self.argv()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            # Own session: the agent's signals (Ctrl-C, its container stopping) never reach it.
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stat = process_stat(child.pid)
        self._pid, self._child = child.pid, child
        self._start_time = stat.start_time if stat else -1  # -1: died at once; the watch sees it
        self._running_since = asyncio.get_running_loop().time()
        self.adopted = False
        self._write_pidfile()

    def _write_pidfile(self) -> None:
        tmp = self.pidfile.with_name(f".{self.pidfile.name}.tmp")
        tmp.write_text(json.dumps({"pid": self._pid, "start_time": self._start_time}) + "\n")
        os.replace(tmp, self.pidfile)

    def _alive(self) -> bool:
        """Whether our Envoy still runs; reaps it when it is our child, so no zombie lingers."""
        if self._pid is None:
            return False
        if self._child is not None and self._child.poll() is not None:
            return False
        stat = process_stat(self._pid)
        if stat is None or stat.start_time != self._start_time:
            return False
        if stat.state == "Z":
            # An adopted Envoy is our child only when one process ran both supervisors (tests).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, os.WNOHANG)
            return False
        return True

    def _exit_status(self) -> str:
        code = self._child.poll() if self._child is not None else None
        return "gone" if code is None else str(code)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if self._alive():
                continue
            if self._pid is not None:
                self.last_exit = self._exit_status()
                ran = loop.time() - self._running_since
                if ran >= HEALTHY_RUN:
                    self._delay = self.backoff[0]
                log.warning(
                    "Envoy pid %d exited (%s) after %.1fs; restarting it in %.1fs",
                    self._pid,
                    self.last_exit,
                    ran,
                    self._delay,
                )
                self._pid = None
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self.backoff[1])
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start Envoy %s: %s; retrying", self.binary, exc)
                continue
            log.info("restarted Envoy as pid %d (restart %d)", self._pid, self.restarts + 1)
            self._restarted()

    def _restarted(self) -> None:
        self.restarts += 1
        if self.on_restart is not None:
            try:
                self.on_restart()
            except Exception:
                log.exception("Envoy on_restart hook failed")

    async def _watch_external(self) -> None:
        while True:
            await asyncio.sleep(ADMIN_POLL_INTERVAL)
            await self._observe()

    async def _observe(self) -> None:
        """One look at the external Envoy's admin /ready; logs only what changed."""
        loop = asyncio.get_running_loop()
        try:
            state = await asyncio.to_thread(self.admin.server_state)
        except EnvoyAdminError as exc:
            # Logged once: when it stops answering, or at the first look if it never did.
            first_miss = bool(self.state) or self._lost_at is None
            self.state, self.admin_error = "", str(exc.__cause__ or exc)
            if first_miss:
                self._lost_at = loop.time()
                # Expected at the agent's start (the envoy container waits for the bootstrap).
                log.log(logging.WARNING if self._seen else logging.INFO, "%s", self.problem())
            return
        if not self.state:
            if self._seen:
                log.info(
                    "the node's Envoy answers again on %s (%s) after %.1fs away",
                    self.admin.address,
                    state,
                    loop.time() - (self._lost_at or loop.time()),
                )
                self._restarted()
            else:
                log.info("found the node's Envoy on its admin %s (%s)", self.admin.address, state)
            self._seen, self._lost_at, self.admin_error = True, None, ""
        elif state != self.state:
            log.info("the node's Envoy is %s (was %s)", state, self.state)
        self.state = state

    async def _terminate(self, pid: int) -> None:
        for sig, wait in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, TERM_GRACE)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = asyncio.get_running_loop().time() + wait
            while self._alive():
                if asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.05)
            else:
                log.info("stopped Envoy pid %d with %s", pid, sig.name)
                return
        log.error("Envoy pid %d survived SIGKILL", pid)
