"""Scenarios 1 and 2: latency the mesh adds, and what the proxies cost per 1000 rps.

nginx in a pod answers 1 KB over HTTP/1.1 keep-alive; `hey` in a client pod sends fixed rates
(4 connections) to its Service, from the same node and from the other node. The four models run
side by side on three testbeds that stay up for the whole scenario (no mesh; per-node, whose
nftables nodes n1/n2 and eBPF nodes n3/n4 each host that model's own server and clients; sidecar),
and every measurement round runs the models back to back, so that "added latency" and ratios are
taken pair by pair within one round (run i of a model against run i of no mesh, and run i of
per-node-ebpf against run i of per-node).

Proxy cost: the CPU seconds (utime + stime from /proc) of every Envoy on the request's path over
the run, as vCPU per 1000 rps, and their proportional memory (PSS) after it. On the path: per-node,
the node Envoy of each node the request crosses (one for same-node, two for cross-node); sidecar,
the client's and the server's sidecars.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    NO_MESH,
    PER_NODE,
    PER_NODE_EBPF,
    SIDECAR,
    Run,
    agent_pods,
    envoy_pids,
    new_figure,
    percentile,
    pss_mib,
    ratios,
    save_figure,
    summary,
    table,
    write_result,
)
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

PERCENTILES = (50, 90, 99)
CONNECTIONS = 4
PLACEMENTS = ("same-node", "cross-node")
BODY_BYTES = 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Model:
    """A deployment model: the testbed it runs on, and its own server, clients and Service.

    per-node and per-node-ebpf share one testbed (one bring-up; their runs of a round against the
    same control plane): per-node's pods on n1/n2, whose agents capture with nftables, and
    per-node-ebpf's on n3/n4, whose agents run with --capture-mode ebpf.
    """

    name: str
    bed: str  # the key of its testbed in BEDS
    suffix: str  # its pods are web<suffix>, client-same<suffix>, client-cross<suffix>
    nodes: tuple[str, str]  # (the server's and the same-node client's, the cross-node client's)

    def client(self, placement: str) -> str:
        return f"bench/client-{placement.removesuffix('-node')}{self.suffix}"

    @property
    def url(self) -> str:
        return f"http://web{self.suffix}.bench/"


MODELS = {
    m.name: m
    for m in (
        Model(NO_MESH, NO_MESH, "", ("n1", "n2")),
        Model(PER_NODE, PER_NODE, "", ("n1", "n2")),
        Model(PER_NODE_EBPF, PER_NODE, "-ebpf", ("n3", "n4")),
        Model(SIDECAR, SIDECAR, "", ("n1", "n2")),
    )
}
# Testbed key -> its top-level topology settings.
BEDS = {
    NO_MESH: "nodeagent: false",
    PER_NODE: "nodeagent: true",
    SIDECAR: "nodeagent: true\nproxyModel: sidecar",
}
EBPF_NODES = frozenset({"n3", "n4"})

MODEL_PODS = """
  - name: web{s}
    namespace: bench
    node: {server}
    serviceAccount: web
    labels: {{app: web{s}}}
    workload: {{type: command, command: ["nginx", "-c", "{conf}", "-p", "{prefix}"], port: 8080}}
  - name: client-same{s}
    namespace: bench
    node: {server}
    serviceAccount: client
    workload: {{type: sleep}}
  - name: client-cross{s}
    namespace: bench
    node: {cross}
    serviceAccount: client
    workload: {{type: sleep}}"""

MODEL_SERVICE = """
  - name: web{s}
    namespace: bench
    selector: {{app: web{s}}}
    ports: [{{name: http, port: 80, targetPort: 8080}}]"""

NGINX = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 8080;
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}
}}
"""


def topology(name: str, bed: str, conf: Path, prefix: Path) -> str:
    """The topology of testbed BED: the nodes, pods and Service of every model it hosts."""
    models = [m for m in MODELS.values() if m.bed == bed]
    nodes = sorted({n for m in models for n in m.nodes})
    node_list = ", ".join(
        f"{{name: {n}, captureMode: ebpf}}" if n in EBPF_NODES else f"{{name: {n}}}" for n in nodes
    )
    pods = "".join(
        MODEL_PODS.format(s=m.suffix, server=m.nodes[0], cross=m.nodes[1], conf=conf, prefix=prefix)
        for m in models
    )
    services = "".join(MODEL_SERVICE.format(s=m.suffix) for m in models)
    return (
        f"name: {name}\n{BEDS[bed]}\nnodes: [{node_list}]\n"
        "namespaces:\n  - name: bench\n    labels: {nodeagent.io/mesh: enabled}\n"
        f"pods:{pods}\nservices:{services}\n"
    )


