"""The load every case runs, and what it counts: clients, servers' logs, the wire.

The testbed (``topology()``): two nodes, a server and a client pod on each, all in namespace
``chaos`` (in the mesh, PeerAuthentication STRICT). Each client calls the server on the *other*
node (services ``s1``, ``s2``: HTTP port 8080, TCP port 9000), so every request crosses the
underlay between two node Envoys, mTLS. Three counts, from three independent witnesses:
- the clients (client.py): every request sent, and whether it failed;
- the servers (server.py, in their pod log): every request that reached the application, and
  whether it came through the node Envoy (delivered from inside the pod's netns; HTTP with the
  x-forwarded-client-cert only the node Envoy sets) or bypassed it;
- a capture on the underlay (sniff.py): frames carrying the requests' marker in clear.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chaos.faults import Window
from nodeagent.ports import MESH_MARK
from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed

HERE = Path(__file__).resolve().parent
PY = sys.executable
NAMESPACE = "chaos"
HTTP_PORT, TCP_PORT = 8080, 9000
# client pod -> (its node, the service it calls: the server on the other node)
CLIENTS = {"c1": ("n1", "s2"), "c2": ("n2", "s1")}
SERVERS = {"s1": "n1", "s2": "n2"}
RATE = 10.0  # requests a second, per client and protocol: 40 a second in all
SETTLE = 30.0  # bound on waiting for the load to flow (before a fault, and after it)


def topology(name: str, envoy_container: bool = False) -> str:
    lines = [
        f"name: {name}",
        "source: kubernetes",
        *(["envoyContainer: true"] if envoy_container else []),
        "nodes: [{name: n1}, {name: n2}]",
        f"namespaces: [{{name: {NAMESPACE}, labels: {{nodeagent.io/mesh: enabled}}}}]",
        "pods:",
    ]
    server = [PY, str(HERE / "server.py"), str(HTTP_PORT), str(TCP_PORT)]
    for pod, node in SERVERS.items():
        workload = {"type": "command", "port": HTTP_PORT, "command": server}
        spec = {"name": pod, "namespace": NAMESPACE, "node": node, "serviceAccount": pod}
        lines.append(f"  - {json.dumps({**spec, 'labels': {'app': pod}, 'workload': workload})}")
    for pod, (node, _) in CLIENTS.items():
        spec = {"name": pod, "namespace": NAMESPACE, "node": node, "serviceAccount": pod}
        lines.append(f"  - {json.dumps({**spec, 'labels': {'app': pod}})}")
    lines.append("services:")
    for svc in SERVERS:
        ports = [{"name": "http", "port": HTTP_PORT}, {"name": "tcp", "port": TCP_PORT}]
        service: dict[str, Any] = {"name": svc, "namespace": NAMESPACE}
        service |= {"selector": {"app": svc}, "ports": ports}
        lines.append(f"  - {json.dumps(service)}")
    return "\n".join(lines) + "\n"


STRICT = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": NAMESPACE},
    "spec": {"mtls": {"mode": "STRICT"}},
}


def apply_strict(tb: Testbed) -> None:
    """STRICT mTLS for the namespace, as ``kubectl apply`` would (the agents watch it)."""
    import yaml

    path = layout.cluster_dir(tb.name) / "chaos-strict.yaml"
    aside = path.with_suffix(".tmp")
    aside.write_text(yaml.safe_dump(STRICT))
    aside.replace(path)


@dataclass
class Figures:
    """What one case counted."""

    sent: int = 0
    failed: int = 0
    failed_by_proto: dict[str, int] = field(default_factory=dict)
    failed_by_client: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # the failures' kinds
    reached_server: int = 0
    bypassed: int = 0
    wire_frames: int = 0
    plaintext_frames: int = 0
    control_frames: int = 0  # the capture's positive control: must be > 0
    # The servers' positive control: a request sent around the node Envoy on purpose (one per
    # server) that their check must count as a bypass, apart from the load's.
    control_bypassed: int = 0
    peers: dict[str, int] = field(default_factory=dict)  # who delivered the load's requests
    failed_times: list[float] = field(default_factory=list)
    sent_times: tuple[float, float] = (0.0, 0.0)

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("failed_times")
        out.pop("sent_times")
        return out


class Load:
    """The clients and the capture of one case, started together, stopped together."""

    def __init__(self, tb: Testbed, folder: Path, case: str, seconds: float) -> None:
        self.tb = tb
        self.folder = folder / case
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tag = f"{case}-{secrets.token_hex(3)}"
        self.marker = f"CHAOSMARK{secrets.token_hex(8)}"
        self.control = f"CHAOSCTRL{secrets.token_hex(8)}"
        self.stop_file = self.folder / "stop"
        self.stop_file.unlink(missing_ok=True)
        self.seconds = seconds + 2 * SETTLE  # the clients' own bound, past every wait
        self.log_offsets = {pod: _size(_pod_log(tb, pod)) for pod in SERVERS}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self._start_capture()
        self._bypass_control()
        for pod in CLIENTS:
            self.start_client(pod)

    def start_client(self, pod: str) -> None:
        """POD's client (again, after its pod was re-created: its requests append to the same
        file)."""
        svc = CLIENTS[pod][1]
        argv = [PY, str(HERE / "client.py"), f"{svc}.{NAMESPACE}", str(HTTP_PORT), str(TCP_PORT)]
        argv += [self.tag, str(RATE), str(self.seconds), self.marker, str(self.out(pod))]
        argv += [str(self.stop_file)]
        with open(self.folder / f"{pod}.stderr", "ab") as err:
            self.clients[pod] = subprocess.Popen(
                self.tb.exec_argv(f"{NAMESPACE}/{pod}", argv), stdout=subprocess.DEVNULL, stderr=err
            )

    def lose_client(self, pod: str) -> None:
        """POD's client dies with its pod (SIGKILL)."""
        proc = self.clients.pop(pod)
        proc.kill()
        proc.wait(timeout=10)

    def _start_capture(self) -> None:
        out = self.folder / "wire.json"
        argv = [PY, str(HERE / "sniff.py"), self.marker, self.control, str(self.seconds)]
        argv += [str(out), str(self.stop_file)]
        self.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", layout.underlay_netns(self.tb.name), *argv],
                stdout=subprocess.DEVNULL,
                stderr=open(self.folder / "sniff.stderr", "wb"),  # noqa: SIM115 (the child's)
            )
        )
        ready = Path(f"{out}.ready")
        deadline = time.monotonic() + 10
        while not ready.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the underlay capture did not start: {self.folder}")
            time.sleep(0.05)
        # Positive control: one datagram in clear from node n1 to n2's underlay address, which
        # the capture must see (else a 0 for the marker would prove nothing).
        target = str(self.tb.topology.nodes[1].underlay_ip)
        probe = [PY, str(HERE / "probe.py"), "clear", target, self.control]
        node = layout.node_netns(self.tb.name, "n1")
        subprocess.run(netns.in_netns(node, probe), check=True, timeout=10)

    def _bypass_control(self) -> None:
        """In each server pod, one HTTP request to its own address from a socket carrying the
        mesh's bypass mark: capture skips it and it reaches the application without the node
        Envoy, as a bypass would; the server's check must say so."""
        for pod in SERVERS:
            ref = f"{NAMESPACE}/{pod}"
            probe = [PY, str(HERE / "probe.py"), "bypass", self.tb.pod_ip(ref), str(HTTP_PORT)]
            proc = self.tb.exec(ref, [*probe, self.control_tag, str(MESH_MARK)])
            if proc.returncode != 0:
                raise RuntimeError(f"the bypass control in {ref} failed: {proc.stderr[-500:]}")

    @property
    def control_tag(self) -> str:
        return f"{self.tag}-control"

    def _all(self) -> list[subprocess.Popen[bytes]]:
        return [*self.procs, *self.clients.values()]

    def out(self, pod: str) -> Path:
        return self.folder / f"{pod}.jsonl"

    def requests(self) -> list[dict[str, Any]]:
        found = []
        for pod in CLIENTS:
            with contextlib.suppress(FileNotFoundError):
                for line in self.out(pod).read_text().splitlines():
                    with contextlib.suppress(ValueError):  # the line being written
                        found.append({**json.loads(line), "client": pod})
        return found

    def flowing(self, seconds: float = 2.0) -> float:
        """Wait (bounded) until every client's last SECONDS of requests, both protocols, all
        succeeded; returns the wall time it did."""
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            now = time.time()
            recent = [r for r in self.requests() if r["t"] >= now - seconds - 1.0]
            streams = {(r["client"], r["proto"]) for r in recent}
            if len(streams) == 2 * len(CLIENTS) and all(r["ok"] for r in recent):
                first = min(r["t"] for r in recent)
                if now - first >= seconds:
                    return now
            for proc in self._all():
                if proc.poll() not in (None, 0):
                    raise RuntimeError(f"a load process ended early ({proc.args!r})")
            time.sleep(0.25)
        raise RuntimeError(f"the load did not flow without failures within {SETTLE:.0f}s")

    def recovered(self, window: Window, seconds: float) -> Window:
        """WINDOW, once the load flowed without failure for SECONDS again (bounded), with the
        last failed request sent since it began."""
        self.flowing(seconds)
        failed = [r["t"] for r in self.requests() if not r["ok"] and r["t"] >= window.start]
        return replace(window, traffic_end=max(failed, default=window.start))

    def stop(self) -> Figures:
        self.stop_file.touch()
        for proc in self._all():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return self.figures()

    def figures(self) -> Figures:
        fig = Figures()
        requests = self.requests()
        fig.sent = len(requests)
        failed = [r for r in requests if not r["ok"]]
        fig.failed = len(failed)
        fig.failed_by_proto = dict(Counter(r["proto"] for r in failed))
        fig.failed_by_client = dict(Counter(r["client"] for r in failed))
        fig.errors = dict(Counter(_kind(r["error"]) for r in failed))
        fig.failed_times = sorted(r["t"] for r in failed)
        if requests:
            fig.sent_times = (min(r["t"] for r in requests), max(r["t"] for r in requests))
        peers: Counter[str] = Counter()
        for pod, offset in self.log_offsets.items():
            for line in _read_from(_pod_log(self.tb, pod), offset).splitlines():
                try:
                    seen = json.loads(line)
                except ValueError:
                    continue  # the workload's other output
                if not isinstance(seen, dict):
                    continue
                if seen.get("tag") == self.control_tag:
                    fig.control_bypassed += 0 if seen.get("via_mesh") else 1
                if seen.get("tag") != self.tag:
                    continue
                fig.reached_server += 1
                fig.bypassed += 0 if seen.get("via_mesh") else 1
                peers[_peer_kind(str(seen.get("peer")), str(seen.get("own")))] += 1
        fig.peers = dict(peers)
        wire = json.loads((self.folder / "wire.json").read_text())
        fig.wire_frames = wire["frames"]
        fig.plaintext_frames = wire["marker_frames"]
        fig.control_frames = wire["control_frames"]
        return fig

    def kill(self) -> None:
        """On the way out after a failure: every load process goes."""
        self.stop_file.touch()
        for proc in self._all():
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)


def _peer_kind(peer: str, own: str) -> str:
    if peer == own:
        return "the pod's own address"
    return "loopback" if peer.startswith("127.") else "another address"


def _kind(error: str) -> str:
    return error.split("(", 1)[0] if "(" in error else error[:40]


def _pod_log(tb: Testbed, pod: str) -> Path:
    return layout.logs_dir(tb.name) / f"{NAMESPACE}.{pod}.log"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
