"""Scenario 2b (#19): what Istio's metrics and access logs cost the node Envoy.

One per-node testbed (nftables capture), latency's nginx and clients (same-node, cross-node).
Three configurations, switched by rewriting the testbed's mesh config between runs, as editing
the istio ConfigMap would:
- none: ``defaultProviders.metrics: []``, ``accessLogFile: ""``;
- metrics: Istio's default ``[prometheus]`` (the stats access loggers, istio_stats.py), no logs;
- metrics+logs: and ``accessLogFile: /dev/stdout`` (the testbed sends the node Envoy's stdout to
  logs/<node>.envoy.log, a file on disk).
After each switch the scenario waits (bounded) until both node Envoys hold the new listeners
(their /config_dump counts stats and stdout loggers as configured) and no listener or filter chain
drains. Per round, every configuration runs once (order rotated round by round), and the ratios to
"none" are taken run by run within the round.

Figures: Envoy vCPU per 1000 rps on the request's path (latency.measure), Envoy PSS and its own
/memory ``allocated`` per node and its /config_dump bytes, right after the switch and after the
traffic; and the config's growth with services: ``allocated`` and /config_dump bytes of n1's
Envoy with SERVICES synthetic services published, against none published, per configuration.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PER_NODE,
    Run,
    envoy_pids,
    new_figure,
    pss_mib,
    ratios,
    save_figure,
    summary,
    table,
    write_result,
)
from bench.convergence import proxy_status, synthetic_objects
from bench.fill import wait_settled
from bench.latency import (
    BODY_BYTES,
    CONNECTIONS,
    MODEL_PODS,
    MODEL_SERVICE,
    MODELS,
    NGINX,
    hey,
    measure,
)
from nodeagent.testbed import daemons, layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

SCENARIO = "telemetry"
NODES = ("n1", "n2")  # n1: nginx and the same-node client; n2: the cross-node client
PLACEMENTS = ("same-node", "cross-node")
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"defaultProviders": {"metrics": []}, "accessLogFile": ""},
    "metrics": {"defaultProviders": {"metrics": ["prometheus"]}, "accessLogFile": ""},
    "metrics+logs": {
        "defaultProviders": {"metrics": ["prometheus"]},
        "accessLogFile": "/dev/stdout",
    },
}
BASE = "none"
STATS_LOGGER = "envoy.access_loggers.stats"
STDOUT_LOGGER = "envoy.access_loggers.stdout"
SWITCH_TIMEOUT = 60.0  # seconds for both Envoys to hold a new mesh config's listeners
DRAINING = (
    "listener_manager.total_listeners_draining",
    "listener_manager.total_filter_chains_draining",
)
SYNTHETIC = "bench-telemetry-services"
LISTENERS = "/config_dump?resource=dynamic_listeners"  # what the agent sent (no bootstrap)


def topology(name: str, conf: Path, prefix: Path) -> str:
    pods = MODEL_PODS.format(s="", server=NODES[0], cross=NODES[1], conf=conf, prefix=prefix)
    return (
        f"name: {name}\nnodeagent: true\nnodes: [{{name: n1}}, {{name: n2}}]\n"
        "namespaces:\n  - name: bench\n    labels: {nodeagent.io/mesh: enabled}\n"
        f"pods:{pods}\nservices:{MODEL_SERVICE.format(s='')}\n"
    )


def admin(tb: Testbed, node: str, path: str) -> bytes:
    proc = subprocess.run(
        daemons.admin_curl(tb.name, node, path, 30), capture_output=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{node} Envoy admin {path}: {proc.stderr.decode().strip()}")
    return proc.stdout


def loggers(dump: bytes) -> tuple[int, int]:
    """(stats loggers, stdout loggers) in a config dump."""
    return dump.count(STATS_LOGGER.encode()), dump.count(STDOUT_LOGGER.encode())


def draining(tb: Testbed, node: str) -> int:
    text = admin(tb, node, "/stats?filter=_draining$").decode()
    return sum(
        int(v) for k, _, v in (line.partition(": ") for line in text.splitlines()) if k in DRAINING
    )


def switch(tb: Testbed, config: str) -> float:
    """Rewrite the mesh config to CONFIG; seconds until both Envoys hold it and drained."""
    fields = CONFIGS[config]
    metrics, logs = bool(fields["defaultProviders"]["metrics"]), bool(fields["accessLogFile"])
    started = time.monotonic()
    tb.set_mesh_config(fields)
    for node in NODES:
        while True:
            stats, stdout = loggers(admin(tb, node, LISTENERS))
            if (stats > 0) == metrics and (stdout > 0) == logs and not draining(tb, node):
                break
            if time.monotonic() - started > SWITCH_TIMEOUT:
                raise TimeoutError(
                    f"{node}: {config} not in force after {SWITCH_TIMEOUT:.0f}s "
                    f"(stats loggers {stats}, stdout loggers {stdout})"
                )
            time.sleep(0.25)
    return time.monotonic() - started


def memory(tb: Testbed, node: str) -> dict[str, float]:
    """Node NODE's Envoy: PSS, its /memory allocated, its /config_dump size."""
    (pid,) = envoy_pids(layout.node_netns(tb.name, node))
    allocated = int(json.loads(admin(tb, node, "/memory"))["allocated"])
    return {
        "pss_mib": pss_mib([pid]),
        "allocated_mib": allocated / 2**20,
        "config_dump_bytes": len(admin(tb, node, "/config_dump")),
    }


