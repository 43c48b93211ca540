"""Filling a node: pods of distinct service accounts, one by one, up to kubelet's default max pods.

Issue #14 asks that a pod cost O(1) config: what depends on services is held once per identity
or group, not once per pod. This scenario measures what one more pod costs a node that already
knows N services, when every pod brings a new identity (its own service account), the worst
case for a per-identity config.

Per size (N = 10 and 1000 services), one single-node testbed:
- N synthetic services (HTTP 8080, two ready endpoints each, outside every pod range: the
  convergence scenario's ``synthetic_objects``) are published and the agent has read them (its
  snapshot version moved and then held still) before the first pod;
- then pods ``fill-000``, ``fill-001``, ... each with its own service account, are started one
  after another through the testbed's runtime shim (sandbox, CNI ADD, workload), up to the
  size's pod count (110 by default: kubelet's ``maxPods``). Per pod: the CNI ADD wall time (the
  runtime's call for the whole chain; nodeagent-cni returns once the pod's capture is in place
  and the node Envoy ACKed its listeners);
- at 1, 10, 50 and 110 pods (and at the last pod reached, if the fill stopped early), once the
  node's Envoy ACKed the agent's latest snapshot and no newer one came for QUIET s: the node
  Envoy's PSS (/proc/PID/smaps_rollup, SAMPLES samples PSS_EVERY s apart) and its own /memory
  ``allocated`` and ``heap_size``, the bytes of its /config_dump (no endpoints) and its active
  clusters; the agent's RSS and PSS; both processes' CPU seconds so far.

The fill stops early, and the result says at which pod and why, when an ADD fails (the plugin
gives up after 30 s), when an ADD took over ADD_LIMIT s, or when the size's time budget is spent.

Derived, per size: memory added per pod, the least-squares slope over the checkpoints (KiB per
pod) of the Envoy's PSS, its ``allocated``, the node total (agent + Envoy PSS) and the config
dump; ADD P50/P99 over the fill, and the P99 over the same number of pods made on a
bridge-only testbed (``nodeagent: false``, same pods) before the sizes: the ratio is pod count
for pod count, one run each.

Sizes and pod counts: full 10:110 and 1000:110; smoke 10:3. ``BENCH_FILL=10:110,1000:30``
(services:pods, comma separated) overrides the full plan, e.g. to keep a slow size short.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    NO_MESH,
    PER_NODE,
    Run,
    envoy_pids,
    new_figure,
    percentile,
    save_figure,
    summary,
    table,
    write_result,
)
from bench.convergence import proxy_status, synthetic_objects
from bench.podstart import PUBLISH_LEAD, contention
from nodeagent.testbed import daemons, layout
from nodeagent.testbed.cluster import Testbed, TestbedError, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology

SCENARIO = "fill"
NAMESPACE = "bench"
NODE = "n1"
MAX_PODS = 110  # kubelet's default maxPods
CHECKPOINTS = (1, 10, 50, 110)
ADD_LIMIT = 30.0  # seconds: an ADD slower than this ends the fill (the plugin's own timeout)
SAMPLES = 3  # PSS samples per checkpoint, PSS_EVERY s apart
PSS_EVERY = 1.0  # seconds
SMOKE_PSS_EVERY = 0.2  # the smoke variant's: it checks the figures' shape, not their size
QUIET = 1.0  # seconds without a newer snapshot before a checkpoint is measured
WAIT_TIMEOUT = 300.0  # services loaded, or the node's Envoy in sync before a checkpoint
ADMIN_TIMEOUT = 120.0  # a config dump of tens of thousands of clusters takes a while
SYNTHETIC = "bench-services"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def plan(run: Run) -> list[tuple[int, int]]:
    """(services, pods) per size, in order."""
    if run.smoke:
        return [(10, 3)]
    override = os.environ.get("BENCH_FILL", "").strip()
    if not override:
        return [(10, MAX_PODS), (1000, MAX_PODS)]
    sizes = []
    for item in override.split(","):
        services, sep, pods = item.strip().partition(":")
        if not (sep and services.isdigit() and pods.isdigit() and 0 < int(pods) <= MAX_PODS):
            raise ValueError(
                f"BENCH_FILL item {item!r}: want SERVICES:PODS with 1 <= PODS <= {MAX_PODS}"
            )
        sizes.append((int(services), int(pods)))
    return sizes


def _topology(name: str, mesh: bool) -> str:
    return (
        f"name: {name}\nnodeagent: {'true' if mesh else 'false'}\n"
        f"nodes: [{{name: {NODE}}}]\n"
        f"namespaces: [{{name: {NAMESPACE}, labels: {{nodeagent.io/mesh: enabled}}}}]\n"
    )


def fill_pod(i: int) -> Pod:
    """Pod I, with a service account of its own (a new identity on the node)."""
    return Pod(
        NAMESPACE,
        f"fill-{i:03d}",
        NODE,
        f"fill-sa-{i:03d}",
        {"app": f"fill-{i:03d}"},
        {},
        Workload("sleep"),
    )


# -- what the node's processes hold ---------------------------------------------------------------


def rollup_kib(pid: int) -> dict[str, int]:
    """Rss and Pss of PID in KiB (/proc/PID/smaps_rollup)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(rest.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of PID so far, in seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _admin(tb: Testbed, path: str) -> bytes:
    proc = subprocess.run(
        daemons.admin_curl(tb.name, NODE, path, ADMIN_TIMEOUT),
        capture_output=True,
        timeout=ADMIN_TIMEOUT + 30,
        check=False,
    )
    if proc.returncode != 0:
        raise TestbedError(f"node Envoy admin {path}: {proc.stderr.decode().strip()}")
    return proc.stdout


def wait_settled(tb: Testbed, newer_than: str | None = None) -> float:
    """Until the agent's snapshot version (newer than NEWER_THAN, if given) held still for QUIET
    s with every type Envoy subscribed to ACKed. Seconds it took (bounded by WAIT_TIMEOUT)."""
    start = time.monotonic()
    stable_since, last = start, ""
    while True:
        status = proxy_status(tb, NODE)
        now = time.monotonic()
        kinds = status.get("types", {})
        synced = bool(kinds) and all(t["state"] == "SYNCED" for t in kinds.values())
        moved = newer_than is None or status["version"] != newer_than
        if not (moved and synced and status["version"] == last):
            stable_since, last = now, status["version"]
        elif now - stable_since >= QUIET:
            return now - start
        if now - start > WAIT_TIMEOUT:
            raise TimeoutError(f"node {NODE} did not settle within {WAIT_TIMEOUT:.0f}s: {status}")
        time.sleep(0.05)


def measure(tb: Testbed, pods: int, every: float = PSS_EVERY) -> dict[str, Any]:
    """What the node holds with PODS pods, once its Envoy has everything the agent sent."""
    settle = wait_settled(tb)
    (envoy,) = envoy_pids(layout.node_netns(tb.name, NODE))
    agent = tb.daemon(NODE, daemons.AGENT).pid
    assert agent is not None
    envoy_pss, agent_pss, agent_rss = [], [], []
    for i in range(SAMPLES):
        if i:
            time.sleep(every)
        e, a = rollup_kib(envoy), rollup_kib(agent)
        envoy_pss.append(e["pss"] / 1024)
        agent_pss.append(a["pss"] / 1024)
        agent_rss.append(a["rss"] / 1024)
    memory = json.loads(_admin(tb, "/memory"))
    clusters = _admin(tb, "/stats?filter=^cluster_manager\\.active_clusters$").decode()
    listeners = _admin(tb, "/stats?filter=^listener_manager\\.total_listeners_active$").decode()
    dump = len(_admin(tb, "/config_dump"))
    mib = 1024 * 1024
    return {
        "pods": pods,
        "settle_s": settle,
        "envoy_pss_mib": summary(envoy_pss),
        "envoy_allocated_mib": int(memory["allocated"]) / mib,
        "envoy_heap_mib": int(memory["heap_size"]) / mib,
        "agent_pss_mib": summary(agent_pss),
        "agent_rss_mib": summary(agent_rss),
        "node_total_mib": summary(e + a for e, a in zip(envoy_pss, agent_pss, strict=True)),
        "config_dump_bytes": dump,
        "envoy_active_clusters": int(clusters.split(":")[-1]),
        "envoy_active_listeners": int(listeners.split(":")[-1]),
        "envoy_cpu_s": cpu_seconds(envoy),
        "agent_cpu_s": cpu_seconds(agent),
    }


# -- one fill ------------------------------------------------------------------------------------


def fill(
    tb: Testbed, pods: int, budget: float, checkpoints: set[int], every: float = PSS_EVERY
) -> dict[str, Any]:
    """Start PODS pods one by one on TB; per pod its ADD seconds, at CHECKPOINTS what the node
    holds. Stops at the first failed or too slow ADD, or when BUDGET seconds are spent."""
    deadline = time.monotonic() + budget
    adds: list[float] = []
    steps: list[dict[str, Any]] = []
    stopped: dict[str, Any] | None = None
    mesh = tb.topology.nodeagent
    for i in range(pods):
        if time.monotonic() > deadline:
            stopped = {"at_pod": i + 1, "why": f"time budget of {budget:.0f}s spent"}
            break
        pod = fill_pod(i)
        try:
            record = tb.add_pod(pod, publish_lead=PUBLISH_LEAD)
        except TestbedError as e:  # the ADD failed (or the pod did not start); add_pod cleaned up
            stopped = {"at_pod": i + 1, "why": f"pod {pod.key} failed: {e}"}
            break
        adds.append(record.cni_add_seconds)
        if record.cni_add_seconds > ADD_LIMIT:
            stopped = {
                "at_pod": i + 1,
                "why": f"ADD of {pod.key} took {record.cni_add_seconds:.1f}s (> {ADD_LIMIT:.0f}s)",
            }
        if mesh and (len(adds) in checkpoints or (stopped and adds)):
            steps.append(measure(tb, len(adds), every))
            print(_progress(tb.name, adds, steps[-1]), flush=True)
        if stopped:
            break
    if mesh and stopped and adds and (not steps or steps[-1]["pods"] != len(adds)):
        steps.append(measure(tb, len(adds), every))  # the last pod reached, for the slope
        print(_progress(tb.name, adds, steps[-1]), flush=True)
    if stopped:
        print(f"  {tb.name}: stopped at pod {stopped['at_pod']}: {stopped['why']}", flush=True)
    return {"pods_started": len(adds), "add_s": adds, "checkpoints": steps, "stopped": stopped}


def _progress(name: str, adds: list[float], step: dict[str, Any]) -> str:
    return (
        f"  {name}: {step['pods']} pods, last ADD {adds[-1] * 1e3:.0f} ms, Envoy PSS "
        f"{step['envoy_pss_mib']['median']:.0f} MiB (allocated {step['envoy_allocated_mib']:.0f}),"
        f" config dump {step['config_dump_bytes'] / 1e6:.1f} MB,"
        f" clusters {step['envoy_active_clusters']}, agent PSS"
        f" {step['agent_pss_mib']['median']:.0f} MiB"
    )


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def derive(filled: dict[str, Any], bridge_adds: list[float]) -> dict[str, Any]:
    """Per-pod slopes over the checkpoints, and ADD percentiles against the bridge alone."""
    steps = filled["checkpoints"]

    def per_pod(value: Any) -> float | None:
        return slope([(s["pods"], value(s)) for s in steps])

    mib_to_kib = 1024.0
    envoy_pss = per_pod(lambda s: s["envoy_pss_mib"]["median"] * mib_to_kib)
    allocated = per_pod(lambda s: s["envoy_allocated_mib"] * mib_to_kib)
    node_total = per_pod(lambda s: s["node_total_mib"]["median"] * mib_to_kib)
    config = per_pod(lambda s: float(s["config_dump_bytes"]))
    clusters = per_pod(lambda s: float(s["envoy_active_clusters"]))
    out: dict[str, Any] = {
        "per_pod_slope": {
            "envoy_pss_kib": envoy_pss,
            "envoy_allocated_kib": allocated,
            "node_total_kib": node_total,
            "config_dump_bytes": config,
            "envoy_active_clusters": clusters,
        },
    }
    adds = filled["add_s"]
    if adds:
        base = bridge_adds[: len(adds)]
        out["add_ms"] = {
            "p50": percentile(adds, 50) * 1e3,
            "p99": percentile(adds, 99) * 1e3,
            "max": max(adds) * 1e3,
        }
        if len(base) == len(adds):
            out["bridge_add_ms"] = {
                "p50": percentile(base, 50) * 1e3,
                "p99": percentile(base, 99) * 1e3,
            }
            out["add_p99_over_bridge"] = percentile(adds, 99) / percentile(base, 99)
    return out


def bring_up(name: str, mesh: bool) -> Testbed:
    down(name)  # a crashed earlier run's leftovers
    text = _topology(name, mesh)
    return Testbed.up(loads_topology(text, SCENARIO), text, SCENARIO)


def _bridge_baseline(pods: int, smoke: bool, budget: float) -> dict[str, Any]:
    tb = bring_up("bfbridge-" + ("s" if smoke else "f"), mesh=False)
    try:
        return fill(tb, pods, budget, set())
    finally:
        down(tb.name)


def _fill_size(services: int, pods: int, smoke: bool, budget: float) -> dict[str, Any]:
    tb = bring_up(f"bf{services}-" + ("s" if smoke else "f"), mesh=True)
    try:
        before = proxy_status(tb, NODE)["version"]
        started = time.monotonic()
        tb.publish_extra(SYNTHETIC, synthetic_objects(tb, services))
        wait_settled(tb, newer_than=before)
        load = time.monotonic() - started
        print(f"  {tb.name}: {services} services read by the agent in {load:.1f}s", flush=True)
        checkpoints = {c for c in CHECKPOINTS if c <= pods} | {pods}
        every = SMOKE_PSS_EVERY if smoke else PSS_EVERY
        filled = fill(tb, pods, budget, checkpoints, every)
        filled["services"] = services
        filled["pods_planned"] = pods
        filled["load_s"] = load
        return filled
    finally:
        down(tb.name)


def run(run: Run) -> None:
    sizes = plan(run)
    budget = float(run.pick(420, 150))  # seconds per fill; a bound, not the expected time
    load_at_start = contention()
    most = max(p for _, p in sizes)
    print(f"  bridge alone: {most} pods", flush=True)
    bridge = _bridge_baseline(most, run.smoke, budget)
    if bridge["stopped"]:
        raise RuntimeError(f"the bridge-only baseline stopped: {bridge['stopped']}")
    results: dict[str, Any] = {
        "bridge": {"pods": bridge["pods_started"], "add_s": bridge["add_s"]},
        "sizes": [],
    }
    for services, pods in sizes:
        filled = _fill_size(services, pods, run.smoke, budget)
        filled.update(derive(filled, bridge["add_s"]))
        results["sizes"].append(filled)
    params = {
        "sizes": [{"services": s, "pods": p} for s, p in sizes],
        "checkpoints": list(CHECKPOINTS),
        "models": [NO_MESH, PER_NODE],
        "service_accounts": "one per pod (fill-sa-NNN): every pod a new identity on the node",
        "synthetic_services": "namespace synth; one HTTP port 8080, two ready endpoints each, "
        "outside every pod range (bench.convergence.synthetic_objects); no traffic",
        "workload": "sleep (no traffic)",
        "measured_add": "the runtime shim's CNI ADD of the pod network (whole chain), wall time",
        "publish_lead_seconds": PUBLISH_LEAD,
        "add_limit_s": ADD_LIMIT,
        "budget_s_per_fill": budget,
        "samples_per_checkpoint": SAMPLES,
        "sample_every_s": run.pick(PSS_EVERY, SMOKE_PSS_EVERY),
        "quiet_s": QUIET,
        "config_dump": "bytes of the node Envoy's /config_dump (JSON, without endpoints)",
        "envoy_memory": "PSS from /proc/PID/smaps_rollup; allocated and heap_size from /memory",
        "slope": "least squares over the checkpoints, per pod",
        "bridge_baseline": "bridge + host-local alone (nodeagent: false), the same pods one by "
        "one; ratio = P99 of the fill's ADDs / P99 of the baseline's first as many ADDs",
        "machine_load_at_start": load_at_start,
        "machine_load_at_end": contention(),
    }
    write_result(run, SCENARIO, params, results)
    _print(results)
    _plot(run, results)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(results: dict[str, Any]) -> None:
    rows = [
        [
            size["services"],
            step["pods"],
            step["envoy_pss_mib"]["median"],
            step["envoy_allocated_mib"],
            step["agent_pss_mib"]["median"],
            step["agent_rss_mib"]["median"],
            step["node_total_mib"]["median"],
            step["config_dump_bytes"] / 1e6,
            step["envoy_active_clusters"],
        ]
        for size in results["sizes"]
        for step in size["checkpoints"]
    ]
    print(
        table(
            [
                "services",
                "pods",
                "Envoy PSS MiB",
                "Envoy alloc MiB",
                "agent PSS MiB",
                "agent RSS MiB",
                "node MiB",
                "config dump MB",
                "clusters",
            ],
            rows,
        )
    )
    rows = []
    for size in results["sizes"]:
        s = size["per_pod_slope"]
        add = size.get("add_ms", {})
        stopped = size["stopped"]
        rows.append(
            [
                size["services"],
                f"{size['pods_started']}/{size['pods_planned']}",
                _num(s["envoy_pss_kib"]),
                _num(s["envoy_allocated_kib"]),
                _num(s["node_total_kib"]),
                _num(None if s["config_dump_bytes"] is None else s["config_dump_bytes"] / 1024),
                _num(add.get("p50")),
                _num(add.get("p99")),
                _num(size.get("add_p99_over_bridge"), 1),
                "-" if stopped is None else f"pod {stopped['at_pod']}",
            ]
        )
    print(
        table(
            [
                "services",
                "pods",
                "Envoy PSS KiB/pod",
                "alloc KiB/pod",
                "node KiB/pod",
                "dump KiB/pod",
                "ADD P50 ms",
                "ADD P99 ms",
                "P99 / bridge",
                "stopped",
            ],
            rows,
        )
    )
    for size in results["sizes"]:
        if size["stopped"]:
            print(f"{size['services']} services: {size['stopped']['why']}")


def _plot(run: Run, results: dict[str, Any]) -> None:
    fig = new_figure("Filling one node with pods of distinct service accounts", 13, 4.5)
    memory_ax, config_ax, add_ax = fig.subplots(1, 3)
    for j, size in enumerate(results["sizes"]):
        steps = size["checkpoints"]
        xs = [s["pods"] for s in steps]
        label = f"{size['services']} services"
        memory_ax.plot(
            xs, [s["envoy_pss_mib"]["median"] for s in steps], "o-", color=f"C{j}", label=label
        )
        memory_ax.plot(
            xs,
            [s["envoy_allocated_mib"] for s in steps],
            "s--",
            color=f"C{j}",
            label=f"{label}: allocated",
        )
        config_ax.plot(
            xs, [s["config_dump_bytes"] / 1e6 for s in steps], "o-", color=f"C{j}", label=label
        )
        adds = size["add_s"]
        add_ax.plot(
            range(1, len(adds) + 1), [a * 1e3 for a in adds], ".-", color=f"C{j}", label=label
        )
    bridge = results["bridge"]["add_s"]
    add_ax.plot(
        range(1, len(bridge) + 1),
        [a * 1e3 for a in bridge],
        ".-",
        color="gray",
        label="bridge alone",
    )
    memory_ax.set_xlabel("pods on the node")
    memory_ax.set_ylabel("node Envoy MiB (PSS; dashed: /memory allocated)")
    config_ax.set_xlabel("pods on the node")
    config_ax.set_ylabel("/config_dump MB (JSON, no endpoints)")
    add_ax.set_xlabel("pod (one by one)")
    add_ax.set_ylabel("CNI ADD ms")
    # Log scales: the 1000-service fill is two orders of magnitude above the 10-service one.
    for ax in (memory_ax, config_ax, add_ax):
        ax.set_yscale("log")
    for ax in (memory_ax, config_ax, add_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(run, SCENARIO, fig)


__all__ = ["run"]
