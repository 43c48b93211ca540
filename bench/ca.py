"""Scenario 7, the CA service: CSR round trip and certificates per second through ``nodeagent ca``.

The real CA service runs as its own process (``python -m nodeagent ca``, so that its CPU time per
certificate can be read from ``/proc/<pid>/stat``), against the stand-in API server, also its own
process (``python -m nodeagent.testbed.apiserver``: pods, TokenReview of a tokens file, the
ConfigMap volume the root bundle is read from). Everything listens on 127.0.0.1 only.

The cluster: ``NODES`` nodes, each with its node agent pod (ServiceAccount
``nodeagent-system/nodeagent``, a pod-bound token for audience ``istio-ca``) and
``PODS_PER_NODE`` workload pods of distinct service accounts. The CA signs from the self-signed
root it creates in Secret ``nodeagent-ca`` (EC P-256), as it does when no ``cacerts`` exists.

Each client is one node agent: its own gRPC channel (its own TLS connection) to the CA, Istio's
certificate API (``IstioCertificateService/CreateCertificate``, istio/api
security/v1alpha1/ca.proto), a CSR whose only SAN is the workload's SPIFFE ID, the identity in the
``ImpersonatedIdentity`` metadata and the node agent's token as ``authorization: Bearer`` -- what
ztunnel sends istiod (istio security/pkg/server/ca/server.go, node_auth.go). Keys and CSRs are
made beforehand (one per identity, reused across requests: the CA keeps nothing per CSR); their
cost is reported on its own.

Measured:
- round trip (client sends -> chain received), one client on an established channel, P50/P99, for
  EC P-256 and RSA 2048 CSRs (Istio's default key), and on a new channel per request (TLS
  handshake included);
- certificates per second at 1, 4 and 16 concurrent node agents, with the CA's CPU per
  certificate (and the stand-in API server's, and this client process's, to show who is busy);
- where the time goes inside the CA: each step the CA takes, run on its own with the CA's own
  code against the same API server process (TokenReview; node authorization: GET the caller's
  pod, LIST pods by node and service account; the CSR check; the signature), beside the CA's own
  ``nodeagent_ca_request_duration_seconds`` (handler time) and the client's round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import struct_pb2

from bench.common import (
    ROOT,
    Run,
    new_figure,
    percentile,
    save_figure,
    summary,
    table,
    write_result,
)
from bench.podstart import contention
from nodeagent.caservice import authn
from nodeagent.caservice.authz import NodeAuthorizer, parse_identity
from nodeagent.caservice.csr import check_csr
from nodeagent.caservice.keystore import SELF_SIGNED_SECRET, secret_files, signer_from_files
from nodeagent.caservice.kubeapi import ClusterAPI
from nodeagent.identity.certs import KeyType, generate_key, verify_chain, workload_csr
from nodeagent.identity.protocol import (
    AUTHORIZATION,
    IMPERSONATED_IDENTITY,
    METHOD,
    TOKEN_AUDIENCE,
    IstioCertificateRequest,
    IstioCertificateResponse,
)

SCENARIO = "ca"
NS = "nodeagent-system"
NODE_ACCOUNT = "nodeagent"
TRUST_DOMAIN = "cluster.local"
SERVER_NAME = f"nodeagent-ca.{NS}.svc"  # the CA's default TLS name, as node agents verify it
ROOT_CONFIGMAP = "nodeagent-ca-root"
WORKLOADS = "bench"  # the workloads' namespace
NODES = 16  # one node agent per concurrent client, at most
PODS_PER_NODE = 8  # workload pods per node, each its own service account (identity)
CONCURRENCY = (1, 4, 16)
KEY_TYPES: tuple[KeyType, ...] = ("EC", "RSA")
KEY_LABELS = {"EC": "EC P-256", "RSA": "RSA 2048"}
CERT_TTL = timedelta(hours=24)  # the CA's default (Istio's DEFAULT_WORKLOAD_CERT_TTL)
HALF_LIFE_S = CERT_TTL.total_seconds() / 2  # a workload certificate is renewed at half life
POD_DENSITY = 110  # kubelet's default maxPods: a full node, every pod its own identity
CALL_TIMEOUT = 10.0
START_TIMEOUT = 30.0
HISTOGRAM = "nodeagent_ca_request_duration_seconds"
TICK = os.sysconf("SC_CLK_TCK")


# -- the cluster the CA sees ----------------------------------------------------------------------


def node_name(n: int) -> str:
    return f"node-{n:02d}"


def agent_token(n: int) -> str:
    return f"bench-token-{node_name(n)}"


def identity(n: int, i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{WORKLOADS}/sa/{node_name(n)}-sa-{i}"


def _pod(namespace: str, name: str, account: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"},
        "spec": {"nodeName": node, "serviceAccountName": account},
    }


def write_cluster(folder: Path) -> tuple[Path, Path]:
    """The API server's cluster directory (node agent and workload pods) and tokens file."""
    cluster = folder / "cluster"
    cluster.mkdir()
    pods, tokens = [], []
    for n in range(NODES):
        node = node_name(n)
        agent = f"nodeagent-{node}"
        pods.append(_pod(NS, agent, NODE_ACCOUNT, node))
        tokens.append(
            {
                "token": agent_token(n),
                "namespace": NS,
                "serviceAccount": NODE_ACCOUNT,
                "podName": agent,
                "podUid": f"uid-{NS}-{agent}",
                "audiences": [TOKEN_AUDIENCE],
            }
        )
        for i in range(PODS_PER_NODE):
            pods.append(_pod(WORKLOADS, f"{node}-pod-{i}", f"{node}-sa-{i}", node))
    (cluster / "pods.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": pods})
    )
    tokens_file = folder / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    return cluster, tokens_file


