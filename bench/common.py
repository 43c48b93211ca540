"""What every scenario shares: repeated runs, statistics, the result file and the plot.

A scenario measures on the testbed and reports through here, so every result file has the same
shape: ``{"scenario", "date", "machine", "versions", "params", "results", "smoke"}``, with figures
as ``{"median", "min", "max", "runs"}`` over repeated runs. Ratios are taken pair by pair (run i of
one model against run i of the other, same run of the suite) and then summarised.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Figure objects, not pyplot: files only, no screen and no backend to choose.
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The deployment models every comparison uses; per-node captures with nftables (the default),
# per-node-ebpf is the same node agent and Envoy with --capture-mode ebpf (#18).
NO_MESH, SIDECAR, PER_NODE = "no-mesh", "sidecar", "per-node"
PER_NODE_EBPF = "per-node-ebpf"


@dataclass(frozen=True)
class Run:
    """How a scenario is run: full (make bench) or the smoke variant the tests run."""

    smoke: bool
    out: Path  # where result files and plots go

    def pick(self, full: Any, smoke: Any) -> Any:
        return smoke if self.smoke else full


def summary(values: Iterable[float]) -> dict[str, float | int]:
    """Median, min and max of repeated measurements."""
    data = [float(v) for v in values]
    if not data:
        raise ValueError("no measurements")
    return {
        "median": statistics.median(data),
        "min": min(data),
        "max": max(data),
        "runs": len(data),
    }


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float | int]:
    """Pair by pair (same run), then summarised: never a ratio of two medians."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios need as many runs on each side")
    return summary(n / d for n, d in zip(numerators, denominators, strict=True) if d)


def percentile(values: Sequence[float], p: float) -> float:
    """The P-th percentile (0-100), linear between closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    k = (len(data) - 1) * p / 100.0
    low = int(k)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (k - low)


def timed(func: Callable[[], Any]) -> float:
    """Wall seconds FUNC took."""
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    distro = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": distro,
    }


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not found"
        if proc.returncode != 0:
            return ""
        lines = (proc.stdout or proc.stderr).strip().splitlines()
        return lines[0] if lines else ""  # e.g. `git status` of a clean tree

    envoy = Path(sys.executable).parent / "envoy"
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nodeagent": commit + ("+dirty" if dirty else ""),
        "envoy": first_line([str(envoy), "--version"]).split("version:")[-1].strip(),
        "python": platform.python_version(),
        "nft": first_line(["nft", "--version"]),
        "hey": first_line(["dpkg-query", "-W", "-f", "${Version}", "hey"]),
        "wrk": first_line(["dpkg-query", "-W", "-f", "${Version}", "wrk"]),
    }


def envoy_pids(netns_name: str) -> list[int]:
    """The Envoy processes living in a testbed network namespace (node or pod)."""
    from nodeagent.testbed import netns

    pids = []
    for pid in netns.pids_in(netns_name):
        try:
            if Path(os.readlink(f"/proc/{pid}/exe")).name == "envoy":
                pids.append(pid)
        except OSError:
            continue  # exited meanwhile
    return pids


def agent_pods(testbed: str, node: str) -> dict[str, dict[str, Any]]:
    """NODE's agent's pod records (``nodeagent pods -o json``), by namespace/name: what a
    scenario asserts the capture backend of its pods with."""
    from nodeagent.testbed import layout

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodeagent",
            "pods",
            "-o",
            "json",
            "--cni-socket",
            str(layout.agent_socket(testbed, node)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nodeagent pods on {testbed}/{node}: {proc.stderr.strip()}")
    return {f"{p['namespace']}/{p['name']}": p for p in json.loads(proc.stdout)}


def pss_mib(pids: Iterable[int]) -> float:
    """Proportional set size: shared pages (Envoy's binary, libraries) split among their users.

    Summing VmRSS over N sidecars would count the Envoy binary N times.
    """
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def write_result(run: Run, scenario: str, params: dict[str, Any], results: dict[str, Any]) -> Path:
    run.out.mkdir(parents=True, exist_ok=True)
    path = run.out / f"{scenario}.json"
    doc = {
        "scenario": scenario,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": run.smoke,
        "machine": machine(),
        "versions": versions(),
        "params": params,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def new_figure(title: str, width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.suptitle(title)
    return fig


def save_figure(run: Run, scenario: str, fig: Figure) -> Path:
    run.out.mkdir(parents=True, exist_ok=True)
    path = run.out / f"{scenario}.png"
    fig.savefig(path, dpi=110)
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table for the terminal."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
