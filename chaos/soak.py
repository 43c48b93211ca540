"""python -m chaos.soak [--minutes M] [--out DIR]: the soak (issue #20, part 4).

M minutes (30 by default; ``make soak``) of the chaos load (load.py: HTTP and TCP between pods
on two nodes, mTLS STRICT, every request counted by the clients, the servers and the wire), with
workload certificates of CERT_TTL seconds (each rotated at about half of it), and once a minute
one change, in turn:

- the agent of n1 SIGKILLed and restarted;
- the node Envoy of n1 SIGKILLed (its agent starts another);
- config churn: a VirtualService and a DestinationRule for s2 applied, or removed again;
- pod churn on n2: a pod created there, or deleted again.

Every SAMPLE_EVERY seconds: memory (RSS, PSS, USS) and open file descriptors of each node's agent
and Envoy. n1's are restarted by the faults; n2's never are, and live through everything the run
does (rotations, pushes, its pods coming and going, its peer's restarts): they are held to the
bound. BOUND: the median of n2's last three minutes against the median of its minutes 2 to 5
(after start-up and the first rotations): USS (private memory) at most +15 % and +16 MiB
over it, file descriptors at most +16. Exit 1 when a bound is exceeded, a request bypassed the
node Envoy or went in clear, or a failure falls outside a fault's window.

Writes ``<out>/soak.json`` and ``<out>/soak.png``; a full run into chaos/results also writes the
soak section of chaos/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import machine, new_figure, versions
from chaos import faults
from chaos.client import TIMEOUT
from chaos.load import CLIENTS, NAMESPACE, Load, apply_strict, topology
from nodeagent.testbed import daemons, layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TESTBED = "chx-soak"
CERT_TTL = 120  # seconds: a rotation per node identity about every minute
SAMPLE_EVERY = 10.0
FAULT_EVERY = 60.0
OBSERVED = "n2"  # never faulted: its processes carry the whole run
BASELINE = (2.0, 5.0)  # minutes
USS_RATIO, USS_MIB, FDS = 1.15, 16.0, 16
CHURN_FILE = "soak-churn.yaml"
HOST = f"s2.{NAMESPACE}.svc.cluster.local"
CHURN_DOCS = [
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "soak", "namespace": NAMESPACE},
        "spec": {
            "hosts": [HOST],
            "http": [{"route": [{"destination": {"host": HOST}}], "timeout": "10s"}],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "soak", "namespace": NAMESPACE},
        "spec": {
            "host": HOST,
            "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 64}}},
        },
    },
]


def _processes(tb: Testbed, node: str) -> dict[str, int | None]:
    agent = tb.daemon(node, daemons.AGENT)
    envoy = faults.envoy_pid(tb, node)
    return {"agent": agent.pid, "envoy": envoy[0] if envoy else None}


def _usage(pid: int | None) -> dict[str, float] | None:
    """Memory (MiB: RSS, PSS, and USS, the pages only PID has) and open file descriptors of
    PID; None when it is gone. USS is what the bound reads: PSS moves when another process
    sharing Envoy's binary (n1's) dies or starts, USS only with what PID itself holds."""
    if pid is None:
        return None
    try:
        kib = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss", "Private_Clean", "Private_Dirty"):
                kib[key] = int(rest.split()[0])
        fds = float(len(os.listdir(f"/proc/{pid}/fd")))
        return {
            "rss": kib["Rss"] / 1024,
            "pss": kib["Pss"] / 1024,
            "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024,
            "fds": fds,
        }
    except (OSError, ValueError, KeyError):
        return None  # it exited between the two reads


class Sampler(threading.Thread):
    """Samples every node's agent and Envoy until stopped."""

    def __init__(self, tb: Testbed) -> None:
        super().__init__(daemon=True)
        self.tb = tb
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        while not self.halt.is_set():
            sample: dict[str, Any] = {"t": round(time.time() - self.started_at, 1)}
            for node in ("n1", OBSERVED):
                with contextlib.suppress(Exception):  # a daemon being restarted
                    for name, pid in _processes(self.tb, node).items():
                        sample[f"{node}/{name}"] = _usage(pid)
            self.samples.append(sample)
            self.halt.wait(SAMPLE_EVERY)