# -- keys and CSRs (the node agent's side, timed on its own) --------------------------------------


@dataclass
class CSRs:
    """One CSR per identity, by key type; and what making them cost."""

    by_key: dict[KeyType, dict[str, str]] = field(default_factory=dict)
    keygen_ms: dict[KeyType, list[float]] = field(default_factory=dict)
    csr_ms: dict[KeyType, list[float]] = field(default_factory=dict)

    def make(self, key_type: KeyType, identities: list[str]) -> None:
        out, keygen, signing = {}, [], []
        for spiffe_id in identities:
            started = time.perf_counter()
            key = generate_key(key_type)
            made = time.perf_counter()
            out[spiffe_id] = workload_csr(key, spiffe_id)
            keygen.append((made - started) * 1e3)
            signing.append((time.perf_counter() - made) * 1e3)
        self.by_key[key_type] = out
        self.keygen_ms[key_type] = keygen
        self.csr_ms[key_type] = signing


# -- the two processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of PID (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


@dataclass
class Services:
    api: subprocess.Popen[bytes]
    ca: subprocess.Popen[bytes]
    kubeconfig: Path
    ca_port: int
    monitoring_port: int
    root_pem: bytes
    logs: Path

    def metrics(self) -> str:
        status, text = _get(f"http://127.0.0.1:{self.monitoring_port}/metrics")
        if status != 200:
            raise RuntimeError(f"CA /metrics answered {status}: {text[:200]}")
        return text

    def handled(self, outcome: str = "issued") -> tuple[float, float]:
        """(sum seconds, count) of the CA's own request duration histogram for OUTCOME."""
        values = {"sum": 0.0, "count": 0.0}
        for line in self.metrics().splitlines():
            for part in values:
                if line.startswith(f'{HISTOGRAM}_{part}{{outcome="{outcome}"}}'):
                    values[part] = float(line.rsplit(" ", 1)[1])
        return values["sum"], values["count"]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextmanager
