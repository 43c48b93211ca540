"""Scenario: reconcile after an agent restart, by number of captured pods.

One single-node testbed with nodeagent; N pods in the mesh (real network namespaces made by the
CNI chain, each captured by nftables through the CNI ADD, a ``sleep`` workload). Then the node's
agent is stopped and started again, as a crash or a rolling update would: the new agent reads
its pod registry, re-verifies every pod's capture inside its netns and only then opens its CNI
socket. Two figures per restart:
- **ready**: from starting the agent process to its CNI socket answering (what a pod ADD waiting
  on a restarting agent sees; includes the interpreter's start);
- **reconcile**: the agent's own pass over its registry (read from its log line
  ``reconcile of N pods in S s``).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

from bench.common import Run, new_figure, save_figure, summary, table, write_result
from nodeagent.redirect.registry import CAPTURED, PodRegistry
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

SCENARIO = "reconcile"
TESTBED = "brc-node"  # brc- prefix: this scenario's leftovers are recognisable
NAMESPACE = "bench"
NODE = "n1"
RECONCILED = re.compile(r"reconcile of (\d+) pods in ([0-9.]+)s: (\{.*\})")


def _topology(pods: int) -> str:
    lines = [
        f"name: {TESTBED}",
        "nodeagent: true",
        "network: {nodeCIDRMaskSize: 21}",  # room for 2000 pods on the node (a /24 holds 253)
        f"nodes: [{{name: {NODE}}}]",
        f"namespaces: [{{name: {NAMESPACE}, labels: {{nodeagent.io/mesh: enabled}}}}]",
        "pods:",
    ]
    for i in range(pods):
        lines.append(
            f"  - {{name: p{i}, namespace: {NAMESPACE}, node: {NODE}, serviceAccount: default,"
            " labels: {app: bench}, workload: {type: sleep}}"
        )
    return "\n".join(lines) + "\n"


def _captured(tb: Testbed) -> int:
    registry = PodRegistry(layout.agent_state_dir(tb.name, NODE) / "pods")
    registry.load()
    return sum(1 for c in registry.pods.values() if c.state == CAPTURED)


def _reconcile_line(log: Path, offset: int) -> tuple[int, float, dict[str, int]]:
    """The first reconcile the agent logged past OFFSET: pods, seconds, summary."""
    with log.open("rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                msg = json.loads(raw)["msg"]
            except (ValueError, KeyError, TypeError):
                continue
            found = RECONCILED.match(str(msg))
            if found:
                outcome = json.loads(found.group(3).replace("'", '"'))
                return int(found.group(1)), float(found.group(2)), outcome
    raise RuntimeError(f"{SCENARIO}: the restarted agent logged no reconcile in {log}")


def _restart(tb: Testbed) -> dict[str, Any]:
    tb.stop_agent(NODE)
    log = layout.logs_dir(tb.name) / f"{NODE}.agent.log"
    offset = log.stat().st_size
    started = time.monotonic()
    tb.start_agent(NODE)  # returns once its CNI socket answers, after the first reconcile
    ready = time.monotonic() - started
    pods, seconds, outcome = _reconcile_line(log, offset)
    return {"ready_s": ready, "reconcile_s": seconds, "pods": pods, "outcome": outcome}


def run(run: Run) -> None:
    pods = int(run.pick(1000, 5))
    repeats = int(run.pick(3, 1))
    down(TESTBED)  # a crashed earlier run's leftovers
    started = time.monotonic()
    text = _topology(pods)
    tb = Testbed.up(loads_topology(text, SCENARIO), text, SCENARIO)
    restarts = []
    try:
        up_seconds = time.monotonic() - started
        captured = _captured(tb)
        if captured != pods:
            raise RuntimeError(f"{SCENARIO}: {captured} of {pods} pods captured after up")
        print(f"  {pods} pods captured in {up_seconds:.0f}s", flush=True)
        for rep in range(repeats):
            got = _restart(tb)
            if got["pods"] != pods or got["outcome"].get("verified") != pods:
                raise RuntimeError(f"{SCENARIO}: restart {rep + 1} reconciled {got}")
            restarts.append(got)
            print(
                f"  restart {rep + 1}/{repeats}: ready {got['ready_s']:.2f}s, reconcile"
                f" {got['reconcile_s']:.2f}s ({got['outcome']})",
                flush=True,
            )
    finally:
        # The agent goes first: while it runs, each pod's CNI DEL in `down` waits for Envoy to
        # drop that pod's listeners, a push of the whole node each (not what is measured here).
        with contextlib.suppress(Exception):
            tb.stop_agent(NODE)
        down(TESTBED)
    ready = summary(r["ready_s"] for r in restarts)
    reconcile = summary(r["reconcile_s"] for r in restarts)
    results = {
        "pods": pods,
        "up_seconds": round(up_seconds, 1),
        "ready_s": ready,
        "reconcile_s": reconcile,
        "restarts": restarts,
    }
    print(
        table(
            ["captured pods", "restarts", "agent ready s (median)", "reconcile pass s (median)"],
            [
                [
                    pods,
                    repeats,
                    f"{ready['median']:.2f}",
                    f"{reconcile['median']:.2f}",
                ]
            ],
        )
    )
    params = {
        "pods": pods,
        "repeats": repeats,
        "nodes": 1,
        "backend": "nftables (in each pod's netns)",
        "workload": "sleep",
        "measured": "agent stopped (SIGTERM), started again: ready = process start to its CNI"
        " socket answering; reconcile = the agent's logged pass over its registry",
    }
    write_result(run, SCENARIO, params, results)
    fig = new_figure(f"Agent restart with {pods} captured pods ({repeats} restart(s))", 6.0, 4.0)
    ax = fig.subplots()
    bars = ax.bar(
        ["agent ready", "reconcile pass"],
        [ready["median"], reconcile["median"]],
        color=["#1f77b4", "#ff7f0e"],
    )
    ax.bar_label(bars, fmt="%.2f s", fontsize=8, padding=2)
    ax.set_ylabel("seconds (median)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(run, SCENARIO, fig)
