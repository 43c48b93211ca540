"""Churn at 5000 services: 100 pods created and then deleted on one node, the agent's CPU and the
node Envoy's memory sampled all along; at 100 pods, what the node holds, and what one endpoint
change sends on the xDS stream.

Issue #14 asks for a pod's cost to follow the change, whatever the services: a node that knows
5000 services must take pods and let them go without its agent or Envoy growing with the
services each time. One single-node testbed:
- SERVICES synthetic services (the convergence scenario's ``synthetic_objects``: HTTP 8080, two
  ready endpoints each, outside every pod range), read by the agent before the first pod;
- a sampler reads, every SAMPLE_EVERY s from /proc: the agent's and the Envoy's CPU seconds
  (utime + stime), their PSS; and the captured pods;
- PODS pods (the fill scenario's: sleep, each with a service account of its own, so every pod is
  a new identity too), created one by one (CNI ADD each, timed);
- at PODS pods, once Envoy holds all the agent sent: the fill scenario's ``measure`` (Envoy PSS,
  ``allocated``, its /config_dump bytes, clusters; the agent's PSS);
- one endpoint change (a second EndpointSlice for one service, in a file of its own): the bytes
  and pushes the agent sent, by xDS type (its ``nodeagent_xds_sent_bytes_total`` and
  ``nodeagent_xds_pushes_total``);
- the PODS pods deleted one by one (CNI DEL each, timed), and the node left to settle.

Smoke: 10 services, 3 pods.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PER_NODE,
    Run,
    envoy_pids,
    new_figure,
    percentile,
    save_figure,
    table,
    write_result,
)
from bench.convergence import SYNTH_NAMESPACE, proxy_status, synthetic_objects, xds_metrics
from bench.fill import (
    NODE,
    PSS_EVERY,
    SMOKE_PSS_EVERY,
    SYNTHETIC,
    bring_up,
    cpu_seconds,
    fill_pod,
    measure,
    rollup_kib,
    wait_settled,
)
from bench.podstart import PUBLISH_LEAD
from nodeagent.testbed import daemons, layout
from nodeagent.testbed.cluster import Testbed, down

SCENARIO = "churn"
SAMPLE_EVERY = 0.5  # seconds between samples
CHANGE = "bench-change"  # the extra file of the endpoint change
MAX_SAMPLES = 20000  # a bound on the sampler, whatever happens


class Sampler(threading.Thread):
    """Samples the agent's and Envoy's CPU seconds and PSS until stopped (bounded), and once at
    each phase's start, so a phase shorter than SAMPLE_EVERY still has its sample."""

    def __init__(self, tb: Testbed, start: float) -> None:
        super().__init__(daemon=True)
        self.tb, self.start_t = tb, start
        self.samples: list[dict[str, Any]] = []
        self.phase = "services"
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        agent = tb.daemon(NODE, daemons.AGENT).pid
        (envoy,) = envoy_pids(layout.node_netns(tb.name, NODE))
        assert agent is not None
        self._pids = (agent, envoy)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        agent, envoy = self._pids
        with self._lock:
            if len(self.samples) >= MAX_SAMPLES:
                return
            a, e = rollup_kib(agent), rollup_kib(envoy)
            self.samples.append(
                {
                    "t": time.monotonic() - self.start_t,
                    "phase": self.phase,
                    "pods": len(self.tb.state.pods),
                    "agent_cpu_s": cpu_seconds(agent),
                    "envoy_cpu_s": cpu_seconds(envoy),
                    "agent_pss_mib": a["pss"] / 1024,
                    "envoy_pss_mib": e["pss"] / 1024,
                }
            )

    def run(self) -> None:
        while not self.stopped.is_set() and len(self.samples) < MAX_SAMPLES:
            self.sample()
            self.stopped.wait(SAMPLE_EVERY)