def services(folder: Path) -> Iterator[Services]:
    """The stand-in API server and ``nodeagent ca``, both stopped on the way out."""
    cluster, tokens = write_cluster(folder)
    kubeconfig, configmaps, logs = folder / "kubeconfig", folder / "configmaps", folder / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's nodeagent, in both processes
    started: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "apiserver.log").open("wb") as log:
            api = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nodeagent.testbed.apiserver",
                    str(cluster),
                    "--listen",
                    "127.0.0.1:0",
                    "--kubeconfig",
                    str(kubeconfig),
                    "--tokens",
                    str(tokens),
                    "--configmap-dir",
                    str(configmaps),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(api)
        _wait(lambda: kubeconfig.exists(), "the API server's kubeconfig", api, logs)
        ca_port, monitoring_port = _free_port(), _free_port()
        with (logs / "ca.log").open("wb") as log:
            ca = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nodeagent",
                    "ca",
                    "--kubeconfig",
                    str(kubeconfig),
                    "--namespace",
                    NS,
                    "--listen",
                    f"127.0.0.1:{ca_port}",
                    "--monitoring",
                    f"127.0.0.1:{monitoring_port}",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(ca)
        ready = f"http://127.0.0.1:{monitoring_port}/ready"
        _wait(lambda: _get(ready)[0] == 200, "the CA's /ready", ca, logs)
        root_file = configmaps / NS / ROOT_CONFIGMAP / "root-cert.pem"
        _wait(root_file.exists, "the root ConfigMap's volume", ca, logs)
        yield Services(api, ca, kubeconfig, ca_port, monitoring_port, root_file.read_bytes(), logs)
    finally:
        for proc in reversed(started):
            _stop(proc)


def _wait(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
            tails = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(logs.glob("*.log")))
            raise RuntimeError(f"waiting for {what}: {state}\n{tails}")
        time.sleep(0.05)


# -- the node agents' side: CreateCertificate over TLS --------------------------------------------


class NodeAgent:
    """One node agent's connection to the CA: its own channel, its own TLS connection."""

    def __init__(self, port: int, root_pem: bytes, token: str) -> None:
        options = [
            ("grpc.ssl_target_name_override", SERVER_NAME),
            # Without it, channels of one process share a TCP connection: not N node agents.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        credentials = grpc.ssl_channel_credentials(root_pem)
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options)
        self.call = self.channel.unary_unary(
            METHOD,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )
        self.metadata = [(AUTHORIZATION, f"Bearer {token}")]

    async def certificate(self, csr: str, spiffe_id: str) -> list[str]:
        meta = struct_pb2.Struct()
        meta.update({IMPERSONATED_IDENTITY: spiffe_id})
        request = IstioCertificateRequest(csr=csr, metadata=meta)
        try:
            response = await self.call(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(
                f"CreateCertificate for {spiffe_id}: {e.code()} {e.details()}"
            ) from None
        return list(response.cert_chain)

    async def close(self) -> None:
        await self.channel.close()


def check_answer(chain: list[str], spiffe_id: str, root_pem: bytes) -> None:
    """The answer is a certificate for SPIFFE_ID that verifies to the published root."""
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [spiffe_id]:
        raise RuntimeError(f"asked for {spiffe_id}, got a certificate for {uris}")
    verify_chain("".join(chain[:-1]).encode(), root_pem)


async def round_trips(
    svc: Services, csrs: dict[str, str], count: int, new_channel: bool = False
) -> list[float]:
    """COUNT sequential requests from node 0's agent; milliseconds each (send -> chain)."""
    ids = [identity(0, i) for i in range(PODS_PER_NODE)]
    agent = None if new_channel else NodeAgent(svc.ca_port, svc.root_pem, agent_token(0))
    try:
        if agent is not None:  # the channel connected and warm: what a running agent has
            check_answer(await agent.certificate(csrs[ids[0]], ids[0]), ids[0], svc.root_pem)
        out = []
        for k in range(count):
            spiffe_id = ids[k % len(ids)]
            started = time.perf_counter()
            if agent is None:
                fresh = NodeAgent(svc.ca_port, svc.root_pem, agent_token(0))
                try:
                    chain = await fresh.certificate(csrs[spiffe_id], spiffe_id)
                finally:
                    await fresh.close()
            else:
                chain = await agent.certificate(csrs[spiffe_id], spiffe_id)
            out.append((time.perf_counter() - started) * 1e3)
            if k == 0:
                check_answer(chain, spiffe_id, svc.root_pem)
    finally:
        if agent is not None:
            await agent.close()
    return out


async def load(svc: Services, csrs: dict[str, str], clients: int, seconds: float) -> dict[str, Any]:
    """CLIENTS node agents asking as fast as answered for SECONDS: rate, CPU, latency."""
    agents = [NodeAgent(svc.ca_port, svc.root_pem, agent_token(n)) for n in range(clients)]
    try:
        for n, agent in enumerate(agents):  # connected before the clock starts
            first = identity(n, 0)
            check_answer(await agent.certificate(csrs[first], first), first, svc.root_pem)
        latencies: list[float] = []
        deadline = 0.0

        async def ask(n: int, agent: NodeAgent) -> None:
            k = 0
            while time.perf_counter() < deadline:
                spiffe_id = identity(n, k % PODS_PER_NODE)
                started = time.perf_counter()
                await agent.certificate(csrs[spiffe_id], spiffe_id)
                latencies.append((time.perf_counter() - started) * 1e3)
                k += 1

        handled_before = svc.handled()
        cpu_before = (cpu_seconds(svc.ca.pid), cpu_seconds(svc.api.pid), time.process_time())
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(ask(n, a) for n, a in enumerate(agents)))
        elapsed = time.perf_counter() - started
        cpu_after = (cpu_seconds(svc.ca.pid), cpu_seconds(svc.api.pid), time.process_time())
        handled_after = svc.handled()
    finally:
        for agent in agents:
            await agent.close()
    certs = len(latencies)
    if not certs:
        raise RuntimeError(f"{clients} clients: no certificate in {seconds}s")
    ca_cpu, api_cpu, client_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    handled = handled_after[1] - handled_before[1]
    return {
        "certs": certs,
        "seconds": elapsed,
        "certs_per_second": certs / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "ca_cpu_ms_per_cert": ca_cpu / certs * 1e3,
        "ca_cores": ca_cpu / elapsed,
        "apiserver_cpu_ms_per_cert": api_cpu / certs * 1e3,
        "apiserver_cores": api_cpu / elapsed,
        "client_cores": client_cpu / elapsed,
        "ca_handler_mean_ms": (handled_after[0] - handled_before[0]) / handled * 1e3
        if handled
        else 0.0,
    }