@contextlib.contextmanager
def testbeds(prefix: Path) -> Iterator[dict[str, Testbed]]:
    """Bed key -> its testbed; all up for the whole scenario."""
    (prefix / "nginx.conf").write_text(NGINX.format(prefix=prefix, body="x" * BODY_BYTES))
    made: dict[str, Testbed] = {}
    try:
        for i, bed in enumerate(BEDS):
            name = f"blat-{i}"
            down(name)
            text = topology(name, bed, prefix / "nginx.conf", prefix)
            made[bed] = Testbed.up(loads_topology(text, "bench/latency"), text, "bench/latency")
        yield made
    finally:
        for tb in made.values():
            down(tb.name)


def capture_backends(beds: dict[str, Testbed]) -> dict[str, dict[str, str]]:
    """Per-node model -> client pod -> "<state>/<backend>" as its node's agent reports it
    (``nodeagent pods``): per-node-ebpf's figures are eBPF capture's, never a fallback's."""
    out: dict[str, dict[str, str]] = {}
    for model in MODELS.values():
        if model.bed != PER_NODE:
            continue
        tb = beds[model.bed]
        for placement in PLACEMENTS:
            ref = model.client(placement)
            record = agent_pods(tb.name, tb.topology.find_pod(ref).node)[ref]
            out.setdefault(model.name, {})[ref] = f"{record['state']}/{record['backend']}"
    return out


