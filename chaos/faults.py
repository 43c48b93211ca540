"""What is done to a node: each fault returns when the node is whole again (bounded), with the
wall-clock window it was broken in."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.cni.install import PLUGIN_TYPE
from nodeagent.redirect.nftables import TABLE as NFT_TABLE
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, TestbedError
from nodeagent.testbed.topology import Pod

NAMESPACE = "chaos"  # the load's (in the mesh)
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


@dataclass
class Reboot:
    """What a node reboot's race looked like: when the agent was back, each pod's sandbox
    attempts (CNI ADDs refused while no agent could capture), and whether each pod was
    captured when its workload started."""

    agent_delay: float = 0.0
    agent_ready: float = 0.0  # wall clock
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def started_uncaptured(self) -> list[str]:
        return [key for key, p in self.pods.items() if p.get("captured") is False]

    @property
    def started_before_agent(self) -> list[str]:
        return [key for key, p in self.pods.items() if p["first_add"] < self.agent_ready]


def reboot_node(
    tb: Testbed,
    node: str,
    rng: random.Random,
    spread: float,
    lost: Callable[[Pod], None],
    started: Callable[[Pod], None],
) -> tuple[Window, Reboot]:
    """NODE "reboots": its agent, install-cni and Envoy SIGKILLed, every pod's processes
    SIGKILLed and its sandbox lost (no CNI DEL), the CNI conflist with nodeagent-cni left in
    place (istio/istio#55968's race). Then, as the node comes back, the runtime re-creates the
    pods and kubelet starts the node's daemons, each after a random delay in [0, SPREAD] s: pods
    may be created before the agent runs (their CNI ADD must fail, and the runtime retries). LOST
    and STARTED are called with each pod as it goes and once its workload runs again."""
    pods = [p for p in tb.topology.pods if p.node == node]
    start = time.time()
    envoy = envoy_pid(tb, node)
    for name in (daemons.AGENT, daemons.INSTALL_CNI):
        record = tb.daemon(node, name)
        _sigkill(record.pid, record.start_time, f"{name} on {node}")
        tb.stop_daemon(node, name)  # forgets the dead one
    if envoy is not None:
        _sigkill(*envoy, f"the node Envoy on {node}")
    uids = {pod.key: tb.state.pods[pod.key].uid for pod in pods}  # the pods outlive a reboot
    for pod in pods:
        lost(pod)
        tb.remove_pod(pod, node_lost=True)
    report = Reboot(agent_delay=rng.uniform(0, spread))
    delays = {pod.key: rng.uniform(0, spread) for pod in pods}
    back = time.monotonic()
    errors: list[BaseException] = []

    def agent() -> None:
        time.sleep(max(0.0, report.agent_delay - (time.monotonic() - back)))
        tb.start_daemon(node, daemons.INSTALL_CNI)
        tb.start_agent(node)
        report.agent_ready = time.time()

    def sandbox(pod: Pod) -> None:
        time.sleep(max(0.0, delays[pod.key] - (time.monotonic() - back)))
        seen: dict[str, Any] = {"delay": round(delays[pod.key], 2), "first_add": time.time()}
        report.pods[pod.key] = seen
        refused: list[str] = []
        deadline = time.monotonic() + RECOVERY
        while True:
            try:
                tb.add_pod(pod, uid=uids[pod.key])
                break
            except TestbedError as e:  # kubelet retries a failed sandbox
                refused.append(str(e)[:160])
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        seen["running"] = time.time()
        seen["captured"] = captured(tb, pod)
        seen["refused_adds"] = len(refused)
        seen["refusals"] = sorted(set(refused))[:3]
        started(pod)

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=guarded(agent))]
    threads += [threading.Thread(target=guarded(lambda p=p: sandbox(p))) for p in pods]  # type: ignore[misc]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RECOVERY + 30)
    if errors:
        raise RuntimeError(f"node {node} did not come back: {errors[0]}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"node {node} did not come back within {RECOVERY + 30:.0f}s")
    tb.wait_converged()
    what = f"node {node} rebooted (agent back after {report.agent_delay:.1f}s)"
    return Window(what, start, time.time()), report


def captured(tb: Testbed, pod: Pod) -> bool:
    """POD's netns holds nodeagent's capture table (looked at as soon as its workload runs)."""
    import subprocess

    proc = subprocess.run(
        netns.in_netns(layout.pod_netns(tb.name, pod), ["nft", "-j", "list", "tables"]),
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    tables = [e["table"] for e in json.loads(proc.stdout)["nftables"] if "table" in e]
    return any(t["name"] == NFT_TABLE for t in tables)


def remove_netns_behind(
    tb: Testbed,
    pod: Pod,
    hold: float,
    lost: Callable[[Pod], None],
    started: Callable[[Pod], None],
) -> Window:
    """POD's netns path removed (``ip netns delete``: its bind mount detached) behind the
    agent's back, while the node Envoy holds POD's listeners in it: the netns itself lives on
    (its processes and Envoy's sockets hold it), but no new socket can be made there by path.
    HOLD seconds later the pod is deleted as kubelet would (CNI DEL naming the vanished path)
    and re-created; LOST and STARTED are called as it goes and once it runs again."""
    import subprocess

    ns = tb.pod_netns(pod.key)
    uid = tb.state.pods[pod.key].uid
    start = time.time()
    subprocess.run(["ip", "netns", "delete", ns], check=True, timeout=10)
    time.sleep(hold)
    lost(pod)
    problems = tb.remove_pod(pod)
    if problems:
        raise RuntimeError(f"deleting {pod.key} after its netns vanished: {problems}")
    tb.add_pod(pod, uid=uid)
    started(pod)
    what = f"netns of {pod.key} removed for {hold:.0f}s, then the pod re-created"
    return Window(what, start, time.time())


def pod_churn(
    tb: Testbed,
    node: str,
    pods: int,
    workers: int,
    prefix: str,
    rewrites: int = 0,
    interval: float = 1.0,
) -> tuple[Window, dict[str, Any]]:
    """PODS sleep pods created and deleted on NODE by WORKERS runtime threads, as fast as the
    runtime goes; each pod's capture is looked at as soon as its workload runs (one found
    uncaptured is looked at again 5 s later: repaired?). With REWRITES, meanwhile the primary
    CNI rewrites its conflist that many times, every INTERVAL s (atomically, without
    nodeagent-cni, as a primary CNI's installer does on upgrade): install-cni must chain the
    plugin in again."""
    from nodeagent.testbed.cluster import bridge_conflist
    from nodeagent.testbed.topology import Workload

    spec = next(n for n in tb.topology.nodes if n.name == node)
    conflist = layout.cni_conf_dir(tb.name, node) / "10-testbed.conflist"
    primary = json.dumps(bridge_conflist(tb.name, spec), indent=2)
    start = time.time()
    done = threading.Event()
    rewritten: list[float] = []
    lock = threading.Lock()
    seen: dict[str, Any] = {"created": 0, "refused": 0, "uncaptured_at_start": [], "repaired": []}
    seen["refusals"] = set()
    todo = list(range(pods))
    errors: list[BaseException] = []

    def rewriter() -> None:
        for _ in range(rewrites):
            if done.wait(interval):
                return
            aside = conflist.with_name(".10-testbed.conflist.tmp")
            aside.write_text(primary)
            aside.replace(conflist)
            rewritten.append(time.time())

    def worker() -> None:
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                labels = {"app": prefix}
                pod = Pod(NAMESPACE, f"{prefix}{i}", node, prefix, labels, {}, Workload("sleep"))
                try:
                    tb.add_pod(pod)
                except TestbedError as e:
                    with lock:  # an ADD refused (fail closed): a runtime would retry it
                        seen["refused"] += 1
                        seen["refusals"].add(str(e)[:160])
                    continue
                at_start = captured(tb, pod)
                repaired = False
                if not at_start:
                    time.sleep(5)
                    repaired = captured(tb, pod)
                with lock:
                    seen["created"] += 1
                    if not at_start:
                        seen["uncaptured_at_start"].append(pod.key)
                        if repaired:
                            seen["repaired"].append(pod.key)
                tb.remove_pod(pod)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rewriter)] if rewrites else []
    threads += [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + RECOVERY + pods * 5
    try:
        for t in threads[1 if rewrites else 0 :]:
            t.join(max(0.0, deadline - time.monotonic()))
    finally:
        done.set()
        todo.clear()
        for t in threads:
            t.join(30)
    if errors:
        raise RuntimeError(f"pod churn on {node}: {errors[0]}") from errors[0]
    seen["refusals"] = sorted(seen["refusals"])[:5]
    seen["seconds"] = round(time.time() - start, 1)
    if rewrites:
        seen["rewrites"] = len(rewritten)
        seen["chained_again"] = holds_plugin(conflist)
    what = f"{seen['created']} pods created and deleted on {node}"
    if rewrites:
        what += f", {len(rewritten)} conflist rewrites meanwhile"
    return Window(what, start, time.time()), seen


def holds_plugin(conflist: Path) -> bool:
    """The node's conflist chains nodeagent-cni (install-cni put it back), within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            plugins = json.loads(conflist.read_text())["plugins"]
        except (OSError, ValueError, KeyError):
            plugins = []
        if any(p.get("type") == PLUGIN_TYPE for p in plugins):
            return True
        time.sleep(0.1)
    return False