def _churn_config(tb: Testbed, on: bool) -> faults.Window:
    start = time.time()
    path = layout.cluster_dir(tb.name) / CHURN_FILE
    if on:
        aside = path.with_suffix(".tmp")
        aside.write_text(yaml.safe_dump_all(CHURN_DOCS))
        aside.replace(path)
    else:
        path.unlink(missing_ok=True)
    what = "VirtualService and DestinationRule for s2 " + ("applied" if on else "removed")
    return faults.Window(what, start, time.time())


def _churn_pod(tb: Testbed, on: bool) -> faults.Window:
    template = next(p for p in tb.topology.pods if p.name == "c2")  # a client pod of n2
    pod = dataclasses.replace(template, name="soak-churn", labels={"app": "soak-churn"})
    start = time.time()
    if on:
        tb.add_pod(pod)
    else:
        problems = tb.remove_pod(pod)
        if problems:
            raise RuntimeError(f"removing {pod.key}: {problems}")
    what = f"pod {pod.key} {'created' if on else 'deleted'} on n2"
    return faults.Window(what, start, time.time())


def _fault(tb: Testbed, minute: int) -> faults.Window:
    """The change of MINUTE (the four kinds in turn; churn alternates on and off)."""
    kind, turn = minute % 4, minute // 4
    if kind == 0:
        return faults.kill_agent(tb, "n1")
    if kind == 1:
        return faults.kill_envoy(tb, "n1")
    if kind == 2:
        return _churn_config(tb, on=turn % 2 == 0)
    return _churn_pod(tb, on=turn % 2 == 0)


def _series(samples: list[dict[str, Any]], key: str, field: str) -> list[tuple[float, float]]:
    return [(s["t"], s[key][field]) for s in samples if s.get(key)]