def endpoint_change(tb: Testbed) -> dict[str, Any]:
    """One more endpoint for the first synthetic service; what the agent sent for it."""
    before = xds_metrics(tb, NODE)
    version = proxy_status(tb, NODE)["version"]
    net = tb.topology.network
    extra_ip = net.cluster_cidr.broadcast_address - 1  # clear of pods and synthetic endpoints
    tb.publish_extra(
        CHANGE,
        [
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": SYNTH_NAMESPACE,
                    "name": "svc-00000-extra",
                    "labels": {"kubernetes.io/service-name": "svc-00000"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [str(extra_ip)], "conditions": {"ready": True}}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        ],
    )
    settle = wait_settled(tb, newer_than=version)
    after = xds_metrics(tb, NODE)

    def grown(metric: str) -> dict[str, int]:
        return {
            t: int(v - before.get((m, t), 0.0))
            for (m, t), v in after.items()
            if m == metric and v > before.get((m, t), 0.0)
        }

    return {
        "settle_s": settle,
        "sent_bytes": grown("nodeagent_xds_sent_bytes_total"),
        "pushes": grown("nodeagent_xds_pushes_total"),
    }


def churn(tb: Testbed, services: int, pods: int, every: float) -> dict[str, Any]:
    """EVERY: seconds between the PSS samples of fill's measure."""
    start = time.monotonic()
    sampler = Sampler(tb, start)
    sampler.start()
    try:
        version = proxy_status(tb, NODE)["version"]
        tb.publish_extra(SYNTHETIC, synthetic_objects(tb, services))
        wait_settled(tb, newer_than=version)
        load = time.monotonic() - start
        print(f"  {tb.name}: {services} services read by the agent in {load:.1f}s", flush=True)
        sampler.enter("create")
        adds = []
        for i in range(pods):
            adds.append(tb.add_pod(fill_pod(i), publish_lead=PUBLISH_LEAD).cni_add_seconds)
        sampler.enter("hold")
        held = measure(tb, pods, every)
        change = endpoint_change(tb)
        print(
            f"  {tb.name}: {pods} pods; Envoy PSS {held['envoy_pss_mib']['median']:.0f} MiB"
            f" (allocated {held['envoy_allocated_mib']:.0f}), config dump"
            f" {held['config_dump_bytes'] / 1e6:.1f} MB; one endpoint change sent"
            f" {change['sent_bytes']} bytes in {change['pushes']} pushes",
            flush=True,
        )
        sampler.enter("delete")
        dels = []
        for i in range(pods):
            began = time.monotonic()
            problems = tb.remove_pod(fill_pod(i))
            dels.append(time.monotonic() - began)
            if problems:
                raise RuntimeError(f"deleting {fill_pod(i).key}: {problems}")
        sampler.enter("settle")
        wait_settled(tb)
        time.sleep(2 * SAMPLE_EVERY)  # a last sample or two with the node at rest
        after = measure(tb, 0, every)
    finally:
        sampler.stopped.set()
        sampler.join(timeout=10)
    return {
        "services": services,
        "pods": pods,
        "load_s": load,
        "add_s": adds,
        "del_s": dels,
        "at_pods": held,
        "endpoint_change": change,
        "after_delete": after,
        "samples": sampler.samples,
    }


def run(run: Run) -> None:
    services, pods = run.pick(5000, 10), run.pick(100, 3)
    tb = bring_up("bchurn-" + ("s" if run.smoke else "f"), mesh=True)
    try:
        results = churn(tb, services, pods, run.pick(PSS_EVERY, SMOKE_PSS_EVERY))
    finally:
        down(tb.name)
    params = {
        "services": services,
        "pods": pods,
        "models": [PER_NODE],
        "nodes": 1,
        "pods_desc": "sleep, one service account each (fill's pods), created then deleted one "
        "by one through the runtime shim",
        "synthetic_services": "HTTP 8080, two ready endpoints each (convergence's)",
        "sample_every_s": SAMPLE_EVERY,
        "endpoint_change": "a second EndpointSlice (one endpoint) for one service, own file",
        "sent_bytes": "growth of the agent's nodeagent_xds_sent_bytes_total by xDS type",
    }
    write_result(run, SCENARIO, params, results)
    _print(results)
    _plot(run, results)