# -- where the time goes: the CA's steps, one at a time -------------------------------------------


async def _timed(step: Callable[[], Awaitable[Any]], count: int) -> dict[str, float]:
    """Medians of COUNT runs of STEP (after one untimed run): wall milliseconds, and the CPU
    milliseconds this process spent, which is what the CA spends on the step (the API server's
    share is its own process's)."""
    await step()
    wall, cpu = [], []
    for _ in range(count):
        started, cpu_started = time.perf_counter(), time.process_time()
        await step()
        wall.append((time.perf_counter() - started) * 1e3)
        cpu.append((time.process_time() - cpu_started) * 1e3)
    return {"wall_ms": percentile(wall, 50), "cpu_ms": percentile(cpu, 50)}


async def steps(
    svc: Services, csrs: dict[KeyType, dict[str, str]], count: int
) -> dict[str, dict[str, float]]:
    """Median milliseconds (wall, CPU) of each step the CA takes for one request of node 0's
    agent, run with the CA's own code against the same API server process (the CA idle)."""
    api = await ClusterAPI.connect(svc.kubeconfig)
    try:
        spiffe_id = identity(0, 0)
        token = agent_token(0)
        caller = await authn.authenticate(api, token, TOKEN_AUDIENCE)
        wanted = parse_identity(spiffe_id, TRUST_DOMAIN)
        authorizer = NodeAuthorizer(api, frozenset({(NS, NODE_ACCOUNT)}))
        secret = await api.read("secrets", NS, SELF_SIGNED_SECRET)
        source = f"Secret {NS}/{SELF_SIGNED_SECRET}"
        signer = signer_from_files(secret_files(secret, source), source)
        out = {
            "TokenReview": await _timed(
                lambda: authn.authenticate(api, token, TOKEN_AUDIENCE), count
            ),
            "node authorization (GET + LIST)": await _timed(
                lambda: authorizer.authorize(caller, wanted), count
            ),
        }
        for key_type in KEY_TYPES:
            pem = csrs[key_type][spiffe_id]
            key = check_csr(pem, spiffe_id)

            async def check(pem: str = pem) -> None:
                check_csr(pem, spiffe_id)

            async def sign(key: Any = key) -> None:
                signer.ca.sign(key, spiffe_id, CERT_TTL)

            out[f"CSR check ({KEY_LABELS[key_type]})"] = await _timed(check, count)
            out[f"signature ({KEY_LABELS[key_type]} CSR)"] = await _timed(sign, count)
        return out
    finally:
        await api.close()


