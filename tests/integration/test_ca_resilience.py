"""The CA service under stress (issue #13, "Must show", last two bullets), on a two-node testbed
whose agents get their certificates from ``nodeagent ca`` (``ca: service``), certTTL 20 s.

Steady traffic (20 req/s, a new connection per request to a TCP service port: every request is a
new mTLS handshake between the node Envoys) from a client on n1 to a server on n2, and from a
neighbour of the server on n2 (same node: the fast path inside n2's Envoy, no TLS, the caller's
identity known to the node); every request is counted by the caller, and the server
application's own log says which requests reached it.

1. A CA outage longer than the certificate TTL: traffic flows until the certificates expire,
   then fails closed (every request fails, none reaches the application: never plaintext), and
   recovers once the CA is back, without restarting any agent, Envoy or pod. The same-node
   caller uses no certificate, so it is not cut off by the outage.
2. A root rotation with 0 failed requests: trust A+B, sign with B, trust B only. Istio's
   cacerts layout: https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/;
   a root-cert.pem holding several roots is how Istio trusts two at once (istio/istio#49825,
   ISTIO_MULTIROOT_MESH), and append-new, re-issue, remove-old is the zero-downtime order
   (cert-manager/istio-csr#137). At the end an A-signed certificate is refused.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from nodeagent.identity.ca import ROOT_CERT, PluginCA, plugin_cacerts
from nodeagent.identity.certs import ChainError, issue, verify_chain
from nodeagent.identity.manager import RETRY_MAX_WITHOUT_CERT
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import envoy_admin, node_cli, node_metrics, proxy_status, wait_for

pytestmark = pytest.mark.integration

PY = sys.executable
HERE = Path(__file__).parent
NAME = "tbcares"
TTL = 20  # seconds: the workload certificates' lifetime (short: the outage must outlast it)
RATE = 20  # requests per second per caller
TRUST_DOMAIN = "cluster.local"
SELF_SIGNED_SECRET = "nodeagent-ca"  # the CA's own root (nodeagent.caservice.keystore)
CACERTS = "cacerts"  # Istio's plug-in CA Secret, which wins over the self-signed root
SERVER = "foo/server"
# Callers: tag -> (pod, its node). "x" crosses nodes (mTLS), "near" stays on the server's node
# (the fast path: no certificate on its way).
CALLERS = {"x": ("foo/client", "n1"), "near": ("foo/near", "n2")}
SERVER_NODE = "n2"

TOPOLOGY = f"""
name: {NAME}
source: kubernetes
ca: service
certTTL: {TTL}
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: foo, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: client, namespace: foo, node: n1, serviceAccount: client, labels: {{app: client}}}}
  - {{name: near, namespace: foo, node: n2, serviceAccount: near, labels: {{app: near}}}}
  - name: server
    namespace: foo
    node: {SERVER_NODE}
    serviceAccount: server
    labels: {{app: server}}
    workload: {{type: fake-service, port: 80}}
services:
  # A TCP port: the caller's Envoy opens a new upstream connection (a new handshake) for each
  # connection of the caller, where an HTTP port would pool one across the whole test.
  - name: server
    namespace: foo
    selector: {{app: server}}
    ports: [{{name: tcp, port: 8000, targetPort: 80}}]
"""


def spiffe(pod: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/foo/sa/{pod.split('/')[1]}"


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        yield Testbed.up(loads_topology(TOPOLOGY, "test_ca_resilience"), TOPOLOGY, "ca_resilience")
    finally:
        down(NAME)


# -- the CA daemon (the testbed's control plane) -------------------------------------------------


def kill_ca(tb: Testbed) -> float:
    """SIGKILL the CA service (a crash: no graceful stop); the wall-clock time it was gone."""
    assert tb.ca_pid() is not None, "the CA service is not running"
    tb.stop_ca(kill=True)  # returns once the process is gone
    return time.time()


def ensure_ca(tb: Testbed) -> None:
    """The CA runs (a test that failed midway may have left it stopped)."""
    if tb.ca_pid() is None:
        tb.stop_ca()
        tb.start_ca()


# -- what the node Envoys hold -------------------------------------------------------------------


def _pem(holder: dict[str, Any], field: str) -> bytes:
    source = holder.get(field, {})
    if "inline_bytes" in source:
        return base64.b64decode(source["inline_bytes"])
    return str(source.get("inline_string", "")).encode()


def envoy_secrets(tb: Testbed, node: str) -> dict[str, list[x509.Certificate]]:
    """The node Envoy's active SDS secrets: name -> its certificates (a workload's chain, leaf
    first, or ROOTCA's trusted roots)."""
    dump = json.loads(envoy_admin(tb.name, node, "/config_dump?resource=dynamic_active_secrets"))
    out: dict[str, list[x509.Certificate]] = {}
    for entry in dump.get("configs", []):
        secret = entry.get("secret", {})
        if "tls_certificate" in secret:
            pem = _pem(secret["tls_certificate"], "certificate_chain")
        elif "validation_context" in secret:
            pem = _pem(secret["validation_context"], "trusted_ca")
        else:
            continue
        out[entry.get("name") or secret.get("name", "")] = (
            x509.load_pem_x509_certificates(pem) if b"CERTIFICATE" in pem else []
        )
    return out


