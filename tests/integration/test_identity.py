"""Identity and mTLS between nodes (issue #5): SPIFFE certificates per local service account over
SDS, auto mTLS, PeerAuthentication, on a two-node testbed with the real Envoy.

SCENARIOS S4: namespaces foo and bar in the mesh, legacy not; each has httpbin (port 8000 ->
container port 80) and sleep. Every sleep calls every httpbin and the 9 codes are printed as a
table and asserted cell by cell, under each policy.

The agents read the cluster from the Kubernetes API (the testbed's API stand-in), as the
DaemonSet's do, and get certificates from the testbed's CA service (``ca: service``); the rotation
test keeps the directory source and the standalone plug-in CA (``ca: plugin``) covered on two
nodes.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration import helpers
from tests.integration.helpers import (
    envoy_admin,
    http_status,
    node_cli,
    node_metrics,
    pod,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

PY = sys.executable
CLIENT = Path(__file__).with_name("keepalive_client.py")
NAME = "tbid"
NAMESPACES = ("foo", "bar", "legacy")


def _topology() -> str:
    httpbin = {"type": "fake-service", "port": 80}
    pods = []
    for i, ns in enumerate(NAMESPACES):
        pods += [
            pod("httpbin", f"n{1 + i % 2}", {"app": "httpbin"}, namespace=ns, workload=httpbin),
            pod("sleep", f"n{2 - i % 2}", {"app": "sleep"}, namespace=ns),
        ]
    services = [service("httpbin", 8000, 80, ns) for ns in NAMESPACES]
    return topology_text(NAME, pods, services, mesh=("foo", "bar"), outside=("legacy",))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_identity") as bed:
        yield bed


def apply_policy(tb: Testbed, yaml_text: str) -> None:
    """Istio resources go where the agents read them, as `kubectl apply` would."""
    path = layout.cluster_dir(tb.name) / "policy.yaml"
    if yaml_text:
        path.write_text(yaml_text)
    else:
        path.unlink(missing_ok=True)


def restore(tb: Testbed) -> None:
    """No policy again, and wait until every pair answers as without one."""
    apply_policy(tb, "")
    expect_matrix(tb, "back to no policy", set())


def code(tb: Testbed, src: str, dst: str) -> str:
    return http_status(tb.exec, f"{src}/sleep", f"http://httpbin.{dst}:8000/ip")


def matrix(tb: Testbed) -> dict[tuple[str, str], str]:
    return {(s, d): code(tb, s, d) for s in NAMESPACES for d in NAMESPACES}


def show(title: str, cells: dict[tuple[str, str], str]) -> str:
    rows = [f"{title}", "from \\ to   " + "  ".join(f"{d:>7}" for d in NAMESPACES)]
    for s in NAMESPACES:
        rows.append(f"sleep.{s:<7}" + "  ".join(f"{cells[(s, d)]:>7}" for d in NAMESPACES))
    return "\n".join(rows)


def expect_matrix(tb: Testbed, title: str, failing: set[tuple[str, str]]) -> None:
    want = {(s, d): ("000" if (s, d) in failing else "200") for s in NAMESPACES for d in NAMESPACES}
    got: dict[tuple[str, str], str] = {}

    def as_wanted() -> bool:
        nonlocal got
        got = matrix(tb)
        return got == want

    def wrong() -> str:
        cells = [
            f"sleep.{s} -> httpbin.{d}: {got[s, d]}" for s, d in want if got[s, d] != want[s, d]
        ]
        return f"{title}: {', '.join(cells)}\n{show(title, got)}"

    wait_for(as_wanted, 15, wrong, step=0.5)
    print("\n" + show(title, got))


MESH_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
FOO_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
"""
BAR_WORKLOAD = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls: {80: {mode: DISABLE}}
"""


def test_s4_peer_authentication_matrix(tb: Testbed) -> None:
    legacy_fails = {("legacy", "foo"), ("legacy", "bar")}
    try:
        apply_policy(tb, "")
        expect_matrix(tb, "no policy (PERMISSIVE)", set())
        apply_policy(tb, MESH_STRICT)
        expect_matrix(tb, "mesh-wide STRICT", legacy_fails)
        apply_policy(tb, FOO_STRICT)
        expect_matrix(tb, "namespace-wide STRICT on foo", {("legacy", "foo")})
        apply_policy(tb, BAR_WORKLOAD)
        expect_matrix(tb, "workload STRICT on httpbin.bar, port 80 DISABLE", set())
    finally:
        restore(tb)


def _values(tree: Any, key: str) -> list[Any]:
    """Every value of KEY anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [
            x for v in tree.values() for x in _values(v, key)
        ]
    if isinstance(tree, list):
        return [x for v in tree for x in _values(v, key)]
    return []