# -- the scenario ---------------------------------------------------------------------------------


async def _measure(
    svc: Services, csrs: CSRs, counts: dict[str, int], seconds: float
) -> dict[str, Any]:
    """One repeat: round trips, load at each concurrency, the CA's steps."""
    out: dict[str, Any] = {"round_trip": {}, "load": {}}
    for key_type in KEY_TYPES:
        before = svc.handled()
        times = await round_trips(svc, csrs.by_key[key_type], counts["round_trips"])
        after = svc.handled()
        out["round_trip"][key_type] = {
            "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99),
            # The first (warm-up) request is in the histogram too: count it out of neither.
            "ca_handler_mean_ms": (after[0] - before[0]) / (after[1] - before[1]) * 1e3,
        }
    fresh = await round_trips(svc, csrs.by_key["EC"], counts["new_channel"], new_channel=True)
    out["round_trip"]["EC, new channel"] = {
        "p50_ms": percentile(fresh, 50),
        "p99_ms": percentile(fresh, 99),
    }
    for clients in CONCURRENCY:
        out["load"][str(clients)] = await load(svc, csrs.by_key["EC"], clients, seconds)
    out["steps"] = await steps(svc, csrs.by_key, counts["steps"])
    return out


def run(run: Run) -> None:
    repeats = int(run.pick(3, 1))
    counts = {
        "round_trips": int(run.pick(200, 20)),
        "new_channel": int(run.pick(30, 5)),
        "steps": int(run.pick(100, 10)),
        "rsa_keys": int(run.pick(16, 3)),
    }
    seconds = float(run.pick(5.0, 1.0))
    load_at_start = contention()

    csrs = CSRs()
    all_ids = [identity(n, i) for n in range(NODES) for i in range(PODS_PER_NODE)]
    csrs.make("EC", all_ids)
    # RSA 2048 keys take ~0.1 s each: only node 0's identities (the round trip's client), and
    # a few more timed for the key generation figure.
    csrs.make("RSA", [identity(0, i) for i in range(PODS_PER_NODE)])
    extra = CSRs()
    extra.make("RSA", [identity(1, i) for i in range(max(0, counts["rsa_keys"] - PODS_PER_NODE))])
    csrs.keygen_ms["RSA"] += extra.keygen_ms["RSA"]
    csrs.csr_ms["RSA"] += extra.csr_ms["RSA"]

    rounds = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-ca-") as folder,
        services(Path(folder)) as svc,
    ):
        for _ in range(repeats):
            rounds.append(asyncio.run(_measure(svc, csrs, counts, seconds)))
        final = svc.handled()
        refused, unavailable = svc.handled("refused")[1], svc.handled("unavailable")[1]
    if refused or unavailable:
        raise RuntimeError(f"the CA refused {refused:.0f} and failed {unavailable:.0f} requests")

    results = summarise(rounds, csrs)
    results["ca_requests_issued"] = int(final[1])
    results["node"] = node_figures(results)
    params = {
        "repeats": repeats,
        "nodes": NODES,
        "pods_per_node": PODS_PER_NODE,
        "concurrency": list(CONCURRENCY),
        "round_trips_per_key_type": counts["round_trips"],
        "new_channel_round_trips": counts["new_channel"],
        "load_seconds_per_level": seconds,
        "step_runs": counts["steps"],
        "ca": "python -m nodeagent ca, own process, --log-level info (a log line per cert)",
        "signer": "the CA's self-signed root, Secret nodeagent-system/nodeagent-ca (EC P-256)",
        "apiserver": "the stand-in (nodeagent.testbed.apiserver), own process, 127.0.0.1",
        "client": "one asyncio process; one gRPC channel (own TLS connection) per node agent",
        "request": "CSR (one URI SAN) + ImpersonatedIdentity + Bearer pod-bound node token;"
        " validity_duration 0 (the CA's 24h default)",
        "load_key_type": "EC P-256",
        "server_name": SERVER_NAME,
        "machine_load_at_start": load_at_start,
        "machine_load_at_end": contention(),
    }
    write_result(run, SCENARIO, params, results)
    report(results, repeats)
    _plot(run, results, repeats)