def trusted_roots(tb: Testbed, node: str) -> list[x509.Certificate]:
    return envoy_secrets(tb, node).get("ROOTCA", [])


def synced(tb: Testbed) -> bool:
    """Every node's Envoy holds (ACKed) all its agent sent."""
    return all(
        t["state"] == "SYNCED" for n in ("n1", "n2") for t in proxy_status(tb, n)["types"].values()
    )


def leaf_expiries(tb: Testbed) -> dict[str, float]:
    """SPIFFE ID -> when the certificate its node's Envoy serves expires (Unix time)."""
    out = {}
    for pod, node in [*CALLERS.values(), (SERVER, SERVER_NODE)]:
        chain = envoy_secrets(tb, node).get(spiffe(pod), [])
        assert chain, f"{node}'s Envoy serves no certificate for {spiffe(pod)}"
        out[spiffe(pod)] = chain[0].not_valid_after_utc.timestamp()
    return out


def pem(*certs: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def chains_to(chain: list[x509.Certificate], root: x509.Certificate) -> bool:
    try:
        verify_chain(pem(*chain), pem(root))
    except ChainError:
        return False
    return True


# -- traffic -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    tag: str
    seq: int
    t: float
    ok: bool
    error: str


class Traffic:
    """A steady caller per CALLERS entry, each writing its requests to a JSON-lines file."""

    def __init__(self, tb: Testbed, folder: Path, phase: str) -> None:
        self.folder = folder
        self.stop_file = folder / f"{phase}.stop"
        self.tags = {f"{phase}-{tag}": pod for tag, (pod, _) in CALLERS.items()}
        self.procs: list[subprocess.Popen[bytes]] = []
        for tag, pod in self.tags.items():
            argv = [PY, str(HERE / "steady_client.py"), "server.foo", "8000", tag, str(RATE)]
            argv += ["600", str(self.out(tag)), str(self.stop_file)]
            with open(folder / f"{tag}.stderr", "wb") as err:
                self.procs.append(
                    subprocess.Popen(tb.exec_argv(pod, argv), stdout=subprocess.DEVNULL, stderr=err)
                )

    def out(self, tag: str) -> Path:
        return self.folder / f"{tag}.jsonl"

    def requests(self, tag: str) -> list[Request]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.out(tag).read_text().splitlines():
                with contextlib.suppress(ValueError):  # the line being written
                    r = json.loads(line)
                    found.append(Request(tag, r["seq"], r["t"], r["ok"], r["error"]))
        return found

    def all_ok_since(self, since: float, seconds: float) -> bool:
        """Every caller sent requests for SECONDS after SINCE and each of those succeeded."""
        for tag in self.tags:
            after = [r for r in self.requests(tag) if r.t >= since]
            if not after or after[-1].t - after[0].t < seconds or not all(r.ok for r in after):
                return False
        return True

    def steady(self, seconds: float, timeout: float, what: str) -> float:
        """Wait until the last SECONDS of every caller all succeeded."""

        def good() -> bool:
            return self.all_ok_since(time.time() - seconds, seconds - 1.0)

        return wait_for(good, timeout, what, step=0.5)

    def stop(self) -> None:
        self.stop_file.touch()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def reached_the_app(tb: Testbed) -> set[tuple[str, int]]:
    """(tag, seq) of every steady request the server application answered, from its own log."""
    log = (layout.logs_dir(tb.name) / "foo.server.log").read_text(errors="replace")
    return {(m[1], int(m[2])) for m in re.finditer(r" GET /steady/([\w-]+)/(\d+) ", log)}


# -- the processes that must survive -------------------------------------------------------------


def processes(tb: Testbed) -> dict[str, tuple[int, int | None]]:
    """Agents, node Envoys and workloads: name -> (pid, start time)."""
    out: dict[str, tuple[int, int | None]] = {}
    for node in ("n1", "n2"):
        agent = tb.daemon(node, daemons.AGENT)
        out[f"{node} agent"] = (agent.pid, agent.start_time)
        pidfile = layout.agent_socket(tb.name, node).parent / "envoy.pid"
        envoy = json.loads(pidfile.read_text())
        out[f"{node} envoy"] = (int(envoy["pid"]), int(envoy["start_time"]))
    for key, rec in tb.state.pods.items():
        assert rec.pid is not None
        out[key] = (rec.pid, rec.start_time)
    return out


# -- 1. outage -----------------------------------------------------------------------------------

# After expiry, a request sent this much later must fail (a handshake takes milliseconds; the
# slack covers the whole-second clocks of certificate checks).
EXPIRY_SLACK = 1.5
FAILING_WINDOW = 6.0  # seconds of fail-closed traffic observed after the last expiry
# Once a certificate has expired its identity is retried at most RETRY_MAX_WITHOUT_CERT (+20 %)
# apart, however long the CA was down; then one issuance and a push.
RECOVERY_BOUND = RETRY_MAX_WITHOUT_CERT * 1.2 + 20.0


def test_a_ca_outage_longer_than_the_ttl_fails_closed_then_recovers(
    tb: Testbed, tmp_path: Path
) -> None:
    """Istio's agents keep serving their certificates while the CA is away and never fall back
    to plaintext (https://istio.io/latest/docs/concepts/security/#pki); past expiry a peer's
    TLS refuses the certificate, so the mesh fails closed until the CA is back."""
    ensure_ca(tb)
    survivors = processes(tb)
    traffic = Traffic(tb, tmp_path, "outage")
    try:
        traffic.steady(3.0, 60, "steady traffic before the outage")
        killed = kill_ca(tb)
        # A certificate being pushed at the kill has reached Envoy: it holds all it was sent.
        wait_for(lambda: synced(tb), 10, "every node's Envoy SYNCED", step=0.2)
        expiry = leaf_expiries(tb)
        first_expiry = {
            f"outage-{tag}": min(expiry[spiffe(pod)], expiry[spiffe(SERVER)])
            for tag, (pod, _) in CALLERS.items()
        }
        # Longer than the TTL, and long enough to watch every pair fail closed.
        back_at = max(killed + TTL + 2.0, max(expiry.values()) + FAILING_WINDOW)
        assert back_at - killed < TTL + FAILING_WINDOW + 5, (killed, expiry)
        # The scenario's clock, not a condition: halfway through the fail-closed window.
        time.sleep(max(0.0, back_at - FAILING_WINDOW / 2 - time.time()))
        # What a user sees meanwhile: the agents say why, and which secrets Envoy holds.
        said = {n: identity_problem(tb, n) for n in ("n1", "n2")}
        # Envoy may keep the last secret it was given (it cannot drop one a cluster uses): then it
        # is the expired one, which peers refuse. No valid certificate without the CA.
        held = {
            n: {k: c[0].not_valid_after_utc.timestamp() for k, c in envoy_secrets(tb, n).items()}
            for n in ("n1", "n2")
        }
        looked = time.time()
        time.sleep(max(0.0, back_at - time.time()))  # the outage lasts until back_at
        restarted = time.time()
        tb.start_ca()
        ca_ready = time.time() - restarted
        traffic.steady(3.0, RECOVERY_BOUND, "traffic to recover after the CA came back")
        # The same-node caller's traffic needs no certificate, so recovered traffic does not
        # mean its identity has one again: wait for the agents to say so.
        wait_for(
            lambda: all(identity_problem(tb, n) == "" for n in ("n1", "n2")),
            RECOVERY_BOUND,
            "every identity to have a certificate again",
            step=0.5,
        )
    finally:
        traffic.stop()
    app = reached_the_app(tb)
    rows = []
    recovery = {}
    for tag in traffic.tags:
        requests = traffic.requests(tag)
        if tag.endswith("-near"):
            rows.append(f"  {tag}: {sum(r.ok for r in requests)}/{len(requests)} ok")
            assert [r.seq for r in requests if not r.ok] == [], f"{tag}: the fast path failed"
            assert len(requests) >= RATE * (restarted - killed) * 0.5, f"{tag}: too little traffic"
            assert [r.seq for r in requests if (tag, r.seq) not in app] == []
            continue
        expires = first_expiry[tag]
        before = [r for r in requests if r.t < expires - EXPIRY_SLACK]
        closed = [r for r in requests if expires + EXPIRY_SLACK <= r.t < restarted]
        last_failure = max((r.t for r in requests if not r.ok), default=restarted)
        recovery[tag] = next(r.t for r in requests if r.t > last_failure) - restarted
        rows.append(
            f"  {tag}: {len(requests)} requests; before the first expiry (+{expires - killed:.0f}s)"
            f" {sum(r.ok for r in before)}/{len(before)} ok; after it"
            f" {sum(not r.ok for r in closed)}/{len(closed)} failed, of which"
            f" {sum((tag, r.seq) in app for r in closed)} reached the app;"
            f" ok again {recovery[tag]:.1f}s after the CA restart"
        )
        assert [r for r in before if not r.ok] == [], f"{tag}: failed before the first expiry"
        assert len(before) >= RATE * (expires - killed) * 0.5, f"{tag}: too little traffic"
        assert len(closed) >= RATE * (FAILING_WINDOW - 2 * EXPIRY_SLACK) * 0.5, (tag, len(closed))
        assert [r for r in closed if r.ok] == [], f"{tag}: requests got through expired certs"
        # Fail closed, never plaintext: no failed request reached the application.
        assert [r.seq for r in requests if not r.ok and (tag, r.seq) in app] == []
        assert [r.seq for r in requests if r.ok and (tag, r.seq) not in app] == []
    print(
        f"\nCA killed (SIGKILL) for {restarted - killed:.0f}s, TTL {TTL}s; certificates expired"
        f" {', '.join(f'+{e - killed:.0f}s' for e in sorted(expiry.values()))} after the kill;"
        f" CA ready {ca_ready:.1f}s after its restart; recovery bound {RECOVERY_BOUND:.0f}s"
    )
    print("\n".join(rows))
    for node in ("n1", "n2"):
        kept = sorted(k for k in held[node] if k != "ROOTCA")
        print(f"  {node} during the outage: agent says {said[node]!r}; Envoy holds {kept}")
        print(f"  {node} agent's counters: {cert_metrics(tb, node)}")
    for node in ("n1", "n2"):
        valid = [k for k, t in held[node].items() if k != "ROOTCA" and t > looked]
        assert valid == [], f"{node}'s Envoy held unexpired certificates without a CA: {valid}"
        assert "CA" in said[node], f"{node}'s agent does not say its CA fails: {said[node]!r}"
        assert identity_problem(tb, node) == "", f"{node}: the agent still reports a CA problem"
    assert restarted - killed > TTL
    # Nothing was restarted to recover: the same agents, Envoys and workloads, still running.
    assert processes(tb) == survivors
    assert all(netns.alive(pid, start) for pid, start in survivors.values())


def cert_metrics(tb: Testbed, node: str) -> str:
    """The agent's certificate counters (requests to the CA by result, expired), for the report."""
    text = node_metrics(tb.name, node)
    wanted = ("nodeagent_cert_requests_total", "nodeagent_cert_expired_total")
    return ", ".join(
        line.replace("nodeagent_cert_", "")
        for line in text.splitlines()
        if line.startswith(wanted) and not line.endswith(" 0.0")
    )


def identity_problem(tb: Testbed, node: str) -> str:
    """Why the node agent's identities lack certificates ("" when all is well), from
    ``nodeagent proxy-status -o json`` as a user reads it."""
    proc = node_cli(tb.name, node, "proxy-status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    problem: str = json.loads(proc.stdout)["identity"]["problem"]
    return problem


# -- 2. root rotation ----------------------------------------------------------------------------

STEP_TIMEOUT = 60.0  # the CA re-reads its Secrets every 2 s, the agents their root file every 3 s


def probe(tb: Testbed, folder: Path, ca: PluginCA, cafile: Path, name: str) -> dict[str, Any]:
    """An mTLS handshake with the server from outside the mesh (node n1's network namespace),
    presenting a certificate CA signed for a mesh identity; the server is verified to CAFILE."""
    cert = issue(ca, f"spiffe://{TRUST_DOMAIN}/ns/foo/sa/prober", timedelta(minutes=10))
    chain, key = folder / f"{name}.chain.pem", folder / f"{name}.key.pem"
    chain.write_bytes(cert.chain_pem)
    key.touch(mode=0o600)
    key.write_bytes(cert.key_pem)
    argv = [PY, str(HERE / "mtls_probe.py"), tb.pod_ip(SERVER), "80", str(chain), str(key)]
    argv.append(str(cafile))
    proc = subprocess.run(
        netns.in_netns(layout.node_netns(tb.name, "n1"), argv),
        capture_output=True,
        text=True,
        timeout=20,
    )
    key.unlink()
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def test_root_rotation_across_two_nodes_with_no_failed_request(tb: Testbed, tmp_path: Path) -> None:
    ensure_ca(tb)
    a_files = tb.read_secret(SELF_SIGNED_SECRET)
    root_a = x509.load_pem_x509_certificate(a_files[ROOT_CERT])
    b_files = plugin_cacerts(TRUST_DOMAIN, intermediate=True)  # Istio's usual layout
    root_b = x509.load_pem_x509_certificate(b_files[ROOT_CERT])
    nodes = ("n1", "n2")
    workloads = [(spiffe(pod), node) for pod, node in [*CALLERS.values(), (SERVER, SERVER_NODE)]]

    def trust(*roots: x509.Certificate) -> bool:
        return all(set(trusted_roots(tb, n)) == set(roots) for n in nodes)

    def signed_by(root: x509.Certificate) -> bool:
        held = {n: envoy_secrets(tb, n) for n in nodes}
        return all(chains_to(held[node].get(sid, []), root) for sid, node in workloads)

    # Before: the CA's own root A signs and is trusted (every workload holds its certificate).
    wait_for(lambda: trust(root_a) and signed_by(root_a), RECOVERY_BOUND, "certificates from A")
    traffic = Traffic(tb, tmp_path, "rotation")
    times = {}
    try:
        traffic.steady(3.0, 90, "steady traffic before the rotation")
        started = time.time()
        # 1. Trust A+B; A still signs: nothing changes for the workloads' certificates.
        tb.apply_secret(CACERTS, {**a_files, ROOT_CERT: pem(root_a, root_b)})
        times["trust A+B"] = wait_for(lambda: trust(root_a, root_b), STEP_TIMEOUT, "trust A+B")
        config_map = tb.ca_root_pem()
        assert set(x509.load_pem_x509_certificates(config_map)) == {root_a, root_b}
        # 2. B signs (the bundle is still A+B): every workload moves to B within a TTL.
        tb.apply_secret(CACERTS, {**b_files, ROOT_CERT: pem(root_a, root_b)})
        times["signed by B"] = wait_for(lambda: signed_by(root_b), TTL + 30, "certs from B")
        # 3. Trust B only.
        tb.apply_secret(CACERTS, b_files)
        times["trust B only"] = wait_for(lambda: trust(root_b), STEP_TIMEOUT, "trust B only")
        time.sleep(3.0)  # traffic under the final trust (its requests are checked below)
    finally:
        traffic.stop()
    requests = [r for tag in traffic.tags for r in traffic.requests(tag)]
    during = [r for r in requests if r.t >= started]
    failed = [r for r in requests if not r.ok]
    print(
        f"\nroot rotation across {len(nodes)} nodes in {time.time() - started:.0f}s: "
        + ", ".join(f"{step} after {s:.1f}s" for step, s in times.items())
        + f"; {len(during)} requests during it, {len(failed)} failed"
    )
    assert failed == [], failed[:5]
    assert len(during) >= RATE * len(traffic.tags) * sum(times.values()) * 0.5
    assert signed_by(root_b) and trust(root_b)
    # Only B is trusted now: an A-signed certificate is refused, a B-signed one accepted.
    cafile = tmp_path / "root-b.pem"
    cafile.write_bytes(pem(root_b))  # the server must present a chain to B too
    a_signed = probe(tb, tmp_path, PluginCA.from_pem(a_files, str), cafile, "a")
    b_signed = probe(tb, tmp_path, PluginCA.from_pem(b_files, str), cafile, "b")
    print(f"handshake with an A-signed certificate: {a_signed}; B-signed: {b_signed}")
    assert b_signed["status"] == 200, b_signed
    assert a_signed["status"] is None, a_signed
