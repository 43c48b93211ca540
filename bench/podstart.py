"""Scenario 4, pod start: the CNI ADD wall time as the container runtime sees it.

One testbed per deployment model, all up for the whole run:
- **no-mesh**: the node's CNI chain is the bridge plugin (+ host-local IPAM) alone;
- **per-node**: bridge + nodeagent-cni, which returns only once the node agent has installed the
  pod's capture (nftables) and the node Envoy has ACKed the pod's listeners;
- **per-node-ebpf**: the same on a second node of per-node's testbed, whose agent runs with
  ``--capture-mode ebpf`` (#18): capture is linking the pod's cgroup to the pinned programs and
  its map entries (plus the companion nftables table for inbound and DNS);
- **sidecar**: only when the testbed offers that model (topology ``proxyModel: sidecar``).

Pods are created through the testbed's runtime shim exactly as for any other pod (``add_pod``:
sandbox, CNI ADD of the pod network, workload); the figure is the runtime's ADD call for the pod
network alone (every plugin of the chain, as kubelet's runtime times ``SetUpPod``'s network
step), which the testbed records per sandbox. Each run creates N pods one after another, removes
them, then M pods at once, removes them; the models take turns within a run, so the per-node /
no-mesh ratio is taken run by run.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    NO_MESH,
    PER_NODE,
    PER_NODE_EBPF,
    SIDECAR,
    Run,
    agent_pods,
    new_figure,
    percentile,
    ratios,
    save_figure,
    summary,
    table,
    write_result,
)
from nodeagent.testbed import netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology

SCENARIO = "podstart"
NAMESPACE = "bench"
NODE = "n1"
# Model -> (testbed, node). Testbed names have the bps- prefix (this scenario's, so a crashed
# run's leftovers are recognisable); per-node and per-node-ebpf share one testbed, a node each.
TESTBEDS = {NO_MESH: "bps-nomesh", PER_NODE: "bps-node", SIDECAR: "bps-sidecar"}
EBPF_NODE = "n2"  # bps-node's node in eBPF mode
PLACES = {
    NO_MESH: (NO_MESH, NODE),
    PER_NODE: (PER_NODE, NODE),
    PER_NODE_EBPF: (PER_NODE, EBPF_NODE),
    SIDECAR: (SIDECAR, NODE),
}
# What a pod runs: a listener (so the testbed sees it ready at once; perl is in Debian's base).
APP_PORT = 8080
APP = (
    "perl",
    "-MIO::Socket::INET",
    "-e",
    f"my $s = IO::Socket::INET->new(LocalPort => {APP_PORT}, Listen => 8, ReuseAddr => 1)"
    " or die $!; sleep",
)
REMOVE_WORKERS = 8
# The pod object is published this long before its CNI ADD, as on Kubernetes, where the agent's
# watch has the pod before kubelet sets up its network. The testbed's agents poll their source
# directory every 0.2 s: without a lead each ADD would also wait up to that for the pod.
PUBLISH_LEAD = 0.3
MODES = ("sequential", "concurrent")


def _topology(bed: str) -> str:
    """BED's topology (a key of TESTBEDS): per-node's also has the eBPF node."""
    extra = {
        NO_MESH: "nodeagent: false",
        PER_NODE: "nodeagent: true",
        SIDECAR: "nodeagent: true\nproxyModel: sidecar",
    }[bed]
    nodes = f"{{name: {NODE}}}"
    if bed == PER_NODE:
        nodes += f", {{name: {EBPF_NODE}, captureMode: ebpf}}"
    return (
        f"name: {TESTBEDS[bed]}\n{extra}\n"
        f"nodes: [{nodes}]\n"
        f"namespaces: [{{name: {NAMESPACE}, labels: {{nodeagent.io/mesh: enabled}}}}]\n"
    )


def contention() -> dict[str, Any]:
    """What else loads this machine now (a benchmark shares its cores with anything running)."""
    prefixes = {n.split(".", 1)[0].removeprefix("tb-") for n in netns.list_netns()}
    ours = {name for name in prefixes if name.startswith(("bps-", "bid-"))}
    return {
        "loadavg_1_5_15": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
        "other_testbeds_up": sorted(prefixes - ours),
    }


def _pod(name: str, node: str) -> Pod:
    return Pod(
        NAMESPACE,
        name,
        node,
        "default",
        {"app": "bench"},
        {},
        Workload("command", APP_PORT, {}, APP),
    )


def _add_seconds(tb: Testbed, pod: Pod) -> float:
    record = tb.add_pod(pod, publish_lead=PUBLISH_LEAD)
    if record.cni_add_seconds <= 0:
        raise RuntimeError(f"testbed {tb.name} recorded no CNI ADD time for {pod.key}")
    return record.cni_add_seconds


def _backends(tb: Testbed, node: str, pods: list[Pod]) -> str:
    """The capture backends NODE's agent reports for PODS (``nodeagent pods``), as
    "<state>/<backend>" (one value when all agree): per-node-ebpf's figures are eBPF capture's,
    never a fallback's."""
    records = agent_pods(tb.name, node)
    seen = {f"{records[p.key]['state']}/{records[p.key]['backend']}" for p in pods}
    return ", ".join(sorted(seen))