def summarise(rounds: list[dict[str, Any]], csrs: CSRs) -> dict[str, Any]:
    def over(*path: str) -> dict[str, float | int]:
        """The figure at PATH in each repeat, summarised."""
        values = []
        for r in rounds:
            value: Any = r
            for key in path:
                value = value[key]
            values.append(float(value))
        return summary(values)

    round_trip = {
        kind: {fig: over("round_trip", kind, fig) for fig in figs}
        for kind, figs in (
            ("EC", ("p50_ms", "p99_ms", "ca_handler_mean_ms")),
            ("RSA", ("p50_ms", "p99_ms", "ca_handler_mean_ms")),
            ("EC, new channel", ("p50_ms", "p99_ms")),
        )
    }
    figures = (
        "certs_per_second",
        "p50_ms",
        "p99_ms",
        "ca_cpu_ms_per_cert",
        "ca_cores",
        "apiserver_cpu_ms_per_cert",
        "apiserver_cores",
        "client_cores",
        "ca_handler_mean_ms",
    )
    loads = {str(c): {f: over("load", str(c), f) for f in figures} for c in CONCURRENCY}
    step_names = list(rounds[0]["steps"])
    return {
        "client_side_ms": {
            KEY_LABELS[k]: {
                "key_generation_p50": percentile(csrs.keygen_ms[k], 50),
                "csr_signing_p50": percentile(csrs.csr_ms[k], 50),
                "keys": len(csrs.keygen_ms[k]),
            }
            for k in KEY_TYPES
        },
        "round_trip": round_trip,
        "load": loads,
        "steps": {s: {f: over("steps", s, f) for f in ("wall_ms", "cpu_ms")} for s in step_names},
        "raw": rounds,
    }


def node_figures(results: dict[str, Any]) -> dict[str, Any]:
    """What the figures mean for a node of POD_DENSITY identities and for one CA replica."""
    best = max(float(v["certs_per_second"]["median"]) for v in results["load"].values())
    sequential = float(results["round_trip"]["EC"]["p50_ms"]["median"])
    keygen = results["client_side_ms"]
    return {
        "pods": POD_DENSITY,
        "renewals_per_half_life": POD_DENSITY,
        "half_life_hours": HALF_LIFE_S / 3600,
        "node_renewals_per_second": POD_DENSITY / HALF_LIFE_S,
        "best_certs_per_second": best,
        "nodes_one_ca_renews": best * HALF_LIFE_S / POD_DENSITY,
        # A node (re)starting with every identity new: one request at a time, or as fast as
        # one CA replica signs when the node has it to itself.
        "node_all_certs_s_one_at_a_time_ec": POD_DENSITY * sequential / 1e3,
        "node_all_certs_s_at_ca_capacity_ec": POD_DENSITY / best,
        "node_key_generation_s": {
            label: POD_DENSITY * float(v["key_generation_p50"]) / 1e3 for label, v in keygen.items()
        },
    }


