"""Scenario 5: config convergence. A change in the source -> the client node's Envoy ACKs it ->
traffic follows it, with 100, 1000 and 5000 services in the cluster.

The testbed (2 nodes): a ``client`` pod on n1 calls service ``web`` (HTTP, port 8080) whose two
fake-service backends run on n2. N synthetic services (one HTTP port, two endpoints each) are
added to the cluster view in one file (``Testbed.publish_extra``); their addresses lie in the
upper halves of the testbed's service and cluster CIDRs, where no node or pod is, and nothing is
ever sent to them. They reach the agents only: the testbed's kube-proxy tables and /etc/hosts do
not carry them (captured traffic is routed by Envoy, not by those tables).

The change is one endpoint: backend ``web-2`` turns ready (added to web's EndpointSlice) or not
ready (removed), as its readiness probe would; the pod keeps running. Per change:

- ``ack_s``: from the source change (directory: just before the testbed writes the EndpointSlice
  file; kubernetes: the watch event, see below) to the moment the client node's Envoy accepted
  the EDS response carrying it (Envoy's own ``update_time`` statistic of web's cluster, 1 ms
  resolution; Envoy sends the ACK right after). It spans the directory source's poll (every
  0.2 s) and the changed file's parse, or the event's conversion, then the agent's translation,
  the push and Envoy applying it. Only one EDS response goes out per change.
- ``ack_polled_s``: the same start to the first answer of the n1 agent's PROXY_STATUS (polled
  every STATUS_POLL s over its socket) showing that ACK, SYNCED: the agent's view, an upper bound
  (the agent answers polls late while it translates).
- ``snapshot_to_ack_s``: the agent's own figure for that push, from its snapshot being set to the
  ACK (exact: the change's share of the nodeagent_xds_push_seconds histogram sum, EDS).
- ``traffic_s``: added endpoint: the same start to the completion of the first request from the
  client pod answered by it (a poller opens one new HTTP/1.1 connection every POLL s to web's
  virtual IP; with two endpoints about every other request reaches the new one, so this lags
  Envoy's update by up to about two poll periods). Removed endpoint: to the completion of the
  last request it answered (after which only the old one answered, for at least SETTLE s): when
  it stopped getting traffic, which can precede Envoy's update by about one poll period (the
  request after it may have gone to the old endpoint by plain load balancing); 0 if it answered
  no request sent after the change.

Cheap cost indicators: the xDS responses each change caused (types and counts, from the agent's
counters), and, once per size, the same translation offline in this process (parse the cluster
directory, translate for n1's pod, serialise and hash as the xDS cache does) with its bytes per
type: a state-of-the-world EDS response carries every load assignment, not just the changed one.

Each source runs on its own testbed, one after the other, with the same sizes and changes:

- ``directory``: the agents poll the cluster directory (every 0.2 s) and re-read the changed file.
- ``kubernetes``: the agents list and watch the testbed's API server stand-in
  (``nodeagent.testbed.apiserver``), which mirrors the cluster directory as a controller's writes
  reach a real API server: ADDED/MODIFIED/DELETED per changed object (the N synthetic services
  arrive as 2N+1 watch events). The source change is the watch event: a watch of the bench, in
  the client node's netns beside its agent's, stamps the arrival of web's EndpointSlice event
  (``source_event_s``: the file write to that event, the stand-in's own share) and the spans
  start there.

The second change is a VirtualService weight change (issue #15). Both backends ready, a
DestinationRule ``web`` (subsets v1 and v2 by the pods' ``version`` label, its own file) and a
VirtualService ``web`` (one http route, destinations subset v1 and v2, its own file) that starts
at weights 100/0; each repeat rewrites the VirtualService to 0/100, then back to 100/0. Per change:

- ``ack_s``: the source change (the VirtualService file written; kubernetes: the stand-in's watch
  event for it) to the moment the client node's Envoy reloaded the route table (the highest
  ``config_reload_time_ms`` of the RDS route tables that reloaded, 1 ms resolution).
- ``traffic_s``: to the completion of the first request answered by the new version;
  ``old_last_s``: to the completion of the last one the old version answered (after which only
  the new version answered, for at least SETTLE s).
- ``route_tables``: the RDS route tables Envoy reloaded (its ``config_reload`` counters): one,
  web's; ``pushes`` and ``sent_bytes``: by xDS type, as for the endpoint change (RDS only).
- ``snapshot_to_ack_s``: the agent's snapshot -> ACK of that RDS push.

Istio: https://istio.io/latest/docs/reference/config/networking/virtual-service/#HTTPRouteDestination
(weights, 0-100, summing to 100) and
https://istio.io/latest/docs/reference/config/networking/destination-rule/#Subset; the change is
Istio's "traffic shifting" task (https://istio.io/latest/docs/tasks/traffic-management/traffic-shifting/).
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

from bench.common import Run, new_figure, save_figure, summary, table, write_result
from nodeagent.cni import wire
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, TestbedError, down
from nodeagent.testbed.topology import loads_topology
from nodeagent.translate import LocalPod, translate
from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot, check_consistent

SCENARIO = "convergence"
CLIENT, OLD, NEW = "bench/client", "bench/web-1", "bench/web-2"
CLIENT_NODE, BACKEND_NODE = "n1", "n2"
WEB_PORT = 8080
SYNTH_NAMESPACE = "synth"
POLL = 0.02  # traffic poller: one request every 20 ms
STATUS_POLL = 0.01  # PROXY_STATUS poll while waiting for the ACK
SETTLE = 0.5  # a removal has been followed once only the old endpoint answered this long
ACK_TIMEOUT = 180.0  # per change, source change -> ACK
TRAFFIC_TIMEOUT = 30.0  # per change, counted from the ACK
LOAD_TIMEOUT = 300.0  # loading N services, and any wait for the agents to go quiet
VERSIONS = {"v1": OLD, "v2": NEW}  # subset -> the pod its version label selects
VS_FILE, DR_FILE = "bench-virtualservice", "bench-destinationrule"  # extra files, one object each
GOAL = 1.5  # issue #10/#15: largest ÷ smallest cluster's convergence time, at most this

# Runs inside the client pod's netns: one new connection per request, one line per answer.
POLLER = r"""
import re, socket, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
req = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
pod_ip = re.compile(rb'"pod_ip": *"([0-9.]+)"')
nxt = time.monotonic()
while True:
    sent = time.monotonic()
    code, who = 0, "-"
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(req)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        code = int(data.split(b" ", 2)[1])
        m = pod_ip.search(data)
        who = m.group(1).decode() if m else "-"
    except Exception:
        pass
    print(f"{sent:.6f} {time.monotonic():.6f} {code} {who}", flush=True)
    nxt = max(nxt + interval, time.monotonic())
    time.sleep(max(0.0, nxt - time.monotonic()))