def _cpu_share(samples: list[dict[str, Any]], key: str) -> list[float]:
    """Per sample, the share of one core the process used since the previous sample."""
    shares = [0.0]
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        shares.append((b[key] - a[key]) / dt if dt > 0 else 0.0)
    return shares


def _print(results: dict[str, Any]) -> None:
    held, after = results["at_pods"], results["after_delete"]
    samples = results["samples"]
    by_phase: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_phase.setdefault(s["phase"], []).append(s)
    rows = []
    for phase, these in by_phase.items():
        cpu = these[-1]["agent_cpu_s"] - these[0]["agent_cpu_s"]
        envoy_cpu = these[-1]["envoy_cpu_s"] - these[0]["envoy_cpu_s"]
        span = these[-1]["t"] - these[0]["t"]
        rows.append(
            [
                phase,
                round(span, 1),
                round(cpu, 2),
                round(envoy_cpu, 2),
                round(max(s["envoy_pss_mib"] for s in these), 1),
                round(max(s["agent_pss_mib"] for s in these), 1),
            ]
        )
    print(
        table(
            ["phase", "seconds", "agent CPU s", "Envoy CPU s", "Envoy PSS max", "agent PSS max"],
            rows,
        )
    )
    adds, dels = results["add_s"], results["del_s"]
    print(
        f"  ADD P50 / P99 {percentile(adds, 50) * 1e3:.0f} / {percentile(adds, 99) * 1e3:.0f} ms;"
        f" DEL P50 / P99 {percentile(dels, 50) * 1e3:.0f} / {percentile(dels, 99) * 1e3:.0f} ms"
    )
    print(
        f"  at {results['pods']} pods: Envoy PSS {held['envoy_pss_mib']['median']:.0f} MiB,"
        f" allocated {held['envoy_allocated_mib']:.0f} MiB, config dump"
        f" {held['config_dump_bytes'] / 1e6:.2f} MB, agent PSS"
        f" {held['agent_pss_mib']['median']:.0f} MiB; after deleting them: Envoy PSS"
        f" {after['envoy_pss_mib']['median']:.0f} MiB, allocated"
        f" {after['envoy_allocated_mib']:.0f} MiB, agent PSS {after['agent_pss_mib']['median']:.0f}"
        f" MiB"
    )
    change = results["endpoint_change"]
    print(f"  one endpoint change: sent {change['sent_bytes']} bytes, pushes {change['pushes']}")


def _plot(run: Run, results: dict[str, Any]) -> Path:
    samples = results["samples"]
    fig = new_figure(
        f"{results['pods']} pods created and deleted at {results['services']} services (one node)",
        height=6.0,
    )
    cpu_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    t = [s["t"] for s in samples]
    cpu_ax.plot(t, _cpu_share(samples, "agent_cpu_s"), label="agent")
    cpu_ax.plot(t, _cpu_share(samples, "envoy_cpu_s"), label="node Envoy")
    cpu_ax.set_ylabel("CPU (cores)")
    mem_ax.plot(t, [s["envoy_pss_mib"] for s in samples], label="node Envoy PSS")
    mem_ax.plot(t, [s["agent_pss_mib"] for s in samples], label="agent PSS")
    mem_ax.set_ylabel("MiB")
    mem_ax.set_xlabel("seconds since the services were published")
    pods_ax = mem_ax.twinx()
    pods_ax.plot(t, [s["pods"] for s in samples], color="grey", linestyle=":", label="pods")
    pods_ax.set_ylabel("pods")
    for ax in (cpu_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return save_figure(run, SCENARIO, fig)