def report(results: dict[str, Any], repeats: int) -> None:
    rt = results["round_trip"]
    print(
        table(
            ["round trip (1 client)", "P50 ms", "P99 ms", "CA handler mean ms"],
            [
                [
                    kind,
                    _med(rt[kind]["p50_ms"]),
                    _med(rt[kind]["p99_ms"]),
                    _med(rt[kind]["ca_handler_mean_ms"])
                    if "ca_handler_mean_ms" in rt[kind]
                    else "-",
                ]
                for kind in rt
            ],
        )
    )
    print(
        table(
            ["key type (client side)", "key generation P50 ms", "CSR signing P50 ms", "keys"],
            [
                [k, v["key_generation_p50"], v["csr_signing_p50"], v["keys"]]
                for k, v in results["client_side_ms"].items()
            ],
        )
    )
    print(
        table(
            [
                "node agents",
                f"certs/s (median of {repeats} [min-max])",
                "P50 ms",
                "P99 ms",
                "CA CPU ms/cert",
                "CA cores",
                "API CPU ms/cert",
                "client cores",
            ],
            [
                [
                    c,
                    _range(v["certs_per_second"]),
                    _med(v["p50_ms"]),
                    _med(v["p99_ms"]),
                    _med(v["ca_cpu_ms_per_cert"]),
                    _med(v["ca_cores"]),
                    _med(v["apiserver_cpu_ms_per_cert"]),
                    _med(v["client_cores"]),
                ]
                for c, v in results["load"].items()
            ],
        )
    )
    print(
        table(
            ["CA step, run alone", "wall ms (median)", "CA CPU ms (median)"],
            [[name, _med(s["wall_ms"]), _med(s["cpu_ms"])] for name, s in results["steps"].items()],
        )
    )
    node = results["node"]
    print(
        f"a node of {node['pods']} identities renews {node['renewals_per_half_life']} certificates"
        f" per {node['half_life_hours']:.0f} h; one CA at {node['best_certs_per_second']:.0f}/s"
        f" renews {node['nodes_one_ca_renews']:.0f} such nodes"
    )


def _med(s: dict[str, float | int]) -> float:
    return round(float(s["median"]), 2)


def _range(s: dict[str, float | int]) -> str:
    return f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]"


def _plot(run: Run, results: dict[str, Any], repeats: int) -> None:
    fig = new_figure(
        f"CA service (nodeagent ca, own process): CSR round trip and certificates per second"
        f" (median of {repeats})",
        13,
        4.8,
    )
    left, middle, right = fig.subplots(1, 3)

    rt = results["round_trip"]
    kinds = list(rt)
    width = 0.38
    for i, (fig_name, label, color) in enumerate(
        (("p50_ms", "P50", "#1f77b4"), ("p99_ms", "P99", "#aec7e8"))
    ):
        xs = [j + (i - 0.5) * width for j in range(len(kinds))]
        bars = left.bar(
            xs, [float(rt[k][fig_name]["median"]) for k in kinds], width, label=label, color=color
        )
        left.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    left.set_xticks(range(len(kinds)), [k.replace(", ", ",\n") for k in kinds])
    left.set_ylabel("milliseconds, send -> chain received")
    left.set_title("Round trip, one node agent")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)

    levels = list(results["load"])
    rates = [float(results["load"][c]["certs_per_second"]["median"]) for c in levels]
    bars = middle.bar(levels, rates, color="#2ca02c")
    middle.bar_label(
        bars,
        labels=[
            f"{r:.0f}/s\nCA {float(results['load'][c]['ca_cpu_ms_per_cert']['median']):.1f} ms CPU"
            for r, c in zip(rates, levels, strict=True)
        ],
        fontsize=8,
        padding=2,
    )
    middle.set_ylim(top=max(rates) * 1.3)
    middle.set_xlabel("concurrent node agents (EC P-256 CSRs)")
    middle.set_ylabel("certificates per second")
    middle.set_title("Throughput, CA CPU per certificate")
    middle.grid(axis="y", alpha=0.3)

    steps_fig = results["steps"]
    names = list(steps_fig)
    height = 0.38
    for i, (what, label, color) in enumerate(
        (("wall_ms", "wall", "#ff7f0e"), ("cpu_ms", "CA CPU", "#ffbb78"))
    ):
        ys = [j + (i - 0.5) * height for j in range(len(names))]
        values = [float(steps_fig[n][what]["median"]) for n in names]
        bars = right.barh(ys, values, height, color=color, label=label)
        right.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    handler = float(rt["EC"]["ca_handler_mean_ms"]["median"])
    right.axvline(handler, color="black", linestyle="--", linewidth=1)
    right.annotate(
        f"CA handler, whole\n(EC, its histogram):\n{handler:.1f} ms",
        (handler, len(names) - 0.6),
        xytext=(-3, 0),
        textcoords="offset points",
        fontsize=7,
        ha="right",
    )
    right.legend(fontsize=8, loc="center right")
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("milliseconds (median), each step run alone")
    right.set_title("Where the time goes in the CA")
    right.grid(axis="x", alpha=0.3)
    save_figure(run, SCENARIO, fig)
