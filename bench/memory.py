"""Scenario 3: a node's memory as its captured pods grow (10, 50, 100), per-node vs sidecars.

One node runs N mesh pods (sleep workloads; every pod is an endpoint of one of ten HTTP
services, so each proxy holds a realistic amount of config). Per model, at each N, after the
node's Envoys hold the published endpoints:
- node total: the agent's and every Envoy's proportional memory (PSS: shared pages split among
  the processes sharing them; VmRSS would count the Envoy binary once per sidecar), sampled
  SAMPLES times;
- Envoy-reported memory: the sum over its Envoys of /memory `allocated` (and `heap_size`);
- config held: the sum of each Envoy's /config_dump (with endpoints) in JSON bytes, which stands
  for the xDS it was sent (JSON, so larger than the protobuf on the wire);
- per pod: each of those divided by N.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from bench.common import (
    PER_NODE,
    SIDECAR,
    Run,
    envoy_pids,
    new_figure,
    pss_mib,
    save_figure,
    summary,
    table,
    write_result,
)
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology

SERVICES = 10
SAMPLES = 3

TOPOLOGY = """
name: {name}
{extra}
nodes: [{{name: n1}}]
namespaces:
  - name: bench
    labels: {{nodeagent.io/mesh: enabled}}
pods:
{pods}
services:
{services}
"""


def models() -> dict[str, str]:
    return {PER_NODE: "", SIDECAR: "proxyModel: sidecar"}


def pod(i: int) -> Pod:
    return Pod(
        "bench",
        f"pod-{i:03d}",
        "n1",
        f"sa-{i % SERVICES}",
        {"app": f"svc-{i % SERVICES}"},
        {},
        Workload("sleep"),
    )


def topology_text(name: str, extra: str, first: int) -> str:
    pods = "\n".join(
        f"  - {{name: pod-{i:03d}, namespace: bench, node: n1, serviceAccount: sa-{i % SERVICES},"
        f" labels: {{app: svc-{i % SERVICES}}}, workload: {{type: sleep}}}}"
        for i in range(first)
    )
    services = "\n".join(
        f"  - {{name: svc-{i}, namespace: bench, selector: {{app: svc-{i}}},"
        f" ports: [{{name: http, port: 80, targetPort: 8080}}]}}"
        for i in range(SERVICES)
    )
    return TOPOLOGY.format(name=name, extra=extra, pods=pods, services=services)


def envoy_spaces(tb: Testbed, model: str) -> list[str]:
    """The network namespaces holding this model's Envoys on n1."""
    if model == PER_NODE:
        return [layout.node_netns(tb.name, "n1")]
    return [record.netns for record in tb.state.pods.values()]


def envoys(tb: Testbed, model: str) -> list[tuple[str, int]]:
    return [(ns, pid) for ns in envoy_spaces(tb, model) for pid in envoy_pids(ns)]


def admin(tb: Testbed, model: str, ns: str, path: str) -> bytes:
    """GET PATH from the Envoy admin in NS: the node Envoy's root-only UNIX socket, or a
    sidecar's in-pod 127.0.0.1:15000 (Istio's)."""
    curl = (
        daemons.admin_curl(tb.name, "n1", path, 10)
        if model == PER_NODE
        else netns.in_netns(
            ns, ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:15000{path}"]
        )
    )
    proc = subprocess.run(
        curl,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"Envoy admin {path} in {ns}: {proc.stderr.decode().strip()}")
    return proc.stdout


def measure(tb: Testbed, model: str, pods: int, every: float) -> dict[str, Any]:
    found = envoys(tb, model)
    expected = 1 if model == PER_NODE else pods
    if len(found) != expected:
        raise RuntimeError(f"{model} with {pods} pods: {len(found)} Envoys, expected {expected}")
    agent = tb.daemon("n1", daemons.AGENT).pid
    totals, envoy_pss, agent_pss = [], [], []
    for i in range(SAMPLES):
        if i:
            time.sleep(every)
        e = pss_mib(pid for _, pid in found)
        a = pss_mib([agent])
        envoy_pss.append(e)
        agent_pss.append(a)
        totals.append(e + a)
    allocated = heap = config = 0
    for ns, _ in found:
        memory = json.loads(admin(tb, model, ns, "/memory"))
        allocated += int(memory["allocated"])
        heap += int(memory["heap_size"])
        config += len(admin(tb, model, ns, "/config_dump?include_eds"))
    mib = 1024 * 1024
    return {
        "pods": pods,
        "envoys": len(found),
        "node_total_mib": summary(totals),
        "envoy_pss_mib": summary(envoy_pss),
        "agent_pss_mib": summary(agent_pss),
        "envoy_allocated_mib": allocated / mib,
        "envoy_heap_mib": heap / mib,
        "config_dump_bytes": config,
        "per_pod": {
            "node_total_mib": summary(t / pods for t in totals),
            "envoy_allocated_kib": allocated / 1024 / pods,
            "config_dump_bytes": config / pods,
        },
    }