def growth(tb: Testbed, services: int) -> dict[str, Any]:
    """Per configuration: n1's Envoy with SERVICES synthetic services against without."""
    out: dict[str, Any] = {}
    for config in CONFIGS:
        switch(tb, config)
        without = memory(tb, "n1")
        version = proxy_status(tb, "n1")["version"]
        tb.publish_extra(SYNTHETIC, synthetic_objects(tb, services))
        wait_settled(tb, newer_than=version)
        switch(tb, config)  # and drained: the replaced listeners are gone
        with_services = memory(tb, "n1")
        version = proxy_status(tb, "n1")["version"]
        tb.publish_extra(SYNTHETIC, [])
        wait_settled(tb, newer_than=version)
        out[config] = {
            "without": without,
            "with": with_services,
            "added_allocated_kib_per_service": (
                (with_services["allocated_mib"] - without["allocated_mib"]) * 1024 / services
            ),
            "added_config_dump_bytes_per_service": (
                (with_services["config_dump_bytes"] - without["config_dump_bytes"]) / services
            ),
        }
    return out


def one_run(
    tb: Testbed, config: str, rates: list[int], seconds: float, warmup: float
) -> dict[str, Any]:
    """CONFIG switched in, then every placement and rate measured once."""
    model = MODELS[PER_NODE]
    out: dict[str, Any] = {"switch_s": switch(tb, config)}
    out["memory_before"] = {n: memory(tb, n) for n in NODES}
    for placement in PLACEMENTS:
        hey(tb, model, model.client(placement), rates[0], warmup)  # connections, caches
        for rate in rates:
            out[f"{placement}/{rate}"] = measure(tb, model, placement, rate, seconds)
    out["memory_after"] = {n: memory(tb, n) for n in NODES}
    return out


def run(run: Run) -> None:
    rates = run.pick([500, 1000], [200])
    seconds = run.pick(10.0, 1.0)
    repeats = run.pick(3, 1)
    warmup = run.pick(1.0, 0.25)
    services = run.pick(100, 10)
    raw: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        prefix = Path(tmp)
        (prefix / "nginx.conf").write_text(NGINX.format(prefix=prefix, body="x" * BODY_BYTES))
        name = "btel-" + ("s" if run.smoke else "f")
        down(name)
        text = topology(name, prefix / "nginx.conf", prefix)
        tb = Testbed.up(loads_topology(text, "bench/telemetry"), text, "bench/telemetry")
        try:
            for i in range(repeats):
                names = list(CONFIGS)
                for config in names[i % len(names) :] + names[: i % len(names)]:
                    one = {"round": i, **one_run(tb, config, rates, seconds, warmup)}
                    print(f"  round {i} {config}: switched in {one['switch_s']:.1f}s", flush=True)
                    raw[config].append(one)
            grown = growth(tb, services)
        finally:
            down(tb.name)
    params = {
        "rates_rps": rates,
        "seconds_per_run": seconds,
        "repeats": repeats,
        "warmup_s": warmup,
        "connections": CONNECTIONS,
        "response_bytes": BODY_BYTES,
        "client": "hey (fixed rate per connection, keep-alive)",
        "server": "nginx, 1 worker, on n1",
        "placements": {"same-node": "client on n1", "cross-node": "client on n2 (mTLS)"},
        "capture_mode": "nftables",
        "configs": CONFIGS,
        "order": "rotated by one configuration each round",
        "access_log_sink": "node Envoy stdout -> logs/<node>.envoy.log (a file)",
        "vcpu": "utime + stime of the node Envoys on the request's path per 1000 achieved rps",
        "memory": "per node Envoy: PSS (smaps_rollup), /memory allocated, /config_dump bytes; "
        "before = after the switch and drain, after = after the round's traffic",
        "growth_services": services,
        "growth": "n1's Envoy, no traffic: synthetic services (bench.convergence) published, "
        "against none, per configuration",
    }
    results = {"cost": _cost(raw, rates), "memory": _memory(raw), "growth": grown, "runs": raw}
    write_result(run, SCENARIO, params, results)
    _print(results)
    _plot(run, results)


