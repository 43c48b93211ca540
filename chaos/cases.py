"""The chaos cases: each runs the load (load.py), does its faults (faults.py) and judges what
was counted. A case passes when nothing bypassed the node Envoy, nothing crossed the wire in
clear, and every failed request is accounted for: none where the case allows none, otherwise
only inside a fault's window, refused (fail closed), never served around the mesh."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import faults
from chaos.client import TIMEOUT
from chaos.load import CLIENTS, NAMESPACE, RATE, Figures, Load
from nodeagent.testbed.cluster import Testbed

LOAD = (
    f"{len(CLIENTS)} client pods (one per node) each calling the server pod on the other node,"
    f" HTTP and TCP, {RATE:.0f} requests/s per protocol each, a new connection per request;"
    " namespace PeerAuthentication STRICT (every request an mTLS hop between the node Envoys)"
)
COUNTED = (
    "sent/failed: by the clients; reached/bypassed: by the servers (a request delivered from"
    " outside the pod's netns, or HTTP without the node Envoy's x-forwarded-client-cert, is a"
    " bypass); plaintext: frames holding the requests' marker on the underlay between the nodes"
    " (a capture whose positive control must be seen)"
)


@dataclass(frozen=True)
class Scale:
    """How much of each fault: the full run (make chaos) or the smoke test's."""

    smoke: bool

    def pick(self, full: Any, smoke: Any) -> Any:
        return smoke if self.smoke else full


@dataclass
class Outcome:
    case: str
    title: str
    fault: str
    figures: Figures
    windows: list[faults.Window]
    fail_closed: str  # why failures inside the windows are expected ("": none are)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_outside_windows(self) -> int:
        # A window's failures: from a request timeout before it (in flight when the fault
        # came) until a request sent just before its end may still be failing.
        grace = TIMEOUT + 1.0
        return sum(
            1
            for t in self.figures.failed_times
            if not any(
                w.start - TIMEOUT <= t <= max(w.end, w.traffic_end) + grace for w in self.windows
            )
        )

    def judge(self) -> None:
        f = self.figures
        if f.bypassed:
            self.problems.append(f"{f.bypassed} requests reached a server bypassing the node Envoy")
        if f.plaintext_frames:
            self.problems.append(f"{f.plaintext_frames} frames with the payload in clear")
        if not f.control_frames:
            self.problems.append("the capture missed its positive control: it proves nothing")
        if f.control_bypassed != 2:
            self.problems.append(
                f"the servers counted {f.control_bypassed} of 2 control bypasses: their check"
                " proves nothing"
            )
        if not f.reached_server:
            self.problems.append("no request reached a server")
        if f.failed and not self.fail_closed:
            self.problems.append(f"{f.failed} requests failed where none may")
        elif self.failed_outside_windows:
            self.problems.append(f"{self.failed_outside_windows} failed outside every fault")

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        f = self.figures
        return {
            "case": self.case,
            "title": self.title,
            "load": LOAD,
            "fault": self.fault,
            "counted": COUNTED,
            "ok": self.ok,
            "problems": self.problems,
            "figures": f.as_json(),
            "failed_explained": (
                f"fail closed: {self.fail_closed}" if f.failed and self.fail_closed else ""
            ),
            "failed_outside_windows": self.failed_outside_windows,
            "windows": [
                {
                    "what": w.what,
                    "start": w.start,
                    "seconds": round(w.seconds, 2),
                    "outage_seconds": round(w.outage_seconds, 2),
                    "failed": sum(1 for t in f.failed_times if w.start <= t <= w.traffic_end),
                }
                for w in self.windows
            ],
            "load_seconds": round(f.sent_times[1] - f.sent_times[0], 1),
            **self.extra,
        }


def _run(
    tb: Testbed,
    folder: Path,
    case: str,
    title: str,
    fault: str,
    seconds: float,
    fail_closed: str,
    do: Callable[[Load], list[faults.Window]],
    scale: Scale,
) -> Outcome:
    load = Load(tb, folder, case, seconds)
    try:
        settle = scale.pick(3.0, 1.0)
        load.flowing(settle)
        envoys = {n: faults.envoy_pid(tb, n) for n in ("n1", "n2")}
        windows = do(load)
        envoys_after = {n: faults.envoy_pid(tb, n) for n in ("n1", "n2")}
        figures = load.stop()
    except BaseException:
        load.kill()
        raise
    outcome = Outcome(case, title, fault, figures, windows, fail_closed)
    outcome.extra["node_envoy_replaced"] = {n: envoys[n] != envoys_after[n] for n in ("n1", "n2")}
    outcome.judge()
    return outcome