def _remove_all(tb: Testbed, pods: list[Pod]) -> None:
    with ThreadPoolExecutor(REMOVE_WORKERS) as pool:
        problems = [p for found in pool.map(tb.remove_pod, pods) for p in found]
    if problems:
        raise RuntimeError(f"testbed {tb.name}: removing pods left: {'; '.join(problems[:3])}")


def _batch(
    tb: Testbed,
    node: str,
    mode: str,
    prefix: str,
    count: int,
    deadline: float,
    backends: dict[str, str] | None = None,
) -> list[float]:
    """CNI ADD seconds of COUNT new pods on NODE, one after another or all at once; then removes
    them. BACKENDS: gets the pods' capture backends under key NODE (before their removal)."""
    pods = [_pod(f"{prefix}-{i}", node) for i in range(count)]
    made: list[Pod] = []
    try:
        if mode == "sequential":
            times = []
            for pod in pods:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{SCENARIO}: over its time budget ({tb.name}, {mode})")
                made.append(pod)
                times.append(_add_seconds(tb, pod))
        else:
            made = pods
            with ThreadPoolExecutor(count) as pool:
                times = list(pool.map(lambda p: _add_seconds(tb, p), pods))
        if backends is not None:
            backends[node] = _backends(tb, node, pods)
        return times
    finally:
        # add_pod removes a pod that failed; the others go here (also on failure).
        _remove_all(tb, [p for p in made if p.key in tb.state.pods])