def test_a_remote_endpoint_keeps_its_identity_and_strict_holds_across_nodes(tb: Testbed) -> None:
    """Issue #12, defect 1. With the Kubernetes source, the caller's node knows the pod behind an
    endpoint on another node: its EDS endpoint carries ``tlsMode: istio`` and the cluster verifies
    the callee's SPIFFE identity (secure naming), so a STRICT callee there answers the meshed
    caller and refuses plaintext. Istio: auto mTLS sends mTLS to endpoints with a proxy
    (https://istio.io/latest/docs/tasks/security/authentication/authn-policy/#auto-mutual-tls),
    secure naming (https://istio.io/latest/docs/concepts/security/#secure-naming). On main the
    source watched only its node's pods: plaintext cross-node, an empty SAN list, 000 under
    STRICT. The endpoint reaches Envoy's originate listener with its SPIFFE ID, which originate
    verifies per connection (nodeagent/translate/internal.py)."""
    assert tb.topology.source == "kubernetes"
    caller, callee = tb.state.pods["foo/sleep"], tb.state.pods["foo/httpbin"]
    assert caller.node != callee.node
    host = "httpbin.foo.svc.cluster.local"
    eds = envoy_config_dump(tb, caller.node, "resource=dynamic_endpoint_configs&include_eds")
    assignment = next(
        c["endpoint_config"]
        for c in eds
        if c.get("endpoint_config", {}).get("cluster_name") == f"outbound|8000||{host}"
    )
    endpoints = {
        # endpoint_id: "ip:port#<digest of the identity verified>" (translate/endpoints.py)
        lb["endpoint"]["address"]["envoy_internal_address"]["endpoint_id"].partition("#")[0]: (
            _values(lb, "tlsMode"),
            _values(lb, "sans"),
        )
        for group in assignment["endpoints"]
        for lb in group["lb_endpoints"]
    }
    # The endpoint's own identity is the only one its server may present (secure naming).
    callee_id = "spiffe://cluster.local/ns/foo/sa/httpbin"
    assert endpoints == {f"{callee.ip}:80": (["istio"], [callee_id])}, assignment
    try:
        apply_policy(tb, FOO_STRICT)
        wait_for(lambda: code(tb, "legacy", "foo") == "000", 15, "legacy refused", step=0.5)
        assert tb.state.pods["legacy/sleep"].node == caller.node  # plaintext, from that node
        assert code(tb, "legacy", "foo") == "000"
        assert code(tb, "foo", "foo") == "200"
        # Over mTLS, not a plaintext connection pooled before the policy: the app sees the
        # caller's identity.
        proc = tb.exec(
            "foo/sleep", ["curl", "-sS", "--max-time", "5", "http://httpbin.foo:8000/headers"]
        )
        xfcc = json.loads(proc.stdout)["headers"].get("x-forwarded-client-cert", "")
        assert "URI=spiffe://cluster.local/ns/foo/sa/sleep" in xfcc, proc.stdout
    finally:
        restore(tb)


def test_destination_rule_tls_mode_against_a_strict_server(tb: Testbed) -> None:
    dr = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: foo}}
spec:
  host: httpbin.bar.svc.cluster.local
  trafficPolicy: {{tls: {{mode: {mode}}}}}
