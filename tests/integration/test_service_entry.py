"""ServiceEntry and outboundTrafficPolicy with the real Envoy: SCENARIOS S1.7 (issue #16).

One node, a sleep pod in the mesh and the testbed's external server ``api`` (its own netns outside
the mesh and the node, name ``api.external.test`` served by the testbed resolver, plain HTTP on 80
and HTTPS on 443 with a certificate of its own CA: nodeagent/testbed/externals.py). The pod calls
``http://api.external.test/``; what the node Envoy does with it, as Istio's sidecar would
(istio.io/latest/docs/tasks/traffic-management/egress/egress-control/ and egress-tls-origination/):

- ALLOW_ANY (Istio's default): passed through (PassthroughCluster in the access log);
- REGISTRY_ONLY: refused (BlackHoleCluster), until a ServiceEntry names the host, with
  resolution DNS or STATIC; another Host on the entry's HTTP port gets Istio's ``block_all`` 502;
- a DestinationRule ``tls.mode: SIMPLE`` on the entry's port 80 (targetPort 443) originates TLS to
  the external's HTTPS server, verified with its CA (caCertificates) and the subjectAltNames
  (the rule's, else the entry's): a wrong one fails the call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    envoy_admin,
    nodeagent,
    pod,
    running_testbed,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbsentry"
HOST = "api.external.test"
URL = f"http://{HOST}/"
REGISTRY_ONLY = {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    # vm: a mesh pod standing in for a VM's proxy (service account vm), which only a
    # WorkloadEntry names (test_a_mesh_internal_workload_entry_...).
    vm = pod("vm", "n1", {"app": "vm"}, workload={"type": "fake-service", "port": 8080})
    vm["workload"]["env"] = {"NAME": "vm"}
    text = topology_text(
        NAME, [pod("sleep", "n1", {"app": "sleep"}), vm], [], nodes=[{"name": "n1"}]
    ) + ("externals:\n  - {name: api, names: [api.external.test]}\n")
    with running_testbed(text, "test_service_entry") as testbed:
        yield testbed


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    yield tb
    apply_docs(tb)
    tb.set_mesh_config({})


def status(tb: Testbed, *args: str) -> str:
    """The HTTP status the sleep pod's curl gets (000: no answer, connection refused or reset)."""
    proc = tb.exec(
        "sleep", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *args]
    )
    return proc.stdout.strip() or "000"


def answer(tb: Testbed) -> dict[str, Any]:
    proc = tb.exec("sleep", ["curl", "-sS", "--max-time", "5", URL])
    assert proc.returncode == 0, proc.stderr
    found: dict[str, Any] = json.loads(proc.stdout)
    return found


def log_path(tb: Testbed) -> Path:
    return layout.logs_dir(tb.name) / "n1.envoy.log"


def log_since(tb: Testbed, offset: int) -> str:
    """The node Envoy's log after OFFSET, a byte offset (a character slice of the decoded text
    would land later wherever an earlier line holds a multi-byte character)."""
    with log_path(tb).open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def logged_after(tb: Testbed, offset: int, *words: str) -> None:
    """The node Envoy's access log gets a line with every one of WORDS after OFFSET (bytes)."""

    def found() -> bool:
        return any(all(w in line for w in words) for line in log_since(tb, offset).splitlines())

    wait_for(found, 10, f"an access log line with {words}", step=0.2)


def entry(resolution: str, port: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"hosts": [HOST], "ports": [port], "resolution": resolution, **spec},
    }


HTTP_80 = {"number": 80, "name": "http", "protocol": "HTTP"}


def test_the_external_server_is_named_by_the_testbed(tb: Testbed) -> None:
    """`nodeagent testbed status` names the external (its names, address, ports, CA file), and
    the pod resolves its name through the testbed resolver (it is in no /etc/hosts)."""
    status_json = json.loads(nodeagent("testbed", "status", "--name", NAME, "-o", "json").stdout)
    (api,) = status_json["externals"]
    ext = tb.external("api")
    assert (api["names"], api["ip"], api["httpPort"], api["httpsPort"]) == (
        [HOST],
        str(ext.ip),
        80,
        443,
    )
    assert api["caFile"] == str(layout.external_ca_file(NAME, "api"))
    assert "EXTERNAL" in nodeagent("testbed", "status", "--name", NAME).stdout
    hosts = tb.exec("sleep", ["getent", "hosts", HOST])
    assert hosts.stdout.split()[0] == str(ext.ip), hosts
    assert tb.exec("sleep", ["grep", "-c", HOST, "/etc/hosts"]).stdout.strip() == "0"