def _cost(raw: dict[str, list[dict[str, Any]]], rates: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for placement in PLACEMENTS:
        for rate in rates:
            key = f"{placement}/{rate}"
            base = [r[key]["vcpu_per_1000rps"] for r in raw[BASE]]
            for config, runs in raw.items():
                vcpu = [r[key]["vcpu_per_1000rps"] for r in runs]
                out.setdefault(key, {})[config] = {
                    "vcpu_per_1000rps": summary(vcpu),
                    "ratio_to_none": ratios(vcpu, base),
                    "p50_ms": summary(r[key]["p50_ms"] for r in runs),
                    "p99_ms": summary(r[key]["p99_ms"] for r in runs),
                    "errors": sum(r[key]["errors"] for r in runs),
                    "achieved_rps": summary(r[key]["achieved_rps"] for r in runs),
                }
    return out


def _memory(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config, runs in raw.items():
        for when in ("memory_before", "memory_after"):
            for node in NODES:
                out.setdefault(config, {}).setdefault(when, {})[node] = {
                    k: summary(r[when][node][k] for r in runs)
                    for k in ("pss_mib", "allocated_mib", "config_dump_bytes")
                }
    return out


def _print(results: dict[str, Any]) -> None:
    rows = [
        [
            key,
            config,
            e["vcpu_per_1000rps"]["median"],
            e["ratio_to_none"]["median"],
            e["p50_ms"]["median"],
            e["p99_ms"]["median"],
            e["errors"],
        ]
        for key, by_config in results["cost"].items()
        for config, e in by_config.items()
    ]
    print(table(["placement/rps", "config", "vCPU/1000rps", "/ none", "P50", "P99", "err"], rows))
    rows = []
    for config, by_when in results["memory"].items():
        for when, by_node in by_when.items():
            for node, m in by_node.items():
                rows.append(
                    [
                        config,
                        when.removeprefix("memory_"),
                        node,
                        m["pss_mib"]["median"],
                        m["allocated_mib"]["median"],
                        m["config_dump_bytes"]["median"] / 1024,
                    ]
                )
    print(table(["config", "when", "node", "PSS MiB", "allocated MiB", "config KiB"], rows))
    rows = [
        [
            config,
            g["without"]["allocated_mib"],
            g["with"]["allocated_mib"],
            g["added_allocated_kib_per_service"],
            g["added_config_dump_bytes_per_service"],
        ]
        for config, g in results["growth"].items()
    ]
    print(table(["config", "alloc MiB", "+services", "KiB/service", "dump B/service"], rows))


def _plot(run: Run, results: dict[str, Any]) -> None:
    fig = new_figure("Node Envoy cost of Istio metrics and access logs (median; bars: min-max)")
    cpu_ax, mem_ax = fig.subplots(1, 2)
    cost = results["cost"]
    width = 1 / (len(CONFIGS) + 1)
    for j, config in enumerate(CONFIGS):
        values = [cost[key][config]["vcpu_per_1000rps"] for key in cost]
        xs = [i + j * width for i in range(len(values))]
        medians = [v["median"] for v in values]
        low = [m - v["min"] for m, v in zip(medians, values, strict=True)]
        high = [v["max"] - m for m, v in zip(medians, values, strict=True)]
        cpu_ax.bar(xs, medians, width, label=config, color=f"C{j}")
        cpu_ax.errorbar(xs, medians, yerr=[low, high], fmt="none", color="black", capsize=2)
    cpu_ax.set_xticks([i + width for i in range(len(cost))], list(cost), fontsize=7, rotation=20)
    cpu_ax.set_ylabel("Envoy vCPU per 1000 rps")
    cpu_ax.legend(fontsize=7)
    memory = results["memory"]
    for j, config in enumerate(CONFIGS):
        values = [memory[config]["memory_after"][n]["allocated_mib"]["median"] for n in NODES]
        mem_ax.bar([i + j * width for i in range(len(NODES))], values, width, color=f"C{j}")
    mem_ax.set_xticks([i + width for i in range(len(NODES))], list(NODES))
    mem_ax.set_ylabel("Envoy allocated MiB after traffic")
    save_figure(run, SCENARIO, fig)


__all__ = ["run"]