"""


# Runs in the client's node netns (where the agent's watch comes from): watches a collection
# (PATH) on the testbed's API server stand-in from its current resourceVersion, one line per event
# of the objects named NAME in NAMESPACE (with LABEL: whose LABEL is NAME), stamped on arrival.
WATCHER = r"""
import http.client, json, sys, time
host, port, path, namespace, name = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
label = sys.argv[6] if len(sys.argv) > 6 else ""
conn = http.client.HTTPConnection(host, port, timeout=30)
conn.request("GET", path + "?limit=1")
version = json.loads(conn.getresponse().read())["metadata"]["resourceVersion"]
conn.close()
conn = http.client.HTTPConnection(host, port, timeout=None)
conn.request("GET", f"{path}?watch=1&resourceVersion={version}&timeoutSeconds=86400")
print("watching", flush=True)
for line in conn.getresponse():
    mono, wall = time.monotonic(), time.time()
    event = json.loads(line)
    meta = event.get("object", {}).get("metadata", {})
    labels = meta.get("labels") or {}
    mine = (labels.get(label) if label else meta.get("name")) == name
    if meta.get("namespace") == namespace and mine:
        print(f"{mono:.6f} {wall:.6f} {event['type']} {meta.get('resourceVersion')}", flush=True)
"""
SOURCES = ("directory", "kubernetes")


def _topology(name: str, source: str) -> str:
    return f"""
name: {name}
source: {source}
nodes: [{{name: {CLIENT_NODE}}}, {{name: {BACKEND_NODE}}}]
namespaces:
  - {{name: bench, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: client, namespace: bench, node: {CLIENT_NODE}, serviceAccount: client,
     labels: {{app: client}}}}
  - {{name: web-1, namespace: bench, node: {BACKEND_NODE}, serviceAccount: web,
     labels: {{app: web, version: v1}}, workload: {{type: fake-service, port: {WEB_PORT}}}}}
  - {{name: web-2, namespace: bench, node: {BACKEND_NODE}, serviceAccount: web,
     labels: {{app: web, version: v2}}, workload: {{type: fake-service, port: {WEB_PORT}}}}}
services:
  - {{name: web, namespace: bench, selector: {{app: web}},
     ports: [{{name: http, port: {WEB_PORT}, targetPort: {WEB_PORT}}}]}}
"""


def synthetic_objects(tb: Testbed, count: int) -> list[dict[str, Any]]:
    """COUNT services (HTTP 8080, two ready endpoints each) and their EndpointSlices.

    Virtual IPs from the upper half of the service CIDR, endpoints from the upper half of the
    cluster CIDR: inside the testbed's own ranges, clear of every node's pod range.
    """
    net = tb.topology.network
    vips = net.service_cidr.network_address + net.service_cidr.num_addresses // 2
    eps = net.cluster_cidr.network_address + net.cluster_cidr.num_addresses // 2
    last_vip, last_ep = vips + count, eps + 2 * count
    if last_vip not in net.service_cidr or last_ep not in net.cluster_cidr:
        raise ValueError(f"{count} synthetic services do not fit the testbed's CIDRs")
    synth = ipaddress.IPv4Network(f"{eps}/{net.cluster_cidr.prefixlen + 1}")
    for node in tb.topology.nodes:
        if node.pod_cidr.overlaps(synth):
            raise ValueError(f"node {node.name}'s pods ({node.pod_cidr}) overlap {synth}")
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYNTH_NAMESPACE}}
    ]
    for i in range(count):
        name = f"svc-{i:05d}"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": SYNTH_NAMESPACE, "name": name},
                "spec": {
                    "clusterIP": str(vips + i),
                    "selector": {"app": name},
                    "ports": [
                        {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
                    ],
                },
            }
        )
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": SYNTH_NAMESPACE,
                    "name": f"{name}-synth",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": [str(eps + 2 * i + k)], "conditions": {"ready": True}}
                    for k in range(2)
                ],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        )
    return objects


# -- what the agents and Envoys say ---------------------------------------------------------------


def proxy_status(tb: Testbed, node: str) -> dict[str, Any]:
    answer = wire.request(
        str(layout.agent_socket(tb.name, node)), {"command": "PROXY_STATUS"}, LOAD_TIMEOUT
    )
    if not answer.get("ok"):
        raise TestbedError(f"node {node}: PROXY_STATUS failed: {answer}")
    status: dict[str, Any] = answer["proxy"]
    return status


def _synced(status: dict[str, Any]) -> bool:
    kinds = status.get("types", {})
    return {"CDS", "EDS", "LDS"} <= set(kinds) and all(
        t["state"] == "SYNCED" for t in kinds.values()
    )


def _in_node(tb: Testbed, node: str, url: str) -> str:
    proc = subprocess.run(
        netns.in_netns(layout.node_netns(tb.name, node), ["curl", "-sS", "--max-time", "30", url]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


_METRIC = re.compile(r'^(nodeagent_xds_\w+)\{type="(\w+)"\} (\S+)$', re.M)


def xds_metrics(tb: Testbed, node: str) -> dict[tuple[str, str], float]:
    """(metric, xDS type) -> value, of the node agent's xDS counters and histogram sums."""
    text = _in_node(tb, node, "http://127.0.0.1:15020/metrics")
    return {(m, t): float(v) for m, t, v in _METRIC.findall(text)}


