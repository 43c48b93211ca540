"""The node Envoy's guards, on a one-node testbed with the real Envoy (issue #12 defects 4-7).

- No redirect loops: connections to the capture ports themselves go to the black hole.
- Apps that speak TLS themselves keep their own TLS on PERMISSIVE ports; STRICT still refuses.
- A captured pod missing from the source gets no identity and no listeners.
- An object Envoy rejects is left out and named; every other pod's ADD and traffic go on.

What the mesh did is read as a user sees it: the bytes and certificates clients get, how fast a
connection ends, Envoy's stats and access log, ``proxy-status``, ``proxy-config`` and metrics.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import Pod, Service, ServicePort, Workload, loads_topology
from tests.integration.helpers import (
    call,
    envoy_stats,
    node_cli,
    node_metrics,
    proxy_status,
    wait_for,
)

pytestmark = pytest.mark.integration

PY = sys.executable
PROBE = str(Path(__file__).with_name("guard_probe.py"))
NAME = "tbguard"
TLS_PORT = 9443


def self_signed(directory: Path) -> tuple[Path, Path]:
    """The TLS app's own certificate (not the mesh's): a self-signed one."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsapp.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "app.pem", directory / "app.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def topology(cert: Path, key: Path) -> str:
    serve = json.dumps([PY, PROBE, "tls-serve", str(TLS_PORT), str(cert), str(key)])
    return f"""
name: {NAME}
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
  - {{name: legacy}}
pods:
  - {{name: sleep, namespace: mesh, node: n1, serviceAccount: sleep, labels: {{app: sleep}}}}
  - {{name: far, namespace: mesh, node: n2, serviceAccount: sleep, labels: {{app: far}}}}
  - {{name: orphan, namespace: mesh, node: n1, serviceAccount: orphan, labels: {{app: orphan}}}}
  - name: echo
    namespace: mesh
    node: n1
    serviceAccount: echo
    labels: {{app: echo}}
    workload: {{type: fake-service}}
  - name: tlsapp
    namespace: mesh
    node: n1
    serviceAccount: tlsapp
    labels: {{app: tlsapp}}
    workload: {{type: command, port: {TLS_PORT}, command: {serve}}}
  - {{name: client, namespace: legacy, node: n1, labels: {{app: client}}}}
services:
  - name: echo
    namespace: mesh
    selector: {{app: echo}}
    ports: [{{name: http, port: 80, targetPort: 8080}}]
  - name: tlsapp
    namespace: mesh
    selector: {{app: tlsapp}}
    ports: [{{name: tls, port: {TLS_PORT}}}]
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tlsapp"))


@pytest.fixture(scope="module")
def tb(certs: tuple[Path, Path]) -> Iterator[Testbed]:
    down(NAME)
    text = topology(*certs)
    try:
        yield Testbed.up(loads_topology(text, "test_envoy_guards"), text, "test_envoy_guards")
    finally:
        down(NAME)


def probe(tb: Testbed, pod: str, *args: str) -> dict[str, Any]:
    proc = tb.exec(pod, [PY, PROBE, *args], timeout=20)
    assert proc.returncode == 0, f"{pod} {args}: {proc.stderr}"
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def stats_samples(tb: Testbed) -> dict[str, float]:
    """The node Envoy's Prometheus samples (its stats port, in the node's netns)."""
    samples = {}
    for line in envoy_stats(tb.name, "n1").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples, "the node Envoy's stats port answered nothing"
    return samples


def total(stats: dict[str, float], metric: str, *parts: str) -> float:
    return sum(
        v for k, v in stats.items() if k.startswith(metric + "{") and all(p in k for p in parts)
    )


def envoy_log(tb: Testbed) -> str:
    return (layout.logs_dir(tb.name) / "n1.envoy.log").read_text(errors="replace")


def test_connections_to_the_capture_ports_are_blackholed_not_looped(tb: Testbed) -> None:
    """#12 defect 4. As Istio's sidecar listeners (istio/istio
    pilot/pkg/networking/core/listener_builder.go: ``virtualOutbound-blackhole`` matches
    destination_port 15001, ``virtualInbound-blackhole`` destination_port 15006, both to
    ``BlackHoleCluster``): each such connection ends at once, Envoy accepts a bounded number of
    connections for them, its access log names the black hole, and the node keeps serving."""
    sleep_ip, echo_ip = tb.pod_ip("mesh/sleep"), tb.pod_ip("mesh/echo")
    cases = [
        ("mesh/sleep", "127.0.0.1", 15001),  # the app dials the outbound capture port
        ("mesh/sleep", "127.0.0.1", 15006),
        ("mesh/sleep", sleep_ip, 15001),  # its own IP on Envoy's ports
        ("mesh/sleep", sleep_ip, 15006),
        ("mesh/sleep", sleep_ip, 15008),
        ("mesh/sleep", echo_ip, 15006),  # a captured peer on another pod's capture ports
        ("mesh/sleep", echo_ip, 15001),
        ("legacy/client", echo_ip, 15006),  # an unmeshed peer
        ("legacy/client", echo_ip, 15001),
    ]
    before = stats_samples(tb)
    log_before = envoy_log(tb).count("BlackHoleCluster")
    envoy_pid = proxy_status(tb, "n1")["envoy_pid"]
    results = {case: probe(tb, case[0], "connect", case[1], str(case[2])) for case in cases}
    for case, result in results.items():
        assert result["result"] in ("closed", "reset", "refused"), (case, result)
        assert result["seconds"] < 2.0, (case, result)
    after = stats_samples(tb)
    accepted = {
        port: total(after, "envoy_listener_downstream_cx_total", f"_{port}")
        - total(before, "envoy_listener_downstream_cx_total", f"_{port}")
        for port in (15001, 15006)
    }
    # One accepted connection per attempt that reached a capture listener, not a loop of them.
    assert 0 < accepted[15001] <= 6 and 0 < accepted[15006] <= 12, accepted

    def blackholed() -> bool:
        return envoy_log(tb).count("BlackHoleCluster") - log_before >= 5

    wait_for(blackholed, 5, "the access log to show the black-holed connections")
    assert proxy_status(tb, "n1")["envoy_pid"] == envoy_pid
    assert call(tb, "mesh/sleep", "http://echo/")["name"] == "echo"


def test_an_app_speaking_tls_itself_keeps_its_own_tls(
    tb: Testbed, certs: tuple[Path, Path]
) -> None:
    """#12 defect 7. PERMISSIVE: a client's own TLS (no Istio ALPN) reaches the app untouched
    (its own certificate, its echo), as Istio's sidecar passes it through (istio/istio
    pilot/pkg/networking/core/filterchain_options.go: mTLS chains match ``allIstioMtlsALPNs``,
    other TLS goes to a TCP chain); a mesh client on another node still comes through mTLS on
    the same port, one on the same node through the fast path (no TLS of the mesh's); STRICT
    refuses the non-mesh client and still serves the mesh ones."""
    cert, _ = certs
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    app_cert = hashlib.sha256(der).hexdigest()
    app_ip = tb.pod_ip("mesh/tlsapp")

    direct = probe(tb, "legacy/client", "tls-call", app_ip, str(TLS_PORT), str(cert), "hello")
    assert direct == {"ok": True, "echo": "hello", "peer": app_cert}, direct

    handshakes, accepted = "envoy_listener_ssl_handshake", "envoy_listener_downstream_cx_total"
    fast = '"inboundInternal"'  # every local pod's fast-path listener (its stat_prefix)
    before = stats_samples(tb)
    meshed = probe(tb, "mesh/far", "tls-call", "tlsapp", str(TLS_PORT), str(cert), "via mesh")
    assert meshed == {"ok": True, "echo": "via mesh", "peer": app_cert}, meshed
    # The remote mesh client's connection was mesh mTLS at the server's capture listener.
    after = stats_samples(tb)
    assert total(after, handshakes, "15006") > total(before, handshakes, "15006")
    near = probe(tb, "mesh/sleep", "tls-call", "tlsapp", str(TLS_PORT), str(cert), "same node")
    assert near == {"ok": True, "echo": "same node", "peer": app_cert}, near
    # The local one's was handed over inside the node Envoy, with no mesh handshake.
    last = stats_samples(tb)
    assert total(last, handshakes, "15006") == total(after, handshakes, "15006")
    assert total(last, accepted, fast) == total(after, accepted, fast) + 1

    # HTTP clients offer Istio's ALPN too: the server side's mTLS chain names the caller.
    answer = call(tb, "mesh/far", "http://echo/")
    assert "spiffe://cluster.local/ns/mesh/sa/sleep" in answer["headers"].get(
        "x-forwarded-client-cert", ""
    ), answer["headers"]

    policy = layout.cluster_dir(tb.name) / "guards-policy.yaml"
    policy.write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: tlsapp, namespace: mesh}\n"
        "spec: {selector: {matchLabels: {app: tlsapp}}, mtls: {mode: STRICT}}\n"
    )
    try:

        def refused() -> bool:
            args = ("tls-call", app_ip, str(TLS_PORT), str(cert), "x")
            return not probe(tb, "legacy/client", *args)["ok"]

        wait_for(refused, 10, "STRICT to refuse the non-mesh TLS client", step=0.2)
        for client in ("mesh/sleep", "mesh/far"):
            meshed = probe(tb, client, "tls-call", "tlsapp", str(TLS_PORT), str(cert), "strict")
            assert meshed == {"ok": True, "echo": "strict", "peer": app_cert}, (client, meshed)
    finally:
        policy.unlink(missing_ok=True)

    def passes() -> bool:
        args = ("tls-call", app_ip, str(TLS_PORT), str(cert), "x")
        return bool(probe(tb, "legacy/client", *args)["ok"])

    wait_for(passes, 10, "PERMISSIVE again", step=0.2)


def test_a_captured_pod_missing_from_the_source_gets_no_identity(tb: Testbed) -> None:
    """#12 defect 5: while the source does not have a captured pod, Envoy holds no certificate
    and no listeners for it (so its traffic is refused: fail closed) and proxy-status and the
    metrics say so; once the pod is back it gets its own identity again."""
    pod_file = layout.cluster_dir(tb.name) / "pods" / "mesh.orphan.yaml"
    away = pod_file.with_name(".mesh.orphan.yaml.away")  # hidden: the source skips it
    pod_file.rename(away)
    try:

        def no_listeners() -> bool:
            shown = node_cli(tb.name, "n1", "proxy-config", "listeners", "mesh/orphan")
            return "holds no listeners for mesh/orphan" in shown.stderr

        wait_for(no_listeners, 10, "Envoy to drop the listeners of the unknown pod", step=0.2)
        secrets = node_cli(tb.name, "n1", "proxy-config", "secrets", "mesh/sleep", "-o", "json")
        names = {s["name"] for s in json.loads(secrets.stdout)}
        assert names == {"spiffe://cluster.local/ns/mesh/sa/sleep", "ROOTCA"}
        assert "mesh/orphan" in proxy_status(tb, "n1")["identity_unknown"]
        dump = node_cli(tb.name, "n1", "proxy-status").stdout
        assert "pod mesh/orphan: identity unknown: pod not in the source" in dump, dump
        assert "nodeagent_pods_identity_unknown 1.0" in node_metrics(tb.name, "n1")
        refused = probe(tb, "mesh/orphan", "connect", "echo", "80")
        assert refused["result"] == "refused", refused
    finally:
        away.rename(pod_file)

    def known() -> bool:
        status = proxy_status(tb, "n1")
        return not status.get("identity_unknown") and status["types"]["LDS"]["state"] == "SYNCED"

    wait_for(known, 10, "the pod to be known again", step=0.2)
    shown = node_cli(tb.name, "n1", "proxy-config", "secrets", "mesh/orphan")
    assert "spiffe://cluster.local/ns/mesh/sa/orphan" in shown.stdout, shown


def test_a_service_envoy_rejects_is_left_out_and_other_pods_go_on(tb: Testbed) -> None:
    """#12 defect 6. A Service that shares another's VIP:port makes every pod's outbound
    listener clash (Envoy: "filter chain ... has the same matching rules"): the new Service is
    left out and named in proxy-status and the metrics, the last good config keeps serving, a
    new pod's CNI ADD succeeds and its traffic flows."""
    echo_vip = next(s.cluster_ip for s in tb.services() if s.name == "echo")
    clash = Service("mesh", "clash", {"app": "echo"}, (ServicePort("http", 80, 8080),), echo_vip)
    late = Pod("mesh", "late", "n1", "late", {"app": "late"}, {}, Workload("sleep"))
    tb.set_service(clash)
    try:

        def seen() -> bool:  # by the agent: Envoy's NACK of it is in (handled or not)
            status = proxy_status(tb, "n1")
            return bool(status.get("rejected")) or status["types"]["LDS"]["state"] == "NACKED"

        wait_for(seen, 10, "Envoy to reject the clashing Service", step=0.2)
        record = tb.add_pod(late, publish_lead=0.5)  # its CNI ADD waits for its listeners
        echo_url = f"http://{echo_vip}/"  # a pod added later has no /etc/hosts of its own
        got = subprocess.run(
            ["ip", "netns", "exec", record.netns, "curl", "-sS", "--max-time", "5", echo_url],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert json.loads(got.stdout)["name"] == "echo", got

        (rejected,) = proxy_status(tb, "n1")["rejected"]
        assert (rejected["kind"], rejected["namespace"], rejected["name"]) == (
            "Service",
            "mesh",
            "clash",
        ), rejected
        assert rejected["by"] == "LDS" and "same matching rules" in rejected["reason"], rejected
        wait_for(
            lambda: proxy_status(tb, "n1")["types"]["LDS"]["state"] == "SYNCED", 10, "LDS SYNCED"
        )
        shown = node_cli(tb.name, "n1", "proxy-status").stdout
        assert "left out: Service mesh/clash (rejected by LDS)" in shown, shown
        metrics = node_metrics(tb.name, "n1")
        assert 'nodeagent_config_rejected{kind="Service"} 1.0' in metrics
        assert call(tb, "mesh/sleep", "http://echo/")["name"] == "echo"
    finally:
        if "mesh/late" in tb.state.pods:
            tb.remove_pod(late)
        tb.delete_service("mesh/clash")
    wait_for(lambda: not proxy_status(tb, "n1").get("rejected"), 10, "the clash to be gone")