def ramp(
    model: str, extra: str, steps: list[int], settle: float, every: float
) -> list[dict[str, Any]]:
    name = f"bmem-{0 if model == PER_NODE else 1}"
    down(name)
    text = topology_text(name, extra, steps[0])
    tb = Testbed.up(loads_topology(text, "bench/memory"), text, "bench/memory")
    out = []
    try:
        have = steps[0]
        for step in steps:
            for i in range(have, step):
                tb.add_pod(pod(i))
            have = step
            tb.wait_converged()
            time.sleep(settle)  # let Envoy settle after the last push (drained listeners, caches)
            out.append(measure(tb, model, step, every))
            print(f"   {model}: {step} pods measured", flush=True)
    finally:
        down(tb.name)
    return out


def run(run: Run) -> None:
    steps = run.pick([10, 50, 100], [2, 5])
    # Seconds of rest before a step's samples, and between them (the smoke checks shape, not size).
    settle, every = run.pick((2.0, 1.0), (0.5, 0.2))
    params = {
        "pods": steps,
        "services": SERVICES,
        "samples_per_step": SAMPLES,
        "settle_s": settle,
        "sample_every_s": every,
        "workload": "sleep (no traffic)",
        "models": list(models()),
        "node_total": "agent PSS + every Envoy's PSS on the node",
        "config": "sum of Envoy /config_dump?include_eds JSON bytes",
    }
    results = {model: ramp(model, extra, steps, settle, every) for model, extra in models().items()}
    if SIDECAR in results:
        pairs = list(zip(results[SIDECAR], results[PER_NODE], strict=True))
        results["sidecar_to_per_node"] = [
            {
                "pods": s["pods"],
                "node_total_ratio": s["node_total_mib"]["median"] / n["node_total_mib"]["median"],
            }
            for s, n in pairs
        ]
        # Issue #14's form of the same figure (goal: at most 0.05 at 100 pods): the node's total
        # over as many sidecars'. One ramp per model, so medians of each step's samples.
        results["per_node_to_sidecar"] = [
            {
                "pods": s["pods"],
                "node_total_ratio": n["node_total_mib"]["median"] / s["node_total_mib"]["median"],
            }
            for s, n in pairs
        ]
    write_result(run, "memory", params, results)
    _print(results)
    _plot(run, results)


def _print(results: dict[str, Any]) -> None:
    rows = [
        [
            model,
            m["pods"],
            m["envoys"],
            m["node_total_mib"]["median"],
            m["agent_pss_mib"]["median"],
            m["envoy_pss_mib"]["median"],
            m["envoy_allocated_mib"],
            m["per_pod"]["node_total_mib"]["median"],
            m["config_dump_bytes"] / 1024,
        ]
        for model in (PER_NODE, SIDECAR)
        if model in results
        for m in results[model]
    ]
    print(
        table(
            [
                "model",
                "pods",
                "envoys",
                "node MiB",
                "agent MiB",
                "envoy PSS MiB",
                "envoy alloc MiB",
                "MiB/pod",
                "config KiB",
            ],
            rows,
        )
    )
    for ratio in results.get("per_node_to_sidecar", []):
        print(
            f"node total, per-node ÷ sidecar at {ratio['pods']} pods: "
            f"{ratio['node_total_ratio']:.3f}"
        )


def _plot(run: Run, results: dict[str, Any]) -> None:
    fig = new_figure("Node memory by captured pods (PSS; bars: min-max of samples)", 10, 4.5)
    total_ax, config_ax = fig.subplots(1, 2)
    for j, model in enumerate(m for m in (PER_NODE, SIDECAR) if m in results):
        steps = results[model]
        xs = [s["pods"] for s in steps]
        med = [s["node_total_mib"]["median"] for s in steps]
        total_ax.errorbar(
            xs,
            med,
            yerr=[
                [s["node_total_mib"]["median"] - s["node_total_mib"]["min"] for s in steps],
                [s["node_total_mib"]["max"] - s["node_total_mib"]["median"] for s in steps],
            ],
            marker="o",
            capsize=3,
            color=f"C{j}",
            label=f"{model}: agent + Envoy(s)",
        )
        config_ax.plot(
            xs,
            [s["config_dump_bytes"] / 1024 / 1024 for s in steps],
            marker="o",
            color=f"C{j}",
            label=model,
        )
    total_ax.set_xlabel("captured pods on the node")
    total_ax.set_ylabel("node total (MiB)")
    total_ax.legend()
    config_ax.set_xlabel("captured pods on the node")
    config_ax.set_ylabel("config held by Envoy(s), JSON (MiB)")
    config_ax.legend()
    save_figure(run, "memory", fig)


__all__ = ["run"]
