"""The CA service on the testbed (issue #13): one trust root, no signing key on any node.

One two-node testbed for the module (``source: kubernetes``, ``ca: service``, 60 s certificates,
n1 capturing with eBPF and n2 with nftables: #18's "S1.1 and S1.2 across the two modes"):
the testbed runs ``nodeagent ca`` on its control-plane host against the stand-in API server, and
every node agent is its client with its node's credentials (a pod-bound token, audience
istio-ca, reviewed by TokenReview) and the root from the CA's ConfigMap. The issue's "Must show":

- "On the testbed: S1.1 and S1.2 across two nodes with certificates from the CA service; no file
  or process memory dump of a node agent contains a CA private key (scan as #5 did)."
- "Node authorization: node A's credential asking for an identity that runs only on node B is
  refused; a forged token is refused; a CSR whose SAN differs from the asked identity is
  refused."

Istio's behaviour followed: the certificate API istiod serves (``IstioCertificateService/
CreateCertificate``, https://istio.io/latest/docs/concepts/security/#pki), node authorization of
a node proxy's impersonated identities (istio security/pkg/server/ca/node_auth.go, used for
ztunnel: https://istio.io/latest/docs/ambient/architecture/data-plane/), and a plug-in or
self-signed root kept only by the CA
(https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from nodeagent.redirect import bpf_sys
from nodeagent.redirect.ebpf import netns_cookie
from nodeagent.redirect.ebpf_maps import listener_key
from nodeagent.testbed import daemons, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration import keyscan
from tests.integration.helpers import agent_pods, call, http_status, presented_chain, wait_for

pytestmark = pytest.mark.integration

PY = sys.executable
CA_CLIENT = Path(__file__).parent.parent / "unit" / "ca_client.py"
NAME = "tbca"
TD = "spiffe://cluster.local"
# S1, each workload with a service account of its own, so that an identity's node is known:
# web-api and sleep on n1, recommendation on n2, purchase-history on both; default/sleep (n2)
# is outside the mesh.
TOPOLOGY = f"""
name: {NAME}
source: kubernetes
ca: service
certTTL: 60
nodes: [{{name: n1, captureMode: ebpf}}, {{name: n2}}]  # S1.1/S1.2 across capture modes (#18)
namespaces:
  - {{name: istioinaction, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - name: sleep
    namespace: istioinaction
    node: n1
    serviceAccount: sleep
    labels: {{app: sleep}}
  - {{name: sleep, namespace: default, node: n2, labels: {{app: sleep}}}}
  - name: web-api
    namespace: istioinaction
    node: n1
    serviceAccount: web-api
    labels: {{app: web-api, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://recommendation:8080"}}}}
  - name: recommendation
    namespace: istioinaction
    node: n2
    serviceAccount: recommendation
    labels: {{app: recommendation, version: v1}}
    workload: {{type: fake-service, env: {{UPSTREAM_URIS: "http://purchase-history:8080"}}}}
  - name: purchase-history-v1
    namespace: istioinaction
    node: n1
    serviceAccount: purchase-history
    labels: {{app: purchase-history, version: v1}}
    workload: {{type: fake-service}}
  - name: purchase-history-v2
    namespace: istioinaction
    node: n2
    serviceAccount: purchase-history
    labels: {{app: purchase-history, version: v2}}
    workload: {{type: fake-service}}
services:
  - name: web-api
    namespace: istioinaction
    selector: {{app: web-api}}
    ports: [{{name: http, port: 8080}}]
  - name: recommendation
    namespace: istioinaction
    selector: {{app: recommendation}}
    ports: [{{name: http, port: 8080}}]
  - name: purchase-history
    namespace: istioinaction
    selector: {{app: purchase-history}}
    ports: [{{name: http, port: 8080}}]
"""
MESH_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        yield Testbed.up(loads_topology(TOPOLOGY, "test_ca_service"), TOPOLOGY, "test_ca_service")
    finally:
        down(NAME)


def ca_signing_key(tb: Testbed) -> bytes:
    """The CA's private key: with no cacerts Secret, the self-signed root's, in the Secret the
    CA created (nodeagent-system/nodeagent-ca)."""
    assert not tb.read_secret("cacerts"), "this module runs the CA on its own self-signed root"
    secret = tb.read_secret("nodeagent-ca")
    assert b"PRIVATE KEY" in secret["ca-key.pem"]
    return secret["ca-key.pem"]


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text; NAME includes its labels."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refusals(tb: Testbed) -> dict[str, float]:
    text = tb.ca_metrics()
    reasons = ("unauthenticated", "not_authorized", "bad_csr", "san_mismatch", "bad_identity")
    return {r: metric(text, f'nodeagent_ca_refusals_total{{reason="{r}"}}') for r in reasons}


def ask_ca(
    tb: Testbed, node: str, token_file: Path, identity: str, sans: list[str]
) -> dict[str, Any]:
    """One CreateCertificate from NODE's network namespace (the node's view of the CA: its
    address, the root from the ConfigMap, the CA's Service name), as NODE's agent asks."""
    argv = [
        PY,
        str(CA_CLIENT),
        "--address",
        tb.ca_address,
        "--root-file",
        str(layout.ca_root_file(tb.name)),
        "--token-file",
        str(token_file),
        "--server-name",
        "nodeagent-ca.nodeagent-system.svc",
        "--identity",
        identity,
        *[a for san in sans for a in ("--san", san)],
    ]
    proc = subprocess.run(
        netns.in_netns(layout.node_netns(tb.name, node), argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def test_s1_1_across_two_nodes_with_certificates_from_the_ca_service(tb: Testbed) -> None:
    """SCENARIOS S1.1: sleep -> web-api (n1) -> recommendation (n2) -> purchase-history (v1 on n1,
    v2 on n2), every hop between mesh pods over mTLS with certificates the CA service signed.
    n1 captures with eBPF, n2 with nftables (#18): web-api's call to n2 leaves through eBPF."""
    assert agent_pods(tb.name, "n1")["istioinaction/web-api"]["backend"] == "ebpf"
    assert agent_pods(tb.name, "n2")["istioinaction/recommendation"]["backend"] == "nftables"
    # No signing key on any node: no plug-in cacerts, each agent a client of the CA service.
    assert not layout.cacerts_dir(tb.name).exists()
    for node in ("n1", "n2"):
        cmdline = Path(f"/proc/{tb.daemon(node, daemons.AGENT).pid}/cmdline").read_bytes()
        argv = cmdline.decode().split("\0")
        assert "--ca-dir" not in argv and argv[argv.index("--ca-address") + 1] == tb.ca_address

    versions = set()
    # Istio's default LEAST_REQUEST picks either idle replica at random: call until both have
    # answered (at least 6 calls; 30 at most: both unseen has odds 2^-29).
    for i in range(30):
        if i >= 6 and {"v1", "v2"} <= versions:
            break
        answer = call(tb, "istioinaction/sleep", "http://web-api:8080/")
        rec = answer["upstream_calls"]["http://recommendation:8080"]
        history = rec["upstream_calls"]["http://purchase-history:8080"]
        assert [a["code"] for a in (answer, rec, history)] == [200, 200, 200]
        # n1 -> n2 over mTLS with web-api's own identity (Envoy's XFCC at the callee).
        xfcc = rec["headers"].get("x-forwarded-client-cert", "")
        assert f"URI={TD}/ns/istioinaction/sa/web-api" in xfcc, rec["headers"]
        versions.add(history["version"])
    assert {"v1", "v2"} <= versions, versions  # both nodes' replicas

    # What the servers present on the wire chains to the root of the CA's ConfigMap, which is
    # the root of the CA's Secret; the leaf is the 60 s certificate the agent asked for.
    root_pem = tb.ca_root_pem()
    assert root_pem.strip() == tb.read_secret("nodeagent-ca")["root-cert.pem"].strip()
    root = x509.load_pem_x509_certificate(root_pem)
    for pod, sa in (("recommendation", "recommendation"), ("web-api", "web-api")):
        chain = presented_chain(tb, "default/sleep", tb.pod_ip(f"istioinaction/{pod}"), 8080)
        assert chain, f"{pod} presented no certificate"
        leaf = chain[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"{TD}/ns/istioinaction/sa/{sa}"
        ]
        links = [c for c in chain if c != root]
        for child, parent in zip(links, [*links[1:], root], strict=True):
            child.verify_directly_issued_by(parent)
        ttl = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        assert 50 <= ttl <= 60 + 120, ttl  # certTTL 60 (plus the CA's backdating, if any)
    issued = metric(tb.ca_metrics(), "nodeagent_ca_certificates_issued_total")
    assert issued >= 5, issued  # sleep, web-api, recommendation, purchase-history x 2 nodes


def test_s1_2_strict_mtls_across_nodes_with_the_cas_certificates(tb: Testbed) -> None:
    """SCENARIOS S1.2: mesh-wide STRICT; sleep outside the mesh (n2) is refused by web-api (n1),
    sleep in the mesh (n1) is served, and recommendation (n2) sees web-api's identity; the
    server app sees the caller's SPIFFE identity."""
    policy = layout.cluster_dir(tb.name) / "policy.yaml"
    try:
        policy.write_text(MESH_STRICT)
        wait_for(lambda: outsider(tb) == "000", 20, "STRICT to refuse the outsider", step=0.5)
        answer = call(tb, "istioinaction/sleep", "http://web-api:8080/")
        assert answer["code"] == 200
        xfcc = answer["headers"].get("x-forwarded-client-cert", "")
        assert f"URI={TD}/ns/istioinaction/sa/sleep" in xfcc, answer["headers"]
        rec = answer["upstream_calls"]["http://recommendation:8080"]
        assert rec["code"] == 200
        assert f"URI={TD}/ns/istioinaction/sa/web-api" in rec["headers"].get(
            "x-forwarded-client-cert", ""
        )
    finally:
        policy.unlink(missing_ok=True)
    wait_for(lambda: outsider(tb) == "200", 20, "PERMISSIVE again for the next tests", step=0.5)


def outsider(tb: Testbed) -> str:
    """What sleep outside the mesh gets from web-api."""
    return http_status(tb.exec, "default/sleep", "http://web-api.istioinaction:8080/")


def test_no_node_holds_the_cas_private_key_in_memory_or_files(tb: Testbed, tmp_path: Path) -> None:
    """The CA's key, in every encoding derivable from it, is in no process of any node (agent,
    Envoy, install-cni: everything in the node's network namespace) and in no file the testbed
    holds (nodes' directories, logs, the cluster directory, the API server's files); it IS in
    the CA process's memory, so the scan can find what it looks for."""
    needles = keyscan.key_encodings(ca_signing_key(tb))
    ca_pid = tb.ca_pid()
    assert ca_pid is not None
    in_ca = keyscan.found_in_process(ca_pid, needles)
    print(f"\nCA process {ca_pid}: holds the key as {sorted(in_ca)}")
    # The key as OpenSSL holds it (the scalar); encodings Python read and freed may be gone.
    assert in_ca & {"raw-scalar-big-endian", "raw-scalar-little-endian"}, in_ca

    scanned = []
    for node in ("n1", "n2"):
        pids = netns.pids_in(layout.node_netns(tb.name, node))
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
        for pid in pids:
            try:
                found = keyscan.found_in_process(pid, needles)
            except (FileNotFoundError, ProcessLookupError):
                continue  # a short-lived helper that exited meanwhile
            assert not found, f"{node}: process {pid} ({names[pid]}) holds the CA key: {found}"
            scanned.append(f"{node}:{names[pid]}")
    print(f"scanned node processes: {scanned}")
    for node in ("n1", "n2"):
        agent = tb.daemon(node, daemons.AGENT).pid
        cni = tb.daemon(node, daemons.INSTALL_CNI).pid
        assert {agent, cni} <= set(netns.pids_in(layout.node_netns(tb.name, node)))
        assert any(n.startswith(f"{node}:envoy") for n in scanned), scanned

    everything = layout.logs_dir(tb.name).parent
    assert keyscan.found_in_files(everything, needles) == {}
    assert keyscan.files_scanned(everything) >= 20
    # Control: the file scan finds the key when a file holds it.
    (tmp_path / "leak").write_bytes(b"x" + needles["der-pkcs8"] + b"y")
    leaks = keyscan.found_in_files(tmp_path, needles)
    assert list(leaks) == [tmp_path / "leak"] and "der-pkcs8" in leaks[tmp_path / "leak"]


def test_node_authorization_with_the_nodes_real_credentials(tb: Testbed, tmp_path: Path) -> None:
    """Each refusal with the gRPC status istiod's clients understand, a reason, counted once in
    the CA's metrics; the tokens never reach the CA's log."""
    n1_token = layout.node_token_file(tb.name, "n1")
    n2_token = layout.node_token_file(tb.name, "n2")
    recommendation = f"{TD}/ns/istioinaction/sa/recommendation"  # runs on n2 only
    web_api = f"{TD}/ns/istioinaction/sa/web-api"  # runs on n1 only

    # Control: each node's credential gets the identities of its own pods.
    assert ask_ca(tb, "n2", n2_token, recommendation, [recommendation])["code"] == "OK"
    answer = ask_ca(tb, "n1", n1_token, web_api, [web_api])
    assert answer["code"] == "OK" and len(answer["chain"]) >= 2

    before = refusals(tb)
    # n1's credential asking for an identity that runs only on n2.
    answer = ask_ca(tb, "n1", n1_token, recommendation, [recommendation])
    assert answer["code"] == "PERMISSION_DENIED", answer
    assert "no pod of istioinaction/recommendation on node n1" in answer["details"], answer
    assert refusals(tb) == before | {"not_authorized": before["not_authorized"] + 1}

    # A forged token (never issued: TokenReview does not know it).
    forged = tmp_path / "forged-token"
    forged.write_text("eyJhbGciOiJSUzI1NiJ9.forged.token")
    answer = ask_ca(tb, "n1", forged, web_api, [web_api])
    assert answer["code"] == "UNAUTHENTICATED", answer
    assert "TokenReview" in answer["details"], answer
    after_forged = refusals(tb)
    assert after_forged == before | {
        "not_authorized": before["not_authorized"] + 1,
        "unauthenticated": before["unauthenticated"] + 1,
    }

    # A CSR whose SAN differs from the identity asked for (both n1's to ask for).
    answer = ask_ca(tb, "n1", n1_token, web_api, [f"{TD}/ns/istioinaction/sa/sleep"])
    assert answer["code"] == "INVALID_ARGUMENT", answer
    assert f"want exactly one SAN, URI {web_api}" in answer["details"], answer
    assert refusals(tb) == after_forged | {"san_mismatch": before["san_mismatch"] + 1}

    # Never a token in the CA's log (nor any other log of the testbed).
    ca_log = (layout.logs_dir(tb.name) / "ca.log").read_text()
    assert "refused a certificate" in ca_log  # the refusals were logged...
    secrets_ = [tb.node_token("n1"), tb.node_token("n2"), forged.read_text()]
    for log in layout.logs_dir(tb.name).iterdir():
        text = log.read_text(errors="replace")
        assert not [s for s in secrets_ if s in text], f"{log} holds a token"


def test_a_killed_ca_comes_back_with_the_same_root(tb: Testbed) -> None:
    """The self-signed root lives in the CA's Secret, not in the process: a CA killed and started
    again (a crashed pod, rescheduled) signs under the same root, and the root the agents mount
    does not change (istiod's istio-ca-secret, https://istio.io/latest/docs/concepts/security/)."""
    root, key = tb.ca_root_pem(), ca_signing_key(tb)
    pid = tb.ca_pid()
    tb.stop_ca(kill=True)
    assert pid is not None and tb.ca_pid() is None and not netns.alive(pid, None)
    control = {c.component: c for c in tb.control_plane_status()}
    assert control["ca"].pid is None and control["ca"].ready == "not running"
    assert control["apiserver"].ready == ""  # the API server is another host's process
    tb.start_ca()
    assert tb.ca_pid() not in (None, pid) and tb.ca_ready() == ""
    assert tb.ca_root_pem() == root and ca_signing_key(tb) == key
    web_api = f"{TD}/ns/istioinaction/sa/web-api"
    answer = ask_ca(tb, "n1", layout.node_token_file(tb.name, "n1"), web_api, [web_api])
    assert answer["code"] == "OK"
    issued_root = x509.load_pem_x509_certificate(answer["chain"][-1].encode())
    assert issued_root == x509.load_pem_x509_certificate(root)


def test_an_envoy_restart_on_the_ebpf_node_gets_its_new_listeners_steered(tb: Testbed) -> None:
    """n1's Envoy killed: the kernel drops the sk_lookup entries of its closed listeners (the
    pods' captured inbound is refused meanwhile: fail closed), and the agent puts the restarted
    Envoy's new sockets in their place; n2 -> purchase-history-v1 (n1) answers again."""
    pod = "istioinaction/purchase-history-v1"
    cookie = netns_cookie(Path("/run/netns") / tb.pod_netns(pod))
    listeners = str(layout.bpf_dir(tb.name, "n1") / "maps" / "listeners")

    def steered() -> bytes | None:
        with bpf_sys.pinned(listeners) as fd:
            return bpf_sys.map_lookup(fd, listener_key(cookie), 8)

    def status() -> str:
        url = f"http://{tb.pod_ip(pod)}:8080/"
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", url]
        return tb.exec("istioinaction/recommendation", argv).stdout

    before = steered()
    assert before is not None and status() == "200"
    pidfile = layout.agent_socket(tb.name, "n1").parent / "envoy.pid"
    os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
    wait_for(lambda: steered() != before, 10, "the killed Envoy's listener entry dropped")
    wait_for(lambda: steered() not in (None, before), 30, "the new Envoy's listener steered")
    wait_for(lambda: status() == "200", 30, "purchase-history-v1 answering again", step=0.2)
