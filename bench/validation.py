"""Scenario 8: CPU to validate one Istio object, CEL rules included (in process, no testbed).

``IstioSchemas.validate`` runs for every Istio object a source reads (directory scan, API watch
event), on the agent's event loop. Per object, CPU seconds (``time.process_time``, median of
repeats) of:

- ``samples``: every Istio object in tests/data/istio/ (Istio's own samples, all valid);
- ``destinationrule``: a DestinationRule with N subsets, each with a traffic policy that sets
  every duration Istio checks with ``duration(self) >= duration('1ms')`` (10 per policy);
- ``serviceentry``: a ServiceEntry with N ports (maxItems: 256), each checked by a port-range
  rule, and all by ``self.all(l1, self.exists_one(l2, l1.number == l2.number))``, n² steps when
  interpreted (6.3 s of CPU at 256 ports in cel-python), evaluated in O(n) by
  ``nodeagent.mesh.cel.UniqueBy``.

cel-python interprets the other rules, about 0.15 ms each per value on this machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import Run, summary, table, write_result
from nodeagent.mesh.validation import IstioSchemas

SCENARIO = "validation"
SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "istio"
POLICY = {
    "connectionPool": {
        "tcp": {
            "connectTimeout": "1s",
            "idleTimeout": "1h",
            "maxConnectionDuration": "1h",
            "tcpKeepalive": {"time": "7200s", "interval": "75s"},
        },
        "http": {"idleTimeout": "1h", "http2KeepAlive": {"timeout": "1m", "interval": "10s"}},
    },
    "outlierDetection": {"interval": "10s", "baseEjectionTime": "30s"},
}


def cpu_each(obj: dict[str, Any], schemas: IstioSchemas, repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        problems = schemas.validate(obj)
        runs.append(time.process_time() - start)
        if problems:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {problems}")
    return runs


def samples(schemas: IstioSchemas) -> list[dict[str, Any]]:
    out = []
    for path in sorted(SAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind"):
                group = str(doc.get("apiVersion", "")).rpartition("/")[0]
                if (group, doc["kind"]) in schemas.kinds():
                    out.append(doc)
    return out


def destination_rule(subsets: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": f"dr-{subsets}"},
        "spec": {
            "host": "reviews",
            "trafficPolicy": POLICY,
            "subsets": [
                {"name": f"v{i}", "labels": {"version": f"v{i}"}, "trafficPolicy": POLICY}
                for i in range(subsets)
            ],
        },
    }


def service_entry(ports: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": f"se-{ports}"},
        "spec": {
            "hosts": ["api.example"],
            "ports": [
                {"number": n, "name": f"p{n}", "protocol": "TCP"} for n in range(1, ports + 1)
            ],
            "resolution": "DNS",
        },
    }


def run(run: Run) -> None:
    schemas = IstioSchemas.load()
    repeats: int = run.pick(5, 1)
    docs = samples(schemas)
    per_sample = [min(cpu_each(d, schemas, repeats)) for d in docs]
    rows: list[dict[str, Any]] = [
        {
            "object": f"{len(docs)} Istio samples (per object)",
            "cpu_s": {
                "median": statistics.median(per_sample),
                "min": min(per_sample),
                "max": max(per_sample),
            },
        }
    ]
    for n in run.pick([1, 10, 50], [1, 3]):
        rows.append(
            {
                "object": f"DestinationRule, {n} subsets",
                "cpu_s": summary(cpu_each(destination_rule(n), schemas, repeats)),
            }
        )
    for n in run.pick([8, 64, 256], [8, 16]):
        rows.append(
            {
                "object": f"ServiceEntry, {n} ports",
                "cpu_s": summary(cpu_each(service_entry(n), schemas, repeats if n < 100 else 1)),
            }
        )
    path = write_result(run, SCENARIO, {"repeats": repeats}, {"objects": rows})
    print(
        table(
            ["object", "validate CPU s (median)", "min", "max"],
            [
                [r["object"], r["cpu_s"]["median"], r["cpu_s"]["min"], r["cpu_s"]["max"]]
                for r in rows
            ],
        )
    )
    print(f"results: {path}")
