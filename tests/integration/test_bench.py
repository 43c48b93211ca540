"""The benchmark suite's smoke variants: each scenario runs tiny, on the real testbed, so that
`make bench` cannot rot. They check the result files' shape and sanity, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def smoke(out: Path, scenario: str, timeout: float = 180) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), scenario],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{scenario}: {proc.stdout}\n{proc.stderr}"


def result(out: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert doc["scenario"] == name and doc["smoke"] is True
    assert doc["machine"]["cores"] >= 1 and doc["versions"]["envoy"]
    return doc


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_latency_and_proxy_cost_smoke(tmp_path: Path) -> None:
    smoke(tmp_path, "latency")
    latency = result(tmp_path, "latency")
    assert latency["params"]["rates_rps"] == [200]
    for placement in ("same-node", "cross-node"):
        by_model = latency["results"]["latency"][placement]["200"]
        assert by_model["no-mesh"]["errors"] == 0 and by_model["per-node"]["errors"] == 0
        for model in by_model:
            e = by_model[model]
            assert 0 < e["p50_ms"]["median"] <= e["p90_ms"]["median"] <= e["p99_ms"]["median"]
    cost = result(tmp_path, "proxy-cost")["results"]["proxy_cost"]
    assert cost["same-node"]["200"]["per-node"]["proxies"] == 1
    assert cost["cross-node"]["200"]["per-node"]["proxies"] == 2
    assert cost["cross-node"]["200"]["per-node"]["vcpu_per_1000rps"]["median"] > 0
    assert is_png(tmp_path / "latency.png") and is_png(tmp_path / "proxy-cost.png")


def test_memory_smoke(tmp_path: Path) -> None:
    smoke(tmp_path, "memory")
    doc = result(tmp_path, "memory")
    steps = doc["results"]["per-node"]
    assert [s["pods"] for s in steps] == doc["params"]["pods"]
    assert all(s["envoys"] == 1 for s in steps)
    # More captured pods: more listeners, so more config held by the node's Envoy.
    assert steps[-1]["config_dump_bytes"] > steps[0]["config_dump_bytes"] > 0
    assert all(s["node_total_mib"]["min"] > s["envoy_rss_mib"]["min"] > 0 for s in steps)
    assert is_png(tmp_path / "memory.png")