def hey(
    tb: Testbed, model: Model, client: str, rate: int, seconds: float
) -> list[tuple[float, int]]:
    """(latency s, status) of every request of a fixed-rate run from CLIENT to MODEL's server."""
    argv = [
        "hey",
        "-z",
        f"{seconds}s",
        "-c",
        str(CONNECTIONS),
        "-q",
        str(rate / CONNECTIONS),
        "-o",
        "csv",
        model.url,
    ]
    proc = subprocess.run(
        tb.exec_argv(client, argv), capture_output=True, text=True, timeout=seconds + 30
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hey in {client} failed: {proc.stderr.strip()}")
    rows = csv.DictReader(io.StringIO(proc.stdout))
    return [(float(r["response-time"]), int(r["status-code"])) for r in rows]


def envoys_on_path(tb: Testbed, model: Model, client: str) -> list[int]:
    if model.name == NO_MESH:
        return []
    if model.bed == PER_NODE:
        nodes = {model.nodes[0], tb.topology.find_pod(client).node}
        spaces = [layout.node_netns(tb.name, n) for n in sorted(nodes)]
    else:
        spaces = [tb.pod_netns(f"bench/web{model.suffix}"), tb.pod_netns(client)]
    return [pid for ns in spaces for pid in envoy_pids(ns)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def measure(tb: Testbed, model: Model, placement: str, rate: int, seconds: float) -> dict[str, Any]:
    client = model.client(placement)
    pids = envoys_on_path(tb, model, client)
    if model.name != NO_MESH and not pids:
        raise RuntimeError(f"{model.name}: no Envoy found on the path of {client}")
    cpu_before, started = cpu_seconds(pids), time.monotonic()
    samples = hey(tb, model, client, rate, seconds)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - cpu_before
    latencies = [s for s, status in samples if status == 200]
    errors = sum(1 for _, status in samples if status != 200)
    if not latencies:
        raise RuntimeError(f"{model.name} {client} at {rate} rps: no successful request")
    achieved = len(samples) / seconds
    return {
        **{f"p{p}_ms": percentile(latencies, p) * 1000 for p in PERCENTILES},
        "requests": len(samples),
        "errors": errors,
        "achieved_rps": achieved,
        "proxies": len(pids),
        "proxy_cpu_s": cpu,
        "vcpu_per_1000rps": (cpu / elapsed) / (achieved / 1000) if pids else 0.0,
        "proxy_pss_mib": pss_mib(pids),
    }


def run(run: Run) -> None:
    rates = run.pick([500, 1000], [200])
    seconds = run.pick(10.0, 1.0)
    repeats = run.pick(3, 1)
    warmup = run.pick(1.0, 0.25)  # seconds per model and placement
    params = {
        "rates_rps": rates,
        "seconds_per_run": seconds,
        "repeats": repeats,
        "connections": CONNECTIONS,
        "response_bytes": BODY_BYTES,
        "client": "hey (fixed rate per connection, keep-alive)",
        "server": "nginx, 1 worker",
        "placements": {
            "same-node": "client and nginx on one node",
            "cross-node": "client on the other node",
        },
        "models": list(MODELS),
        "nodes": {
            m.name: {"server": m.nodes[0], "cross-node client": m.nodes[1]} for m in MODELS.values()
        },
        "testbeds": {m.name: f"blat-{list(BEDS).index(m.bed)}" for m in MODELS.values()},
        "capture_mode": {
            PER_NODE: "nftables (n1, n2)",
            PER_NODE_EBPF: "ebpf (n3, n4): outbound by cgroup connect/sockops/getsockopt, "
            "inbound by the companion nftables prerouting redirect (#18)",
            SIDECAR: "nftables (istio-init's rule set)",
        },
        "warmup_s": warmup,
    }
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp, testbeds(Path(tmp)) as beds:
        params["capture_backends"] = capture_backends(beds)
        for model in MODELS.values():
            for placement in PLACEMENTS:
                # warm up: connections, Envoy, caches
                hey(beds[model.bed], model, model.client(placement), rates[0], warmup)
        for _ in range(repeats):
            for placement in PLACEMENTS:
                for rate in rates:
                    for model in MODELS.values():
                        one = measure(beds[model.bed], model, placement, rate, seconds)
                        raw.setdefault(placement, {}).setdefault(str(rate), {}).setdefault(
                            model.name, []
                        ).append(one)
    results = {"runs": raw, "latency": _latency(raw), "proxy_cost": _cost(raw)}
    write_result(run, "latency", params, {"latency": results["latency"], "runs": raw})
    write_result(run, "proxy-cost", params, {"proxy_cost": results["proxy_cost"], "runs": raw})
    _print(results)
    _plot(run, results)


def _latency(raw: dict[str, Any]) -> dict[str, Any]:
    """Per placement, rate, model: percentiles, and added ms / ratio against no mesh, pairwise."""
    out: dict[str, Any] = {}
    for placement, by_rate in raw.items():
        for rate, by_model in by_rate.items():
            base = by_model[NO_MESH]
            for model, runs in by_model.items():
                entry: dict[str, Any] = {}
                for p in PERCENTILES:
                    key = f"p{p}_ms"
                    entry[key] = summary(r[key] for r in runs)
                    if model != NO_MESH:
                        entry[f"added_{key}"] = summary(
                            r[key] - b[key] for r, b in zip(runs, base, strict=True)
                        )
                        entry[f"ratio_{key}"] = ratios(
                            [r[key] for r in runs], [b[key] for b in base]
                        )
                    if model == PER_NODE_EBPF and PER_NODE in by_model:
                        # eBPF against nftables capture: same testbed, same round
                        nft = by_model[PER_NODE]
                        entry[f"minus_per_node_{key}"] = summary(
                            r[key] - n[key] for r, n in zip(runs, nft, strict=True)
                        )
                        entry[f"ratio_to_per_node_{key}"] = ratios(
                            [r[key] for r in runs], [n[key] for n in nft]
                        )
                entry["errors"] = sum(r["errors"] for r in runs)
                out.setdefault(placement, {}).setdefault(rate, {})[model] = entry
    return out


def _cost(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for placement, by_rate in raw.items():
        for rate, by_model in by_rate.items():
            for model, runs in by_model.items():
                if model == NO_MESH:
                    continue
                entry = {
                    "vcpu_per_1000rps": summary(r["vcpu_per_1000rps"] for r in runs),
                    "proxy_pss_mib": summary(r["proxy_pss_mib"] for r in runs),
                    "proxies": runs[0]["proxies"],
                }
                if model in (SIDECAR, PER_NODE_EBPF) and PER_NODE in by_model:
                    node = by_model[PER_NODE]
                    entry["cpu_ratio_to_per_node"] = ratios(
                        [r["vcpu_per_1000rps"] for r in runs],
                        [n["vcpu_per_1000rps"] for n in node],
                    )
                out.setdefault(placement, {}).setdefault(rate, {})[model] = entry
    return out


def _print(results: dict[str, Any]) -> None:
    rows = []
    for placement, by_rate in results["latency"].items():
        for rate, by_model in by_rate.items():
            for model, e in by_model.items():
                rows.append(
                    [
                        placement,
                        rate,
                        model,
                        *(e[f"p{p}_ms"]["median"] for p in PERCENTILES),
                        *(
                            e[f"added_p{p}_ms"]["median"] if model != NO_MESH else "-"
                            for p in PERCENTILES
                        ),
                        e["errors"],
                    ]
                )
    print(
        table(
            [
                "placement",
                "rps",
                "model",
                "P50 ms",
                "P90 ms",
                "P99 ms",
                "+P50",
                "+P90",
                "+P99",
                "errors",
            ],
            rows,
        )
    )
    rows = []
    for placement, by_rate in results["proxy_cost"].items():
        for rate, by_model in by_rate.items():
            for model, e in by_model.items():
                rows.append(
                    [
                        placement,
                        rate,
                        model,
                        e["proxies"],
                        e["vcpu_per_1000rps"]["median"],
                        e["proxy_pss_mib"]["median"],
                    ]
                )
    print(table(["placement", "rps", "model", "proxies", "vCPU/1000rps", "PSS MiB"], rows))
    rows = []
    for placement, by_rate in results["latency"].items():
        for rate, by_model in by_rate.items():
            e = by_model.get(PER_NODE_EBPF)
            cost = results["proxy_cost"][placement][rate].get(PER_NODE_EBPF)
            if e is None or "minus_per_node_p50_ms" not in e or cost is None:
                continue
            rows.append(
                [
                    placement,
                    rate,
                    *(e[f"minus_per_node_p{p}_ms"]["median"] for p in PERCENTILES),
                    cost["cpu_ratio_to_per_node"]["median"],
                ]
            )
    print("eBPF against nftables capture (per-node-ebpf minus per-node, run by run):")
    print(table(["placement", "rps", "dP50 ms", "dP90 ms", "dP99 ms", "vCPU ratio"], rows))


COLORS = {PER_NODE: "C0", PER_NODE_EBPF: "C2", SIDECAR: "C1"}
SHORT = {PER_NODE: "node\nnftables", PER_NODE_EBPF: "node\neBPF", SIDECAR: "sidecar"}


def _plot(run: Run, results: dict[str, Any]) -> None:
    latency = results["latency"]
    placements = list(latency)
    fig = new_figure("Latency added by the mesh (median of runs; bars: min-max)", 14, 5)
    axes = fig.subplots(1, len(placements), sharey=True, squeeze=False)[0]
    for ax, placement in zip(axes, placements, strict=True):
        labels, offset = [], 0.0
        for rate, by_model in latency[placement].items():
            for model, e in by_model.items():
                if model == NO_MESH:
                    continue
                for j, p in enumerate(PERCENTILES):
                    s = e[f"added_p{p}_ms"]
                    x = offset + j
                    ax.bar(x, s["median"], color=f"C{j}", label=f"P{p}" if offset == 0 else None)
                    ax.errorbar(
                        x,
                        s["median"],
                        yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                        color="black",
                        capsize=3,
                    )
                labels.append((offset + 1, f"{SHORT[model]}\n{rate} rps"))
                offset += len(PERCENTILES) + 1
        ax.set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=7)
        ax.set_title(placement)
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[0].set_ylabel("added latency vs no mesh (ms)")
    axes[0].legend()
    save_figure(run, "latency", fig)

    cost = results["proxy_cost"]
    fig = new_figure("Proxy cost during the latency runs (median; bars: min-max)", 14, 5)
    cpu_ax, mem_ax = fig.subplots(1, 2)
    names, cpu, mem = [], [], []
    for placement, by_rate in cost.items():
        for rate, by_model in by_rate.items():
            for model, e in by_model.items():
                names.append(f"{model}\n{placement}\n{rate} rps")
                cpu.append(e["vcpu_per_1000rps"])
                mem.append(e["proxy_pss_mib"])
    for ax, values, unit in ((cpu_ax, cpu, "vCPU per 1000 rps"), (mem_ax, mem, "proxy PSS (MiB)")):
        xs = range(len(values))
        medians = [v["median"] for v in values]
        ax.bar(xs, medians, color=[COLORS[n.split("\n")[0]] for n in names])
        ax.errorbar(
            xs,
            medians,
            yerr=[
                [v["median"] - v["min"] for v in values],
                [v["max"] - v["median"] for v in values],
            ],
            fmt="none",
            color="black",
            capsize=3,
        )
        ax.set_xticks(list(xs), names, fontsize=6, rotation=90)
        ax.set_ylabel(unit)
    save_figure(run, "proxy-cost", fig)


__all__ = ["run"]