"""
    try:
        apply_policy(tb, MESH_STRICT + "---" + dr.format(mode="DISABLE"))
        wait_for(lambda: code(tb, "foo", "bar") == "503", 15, "plaintext to STRICT", step=0.5)
        # Plaintext to a STRICT server is refused; as with Istio, the caller's proxy answers 503.
        assert code(tb, "foo", "bar") == "503"
        assert code(tb, "bar", "bar") == "200"  # the DR lives in foo: it binds foo's clients
        apply_policy(tb, MESH_STRICT + "---" + dr.format(mode="ISTIO_MUTUAL"))
        wait_for(lambda: code(tb, "foo", "bar") == "200", 15, "ISTIO_MUTUAL to STRICT", step=0.5)
        assert code(tb, "foo", "bar") == "200"
    finally:
        restore(tb)


def test_the_server_app_sees_the_real_callers_spiffe_identity(tb: Testbed) -> None:
    for src, dst in (("foo", "bar"), ("bar", "foo"), ("foo", "foo")):
        proc = tb.exec(
            f"{src}/sleep", ["curl", "-sS", "--max-time", "5", f"http://httpbin.{dst}:8000/headers"]
        )
        xfcc = json.loads(proc.stdout)["headers"]["x-forwarded-client-cert"]
        assert f"URI=spiffe://cluster.local/ns/{src}/sa/sleep" in xfcc, xfcc
        assert f"By=spiffe://cluster.local/ns/{dst}/sa/httpbin" in xfcc, xfcc
    # A plaintext caller from outside the mesh gets no identity, and cannot forge one.
    proc = tb.exec(
        "legacy/sleep",
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-H",
            "x-forwarded-client-cert: URI=spiffe://forged",
            "http://httpbin.foo:8000/headers",
        ],
    )
    assert "x-forwarded-client-cert" not in json.loads(proc.stdout)["headers"]


def presented_chain(tb: Testbed, dst: str) -> list[x509.Certificate]:
    """The certificates httpbin.DST presents on the wire, read with openssl from outside."""
    return helpers.presented_chain(tb, "legacy/sleep", tb.pod_ip(f"{dst}/httpbin"), 80)


def test_workload_certificates_on_the_wire_verify_to_the_cas_root(tb: Testbed) -> None:
    """The testbed's CA (the CA service, topology default ``ca: service``) signed them: they
    verify to the root the agents mount from its ConfigMap."""
    chain = presented_chain(tb, "bar")
    assert chain, "the server presented no certificate"
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/bar/sa/httpbin"
    ]
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    now = time.time()
    assert leaf.not_valid_before_utc.timestamp() <= now < leaf.not_valid_after_utc.timestamp()
    ttl = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 23 * 3600 < ttl.total_seconds() <= 24 * 3600 + 120  # Istio's default 24 h
    root = x509.load_pem_x509_certificate(tb.trust_root_pem())
    # The chain as presented, up to the trusted root (a root sent along is not needed).
    links = [c for c in chain if c != root]
    for child, parent in zip(links, [*links[1:], root], strict=True):
        child.verify_directly_issued_by(parent)  # raises if a link is broken


def test_no_private_key_material_in_anything_the_agents_write(tb: Testbed) -> None:
    # What the agents write: their state and run directories (registry, Envoy bootstrap,
    # pidfile, sockets) and the logs (agent, Envoy, plugin).
    folders = [layout.logs_dir(tb.name)]
    for node in ("n1", "n2"):
        folders += [
            layout.agent_state_dir(tb.name, node),
            layout.agent_socket(tb.name, node).parent,
        ]
    scanned = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                scanned += 1
                assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert scanned >= 8


def envoy_config_dump(tb: Testbed, node: str, query: str) -> list[dict[str, Any]]:
    """The ``configs`` of the node Envoy's admin ``/config_dump?QUERY``."""
    configs: list[dict[str, Any]] = json.loads(
        envoy_admin(tb.name, node, f"/config_dump?{query}")
    ).get("configs", [])
    return configs


def envoy_secret_names(tb: Testbed, node: str) -> set[str]:
    return {
        c.get("name", "") for c in envoy_config_dump(tb, node, "resource=dynamic_active_secrets")
    }