def agent_restarts(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    kills = int(scale.pick(5, 1))
    down = float(scale.pick(30, 5))

    def do(load: Load) -> list[faults.Window]:
        settle = scale.pick(3.0, 1.0)
        windows = []
        for i in range(kills):
            windows.append(load.recovered(faults.kill_agent(tb, ("n2", "n1")[i % 2]), settle))
        windows.append(load.recovered(faults.stop_agent(tb, "n2", down), settle))
        return windows

    outcome = _run(
        tb,
        folder,
        "agent-restart",
        "agent SIGKILLed and restarted; agent stopped",
        f"the node agent SIGKILLed and restarted {kills} times (alternating nodes, traffic"
        f" flowing again between kills), then stopped (SIGTERM) on n2 for {down:.0f} s and"
        " started again",
        kills * 6 + down,
        "",  # the node Envoy keeps serving while its agent is away: no request may fail
        do,
        scale,
    )
    if any(outcome.extra["node_envoy_replaced"].values()):
        outcome.problems.append("a node Envoy was replaced by an agent restart")
    return outcome


def envoy_kill(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    kills = int(scale.pick(4, 1))

    def do(load: Load) -> list[faults.Window]:
        settle = scale.pick(3.0, 1.0)
        return [
            load.recovered(faults.kill_envoy(tb, ("n2", "n1")[i % 2]), settle) for i in range(kills)
        ]

    return _run(
        tb,
        folder,
        "envoy-kill",
        "node Envoy SIGKILLed",
        f"the node Envoy SIGKILLed {kills} times (alternating nodes); the agent's supervisor"
        " starts a new one, which binds every pod's listeners again",
        kills * 8,
        "while a node has no Envoy, its pods' captured connections are refused inside the"
        " pod (the capture rules stay; nothing listens on 15001/15006), and the other node's"
        " Envoy finds no peer: requests fail, none is served around the mesh",
        do,
        scale,
    )


def envoy_container_restart(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    restarts = int(scale.pick(2, 1))

    def do(load: Load) -> list[faults.Window]:
        settle = scale.pick(3.0, 1.0)
        return [
            load.recovered(faults.restart_envoy_container(tb, ("n2", "n1")[i % 2]), settle)
            for i in range(restarts)
        ]

    return _run(
        tb,
        folder,
        "envoy-container",
        "Envoy's container restarted (external mode)",
        f"envoyContainer: true (the agent in --envoy-mode external): the node's envoy"
        f" container stopped and started again {restarts} times (alternating nodes), the"
        " agent running throughout",
        restarts * 10,
        "while the envoy container is down, its pods' captured connections are refused in"
        " the pod: requests fail, none is served around the mesh",
        do,
        scale,
    )


def node_reboot(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    reboots = int(scale.pick(3, 1))
    spread = float(scale.pick(4.0, 2.0))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    races: list[faults.Reboot] = []

    def do(load: Load) -> list[faults.Window]:
        settle = scale.pick(3.0, 1.0)
        windows = []
        for _ in range(reboots):
            window, race = faults.reboot_node(
                tb,
                "n2",
                rng,
                spread,
                lambda pod: load.lose_client(pod.name) if pod.name in CLIENTS else None,
                lambda pod: load.start_client(pod.name) if pod.name in CLIENTS else None,
            )
            races.append(race)
            windows.append(load.recovered(window, settle))
        return windows

    outcome = _run(
        tb,
        folder,
        "node-reboot",
        "node reboot: daemons and pods killed, pods re-created racing the agent",
        f"node n2 'rebooted' {reboots} times: its agent, install-cni and Envoy SIGKILLed,"
        " every pod's processes SIGKILLed and sandbox lost without CNI DEL, nodeagent-cni left"
        " in the conflist; then the pods re-created by the runtime (retrying refused ADDs) and"
        f" the daemons started, each after a random delay in [0, {spread:.0f}] s",
        reboots * 15,
        "while n2 is down, c1's requests to s2 find no endpoint (refused by n1's Envoy) and"
        " c2 does not exist; a pod created before its agent is back is refused by the CNI"
        " plugin (ADD fails, the runtime retries) instead of starting uncaptured",
        do,
        scale,
    )
    uncaptured = [key for race in races for key in race.started_uncaptured]
    if uncaptured:
        outcome.problems.append(f"pods started uncaptured: {', '.join(uncaptured)}")
    if not any(race.started_before_agent for race in races) and not scale.smoke:
        outcome.problems.append("no pod was created before its agent: the race was not run")
    outcome.extra["seed"] = seed
    outcome.extra["reboots"] = [
        {
            "agent_delay_s": round(r.agent_delay, 2),
            "pods": {
                key: {
                    "delay_s": p["delay"],
                    "added_before_agent_ready": p["first_add"] < r.agent_ready,
                    "refused_adds": p["refused_adds"],
                    "running_after_agent_ready_s": round(p["running"] - r.agent_ready, 2),
                    "captured_at_start": p["captured"],
                    "refusals": p["refusals"],
                }
                for key, p in r.pods.items()
            },
        }
        for r in races
    ]
    outcome.extra["started_uncaptured"] = len(uncaptured)
    outcome.extra["pods_created_before_agent"] = sum(len(r.started_before_agent) for r in races)
    return outcome


def netns_removed(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    hold = float(scale.pick(10, 3))
    victim = tb.topology.find_pod(f"{NAMESPACE}/c2")

    def do(load: Load) -> list[faults.Window]:
        window = faults.remove_netns_behind(
            tb,
            victim,
            hold,
            lambda pod: load.lose_client(pod.name),
            lambda pod: load.start_client(pod.name),
        )
        return [load.recovered(window, scale.pick(3.0, 1.0))]

    outcome = _run(
        tb,
        folder,
        "netns-removed",
        "a pod's netns removed behind the agent's back",
        f"client pod c2's netns path on n2 removed (`ip netns delete`) while the node Envoy"
        f" holds its listeners and c2 keeps sending; {hold:.0f} s later the pod deleted (CNI"
        " DEL naming the vanished path) and re-created",
        hold + 10,
        "c2's own requests: its listeners accept them, but Envoy cannot open their upstream"
        " sockets in a netns it can no longer name, so they fail; no other pod's request may",
        do,
        scale,
    )
    if outcome.figures.failed_by_client.get("c1"):
        outcome.problems.append(f"c1 (not the victim) failed {outcome.figures.failed_by_client}")
    if any(outcome.extra["node_envoy_replaced"].values()):
        outcome.problems.append("a node Envoy was replaced (crashed?) when the netns vanished")
    return outcome


def _churn_case(
    tb: Testbed,
    folder: Path,
    scale: Scale,
    case: str,
    title: str,
    fault: str,
    pods: int,
    rewrites: int,
) -> Outcome:
    report: dict[str, Any] = {}

    def do(load: Load) -> list[faults.Window]:
        window, seen = faults.pod_churn(
            tb, "n2", pods, workers=3, prefix=case.split("-")[0][:4], rewrites=rewrites
        )
        report.update(seen)
        return [load.recovered(window, scale.pick(3.0, 1.0))]

    outcome = _run(tb, folder, case, title, fault, pods * 1.5, "", do, scale)
    outcome.extra["pods"] = report
    if report.get("uncaptured_at_start"):
        outcome.problems.append(
            f"{len(report['uncaptured_at_start'])} pods started uncaptured"
            f" ({len(report['repaired'])} captured 5 s later)"
        )
    if rewrites and not report.get("chained_again"):
        outcome.problems.append("nodeagent-cni not chained in the conflist again")
    if any(outcome.extra["node_envoy_replaced"].values()):
        outcome.problems.append("a node Envoy was replaced during the churn")
    return outcome


def conflist_rewrite(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    pods, rewrites = int(scale.pick(40, 8)), int(scale.pick(20, 4))
    return _churn_case(
        tb,
        folder,
        scale,
        "conflist-rewrite",
        "the primary CNI's conflist rewritten while pods are created",
        f"{pods} mesh pods created and deleted on n2 (3 runtime threads) while the primary CNI"
        f" rewrote its conflist without nodeagent-cni {rewrites} times, once a second"
        " (install-cni --watch chains it in again)",
        pods,
        rewrites,
    )


def pod_churn(tb: Testbed, folder: Path, scale: Scale) -> Outcome:
    pods = int(scale.pick(200, 10))
    return _churn_case(
        tb,
        folder,
        scale,
        "pod-churn",
        "pods created and deleted as fast as the runtime can",
        f"{pods} mesh pods created and deleted on n2 by 3 runtime threads, as fast as they go,"
        " each one's capture checked as its workload starts",
        pods,
        0,
    )


# name -> (function, needs the external-Envoy testbed)
CASES: dict[str, tuple[Callable[[Testbed, Path, Scale], Outcome], bool]] = {
    "agent-restart": (agent_restarts, False),
    "envoy-kill": (envoy_kill, False),
    "node-reboot": (node_reboot, False),
    "netns-removed": (netns_removed, False),
    "conflist-rewrite": (conflist_rewrite, False),
    "pod-churn": (pod_churn, False),
    "envoy-container": (envoy_container_restart, True),
}
# In the order, those not built yet: listed as such in the table, never faked.
NOT_YET: dict[str, str] = {}