def _median_between(points: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    values = [v for t, v in points if lo <= t < hi]
    return statistics.median(values) if values else None


def bounds(samples: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    """The bound on each of OBSERVED's processes: baseline and end medians, and whether held."""
    found: list[dict[str, Any]] = []
    for name in ("agent", "envoy"):
        key = f"{OBSERVED}/{name}"
        for field in ("uss", "fds"):
            points = _series(samples, key, field)
            base = _median_between(points, BASELINE[0] * 60, BASELINE[1] * 60)
            end = _median_between(points, seconds - 180, seconds + 60)
            if base is None or end is None:
                found.append({"process": key, "what": field, "held": False, "why": "no samples"})
                continue
            allowed = base * USS_RATIO + USS_MIB if field == "uss" else base + FDS
            found.append(
                {
                    "process": key,
                    "what": field,
                    "baseline": round(base, 1),
                    "end": round(end, 1),
                    "allowed": round(allowed, 1),
                    "held": end <= allowed,
                }
            )
    return found


def plot(samples: list[dict[str, Any]], windows: list[faults.Window], t0: float, out: Path) -> None:
    fig = new_figure("Soak: memory and file descriptors of each node's agent and Envoy", 10, 6)
    uss, fds = fig.subplots(2, 1, sharex=True)
    for key in ("n1/agent", "n1/envoy", f"{OBSERVED}/agent", f"{OBSERVED}/envoy"):
        style = "-" if key.startswith(OBSERVED) else ":"
        for axis, field in ((uss, "uss"), (fds, "fds")):
            points = _series(samples, key, field)
            if points:
                axis.plot([t / 60 for t, _ in points], [v for _, v in points], style, label=key)
    for w in windows:
        for axis in (uss, fds):
            axis.axvline((w.start - t0) / 60, color="grey", alpha=0.15, linewidth=1)
    uss.set_ylabel("USS: private memory (MiB)")
    fds.set_ylabel("open file descriptors")
    fds.set_xlabel("minutes (grey: a fault or change; dotted: n1, restarted by the faults)")
    uss.legend(loc="upper left", fontsize="small")
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the soak builds a testbed (network namespaces): run it as root", file=sys.stderr)
        return 2
    if args.minutes < BASELINE[1] + 3:
        parser.error(f"--minutes: at least {BASELINE[1] + 3:g} (a baseline and an end to compare)")
    seconds = args.minutes * 60
    down(TESTBED)  # a crashed earlier run's leftovers
    text = topology(TESTBED) + f"certTTL: {CERT_TTL}\n"
    tb = Testbed.up(loads_topology(text, "soak"), text, "soak")
    windows: list[faults.Window] = []
    try:
        apply_strict(tb)
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            load = Load(tb, Path(scratch), "soak", seconds)
            try:
                load.flowing()
                sampler = Sampler(tb)
                sampler.start()
                t0 = sampler.started_at
                minute = 0
                while time.time() - t0 < seconds - FAULT_EVERY / 2:
                    time.sleep(max(0.0, t0 + (minute + 1) * FAULT_EVERY - time.time()))
                    if time.time() - t0 >= seconds - FAULT_EVERY / 2:
                        break
                    print(f"soak: minute {minute + 1}", flush=True)
                    windows.append(load.recovered(_fault(tb, minute), 2.0))
                    minute += 1
                time.sleep(max(0.0, t0 + seconds - time.time()))
                sampler.halt.set()
                sampler.join(timeout=SAMPLE_EVERY + 5)
            finally:
                figures = load.stop()
                failed = [r for r in load.requests() if not r["ok"]]
    finally:
        down(TESTBED)
    # A failure belongs to a window from a request's timeout before it (one in flight when the
    # fault came) until a few seconds after the load flowed again.
    grace = 6.0
    outside = [
        {"t": round(r["t"] - t0, 2), **{k: r[k] for k in ("client", "proto", "error")}}
        for r in failed
        if not any(
            w.start - TIMEOUT <= r["t"] <= max(w.end, w.traffic_end) + grace for w in windows
        )
    ]
    held = bounds(sampler.samples, seconds)
    ok = (
        all(b["held"] for b in held)
        and figures.bypassed == 0
        and figures.plaintext_frames == 0
        and figures.control_frames > 0
        and not outside
    )
    doc = {
        "scenario": "soak",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "params": {
            "minutes": args.minutes,
            "cert_ttl_seconds": CERT_TTL,
            "fault_every_seconds": FAULT_EVERY,
            "sample_every_seconds": SAMPLE_EVERY,
            "clients": sorted(CLIENTS),
            "bound": f"{OBSERVED}'s agent and Envoy: median of the last 3 minutes <= median of"
            f" minutes {BASELINE[0]:g}-{BASELINE[1]:g} x {USS_RATIO} + {USS_MIB:g} MiB (USS),"
            f" + {FDS} (file descriptors)",
        },
        "ok": ok,
        "bounds": held,
        "figures": figures.as_json(),
        "failed_outside_windows": outside,
        "windows": [
            {
                "what": w.what,
                "start": round(w.start - t0, 1),
                "seconds": round(w.seconds, 1),
                "outage_seconds": round(w.outage_seconds, 1),
            }
            for w in windows
        ],
        "samples": sampler.samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(sampler.samples, windows, t0, args.out / "soak.png")
    for b in held:
        shown = {k: v for k, v in b.items() if k != "process"}
        print(f"soak: {b['process']} {shown}")
    print(
        f"soak: sent {figures.sent}, failed {figures.failed} ({len(outside)} outside the"
        f" {len(windows)} windows), bypassed {figures.bypassed}, plaintext"
        f" {figures.plaintext_frames}: {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