def test_a_node_holds_only_the_identities_of_its_own_pods(tb: Testbed) -> None:
    n1 = {n for n in envoy_secret_names(tb, "n1") if n.startswith("spiffe://")}
    n2 = {n for n in envoy_secret_names(tb, "n2") if n.startswith("spiffe://")}
    on = {
        node: {
            f"spiffe://cluster.local/ns/{key.split('/')[0]}/sa/{rec.service_account}"
            for key, rec in tb.state.pods.items()
            if rec.node == node and key.split("/")[0] in ("foo", "bar")
        }
        for node in ("n1", "n2")
    }
    assert n1 == on["n1"] and n2 == on["n2"], (n1, n2, on)
    assert not n1 & n2 or on["n1"] & on["n2"]


ROTATION = """
name: tbrot
source: directory
ca: plugin
certTTL: 10
nodes: [{name: n1}, {name: n2}]
namespaces:
  - {name: foo, labels: {nodeagent.io/mesh: enabled}}
  - {name: bar, labels: {nodeagent.io/mesh: enabled}}
pods:
  - {name: sleep, namespace: foo, node: n1, serviceAccount: sleep, labels: {app: sleep}}
  - name: httpbin
    namespace: bar
    node: n2
    serviceAccount: httpbin
    labels: {app: httpbin}
    workload: {type: fake-service, port: 80}
services:
  - name: httpbin
    namespace: bar
    selector: {app: httpbin}
    ports: [{name: http, port: 8000, targetPort: 80}]
"""