def _admin(tb: Testbed, node: str, path: str) -> str:
    """GET PATH from the node Envoy's admin (its root-only UNIX socket)."""
    return subprocess.run(
        daemons.admin_curl(tb.name, node, path, 30),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def envoy_clusters(tb: Testbed, node: str) -> int:
    text = _admin(tb, node, "/stats?filter=^cluster_manager\\.active_clusters$")
    return int(text.split(":")[-1])


def wait_quiet(tb: Testbed, since: dict[str, str] | None = None) -> float:
    """Until every node's Envoy ACKed all of its agent's latest snapshot and no new snapshot came
    for 0.3 s (with SINCE, node -> version: a newer version than that first). Seconds it took."""
    start = time.monotonic()
    deadline = start + LOAD_TIMEOUT
    for node in (n.name for n in tb.topology.nodes):
        stable_since, last = 0.0, ""
        while True:
            status = proxy_status(tb, node)
            now = time.monotonic()
            newer = since is None or status["version"] != since.get(node)
            if newer and _synced(status) and status["version"] == last:
                if now - stable_since >= 0.3:
                    break
            else:
                stable_since, last = now, status["version"]
            if now > deadline:
                raise TimeoutError(
                    f"node {node}'s Envoy did not settle within {LOAD_TIMEOUT:.0f}s: {status}"
                )
            time.sleep(0.05)
    return time.monotonic() - start


# -- traffic --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() (one clock for every process of the machine)
    done: float
    code: int
    pod_ip: str


def _end(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Stop a helper process (terminate, then kill) and the thread reading its output."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    reader.join(5)


class TrafficPoller:
    """The client pod calling web every POLL seconds, for the whole run."""

    def __init__(self, tb: Testbed, vip: str) -> None:
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            tb.exec_argv(CLIENT, [sys.executable, "-c", POLLER, vip, str(WEB_PORT), str(POLL)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            sent, done, code, who = line.split()
            with self._lock:
                self.answers.append(Answer(float(sent), float(done), int(code), who))

    def since(self, start: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.sent >= start]

    def stop(self) -> None:
        _end(self._proc, self._reader)


@dataclass(frozen=True)
class WatchEvent:
    mono: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    type: str
    version: str


SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
VIRTUALSERVICES = "/apis/networking.istio.io/v1/virtualservices"


class ObjectWatch:
    """A watch on the API server stand-in, beside the client node's agent: when the stand-in
    sent each event of one object (source: kubernetes): web's EndpointSlice (by its service-name
    label) or the VirtualService web. The testbed's stand-in mirrors the cluster directory (polls
    it every 0.1 s and diffs it); this tells that share apart."""

    def __init__(self, tb: Testbed, collection: str, label: str = "") -> None:
        self.events: list[WatchEvent] = []
        self.what = f"{collection.rpartition('/')[2]} of web"
        self._lock = threading.Lock()
        self._watching = threading.Event()
        host, _, port = tb.apiserver_address.rpartition(":")
        argv = [sys.executable, "-c", WATCHER, host, port, collection, "bench", "web"]
        if label:
            argv.append(label)
        self._proc = subprocess.Popen(
            netns.in_netns(layout.node_netns(tb.name, CLIENT_NODE), argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._watching.wait(30):
            self.stop()
            raise TestbedError("the bench's watch on the API server stand-in did not start")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip() == "watching":
                self._watching.set()
                continue
            mono, wall, type_, version = line.split()
            with self._lock:
                self.events.append(WatchEvent(float(mono), float(wall), type_, version))

    def first_after(self, start: float, timeout: float) -> WatchEvent:
        """The first event of the object that arrived after START (monotonic), waiting."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = next((e for e in self.events if e.mono >= start), None)
            if found is not None:
                return found
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise TimeoutError(f"no watch event for the {self.what} within {timeout:.0f}s")
            time.sleep(POLL)

    def stop(self) -> None:
        _end(self._proc, self._reader)


def _wait_traffic(poller: TrafficPoller, start: float, old_ip: str) -> None:
    """Until the client gets answers from the old endpoint (bounded)."""
    deadline = time.monotonic() + TRAFFIC_TIMEOUT
    while not any(a.pod_ip == old_ip for a in poller.since(start)):
        if time.monotonic() > deadline:
            seen = poller.since(start)[-3:]
            raise TimeoutError(f"client gets no answer from {OLD} within 30s (last: {seen})")
        time.sleep(POLL)


def _followed(answers: list[Answer], ready: bool, new_ip: str) -> Answer | None:
    """Added: the first answer from the new endpoint. Removed: the last answer from it, once
    only the old endpoint answered for SETTLE s (and 5 requests) after it; None: not yet."""
    if ready:
        return next((a for a in answers if a.pod_ip == new_ip), None)
    last_new = max((i for i, a in enumerate(answers) if a.pod_ip == new_ip), default=-1)
    after = answers[last_new + 1 :]
    if len(after) < 5 or after[-1].sent - after[0].sent < SETTLE:
        return None
    # No answer from it since the change: its last answer came before; 0 s after the change.
    return answers[last_new] if last_new >= 0 else Answer(0.0, 0.0, 0, "")


def envoy_eds_update(tb: Testbed) -> float:
    """When (time.time()) the client node's Envoy last accepted an EDS update for web's cluster
    (its subscription statistic ``update_time``, milliseconds since the epoch)."""
    # Per-identity clusters report under their service's name (alt_stat_name, #12).
    cluster = f"outbound|{WEB_PORT}||web.bench.svc.cluster.local"
    pattern = "^cluster\\." + re.escape(cluster) + "\\.update_time$"
    text = _admin(tb, CLIENT_NODE, "/stats?filter=" + urllib.parse.quote(pattern))
    return int(text.split(":")[-1]) / 1000.0


# -- one change -----------------------------------------------------------------------------------


def measure_change(
    tb: Testbed, poller: TrafficPoller, ready: bool, watch: ObjectWatch | None = None
) -> dict[str, Any]:
    """Turn web-2 ready (READY) or not, and time the client node's ACK and the traffic.

    Spans start at the source change: the EndpointSlice file written (directory source), or,
    with WATCH (Kubernetes source), the API server's watch event for it."""
    new_ip = tb.pod_ip(NEW)
    before = proxy_status(tb, CLIENT_NODE)
    if not _synced(before):
        raise RuntimeError(f"node {CLIENT_NODE} is not in sync before the change: {before}")
    eds_before = before["types"]["EDS"]["version_acked"]
    metrics_before = xds_metrics(tb, CLIENT_NODE)
    envoy_before = envoy_eds_update(tb)

    start_wall = time.time()
    start = time.monotonic()
    tb.set_pod_ready(NEW, ready)
    published = time.monotonic() - start

    asked = start
    while True:
        issued = time.monotonic()
        status = proxy_status(tb, CLIENT_NODE)
        now = time.monotonic()
        eds = status["types"].get("EDS", {})
        if eds.get("state") == "NACKED":
            raise RuntimeError(f"Envoy on {CLIENT_NODE} rejected EDS: {eds.get('last_nack')}")
        if eds.get("version_acked") != eds_before and eds.get("state") == "SYNCED":
            acked, resolution = now, now - asked
            break
        if now - start > ACK_TIMEOUT:
            raise TimeoutError(f"no EDS ACK on {CLIENT_NODE} within {ACK_TIMEOUT:.0f}s: {status}")
        asked = issued
        time.sleep(STATUS_POLL)

    # The source change: the file written, or the watch event the agents react to.
    origin, origin_wall = start, start_wall
    if watch is not None:
        event = watch.first_after(start, ACK_TIMEOUT)
        origin, origin_wall = event.mono, event.wall
    polled = acked - origin

    deadline = time.monotonic() + TRAFFIC_TIMEOUT
    while (hit := _followed(poller.since(start), ready, new_ip)) is None:
        if time.monotonic() > deadline:
            what = "reach the added" if ready else "leave the removed"
            raise TimeoutError(
                f"requests did not {what} endpoint within {TRAFFIC_TIMEOUT:.0f}s of the ACK"
            )
        time.sleep(POLL)
    traffic = max(0.0, hit.done - origin)

    wait_quiet(tb)  # both nodes done with this change before the next one
    metrics_after = xds_metrics(tb, CLIENT_NODE)
    envoy_after = envoy_eds_update(tb)
    if envoy_after <= envoy_before:
        raise RuntimeError(f"Envoy on {CLIENT_NODE} shows no EDS update for web after the change")
    pushes = {
        t: int(v - metrics_before.get((m, t), 0.0))
        for (m, t), v in metrics_after.items()
        if m == "nodeagent_xds_pushes_total" and v > metrics_before.get((m, t), 0.0)
    }
    sent_bytes = {
        t: int(v - metrics_before.get((m, t), 0.0))
        for (m, t), v in metrics_after.items()
        if m == "nodeagent_xds_sent_bytes_total" and v > metrics_before.get((m, t), 0.0)
    }
    key = ("nodeagent_xds_push_seconds_sum", "EDS")
    window = [a for a in poller.since(start) if a.sent <= max(hit.sent, start) + SETTLE]
    gaps = [b.sent - a.sent for a, b in itertools.pairwise(window)]
    return {
        "change": "add" if ready else "remove",
        "source_event_s": origin - start,
        "ack_s": envoy_after - origin_wall,
        "ack_polled_s": polled,
        "ack_polled_resolution_s": resolution,
        "traffic_s": traffic,
        "snapshot_to_ack_s": metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0),
        "publish_call_s": published,
        "snapshots": int(status["version"]) - int(before["version"]),
        "pushes": pushes,
        "sent_bytes": sent_bytes,
        "requests": len(window),
        "failed_requests": sum(1 for a in window if a.code != 200),
        "max_request_gap_s": max(gaps, default=0.0),
    }


# -- one VirtualService weight change -------------------------------------------------------------


def destination_rule() -> dict[str, Any]:
    """web's subsets v1 and v2, by the pods' version label (Istio's traffic-shifting task)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"namespace": "bench", "name": "web"},
        "spec": {
            "host": "web",
            "subsets": [{"name": v, "labels": {"version": v}} for v in VERSIONS],
        },
    }


def virtual_service(to: str) -> dict[str, Any]:
    """web's one http route: weight 100 to subset TO, 0 to the other (weights 0-100, summing to
    100: istio.io/latest/docs/reference/config/networking/virtual-service/#HTTPRouteDestination)."""
    route = [
        {"destination": {"host": "web", "subset": v}, "weight": 100 if v == to else 0}
        for v in VERSIONS
    ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"namespace": "bench", "name": "web"},
        "spec": {"hosts": ["web"], "http": [{"route": route}]},
    }


# RDS statistics are rooted at http.<stat_prefix>.rds.<route_config_name>. (Envoy's
# envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/rds; ALL_RDS_STATS in
# source/common/rds/rds_route_config_subscription.h): config_reload counts reloads that changed
# the table, config_reload_time_ms is when the last one happened.
_RDS_STAT = re.compile(
    r"^http\..*?\.rds\.(.+)\.(config_reload|config_reload_time_ms): (\d+)$", re.M
)


@dataclass(frozen=True)
class RouteTable:
    reloads: int
    reloaded_at: float  # time.time() of the last reload (1 ms resolution)


def envoy_route_tables(tb: Testbed) -> dict[str, RouteTable]:
    """Every RDS route table of the client node's Envoy: name -> its reloads."""
    pattern = "\\.rds\\..+\\.config_reload(_time_ms)?$"
    text = _admin(tb, CLIENT_NODE, "/stats?filter=" + urllib.parse.quote(pattern))
    found: dict[str, dict[str, int]] = {}
    for name, stat, value in _RDS_STAT.findall(text):
        found.setdefault(name, {})[stat] = int(value)
    return {
        name: RouteTable(s.get("config_reload", 0), s.get("config_reload_time_ms", 0) / 1000.0)
        for name, s in found.items()
    }


def _only(answers: list[Answer], ip: str) -> bool:
    """IP alone answered ANSWERS, at least 5 of them over at least SETTLE s."""
    return (
        len(answers) >= 5
        and answers[-1].sent - answers[0].sent >= SETTLE
        and all(a.pod_ip == ip for a in answers)
    )


def _wait_for(condition: Callable[[], object], what: str) -> None:
    """Until CONDITION() is truthy, at most TRAFFIC_TIMEOUT s."""
    deadline = time.monotonic() + TRAFFIC_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client's requests: no {what} within {TRAFFIC_TIMEOUT:.0f}s")
        time.sleep(POLL)


def _shifted(answers: list[Answer], new_ip: str, old_ip: str) -> tuple[Answer, Answer] | None:
    """The first answer from the new version, and the last from the old one once only the new one
    answered for SETTLE s (and 5 requests) after it (its sent time 0: none since the change)."""
    first_new = next((a for a in answers if a.pod_ip == new_ip), None)
    last_old = max((i for i, a in enumerate(answers) if a.pod_ip == old_ip), default=-1)
    if first_new is None or not _only(answers[last_old + 1 :], new_ip):
        return None
    return first_new, answers[last_old] if last_old >= 0 else Answer(0.0, 0.0, 0, "")


def measure_route_change(
    tb: Testbed, poller: TrafficPoller, to: str, watch: ObjectWatch | None = None
) -> dict[str, Any]:
    """Rewrite web's VirtualService to send everything to subset TO, and time the client node's
    route table reload and the traffic moving to that version.

    Spans start at the source change: the VirtualService file written (directory source), or,
    with WATCH (Kubernetes source), the API server's watch event for it."""
    new_ip = tb.pod_ip(VERSIONS[to])
    old_ip = next(tb.pod_ip(pod) for v, pod in VERSIONS.items() if v != to)
    before = proxy_status(tb, CLIENT_NODE)
    if not _synced(before) or "RDS" not in before["types"]:
        raise RuntimeError(f"node {CLIENT_NODE} is not in sync before the change: {before}")
    rds_before = before["types"]["RDS"]["version_acked"]
    metrics_before = xds_metrics(tb, CLIENT_NODE)
    tables_before = envoy_route_tables(tb)

    start_wall = time.time()
    start = time.monotonic()
    tb.publish_extra(VS_FILE, [virtual_service(to)])

    while True:
        status = proxy_status(tb, CLIENT_NODE)
        now = time.monotonic()
        rds = status["types"].get("RDS", {})
        if rds.get("state") == "NACKED":
            raise RuntimeError(f"Envoy on {CLIENT_NODE} rejected RDS: {rds.get('last_nack')}")
        if rds.get("version_acked") != rds_before and rds.get("state") == "SYNCED":
            break
        if now - start > ACK_TIMEOUT:
            raise TimeoutError(f"no RDS ACK on {CLIENT_NODE} within {ACK_TIMEOUT:.0f}s: {status}")
        time.sleep(STATUS_POLL)

    origin, origin_wall = start, start_wall
    if watch is not None:
        event = watch.first_after(start, ACK_TIMEOUT)
        origin, origin_wall = event.mono, event.wall
    polled = now - origin

    deadline = time.monotonic() + TRAFFIC_TIMEOUT
    while (hit := _shifted(poller.since(start), new_ip, old_ip)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"requests did not move to {to} ({new_ip}) within {TRAFFIC_TIMEOUT:.0f}s of the ACK"
            )
        time.sleep(POLL)
    first_new, last_old = hit

    wait_quiet(tb)  # both nodes done with this change before the next one
    metrics_after = xds_metrics(tb, CLIENT_NODE)
    tables_after = envoy_route_tables(tb)
    reloaded = sorted(
        name
        for name, table in tables_after.items()
        if name not in tables_before or table.reloads != tables_before[name].reloads
    )
    if not reloaded:
        raise RuntimeError(f"Envoy on {CLIENT_NODE} reloaded no route table after the change")

    def grown(metric: str) -> dict[str, int]:
        return {
            t: int(v - metrics_before.get((m, t), 0.0))
            for (m, t), v in metrics_after.items()
            if m == metric and v > metrics_before.get((m, t), 0.0)
        }

    key = ("nodeagent_xds_push_seconds_sum", "RDS")
    window = [a for a in poller.since(start) if a.sent <= first_new.sent + SETTLE]
    return {
        "change": f"to-{to}",
        "source_event_s": origin - start,
        "ack_s": max(tables_after[name].reloaded_at for name in reloaded) - origin_wall,
        "ack_polled_s": polled,
        "traffic_s": max(0.0, first_new.done - origin),
        "old_last_s": max(0.0, last_old.done - origin),
        "snapshot_to_ack_s": metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0),
        "snapshots": int(status["version"]) - int(before["version"]),
        "route_tables": reloaded,
        "route_tables_total": len(tables_after),
        "pushes": grown("nodeagent_xds_pushes_total"),
        "sent_bytes": grown("nodeagent_xds_sent_bytes_total"),
        "requests": len(window),
        "failed_requests": sum(1 for a in window if a.code != 200),
    }


def measure_route_changes(
    tb: Testbed, poller: TrafficPoller, times: int, source: str, n: int
) -> list[dict[str, Any]]:
    """Both backends ready, web's DestinationRule and VirtualService (all to v1) in place; TIMES
    repeats of: all to v2, all back to v1. Then back to the endpoint changes' start (no
    VirtualService or DestinationRule, web-2 not ready)."""
    # Each step waits for what the client sees: web-2 answering, then v1 alone answering.
    started = time.monotonic()
    tb.set_pod_ready(NEW, True)
    _wait_for(lambda: _followed(poller.since(started), True, tb.pod_ip(NEW)), f"{NEW} answering")
    tb.publish_extra(DR_FILE, [destination_rule()])
    tb.publish_extra(VS_FILE, [virtual_service("v1")])
    _wait_for(lambda: _only(poller.since(time.monotonic() - 2 * SETTLE), tb.pod_ip(OLD)), "v1 only")
    wait_quiet(tb)
    watch = ObjectWatch(tb, VIRTUALSERVICES) if source == "kubernetes" else None
    changes = []
    try:
        for i in range(times):
            for to in ("v2", "v1"):
                change = measure_route_change(tb, poller, to, watch)
                change["repeat"] = i
                changes.append(change)
                print(
                    f"  {source}: {n} services, VirtualService {change['change']}: route table "
                    f"reload {change['ack_s']:.3f}s, traffic {change['traffic_s']:.3f}s, "
                    f"tables {len(change['route_tables'])}, pushes {change['pushes']}",
                    flush=True,
                )
    finally:
        if watch is not None:
            watch.stop()
    tb.publish_extra(VS_FILE, [])
    tb.publish_extra(DR_FILE, [])
    tb.set_pod_ready(NEW, False)
    wait_quiet(tb)
    return changes


# -- offline translation cost ---------------------------------------------------------------------


def offline_cost(tb: Testbed) -> dict[str, Any]:
    """What one push of n1's agent costs, redone in this process on the same cluster directory
    while the agents are idle: parse, translate, serialise + hash (as the xDS cache does)."""
    store = MeshStore()
    started = time.perf_counter()
    DirectorySource(layout.cluster_dir(tb.name), store).scan()
    parsed = time.perf_counter()
    local = [LocalPod(store.pods[CLIENT], str(netns.netns_path(tb.pod_netns(CLIENT))))]
    resources = translate(store, local)
    translated = time.perf_counter()
    snapshot = Snapshot("offline", resources)
    check_consistent(snapshot)
    size: dict[str, int] = {}
    count: dict[str, int] = {}
    for type_url, by_name in resources.items():
        raw = [m.SerializeToString(deterministic=True) for m in by_name.values()]
        for r in raw:
            hashlib.sha256(r).hexdigest()
        size[types.short_name(type_url)] = sum(len(r) for r in raw)
        count[types.short_name(type_url)] = len(raw)
    encoded = time.perf_counter()
    return {
        "parse_s": parsed - started,
        "translate_s": translated - parsed,
        "encode_hash_s": encoded - translated,
        "resources": count,
        "bytes": size,
    }


# -- the scenario ---------------------------------------------------------------------------------


SPANS = ("source_event_s", "ack_s", "ack_polled_s", "traffic_s", "snapshot_to_ack_s")
ROUTE_SPANS = (*SPANS, "old_last_s")


def _measure(
    tb: Testbed, repeats: dict[int, int], route_repeats: int, source: str
) -> dict[str, Any]:
    vip = str(next(s.cluster_ip for s in tb.topology.services if s.name == "web"))
    old_ip = tb.pod_ip(OLD)
    poller = TrafficPoller(tb, vip)
    watch: ObjectWatch | None = None
    try:
        tb.set_pod_ready(NEW, False)  # start from one endpoint
        wait_quiet(tb)
        _wait_traffic(poller, time.monotonic(), old_ip)
        if source == "kubernetes":
            watch = ObjectWatch(tb, SLICES, "kubernetes.io/service-name")
        per_size = []
        for n, times in repeats.items():
            versions = {
                node.name: proxy_status(tb, node.name)["version"] for node in tb.topology.nodes
            }
            started = time.monotonic()
            tb.publish_extra("bench-services", synthetic_objects(tb, n))
            wait_quiet(tb, since=versions)
            load = time.monotonic() - started
            clusters = {node.name: envoy_clusters(tb, node.name) for node in tb.topology.nodes}
            print(
                f"  {source}: {n} services loaded in {load:.1f}s (Envoy clusters {clusters})",
                flush=True,
            )
            changes = []
            for i in range(times):
                for ready in (True, False):
                    change = measure_change(tb, poller, ready, watch)
                    change["repeat"] = i
                    changes.append(change)
                    print(
                        f"  {source}: {n} services, {change['change']:6}: ACK "
                        f"{change['ack_s']:.3f}s, traffic {change['traffic_s']:.3f}s, source event"
                        f" {change['source_event_s']:.3f}s, pushes {change['pushes']}",
                        flush=True,
                    )
            entry: dict[str, Any] = {
                "services": n,
                "load_s": load,
                "envoy_active_clusters": clusters,
                "changes": changes,
            }
            if source == "directory":  # the translation is the same whatever the source
                entry["offline"] = offline_cost(tb)
            for kind in ("add", "remove"):
                these = [c for c in changes if c["change"] == kind]
                entry[kind] = {k: summary(c[k] for c in these) for k in SPANS}
                entry[kind]["failed_requests"] = sum(c["failed_requests"] for c in these)
                sent_types = sorted({t for c in these for t in c["sent_bytes"]})
                entry[kind]["sent_bytes"] = {
                    t: summary(c["sent_bytes"].get(t, 0) for c in these) for t in sent_types
                }
            routes = measure_route_changes(tb, poller, route_repeats, source, n)
            entry["virtualservice"] = {"changes": routes}
            for kind in ("to-v2", "to-v1"):
                these = [c for c in routes if c["change"] == kind]
                summed: dict[str, Any] = {k: summary(c[k] for c in these) for k in ROUTE_SPANS}
                summed["failed_requests"] = sum(c["failed_requests"] for c in these)
                sent_types = sorted({t for c in these for t in c["sent_bytes"]})
                summed["sent_bytes"] = {
                    t: summary(c["sent_bytes"].get(t, 0) for c in these) for t in sent_types
                }
                entry["virtualservice"][kind] = summed
            per_size.append(entry)
        return {"sizes": per_size}
    finally:
        if watch is not None:
            watch.stop()
        poller.stop()


def scaling(results: dict[str, Any], small: int, large: int) -> dict[str, Any]:
    """Per source and change: median at LARGE services ÷ median at SMALL, of the Envoy update
    (ack_s) and of the traffic following (traffic_s), against the issues' goal (≤ GOAL)."""
    out: dict[str, Any] = {"goal": GOAL, "services": [small, large], "sources": {}}
    for source, measured in results["sources"].items():
        by_size = {e["services"]: e for e in measured["sizes"]}
        per: dict[str, Any] = {}
        at_small = dict(_changes(by_size[small]))
        for label, at_large in _changes(by_size[large]):
            spans = {}
            for span in ("ack_s", "traffic_s"):
                big, little = at_large[span]["median"], at_small[label][span]["median"]
                spans[span] = {
                    "large_s": big,
                    "small_s": little,
                    # None: the small size read 0 (within Envoy's 1 ms resolution).
                    "ratio": big / little if little > 0 else None,
                }
            met = all(v["ratio"] is not None and v["ratio"] <= GOAL for v in spans.values())
            per[label] = {**spans, "met": met}
        out["sources"][source] = per
    return out


def _testbed_name(source: str, smoke: bool) -> str:
    return ("bcv" if source == "directory" else "bcvk") + ("-smoke" if smoke else "-full")


def run(run: Run) -> None:
    sizes: list[int] = run.pick([100, 1000, 5000], [10, 50])
    # 3 repeats at 5000 services: loading them takes ≈ 16 s per source; the whole run ≈ 5 min.
    repeats: dict[int, int] = dict(zip(sizes, run.pick([5, 5, 3], [1, 1]), strict=True))
    # A VirtualService change costs no reload of services: more of them, at every size, as
    # the Kubernetes source's few-ms figures carry a few ms of scheduling noise each.
    route_repeats: int = run.pick(11, 1)
    results: dict[str, Any] = {"sources": {}}
    topologies = {}
    for source in SOURCES:
        name = _testbed_name(source, run.smoke)
        text = _topology(name, source)
        topologies[source] = text.strip()
        down(name)  # a crashed earlier run's leftovers
        tb = Testbed.up(loads_topology(text, SCENARIO), text, SCENARIO)
        try:
            results["sources"][source] = _measure(tb, repeats, route_repeats, source)
        finally:
            problems = down(name)
            if problems:
                print(f"testbed {name} teardown left: {'; '.join(problems)}", file=sys.stderr)
    results["goal"] = scaling(results, sizes[0], sizes[-1])
    params = {
        "sizes": sizes,
        "sources": list(SOURCES),
        "repeats": {str(n): times for n, times in repeats.items()},
        "route_repeats": route_repeats,
        "changes_per_repeat": ["add (web-2 ready)", "remove (web-2 not ready)"],
        "route_changes_per_repeat": [
            "to-v2 (web's VirtualService: weights v1/v2 100/0 -> 0/100)",
            "to-v1 (0/100 -> 100/0)",
        ],
        "route_change": "after a size's endpoint changes: web-2 ready, DestinationRule web "
        "(subsets v1, v2 by label version) and VirtualService web (weights 100/0) each in its "
        "own file of the cluster directory, then the VirtualService file rewritten per change; "
        "removed again before the next size",
        "route_spans": {
            "ack_s": "the VirtualService file written (kubernetes: the stand-in's watch event "
            "for it) -> the client node's Envoy reloaded the route table (highest "
            "config_reload_time_ms of the RDS tables whose config_reload grew)",
            "traffic_s": "same start -> completion of the first request answered by the new "
            "version",
            "old_last_s": "same start -> completion of the last request answered by the old "
            "version (only the new one answered for settle_s after it; 0 if none after the "
            "change)",
            "route_tables": "the RDS route tables whose config_reload counter grew",
            "snapshot_to_ack_s": "the change's share of nodeagent_xds_push_seconds_sum, RDS",
        },
        "goal": f"largest ÷ smallest size, ratio of the medians, at most {GOAL} (issues #10, #15)",
        "topologies": topologies,
        "synthetic_services": (
            "namespace synth; each one HTTP port 8080 and two ready endpoints; VIPs from the "
            "upper half of the service CIDR, endpoints from the upper half of the cluster CIDR "
            "(no pod there; nothing is ever sent to them); one JSON file in the cluster "
            "directory (source kubernetes: served by the API server stand-in, one watch event "
            "per object); not in the testbed's kube-proxy tables or /etc/hosts"
        ),
        "traffic_poll_s": POLL,
        "status_poll_s": STATUS_POLL,
        "settle_s": SETTLE,
        "timeouts_s": {
            "ack": ACK_TIMEOUT,
            "traffic_after_ack": TRAFFIC_TIMEOUT,
            "load": LOAD_TIMEOUT,
        },
        "spans": {
            "source_event_s": "directory: 0 (the testbed writing the EndpointSlice file is the "
            "source change); kubernetes: that write (monotonic) -> the API server stand-in's "
            "watch event for web's EndpointSlice arriving at a watch in n1's node netns, beside "
            "the agent's (the stand-in mirrors the cluster directory: a poll every 0.1 s and a "
            "diff of every object; a real API server has no such step)",
            "ack_s": "the source change (directory: the testbed about to write the EndpointSlice "
            "file; kubernetes: the watch event's arrival, wall clock) -> the client node's Envoy "
            "accepted the EDS update for web's cluster (its update_time statistic, ms since the "
            "epoch); Envoy ACKs right after. Directory: includes its 0.2 s poll",
            "ack_polled_s": "same start (monotonic) -> first n1 agent PROXY_STATUS answer "
            "showing EDS ACKed at a newer version, SYNCED (polled; an upper bound)",
            "snapshot_to_ack_s": "agent's snapshot set -> Envoy's EDS ACK "
            "(the change's share of the nodeagent_xds_push_seconds sum)",
            "traffic_s": "add: same start -> completion of the first client request answered by "
            "the added endpoint; remove: -> completion of the last request the removed endpoint "
            "answered (only the old one answered for settle_s after it; 0 if none after the "
            "change)",
            "load_s": "synthetic services file written -> both nodes' Envoys ACKed everything "
            "and no new snapshot for 0.3 s (kubernetes: includes the stand-in's mirror)",
            "offline": "directory testbed only: n1's push redone in the bench process on the "
            "same cluster directory (agents idle): parse the directory, translate, serialise + "
            "sha256 per resource",
        },
        "sent_bytes": "per change, by xDS type: growth of the n1 agent's "
        "nodeagent_xds_sent_bytes_total counter (serialized DiscoveryResponse bytes it sent its "
        "Envoy) from just before the change until both nodes were quiet again",
        "note": "both node agents and Envoys share this machine's cores: every change is "
        "re-translated by both agents at once; one testbed per source, one after the other",
    }
    write_result(run, SCENARIO, params, results)
    _report(run, results)


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def _changes(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, summaries) of every kind of change measured at one size."""
    routes = entry["virtualservice"]
    return [
        ("endpoint add", entry["add"]),
        ("endpoint remove", entry["remove"]),
        ("VirtualService to-v2", routes["to-v2"]),
        ("VirtualService to-v1", routes["to-v1"]),
    ]


def _report(run: Run, results: dict[str, Any]) -> None:
    rows = []
    for source, measured in results["sources"].items():
        for entry in measured["sizes"]:
            for label, e in _changes(entry):
                rows.append(
                    (
                        source,
                        entry["services"],
                        label,
                        _fmt(e["ack_s"]),
                        _fmt(e["traffic_s"]),
                        _fmt(e["ack_polled_s"]),
                        _fmt(e["snapshot_to_ack_s"]),
                        _fmt(e["source_event_s"]),
                        e["failed_requests"],
                    )
                )
    print(
        table(
            (
                "source",
                "services",
                "change",
                "Envoy EDS/RDS update s, median (min-max)",
                "traffic s",
                "agent saw ACK s",
                "snapshot->ACK s",
                "file->watch event s",
                "failed req",
            ),
            rows,
        )
    )
    byte_rows = [
        (
            source,
            entry["services"],
            label,
            ", ".join(f"{t} {b['median'] / 1e3:.1f}" for t, b in e["sent_bytes"].items()) or "none",
        )
        for source, measured in results["sources"].items()
        for entry in measured["sizes"]
        for label, e in _changes(entry)
    ]
    print(table(("source", "services", "change", "xDS kB sent per change, median"), byte_rows))
    route_rows = [
        (
            source,
            entry["services"],
            c["change"],
            f"{len(c['route_tables'])} of {c['route_tables_total']}",
            ", ".join(c["route_tables"]),
            ", ".join(f"{t} {k}" for t, k in sorted(c["pushes"].items())),
        )
        for source, measured in results["sources"].items()
        for entry in measured["sizes"]
        for c in entry["virtualservice"]["changes"][:2]  # the same in every repeat
    ]
    print(
        table(
            ("source", "services", "change", "route tables reloaded", "which", "pushes"),
            route_rows,
        )
    )
    goal = results["goal"]
    small, large = goal["services"]
    goal_rows = [
        (
            source,
            label,
            *(
                f"{r[span]['large_s']:.3f} / {r[span]['small_s']:.3f} = "
                + ("n/a" if r[span]["ratio"] is None else f"{r[span]['ratio']:.1f}x")
                for span in ("ack_s", "traffic_s")
            ),
            "yes" if r["met"] else "no",
        )
        for source, per in goal["sources"].items()
        for label, r in per.items()
    ]
    print(
        table(
            (
                "source",
                "change",
                f"Envoy update s, {large} / {small} services",
                "traffic s",
                f"<= {goal['goal']}x",
            ),
            goal_rows,
        )
    )
    cost_rows = []
    directory = results["sources"]["directory"]["sizes"]
    loads = {
        source: {e["services"]: e["load_s"] for e in measured["sizes"]}
        for source, measured in results["sources"].items()
    }
    for entry in directory:
        off = entry["offline"]
        cost_rows.append(
            (
                entry["services"],
                " / ".join(f"{loads[s].get(entry['services'], 0.0):.2f}" for s in loads),
                f"{off['parse_s']:.2f}",
                f"{off['translate_s']:.2f}",
                f"{off['encode_hash_s']:.3f}",
                f"{off['bytes'].get('EDS', 0) / 1e6:.2f}",
                f"{off['bytes'].get('CDS', 0) / 1e6:.2f}",
                f"{off['bytes'].get('LDS', 0) / 1e6:.2f}",
                f"{off['bytes'].get('RDS', 0) / 1e6:.2f}",
                entry["envoy_active_clusters"].get(CLIENT_NODE, 0),
            )
        )
    print(
        table(
            (
                "services",
                f"load s ({' / '.join(loads)})",
                "parse s",
                "translate s",
                "encode s",
                "EDS MB",
                "CDS MB",
                "LDS MB",
                "RDS MB",
                "n1 clusters",
            ),
            cost_rows,
        )
    )
    print(
        "spans start at the source change: directory = EndpointSlice (VirtualService) file"
        " written (includes its 0.2 s poll); kubernetes = the stand-in's watch event.\n"
        "traffic: added = first answer from the new endpoint; removed = last answer from the"
        " removed one.\n"
        "parse/translate/encode: n1's push redone offline; MB: one full SotW response per type"
        " (every EDS push carries all load assignments)."
    )
    print(
        "VirtualService: the Envoy update is the route table's reload; traffic = first answer"
        " from the new version. Ratios are of medians."
    )
    _plot(run, results)


def _plot(run: Run, results: dict[str, Any]) -> None:
    sources = results["sources"]
    title = "Config convergence on the client's node (one endpoint; one VirtualService)"
    fig = new_figure(title, 11, 4.5)
    left, right = fig.subplots(1, 2)
    styles = {  # per source: endpoint added, removed, initial load
        "directory": ("o-", "^-", "o-"),
        "kubernetes": ("s--", "v--", "s--"),
    }
    for source, measured in sources.items():
        entries = measured["sizes"]
        xs = [e["services"] for e in entries]
        added, removed, load = styles.get(source, ("d:", "d:", "d:"))
        for kind, what, style in (("add", "added", added), ("remove", "removed", removed)):
            med = [e[kind]["ack_s"]["median"] for e in entries]
            lo = [m - e[kind]["ack_s"]["min"] for m, e in zip(med, entries, strict=True)]
            hi = [e[kind]["ack_s"]["max"] - m for m, e in zip(med, entries, strict=True)]
            left.errorbar(
                xs, med, yerr=[lo, hi], fmt=style, capsize=4, label=f"{source}: ACK, {what}"
            )
        vs = [e["virtualservice"]["to-v2"]["ack_s"]["median"] for e in entries]
        left.plot(xs, vs, "x:", label=f"{source}: VirtualService to v2, route reload")
        right.plot(xs, [e["load_s"] for e in entries], load, label=f"{source}: initial load s")
    directory = sources["directory"]["sizes"]
    xs = [e["services"] for e in directory]
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("services in the cluster (log)")
    left.set_ylabel("seconds after the source change (log)")
    left.set_title("median, min-max bars")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.plot(xs, [e["offline"]["translate_s"] for e in directory], "d-", label="translate s")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("services in the cluster (log)")
    right.set_ylabel("seconds (log)")
    twin = right.twinx()
    twin.plot(
        xs,
        [e["offline"]["bytes"].get("EDS", 0) / 1e6 for e in directory],
        "d:",
        color="tab:red",
        label="EDS response MB (right axis)",
    )
    twin.set_ylabel("MB per SotW EDS response")
    right.set_title("cost of one push (translation offline), initial load")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (left, right):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    right.grid(True, which="both", alpha=0.3)
    handles = right.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    right.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8)
    save_figure(run, SCENARIO, fig)
