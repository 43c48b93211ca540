"""What is done to a node: each fault returns when the node is whole again (bounded), with the
wall-clock window it was broken in."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed

RECOVERY = 60.0  # bound on a node becoming whole again after any fault


@dataclass(frozen=True)
class Window:
    """A fault: what, from when it was done until the node was whole again (END, wall clock),
    and the last request sent in it that failed (TRAFFIC_END: the load's own view of when the
    outage ended; the runner sets it once traffic flowed without failure again)."""

    what: str
    start: float
    end: float
    traffic_end: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def outage_seconds(self) -> float:
        return max(0.0, self.traffic_end - self.start)


def envoy_pid(tb: Testbed, node: str) -> tuple[int, int] | None:
    """The node Envoy's (pid, start time), from the pidfile its supervisor keeps."""
    try:
        record = json.loads((layout.agent_socket(tb.name, node).parent / "envoy.pid").read_text())
        pid, start = int(record["pid"]), int(record["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, start) if netns.alive(pid, start) else None


def _sigkill(pid: int, start_time: int | None, what: str) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while netns.alive(pid, start_time):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} (pid {pid}) outlived SIGKILL")
        time.sleep(0.02)


def kill_agent(tb: Testbed, node: str, down_for: float = 0.0) -> Window:
    """SIGKILL NODE's agent (a crash: no cleanup of its own), leave it dead DOWN_FOR seconds,
    start it again as kubelet restarts a container; the window ends once its CNI socket answers."""
    record = tb.daemon(node, daemons.AGENT)
    start = time.time()
    _sigkill(record.pid, record.start_time, f"the agent on {node}")
    tb.stop_daemon(node, daemons.AGENT)  # forgets the dead one
    time.sleep(down_for)
    tb.start_agent(node)
    return Window(f"agent SIGKILL on {node}, down {down_for:.0f}s", start, time.time())


def stop_agent(tb: Testbed, node: str, down_for: float) -> Window:
    """Stop NODE's agent (SIGTERM: a rolling update's stop, the DaemonSet still there) for
    DOWN_FOR seconds, then start it again."""
    start = time.time()
    tb.stop_agent(node)
    time.sleep(down_for)
    tb.start_agent(node)
    return Window(f"agent stopped (SIGTERM) on {node} for {down_for:.0f}s", start, time.time())


def kill_envoy(tb: Testbed, node: str) -> Window:
    """SIGKILL NODE's Envoy; its supervisor (the agent) starts a new one. The window ends once
    the new Envoy is LIVE with every listener the old one had."""
    before = envoy_pid(tb, node)
    if before is None:
        raise RuntimeError(f"no node Envoy runs on {node}")
    listeners = _listener_count(tb, node)
    start = time.time()
    _sigkill(*before, f"the node Envoy on {node}")
    deadline = time.monotonic() + RECOVERY
    while True:
        now = envoy_pid(tb, node)
        if (
            now not in (None, before)
            and not daemons.envoy_not_ready(tb.name, node)
            and _listener_count(tb, node) >= listeners
        ):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node Envoy on {node} not back within {RECOVERY:.0f}s")
        time.sleep(0.05)
    return Window(f"node Envoy SIGKILL on {node}", start, time.time())


def restart_envoy_container(tb: Testbed, node: str) -> Window:
    """External mode: NODE's envoy container stopped and started again (its own daemon, as
    kubelet restarts one container of the DaemonSet's pod); the agent keeps running."""
    listeners = _listener_count(tb, node)
    start = time.time()
    tb.stop_daemon(node, daemons.ENVOY)
    tb.start_daemon(node, daemons.ENVOY)
    deadline = time.monotonic() + RECOVERY
    while _listener_count(tb, node) < listeners:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the envoy container on {node}: listeners not back")
        time.sleep(0.05)
    return Window(f"envoy container restarted on {node}", start, time.time())


def _listener_count(tb: Testbed, node: str) -> int:
    import subprocess

    proc = subprocess.run(
        daemons.admin_curl(tb.name, node, "/listeners?format=json", 2),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    try:
        return len(json.loads(proc.stdout).get("listener_statuses", []))
    except ValueError:
        return 0