def run(run: Run) -> None:
    sequential = int(run.pick(50, 3))
    concurrent = int(run.pick(20, 3))
    repeats = int(run.pick(3, 1))
    budget = float(run.pick(900, 150))  # seconds; a bound, not the expected time
    models = [NO_MESH, PER_NODE, PER_NODE_EBPF, SIDECAR]
    sidecar_note = "included"
    counts = {"sequential": sequential, "concurrent": concurrent}
    # samples[model][mode][rep] = ADD seconds of every pod of that batch
    samples: dict[str, dict[str, list[list[float]]]] = {
        m: {mode: [] for mode in MODES} for m in models
    }
    load_at_start = contention()
    deadline = time.monotonic() + budget
    testbeds: dict[str, Testbed] = {}  # bed -> its testbed
    backends: dict[str, dict[str, str]] = {}  # model -> mode -> its pods' capture
    try:
        for bed in TESTBEDS:
            down(TESTBEDS[bed])  # a crashed earlier run's leftovers
            text = _topology(bed)
            try:
                testbeds[bed] = Testbed.up(loads_topology(text, SCENARIO), text, SCENARIO)
            except Exception as e:
                if bed != SIDECAR:
                    raise
                models.remove(bed)  # reported, never estimated
                sidecar_note = f"failed to come up: {e}"
                print(f"  sidecar model left out: {sidecar_note}", flush=True)
        for rep in range(repeats):
            for model in list(models):
                for mode in MODES:
                    if model not in models:
                        continue
                    prefix = f"{mode[0]}{rep}"
                    bed, node = PLACES[model]
                    check: dict[str, str] | None = (
                        {} if model in (PER_NODE, PER_NODE_EBPF) and rep == 0 else None
                    )
                    try:
                        got = _batch(
                            testbeds[bed], node, mode, prefix, counts[mode], deadline, check
                        )
                    except Exception as e:
                        if model != SIDECAR:
                            raise
                        models.remove(model)
                        sidecar_note = f"failed in run {rep + 1} ({mode}): {e}"
                        print(f"  sidecar model left out: {sidecar_note}", flush=True)
                        continue
                    samples[model][mode].append(got)
                    if check:
                        backends.setdefault(model, {})[mode] = check[node]
                    print(
                        f"  run {rep + 1}/{repeats} {model:<13} {mode:<10} {len(got)} pods: "
                        f"P50 {percentile(got, 50) * 1e3:.0f} ms, "
                        f"P99 {percentile(got, 99) * 1e3:.0f} ms",
                        flush=True,
                    )
    finally:
        for bed in TESTBEDS:
            if bed in testbeds or bed in models:
                down(TESTBEDS[bed])

    results: dict[str, Any] = {"models": {}, "ratios": {}, "added_ms": {}, "ebpf_vs_nftables": {}}
    rows = []
    for model in models:
        results["models"][model] = {}
        for mode in MODES:
            runs = samples[model][mode]
            p50 = [percentile(r, 50) * 1e3 for r in runs]
            p99 = [percentile(r, 99) * 1e3 for r in runs]
            results["models"][model][mode] = {
                "pods": [len(r) for r in runs],
                "p50_ms": summary(p50),
                "p99_ms": summary(p99),
                "all_ms": [[round(v * 1e3, 2) for v in r] for r in runs],
            }
    for model in models:
        if model == NO_MESH:
            continue
        results["ratios"][model] = {}
        results["added_ms"][model] = {}
        for mode in MODES:
            mine_runs, base_runs = samples[model][mode], samples[NO_MESH][mode]
            results["ratios"][model][mode] = {
                q: ratios(
                    [percentile(r, p) for r in mine_runs], [percentile(r, p) for r in base_runs]
                )
                for q, p in (("p50", 50), ("p99", 99))
            }
            results["added_ms"][model][mode] = {
                q: summary(
                    (percentile(a, p) - percentile(b, p)) * 1e3
                    for a, b in zip(mine_runs, base_runs, strict=True)
                )
                for q, p in (("p50", 50), ("p99", 99))
            }
    for mode in MODES:
        # eBPF against nftables capture: the same testbed, batches of the same run
        ebpf_runs, nft_runs = samples[PER_NODE_EBPF][mode], samples[PER_NODE][mode]
        results["ebpf_vs_nftables"][mode] = {
            **{
                f"ratio_{q}": ratios(
                    [percentile(r, p) for r in ebpf_runs], [percentile(r, p) for r in nft_runs]
                )
                for q, p in (("p50", 50), ("p99", 99))
            },
            **{
                f"minus_ms_{q}": summary(
                    (percentile(a, p) - percentile(b, p)) * 1e3
                    for a, b in zip(ebpf_runs, nft_runs, strict=True)
                )
                for q, p in (("p50", 50), ("p99", 99))
            },
        }
    for mode in MODES:
        for model in models:
            fig = results["models"][model][mode]
            ratio = results["ratios"].get(model, {}).get(mode)
            rows.append(
                [
                    mode,
                    model,
                    counts[mode],
                    _fmt(fig["p50_ms"]),
                    _fmt(fig["p99_ms"]),
                    "1 (baseline)" if ratio is None else _fmt(ratio["p50"], "x", 2),
                    "1 (baseline)" if ratio is None else _fmt(ratio["p99"], "x", 2),
                ]
            )
    print(
        table(
            [
                "mode",
                "model",
                "pods",
                "ADD P50 ms (median [min-max])",
                "ADD P99 ms",
                "P50 / no-mesh",
                "P99 / no-mesh",
            ],
            rows,
        )
    )
    for mode, vs in results["ebpf_vs_nftables"].items():
        print(
            f"  eBPF / nftables, {mode}: P50 {_fmt(vs['ratio_p50'], 'x', 2)} "
            f"({_fmt(vs['minus_ms_p50'], ' ms', 1)}), P99 {_fmt(vs['ratio_p99'], 'x', 2)}"
        )
    params = {
        "models": models,
        "places": {m: f"{TESTBEDS[PLACES[m][0]]}/{PLACES[m][1]}" for m in models},
        "capture_backends": backends,
        "sidecar": sidecar_note,
        "sequential_pods": sequential,
        "concurrent_pods": concurrent,
        "repeats": repeats,
        "nodes": "one per model (bps-node: n1 in nftables mode, n2 in eBPF mode)",
        "primary_cni": "bridge + host-local (containernetworking-plugins)",
        "measured": "the runtime shim's CNI ADD of the pod network (whole chain), wall time; "
        "plugins exec'd through `ip netns exec <node netns>` like every testbed plugin",
        "per_node_ready_means": "nodeagent-cni returns after capture is applied and the node "
        "Envoy ACKed the pod's listeners",
        "workload": "perl listener on :8080 (ready at once)",
        "service_account": "default (one identity: the first pod of a run gets its certificate)",
        "cert_key_type": "EC P-256",
        "percentiles": "linear between closest ranks; with 20 pods P99 is close to the maximum",
        "pods_removed_between_batches": True,
        "publish_lead_seconds": PUBLISH_LEAD,
        "machine_load_at_start": load_at_start,
        "machine_load_at_end": contention(),
        "publish_lead_why": "pod object published before the ADD, as on Kubernetes (the agent "
        "knows the pod when the ADD comes); the testbed agents poll their directory every 0.2 s",
    }
    write_result(run, SCENARIO, params, results)
    _plot(run, models, results, counts, repeats)


