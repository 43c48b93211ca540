"""Scenario 6, identity: certificates issued per second, and SDS push time on rotation.

(a) Issuance, in process, through the agent's own path: an ``IdentityManager`` over a
``PluginCA`` loaded from Istio plug-in cacerts (root + intermediate, as the testbed makes them)
issues one certificate per new local identity: a fresh workload key (EC P-256, or RSA 2048 as
Istio's default) and the CA's signature. Also the signature alone (keys made beforehand), which
is what a CA serving CSRs (istiod) spends per certificate.

(b) Rotation, on a real testbed: one node, its agent and real Envoy, certificates of ``certTTL``
seconds (renewed at about half life). For each rotation of the mesh pod's identity:
- *issued*: the agent logs the new serial (its log line's time);
- *ACKed*: the agent's xDS state shows Envoy ACKed a newer SDS version (polled over the agent's
  socket, ``nodeagent proxy-status``'s source);
- *served*: a client outside the mesh, in another pod, handshakes TLS with the mesh pod in a loop
  and first sees the new serial on the wire.
The agent's own ``nodeagent_xds_push_seconds{type="SDS"}`` (snapshot set -> ACK) is reported
beside it as a cross-check.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.common import Run, new_figure, save_figure, summary, table, write_result
from bench.podstart import contention
from nodeagent.cni import wire
from nodeagent.identity.ca import PluginCA, create_plugin_cacerts
from nodeagent.identity.certs import KeyType
from nodeagent.identity.manager import IdentityManager
from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

SCENARIO = "identity"
TRUST_DOMAIN = "cluster.local"
KEY_TYPES: tuple[KeyType, ...] = ("EC", "RSA")
KEY_LABELS = {"EC": "EC P-256", "RSA": "RSA 2048"}
TESTBED = "bid-rot"
NODE = "n1"
CERT_TTL = 10  # seconds: the testbed's minimum; renewed every ~4.5-5 s
SERVER_PORT = 8080
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/mesh/sa/server"
PROBE = Path(__file__).with_name("serial_probe.py")
PROBE_INTERVAL = 0.02  # seconds between handshakes: the "served" figure's resolution
ACK_POLL = 0.01  # seconds between looks at the agent's xDS state
ISSUED = re.compile(r"^certificate for (\S+) issued: serial ([0-9a-f]+),")

TOPOLOGY = f"""
name: {TESTBED}
certTTL: {CERT_TTL}
nodes: [{{name: {NODE}}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
  - {{name: legacy}}
pods:
  - name: server
    namespace: mesh
    node: {NODE}
    serviceAccount: server
    labels: {{app: server}}
    workload: {{type: fake-service, port: {SERVER_PORT}}}
  - {{name: client, namespace: legacy, node: {NODE}}}
"""


# -- (a) issuance ---------------------------------------------------------------------------------


def _plugin_ca() -> PluginCA:
    with tempfile.TemporaryDirectory(prefix="bid-") as folder:
        create_plugin_cacerts(Path(folder), TRUST_DOMAIN, intermediate=True)
        return PluginCA.load(Path(folder))


def issue_rate(ca: PluginCA, key_type: KeyType, count: int) -> float:
    """Certificates per second the agent's IdentityManager issues for COUNT new identities."""
    manager = IdentityManager(ca, TRUST_DOMAIN, ttl=timedelta(hours=24), key_type=key_type)
    identities = [("bench", f"sa-{i}") for i in range(count)]
    started = time.perf_counter()
    manager.set_local_identities(identities)  # schedules them; the renewal loop's pass issues
    asyncio.run(manager.renew_due())
    elapsed = time.perf_counter() - started
    if len(manager.certs()) != count:
        raise RuntimeError(f"{key_type}: {len(manager.certs())} of {count} certificates issued")
    return count / elapsed


def sign_rate(ca: PluginCA, key_type: KeyType, count: int) -> float:
    """Certificates per second the CA signs when the keys exist already (CSR-style)."""
    keys = [
        ec.generate_private_key(ec.SECP256R1()).public_key()
        if key_type == "EC"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        for _ in range(count)
    ]
    started = time.perf_counter()
    for i, key in enumerate(keys):
        ca.sign(key, f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/sa-{i}", timedelta(hours=24))
    return count / (time.perf_counter() - started)


# -- (b) rotation ---------------------------------------------------------------------------------


class AckWatch(threading.Thread):
    """Polls the agent's xDS state; records when Envoy's ACKed SDS version changes."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(daemon=True)
        self.socket_path = str(socket_path)
        self.changes: list[tuple[float, str]] = []  # (Unix time seen, SDS version ACKed)
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            try:
                answer = wire.request(self.socket_path, {"command": "PROXY_STATUS"}, 2)
                seen = time.time()
                acked = str(answer["proxy"]["types"]["SDS"]["version_acked"])
            except (OSError, wire.ProtocolError, KeyError, TypeError):
                self.errors += 1
                acked = None
            if acked is not None and acked != last:
                self.changes.append((seen, acked))
                last = acked
            self.stop.wait(ACK_POLL)


def _issued(log_path: Path, identity: str) -> list[tuple[float, str]]:
    """(Unix time, serial hex) of every certificate the agent logged for IDENTITY."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        match = ISSUED.match(str(entry.get("msg", "")))
        if match and match.group(1) == identity:
            when = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            out.append((when.timestamp(), match.group(2)))
    return out


def _sds_histogram(tb: Testbed) -> tuple[float, float]:
    """(sum, count) of the agent's nodeagent_xds_push_seconds{type="SDS"}."""
    proc = subprocess.run(
        netns.in_netns(
            layout.node_netns(tb.name, NODE),
            ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        ),
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    values = {}
    for line in proc.stdout.splitlines():
        for field in ("sum", "count"):
            if line.startswith(f'nodeagent_xds_push_seconds_{field}{{type="SDS"}}'):
                values[field] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def rotations(rotations_wanted: int) -> dict[str, Any]:
    """Measure ROTATIONS_WANTED rotations on a fresh testbed; always tears it down."""
    window = rotations_wanted * CERT_TTL * 0.6 + 8  # renewals come every ~0.45-0.5 TTL
    down(TESTBED)
    probe: subprocess.Popen[str] | None = None
    watch: AckWatch | None = None
    try:
        tb = Testbed.up(loads_topology(TOPOLOGY, SCENARIO), TOPOLOGY, SCENARIO)
        log_path = layout.logs_dir(tb.name) / f"{NODE}.agent.log"
        server_ip = tb.pod_ip("mesh/server")
        hist_before = _sds_histogram(tb)
        watch = AckWatch(layout.agent_socket(tb.name, NODE))
        watch.start()
        probe = subprocess.Popen(
            tb.exec_argv(
                "legacy/client",
                [
                    sys.executable,
                    str(PROBE),
                    server_ip,
                    str(SERVER_PORT),
                    str(window + 5),
                    str(PROBE_INTERVAL),
                ],
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        started = time.time()
        time.sleep(0.5)  # both observers running before the first rotation counted
        counted_from = time.time()
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            fresh = [s for t, s in _issued(log_path, SERVER_ID) if t > counted_from]
            if len(fresh) >= rotations_wanted:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the last rotation's push and its first handshakes
        probe.terminate()
        out, _ = probe.communicate(timeout=15)
        watch.stop.set()
        watch.join(timeout=5)
        hist_after = _sds_histogram(tb)
        issued = [(t, s) for t, s in _issued(log_path, SERVER_ID) if t > counted_from]
    finally:
        if watch is not None:
            watch.stop.set()
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait(timeout=5)
        down(TESTBED)

    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    seen = {entry["serial"]: entry["t"] for entry in lines if "serial" in entry}
    tail: dict[str, Any] = next((entry for entry in lines if entry.get("done")), {})
    if not issued:
        raise RuntimeError(f"no rotation within {window:.0f}s (certTTL {CERT_TTL}s)")
    per_rotation = []
    for t_issued, serial in issued[:rotations_wanted]:
        acked = next((t for t, _ in watch.changes if t >= t_issued), None)
        served = seen.get(serial)
        if acked is None or served is None:
            raise RuntimeError(
                f"rotation to serial {serial}: ACK seen {acked is not None}, "
                f"served seen {served is not None} (probe: {tail})"
            )
        per_rotation.append(
            {
                "serial": serial,
                "ack_ms": (acked - t_issued) * 1e3,
                "served_ms": (served - t_issued) * 1e3,
            }
        )
    count = hist_after[1] - hist_before[1]
    return {
        "rotations": per_rotation,
        "observed_seconds": round(time.time() - started, 1),
        "probe": {k: tail.get(k) for k in ("handshakes", "errors", "last_error")},
        "ack_poll_errors": watch.errors,
        "agent_sds_push_histogram": {
            "pushes": count,
            "mean_ms": (hist_after[0] - hist_before[0]) / count * 1e3 if count else None,
        },
    }


# -- the scenario ---------------------------------------------------------------------------------


def run(run: Run) -> None:
    counts: dict[KeyType, int] = {"EC": int(run.pick(200, 20)), "RSA": int(run.pick(40, 4))}
    repeats = int(run.pick(3, 1))
    rotations_wanted = int(run.pick(12, 2))

    load_at_start = contention()
    ca = _plugin_ca()
    issuance: dict[str, Any] = {}
    for key_type in KEY_TYPES:
        issued = [issue_rate(ca, key_type, counts[key_type]) for _ in range(repeats)]
        signed = [sign_rate(ca, key_type, counts[key_type]) for _ in range(repeats)]
        issuance[key_type] = {
            "issued_per_second": summary(issued),
            "signed_per_second": summary(signed),
        }
    rotation = rotations(rotations_wanted)
    ack = [r["ack_ms"] for r in rotation["rotations"]]
    served = [r["served_ms"] for r in rotation["rotations"]]
    results = {
        "issuance": issuance,
        "rotation": {
            "issued_to_ack_ms": summary(ack),
            "issued_to_served_ms": summary(served),
            **rotation,
        },
    }

    print(
        table(
            [
                "key type",
                "issued/s: new key + signature (median [min-max])",
                "signed/s: signature only",
                "certs per run",
            ],
            [
                [
                    KEY_LABELS[k],
                    _fmt(issuance[k]["issued_per_second"]),
                    _fmt(issuance[k]["signed_per_second"]),
                    counts[k],
                ]
                for k in KEY_TYPES
            ],
        )
    )
    hist = rotation["agent_sds_push_histogram"]
    print(
        table(
            ["rotation (EC P-256, certTTL 10 s)", "median ms", "min ms", "max ms", "rotations"],
            [
                ["issued -> Envoy ACKed SDS", *_row(results["rotation"]["issued_to_ack_ms"])],
                ["issued -> served on the wire", *_row(results["rotation"]["issued_to_served_ms"])],
                [
                    "agent histogram: snapshot -> ACK (mean)",
                    "-" if hist["mean_ms"] is None else round(hist["mean_ms"], 1),
                    "",
                    "",
                    int(hist["pushes"]),
                ],
            ],
        )
    )
    params = {
        "key_types": [KEY_LABELS[k] for k in KEY_TYPES],
        "certs_per_run": {KEY_LABELS[k]: counts[k] for k in KEY_TYPES},
        "repeats": repeats,
        "ca": "PluginCA over Istio plug-in cacerts (EC P-256 root + intermediate, as the testbed)",
        "issuance_path": "IdentityManager.set_local_identities + renew_due: one new identity per"
        " certificate, in process, up to 4 at once in worker threads (as the agent)",
        "cert_ttl_issuance": "24h",
        "rotation_cert_ttl_seconds": CERT_TTL,
        "rotation_key_type": "EC P-256 (the testbed agents' default)",
        "rotations": rotations_wanted,
        "rotation_topology": "1 node: mesh/server (fake-service :8080), legacy/client (no mesh)",
        "served_probe": f"TLS handshake from legacy/client to mesh/server:{SERVER_PORT} every "
        f"{PROBE_INTERVAL * 1e3:.0f} ms (resolution)",
        "ack_poll_ms": ACK_POLL * 1e3,
        "issued_time": "the agent's log line for the new serial (ms precision)",
        "machine_load_at_start": load_at_start,
        "machine_load_at_end": contention(),
    }
    write_result(run, SCENARIO, params, results)
    _plot(run, issuance, results["rotation"], counts, repeats)


def _fmt(s: dict[str, float | int]) -> str:
    if s["runs"] > 1:
        return f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]"
    return f"{s['median']:.0f}"


def _row(s: dict[str, float | int]) -> list[Any]:
    return [
        round(float(s["median"]), 1),
        round(float(s["min"]), 1),
        round(float(s["max"]), 1),
        s["runs"],
    ]


def _plot(
    run: Run,
    issuance: dict[str, Any],
    rotation: dict[str, Any],
    counts: dict[KeyType, int],
    repeats: int,
) -> None:
    fig = new_figure(
        "Identity: certificate issuance and SDS rotation (one node, real Envoy)", 11, 4.8
    )
    left, right = fig.subplots(1, 2)
    width = 0.38
    for i, (what, label, color) in enumerate(
        (
            ("issued_per_second", "new key + signature (agent path)", "#1f77b4"),
            ("signed_per_second", "signature only (key made beforehand)", "#aec7e8"),
        )
    ):
        xs = [j + (i - 0.5) * width for j in range(len(KEY_TYPES))]
        figs = [issuance[k][what] for k in KEY_TYPES]
        bars = left.bar(
            xs,
            [f["median"] for f in figs],
            width,
            yerr=[
                [f["median"] - f["min"] for f in figs],
                [f["max"] - f["median"] for f in figs],
            ],
            capsize=3,
            color=color,
            label=label,
        )
        left.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    left.set_xticks(
        range(len(KEY_TYPES)), [f"{KEY_LABELS[k]}\n({counts[k]} certs/run)" for k in KEY_TYPES]
    )
    left.set_yscale("log")
    top = max(
        issuance[k][w]["max"] for k in KEY_TYPES for w in ("issued_per_second", "signed_per_second")
    )
    left.set_ylim(top=top * 12)  # room for the legend above the bars
    left.set_ylabel("certificates per second (log scale)")
    left.set_title(f"Issuance, one thread (median of {repeats}, bars = min-max)")
    left.legend(fontsize=8, loc="upper right")
    left.grid(axis="y", alpha=0.3)

    series = (
        ("issued ->\nEnvoy ACKed SDS", "ack_ms", "issued_to_ack_ms", "#2ca02c"),
        ("issued ->\nserved on the wire", "served_ms", "issued_to_served_ms", "#d62728"),
    )
    for i, (_label, each, overall, color) in enumerate(series):
        values = [r[each] for r in rotation["rotations"]]
        right.scatter([i] * len(values), values, color=color, alpha=0.7)
        median = float(rotation[overall]["median"])
        right.hlines(median, i - 0.25, i + 0.25, color="black", linewidth=2)
        right.annotate(f"median {median:.0f} ms", (i + 0.27, median), fontsize=8, va="center")
    right.set_xticks([0, 1], [s[0] for s in series])
    right.set_xlim(-0.6, 1.9)
    right.set_ylim(bottom=0)
    right.set_ylabel("milliseconds after the new serial was issued")
    right.set_title(
        f"Rotation to Envoy: {len(rotation['rotations'])} rotations, certTTL {CERT_TTL} s"
    )
    right.grid(axis="y", alpha=0.3)
    hist = rotation["agent_sds_push_histogram"]["mean_ms"]
    right.text(
        0.02,
        0.02,
        f"dots: one rotation each; bar: median\nACK: seen polling the agent every "
        f"{ACK_POLL * 1e3:.0f} ms\nserved: TLS handshake from a non-mesh pod every "
        f"{PROBE_INTERVAL * 1e3:.0f} ms\nagent's own snapshot -> ACK, mean: "
        + ("n/a" if hist is None else f"{hist:.1f} ms"),
        transform=right.transAxes,
        fontsize=7,
        va="bottom",
    )
    save_figure(run, SCENARIO, fig)
