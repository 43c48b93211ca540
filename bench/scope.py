"""Sidecar scoping: the node Envoy's memory per local pod at 1000 services, with and without a
namespace-local Sidecar (issue #16, part 3).

Two single-node testbeds, one per variant, each as ``bench fill`` builds its size: SERVICES
synthetic services (namespace ``synth``, HTTP 8080, two ready endpoints each) read by the agent
first, then pods ``bench/fill-NNN`` (each its own service account) started one by one, measured
at the checkpoints once the node's Envoy holds the agent's latest snapshot (``fill.measure``:
Envoy PSS, /memory ``allocated``, config dump bytes).

- unscoped: no Sidecar; every pod's outbound goes to ``outbound-internal`` (one chain per
  service port: SERVICES chains);
- scoped: before the first pod, ``bench``'s namespace-wide Sidecar with egress hosts ``./*`` and
  ``istio-system/*`` (istio.io's namespace isolation example): the pods share one scope whose
  listener holds only bench's own services (none here), and, no pod being unscoped, the node
  has no ``outbound-internal`` at all, nor clusters, routes and endpoints of services no scope
  reaches (as Istio's Sidecar trims a sidecar's CDS).

Per variant: per checkpoint the figures, the per-pod slope (least squares, from 10 pods on),
and the memory per pod (the Envoy's total over the pods); the scoped/unscoped ratio of each.
Full: 1000 services, checkpoints 1, 10, 30 pods; smoke: 10 services, 2 pods. PSS hardly moves
when config goes (the allocator keeps the pages); /memory ``allocated`` does.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Run, table, write_result
from bench.convergence import proxy_status, synthetic_objects
from bench.fill import NAMESPACE, NODE, QUIET, SAMPLES, bring_up, fill, slope, wait_settled
from nodeagent.testbed.cluster import down

SCENARIO = "scope"
SIDECAR_FILE = "bench-sidecar"
SYNTHETIC = "bench-services"
VARIANTS = ("unscoped", "scoped")


def namespace_sidecar() -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": NAMESPACE},
        "spec": {"egress": [{"hosts": ["./*", "istio-system/*"]}]},
    }


def _variant(variant: str, services: int, pods: int, smoke: bool, budget: float) -> dict[str, Any]:
    tb = bring_up(f"bs{variant[0]}{services}-" + ("s" if smoke else "f"), mesh=True)
    try:
        before = proxy_status(tb, NODE)["version"]
        started = time.monotonic()
        tb.publish_extra(SYNTHETIC, synthetic_objects(tb, services))
        if variant == "scoped":
            tb.publish_extra(SIDECAR_FILE, [namespace_sidecar()])
        wait_settled(tb, newer_than=before)
        print(f"  {tb.name}: {services} services read in {time.monotonic() - started:.1f}s")
        checkpoints = {c for c in (1, 10, 30) if c <= pods} | {pods}
        filled = fill(tb, pods, budget, checkpoints)
        # From 10 pods on: in the scoped variant the first pod replaces the node-wide
        # outbound-internal (held while no pod is on the node) by its scope's, and the old
        # listener is still draining when that checkpoint is measured.
        steps = [s for s in filled["checkpoints"] if s["pods"] >= min(10, pods)]
        kib = 1024.0
        filled["slope_kib_per_pod"] = {
            "envoy_pss": slope([(s["pods"], s["envoy_pss_mib"]["median"] * kib) for s in steps]),
            "envoy_allocated": slope([(s["pods"], s["envoy_allocated_mib"] * kib) for s in steps]),
            "config_dump": slope([(s["pods"], s["config_dump_bytes"] / kib) for s in steps]),
        }
        last = steps[-1]
        filled["per_pod_at_last_kib"] = {
            "envoy_pss": last["envoy_pss_mib"]["median"] * kib / last["pods"],
            "envoy_allocated": last["envoy_allocated_mib"] * kib / last["pods"],
            "config_dump": last["config_dump_bytes"] / kib / last["pods"],
        }
        filled.update(variant=variant, services=services, pods_planned=pods)
        return filled
    finally:
        down(tb.name)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def run(run: Run) -> None:
    services, pods = run.pick((1000, 30), (10, 2))
    budget = float(run.pick(300, 120))
    results: dict[str, Any] = {
        variant: _variant(variant, services, pods, run.smoke, budget) for variant in VARIANTS
    }
    unscoped, scoped = results["unscoped"], results["scoped"]
    results["scoped_over_unscoped"] = {
        kind: {
            key: _ratio(scoped[kind][key], unscoped[kind][key])
            for key in ("envoy_pss", "envoy_allocated", "config_dump")
        }
        for kind in ("slope_kib_per_pod", "per_pod_at_last_kib")
    }
    params = {
        "services": services,
        "pods": pods,
        "variants": list(VARIANTS),
        "sidecar": namespace_sidecar(),
        "synthetic_services": "namespace synth (outside the scope), one HTTP port each",
        "samples_per_checkpoint": SAMPLES,
        "quiet_s": QUIET,
        "per_pod_at_last": "the Envoy's figure at the last checkpoint divided by its pods",
    }
    write_result(run, SCENARIO, params, results)
    _print(results)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(results: dict[str, Any]) -> None:
    rows = [
        [
            variant,
            step["pods"],
            step["envoy_pss_mib"]["median"],
            step["envoy_allocated_mib"],
            step["config_dump_bytes"] / 1e6,
            step["envoy_active_listeners"],
            step["envoy_active_clusters"],
        ]
        for variant in VARIANTS
        for step in results[variant]["checkpoints"]
    ]
    print(
        table(
            ["variant", "pods", "Envoy PSS MiB", "alloc MiB", "dump MB", "listeners", "clusters"],
            rows,
        )
    )
    rows = []
    for kind, label in (("slope_kib_per_pod", "slope"), ("per_pod_at_last_kib", "total/pods")):
        for key in ("envoy_pss", "envoy_allocated", "config_dump"):
            a, b = results["unscoped"][kind][key], results["scoped"][kind][key]
            ratio = results["scoped_over_unscoped"][kind][key]
            rows.append([f"{label} {key} KiB/pod", _num(a), _num(b), _num(ratio, 2)])
    print(table(["per pod", "unscoped", "scoped", "scoped / unscoped"], rows))
    for variant in VARIANTS:
        if results[variant]["stopped"]:
            print(f"{variant}: {results[variant]['stopped']['why']}")


__all__ = ["run"]