def _fmt(s: dict[str, float | int], unit: str = "", digits: int = 0) -> str:
    return (
        f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"
        if s["runs"] > 1
        else f"{s['median']:.{digits}f}{unit}"
    )


COLORS = {NO_MESH: "#8c8c8c", PER_NODE: "#1f77b4", PER_NODE_EBPF: "#2ca02c", SIDECAR: "#ff7f0e"}
LABELS = {
    NO_MESH: "no mesh (bridge alone)",
    PER_NODE: "per-node, nftables (bridge + nodeagent-cni)",
    PER_NODE_EBPF: "per-node, eBPF capture",
    SIDECAR: "sidecar (an Envoy per pod)",
}


def _plot(
    run: Run,
    models: list[str],
    results: dict[str, Any],
    counts: dict[str, int],
    repeats: int,
) -> None:
    fig = new_figure(
        f"Pod start: CNI ADD wall time (median of {repeats} run(s), bars = min-max)", 10.0, 4.8
    )
    axes = fig.subplots(1, len(MODES), sharey=True)
    width = 0.8 / len(models)
    for ax, mode in zip(axes, MODES, strict=True):
        for i, model in enumerate(models):
            figs = results["models"][model][mode]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(2)]
            meds = [figs[q]["median"] for q in ("p50_ms", "p99_ms")]
            low = [figs[q]["median"] - figs[q]["min"] for q in ("p50_ms", "p99_ms")]
            high = [figs[q]["max"] - figs[q]["median"] for q in ("p50_ms", "p99_ms")]
            bars = ax.bar(
                xs,
                meds,
                width,
                yerr=[low, high],
                capsize=3,
                color=COLORS[model],
                label=LABELS[model],
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set_xticks([0, 1], ["P50", "P99"])
        ax.set_title(
            f"{counts[mode]} pods {mode}"
            + (" (one at a time)" if mode == MODES[0] else " (all at once)")
        )
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("CNI ADD wall time (ms)")
    axes[0].legend(loc="upper left", fontsize=8)
    save_figure(run, SCENARIO, fig)