def serials(tb: Testbed, node: str, pod: str) -> set[str]:
    proc = node_cli(tb.name, node, "proxy-config", "secrets", pod, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return {s["serial"] for s in json.loads(proc.stdout) if s["name"].startswith("spiffe://")}


def test_rotation_with_a_10s_ttl_under_a_steady_stream() -> None:
    """Certificates of 10 s, rotated at half life, for 25 s of new mTLS connections: four
    rotations or more on each side with no failed request, as many as 3 minutes of 60 s
    certificates gave (that ran 184 s of the suite's 25 minutes; 20 s ones for 50 s, 60 s)."""
    down("tbrot")
    try:
        tb = Testbed.up(loads_topology(ROTATION, "rotation"), ROTATION, "rotation")
        stream = subprocess.Popen(
            tb.exec_argv("foo/sleep", [PY, str(CLIENT), "httpbin.bar", "8000", "25", "fresh"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        seen = {"foo/sleep": set(), "bar/httpbin": set()}
        deadline = time.monotonic() + 30
        while stream.poll() is None and time.monotonic() < deadline:
            seen["foo/sleep"] |= serials(tb, "n1", "foo/sleep")
            seen["bar/httpbin"] |= serials(tb, "n2", "bar/httpbin")
            time.sleep(0.5)  # sampling while the stream runs (the loop ends with it)
        out, _ = stream.communicate(timeout=30)
        summary = json.loads(out)
        print(f"\nrotation: {summary['sent']} requests, serials seen {seen}")
        assert summary["failures"] == [], summary
        assert summary["sent"] > 75
        # 10 s certificates renewed at ~half life: at least 4 of each in 25 s.
        assert len(seen["foo/sleep"]) >= 4 and len(seen["bar/httpbin"]) >= 4, seen
        text = node_metrics("tbrot", "n2")
        assert "nodeagent_cert_rotations_total" in text
    finally:
        down("tbrot")


def ask_for_secret(
    tb: Testbed, node: str, names: list[str], quiet: float = 2.0, limit: float = 15.0
) -> set[str]:
    """Ask the node agent's xDS server, as its Envoy would, for SDS secrets by name: the names
    it serves in its answer and in whatever it sends within QUIET seconds after (LIMIT in all).

    Like Envoy, the probe keeps its stream open and ACKs each response, so the server never
    holds a response back for an ACK (its 5 s ACK timeout): a secret it would serve comes at once.
    """
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

    def subscribe(version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=f"nodeagent~{node}", cluster=node),
            type_url=secret_type,
            resource_names=names,
            version_info=version,
            response_nonce=nonce,
        )

    outbox: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
    outbox.put(subscribe())
    inbox: queue.Queue[discovery_pb2.DiscoveryResponse | grpc.RpcError] = queue.Queue()

    def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
        # Like Envoy, keep the stream open: a half-closed stream may end before an answer.
        while (message := outbox.get()) is not None:
            yield message

    sock = layout.agent_socket(tb.name, node).parent / "xds.sock"
    got: set[str] = set()
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        stream = stub.StreamAggregatedResources(requests(), timeout=limit)

        def read() -> None:
            try:
                for response in stream:
                    inbox.put(response)
            except grpc.RpcError as e:
                inbox.put(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        answered = False
        try:
            while True:
                try:  # the server answers every request (SotW), if only with no secret
                    item = inbox.get(timeout=quiet if answered else limit)
                except queue.Empty:
                    assert answered, f"no answer from {node}'s xDS server within {limit}s"
                    break  # nothing more within QUIET s of the last answer
                assert not isinstance(item, grpc.RpcError), item
                answered = True
                for resource in item.resources:
                    secret = secret_pb2.Secret()
                    resource.Unpack(secret)
                    got.add(secret.name)
                outbox.put(subscribe(item.version_info, item.nonce))  # the ACK
        finally:
            outbox.put(None)
            stream.cancel()
            reader.join(timeout=5)
    return got


def test_secrets_follow_local_pods_and_foreign_identities_are_not_served(tb: Testbed) -> None:
    from nodeagent.testbed.topology import Pod, Workload

    here = "spiffe://cluster.local/ns/foo/sa/temp"
    elsewhere = "spiffe://cluster.local/ns/bar/sa/httpbin"  # bar's httpbin runs on n2
    assert tb.state.pods["bar/httpbin"].node == "n2"
    assert ask_for_secret(tb, "n1", [elsewhere]) == set()
    temp = Pod("foo", "temp", "n1", "temp", {"app": "temp"}, {}, Workload("sleep"))
    tb.add_pod(temp)
    try:
        assert here in envoy_secret_names(tb, "n1")
        assert ask_for_secret(tb, "n1", [here, elsewhere]) == {here}
    finally:
        tb.remove_pod(temp)
    # The removed listeners drain for 5 s first.
    wait_for(lambda: here not in envoy_secret_names(tb, "n1"), 15, "secret gone", step=0.2)
    assert ask_for_secret(tb, "n1", [here]) == set()  # forgotten with its last pod


def test_s1_2_strict_mtls_on_the_workshop_shop() -> None:
    """SCENARIOS S1.2: mesh-wide STRICT; sleep outside the mesh fails, inside it gets 200."""
    from nodeagent.testbed.topology import builtin_topology_path

    text = builtin_topology_path("workshop").read_text().replace("name: workshop", "name: tbs12")
    down("tbs12")
    try:
        shop = Testbed.up(loads_topology(text, "workshop"), text, "workshop")
        assert shop.topology.source == "kubernetes"  # the default: as the DaemonSet runs
        (layout.cluster_dir(shop.name) / "policy.yaml").write_text(MESH_STRICT)

        def status(pod: str) -> str:
            return http_status(shop.exec, pod, "http://web-api.istioinaction:8080/")

        # Reset: plaintext refused.
        wait_for(lambda: status("default/sleep") == "000", 15, "STRICT to refuse", step=0.5)
        assert status("istioinaction/sleep") == "200"
        answer = json.loads(
            shop.exec("istioinaction/sleep", ["curl", "-sS", "http://web-api:8080/"]).stdout
        )
        xfcc = answer["headers"]["x-forwarded-client-cert"]
        assert "URI=spiffe://cluster.local/ns/istioinaction/sa/sleep" in xfcc
        # The whole chain still answers, every hop over mTLS.
        rec = answer["upstream_calls"]["http://recommendation:8080"]
        assert (
            "URI=spiffe://cluster.local/ns/istioinaction/sa/web-api"
            in (rec["headers"]["x-forwarded-client-cert"])
        )
    finally:
        down("tbs12")