def test_allow_any_passes_unknown_hosts_through(clean: Testbed) -> None:
    """Istio's default (ALLOW_ANY): a host no registry names is passed through."""
    tb = clean
    wait_for(lambda: status(tb, URL) == "200", 20, "api.external.test passed through")
    offset = log_path(tb).stat().st_size
    assert answer(tb)["name"] == "api"
    logged_after(tb, offset, "default/sleep", "PassthroughCluster")


def test_registry_only_blocks_until_a_service_entry_names_the_host(clean: Testbed) -> None:
    """REGISTRY_ONLY: refused (BlackHoleCluster in the access log); a ServiceEntry with
    resolution DNS, then STATIC (the external's address as its endpoint), admits it, and the
    access log names its cluster, outbound|80||api.external.test."""
    tb = clean
    tb.set_mesh_config(REGISTRY_ONLY)
    wait_for(lambda: status(tb, URL) == "000", 20, "REGISTRY_ONLY refusing the external host")
    offset = log_path(tb).stat().st_size
    assert status(tb, URL) == "000"
    logged_after(tb, offset, "default/sleep", "BlackHoleCluster")

    apply_docs(tb, entry("DNS", HTTP_80))
    wait_for(lambda: status(tb, URL) == "200", 20, "the DNS ServiceEntry admitting its host")
    offset = log_path(tb).stat().st_size
    assert answer(tb)["name"] == "api"
    logged_after(tb, offset, f"outbound|80||{HOST}", f'"{HOST}"')
    # Another Host on the entry's port: Istio's block_all answers 502 (route/route.go).
    ip = str(tb.external("api").ip)
    offset = log_path(tb).stat().st_size
    assert status(tb, "-H", "Host: other.example", f"http://{ip}/") == "502"
    logged_after(tb, offset, "502", "block_all")

    static = entry("STATIC", HTTP_80, endpoints=[{"address": ip}])
    apply_docs(tb, static)
    offset = log_path(tb).stat().st_size
    # The entry's endpoint, reached through the node's originate listener (the connection
    # leaves from the pod's netns); the DNS entry's cluster had Envoy dial the name itself.
    served = f'"envoy://originate/{ip}:80" outbound|80||{HOST}'
    seen: list[str] = []

    def static_served() -> bool:
        seen.append(status(tb, URL))
        return seen[-1] == "200" and served in log_since(tb, offset)

    def what() -> str:
        lines = [line for line in log_since(tb, offset).splitlines() if "default/sleep" in line]
        clusters = [c for c in envoy_admin(tb.name, "n1", "/clusters").splitlines() if HOST in c]
        return (
            f"the STATIC ServiceEntry's endpoint serving (statuses {seen[-5:]}, last access log"
            f" lines {lines[-3:]}; n1's Envoy: {clusters[-6:]})"
        )

    wait_for(static_served, 20, what)


def test_destination_rule_simple_originates_tls_to_the_external_server(clean: Testbed) -> None:
    """The canonical egress TLS origination: the app sends plain HTTP to port 80; the entry
    maps it to 443 and the DestinationRule originates TLS there, verified with the external's
    own CA and the subjectAltNames; the external's HTTPS server answers (VERSION https) and saw
    the SNI api.external.test. A wrong subjectAltNames (the rule's, then the entry's when the
    rule names none) fails the call (503)."""
    tb = clean
    tb.set_mesh_config(REGISTRY_ONLY)
    ca = str(layout.external_ca_file(tb.name, "api"))
    port = HTTP_80 | {"targetPort": 443}

    def rule(**tls: Any) -> dict[str, Any]:
        setting = {"mode": "SIMPLE", "caCertificates": ca, **tls}
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {
                "host": HOST,
                "trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}, "tls": setting}]},
            },
        }

    apply_docs(tb, entry("DNS", port), rule(subjectAltNames=[HOST]))

    def https_answers() -> bool:
        return status(tb, URL) == "200" and answer(tb)["version"] == "https"

    wait_for(https_answers, 20, "TLS originated to the external's HTTPS server")
    assert answer(tb)["tls"]["sni"] == HOST

    apply_docs(tb, entry("DNS", port), rule(subjectAltNames=["wrong.example"]))
    wait_for(lambda: status(tb, URL) == "503", 20, "a wrong subjectAltNames refusing the server")
    offset = log_path(tb).stat().st_size
    assert status(tb, URL) == "503"
    logged_after(tb, offset, f"outbound|80||{HOST}", "CERTIFICATE_VERIFY_FAILED")

    apply_docs(tb, entry("DNS", port, subjectAltNames=[HOST]), rule())
    wait_for(https_answers, 20, "the entry's subjectAltNames accepting the server")
    apply_docs(tb, entry("DNS", port, subjectAltNames=["wrong.example"]), rule())
    wait_for(lambda: status(tb, URL) == "503", 20, "the entry's wrong subjectAltNames refusing")
    offset = log_path(tb).stat().st_size
    assert status(tb, URL) == "503"
    logged_after(tb, offset, f"outbound|80||{HOST}", "CERTIFICATE_VERIFY_FAILED")


def test_https_port_and_the_other_resolutions(clean: Testbed) -> None:
    """Istio's egress-control task (istio.io/latest/docs/tasks/traffic-management/egress/
    egress-control/): an entry's HTTPS port without addresses is the host's port, the app's own
    TLS passes through to it (TCP, the access log names its cluster); resolution NONE (where the
    caller dialled) and DNS_ROUND_ROBIN (LOGICAL_DNS) admit the host too."""
    tb = clean
    tb.set_mesh_config(REGISTRY_ONLY)
    https = ["--cacert", str(layout.external_ca_file(tb.name, "api")), f"https://{HOST}/"]
    wait_for(lambda: status(tb, *https) == "000", 20, "REGISTRY_ONLY refusing HTTPS")
    ports = [HTTP_80, {"number": 443, "name": "https", "protocol": "HTTPS"}]
    for resolution in ("DNS", "NONE", "DNS_ROUND_ROBIN"):
        admitted = entry(resolution, HTTP_80)
        admitted["spec"]["ports"] = ports
        apply_docs(tb, admitted)
        wait_for(
            lambda: status(tb, *https) == "200" and status(tb, URL) == "200",
            20,
            f"resolution {resolution} admitting HTTP and HTTPS",
        )
        offset = log_path(tb).stat().st_size
        assert status(tb, *https) == "200"
        logged_after(tb, offset, "default/sleep", "TCP", f"outbound|443||{HOST}")
        apply_docs(tb)
        wait_for(lambda: status(tb, *https) == "000", 20, "the entry gone: refused again")


def test_a_mesh_internal_workload_entrys_service_account_is_the_server_verified(
    clean: Testbed,
) -> None:
    """WorkloadEntry ``serviceAccount`` (istio: serviceentry/conversion.go convertEndpoint):
    a MESH_INTERNAL STATIC entry selecting a WorkloadEntry at the vm pod's address (a VM's
    proxy, STRICT mTLS) reaches it with mTLS verified as spiffe://cluster.local/ns/default/sa/
    <its account>: the right account answers; another account fails the handshake (503, the
    access log names the cluster); no account is plaintext, which STRICT refuses (503)."""
    tb = clean
    tb.set_mesh_config(REGISTRY_ONLY)
    vm_host = "vm.internal.test"
    # curl dials the external's address with Host vm.internal.test: the entry has no
    # addresses, so port 80 is routed by Host (the external itself would answer "api").
    url = ["--resolve", f"{vm_host}:80:{tb.external('api').ip}", f"http://{vm_host}/"]
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "vm", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "vm"}}, "mtls": {"mode": "STRICT"}},
    }
    internal = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "vm", "namespace": "default"},
        "spec": {
            "hosts": [vm_host],
            "ports": [HTTP_80],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "workloadSelector": {"labels": {"role": "vm-proxy"}},
        },
    }

    def workload_entry(**spec: Any) -> dict[str, Any]:
        body = {"address": tb.pod_ip("vm"), "labels": {"role": "vm-proxy"}}
        body |= {"ports": {"http": 8080}, **spec}
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": "vm-1", "namespace": "default"},
            "spec": body,
        }

    def vm_answers() -> bool:
        proc = tb.exec("sleep", ["curl", "-sS", "--max-time", "5", *url])
        try:
            return proc.returncode == 0 and json.loads(proc.stdout)["name"] == "vm"
        except (ValueError, KeyError):
            return False

    apply_docs(tb, strict, internal, workload_entry(serviceAccount="vm"))
    wait_for(vm_answers, 20, "the WorkloadEntry reached with mTLS as its service account")
    offset = log_path(tb).stat().st_size
    # Several calls: each Envoy worker keeps verified connections to the endpoint pooled.
    assert all(vm_answers() for _ in range(6))
    logged_after(tb, offset, "default/sleep", f"outbound|80||{vm_host}")

    apply_docs(tb, strict, internal, workload_entry(serviceAccount="other"))
    wait_for(lambda: status(tb, *url) == "503", 20, "another service account refused")
    offset = log_path(tb).stat().st_size
    # No connection verified as the old account serves a call after the change.
    assert [status(tb, *url) for _ in range(6)] == ["503"] * 6
    logged_after(tb, offset, f"outbound|80||{vm_host}", "503")

    apply_docs(tb, strict, internal, workload_entry())
    wait_for(lambda: status(tb, *url) == "503", 20, "no account: plaintext, refused by STRICT")
    apply_docs(tb, strict, internal, workload_entry(serviceAccount="vm"))
    wait_for(vm_answers, 20, "the right account again")
