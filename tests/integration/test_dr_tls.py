"""DestinationRule ``tls`` SIMPLE and MUTUAL on a two-node testbed with the real Envoy (issue #15).

A client pod calls plain HTTP; the service's pods (one on each node) terminate TLS themselves
(the fake service with TLS_CERT/TLS_KEY, see nodeagent/testbed/workload.py) and answer with what
the client sent in the handshake. The node Envoy originates that TLS as Istio's sidecar would
(istio.io/latest/docs/reference/config/networking/destination-rule/#ClientTLSSettings;
istio/istio pilot/pkg/networking/core/cluster_tls.go): the DestinationRule's sni, its
subjectAltNames checked against the server certificate, its client certificate for MUTUAL.
The certificate files are paths on the node, which the agent serves over SDS and watches.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import call, envoy_admin, http_status, put_config, wait_for
from tests.tls_certs import write_app_pki

pytestmark = pytest.mark.integration

NAME = "tbdrtls"
SERVER, CLIENT = "secure.example", "client.example"  # the DNS SAN of each certificate
PY = sys.executable
STEADY = str(Path(__file__).with_name("steady_client.py"))
ROTATED = "rotated.example"  # the client certificate a rotated Secret holds
SECURE = "http://secure:8443/"
MUTUAL = "http://secure-mutual:9443/"
FQDN = "secure.default.svc.cluster.local"


def _topology(pki: Path) -> str:
    serve = {"TLS_CERT": str(pki / f"{SERVER}.pem"), "TLS_KEY": str(pki / f"{SERVER}.key")}
    require = serve | {"TLS_CLIENT_CA": str(pki / "ca.pem")}
    pods = [
        {"name": "sleep", "node": "n1", "labels": {"app": "sleep"}},
        # The same labels, another service account (credentialName authorization is per account).
        {"name": "sleep-other", "node": "n1", "labels": {"app": "sleep"}},
        # One TLS-serving replica per node: the local one must not take the fast path either.
        *(
            {
                "name": f"secure-{i}",
                "node": node,
                "labels": {"app": "secure"},
                "workload": {"type": "fake-service", "port": 8443, "env": serve},
            }
            for i, node in ((1, "n1"), (2, "n2"))
        ),
        {
            "name": "secure-mutual-1",
            "node": "n2",
            "labels": {"app": "secure-mutual"},
            "workload": {"type": "fake-service", "port": 9443, "env": require},
        },
    ]
    for pod in pods:
        pod |= {"namespace": "default", "serviceAccount": pod["labels"]["app"]}
        if pod["name"] == "sleep-other":
            pod["serviceAccount"] = "sleep-other"
    services = [("secure", 8443), ("secure-mutual", 9443)]
    return "\n".join(
        [
            f"name: {NAME}",
            "source: kubernetes",
            "nodes: [{name: n1}, {name: n2}]",
            "namespaces:",
            "  - {name: default, labels: {nodeagent.io/mesh: enabled}}",
            "pods:",
            *[f"  - {json.dumps(p)}" for p in pods],
            "services:",
            *[
                f"  - {{name: {n}, namespace: default, selector: {{app: {n}}},"
                f" ports: [{{name: http, port: {p}, targetPort: {p}}}]}}"
                for n, p in services
            ],
        ]
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("app-pki")
    write_app_pki(directory, SERVER, CLIENT, ROTATED)
    return directory


@pytest.fixture(scope="module")
def tb(pki: Path) -> Iterator[Testbed]:
    down(NAME)
    text = _topology(pki)
    try:
        yield Testbed.up(loads_topology(text, "test_dr_tls"), text, "test_dr_tls")
    finally:
        down(NAME)


def apply(tb: Testbed, *rules: dict[str, Any]) -> None:
    """Replace the test's DestinationRules with RULES (host -> tls), as kubectl apply would."""
    docs = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": f"dr-{i}", "namespace": "default"},
            "spec": rule,
        }
        for i, rule in enumerate(rules)
    ]
    put_config(tb, "traffic.yaml", docs)


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    """Each test starts from no rule in effect (plain HTTP to the TLS apps gets no 200), so a
    test's wait for its own rule cannot be met by the previous test's."""
    apply(tb)
    wait_for(
        lambda: status(tb, SECURE) != "200" and status(tb, MUTUAL) != "200",
        30,
        "no DestinationRule in effect",
        step=0.3,
    )
    yield tb
    apply(tb)


def tls_rule(host: str, **tls: Any) -> dict[str, Any]:
    return {"host": host, "trafficPolicy": {"tls": tls}}


def status(tb: Testbed, url: str) -> str:
    return http_status(tb.exec, "default/sleep", url)


def until_status(tb: Testbed, url: str, code: str) -> None:
    """Until the rule has landed: URL answers CODE (each try is one bounded curl)."""
    wait_for(lambda: status(tb, url) == code, 30, f"{url} answering {code}", step=0.3)


def handshakes(tb: Testbed, url: str, replicas: int) -> dict[str, dict[str, Any]]:
    """What each of REPLICAS pods saw of the client's TLS, calling URL until all answered
    (at most 40 calls)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40):
        answer = call(tb, "default/sleep", url)
        seen[answer["pod_ip"]] = answer["tls"]
        if len(seen) == replicas:
            break
    assert len(seen) == replicas, f"only {sorted(seen)} answered {url}"
    return seen


def test_simple_originates_tls_with_the_rules_sni(clean: Testbed, pki: Path) -> None:
    """SIMPLE: the app gets TLS with SNI = the rule's sni, the server is verified against
    caCertificates and subjectAltNames; no client certificate is sent."""
    tb = clean
    # Without a rule the plain HTTP request reaches a TLS server: no HTTP answer from it.
    assert status(tb, SECURE) != "200"
    ca = str(pki / "ca.pem")
    apply(
        tb,
        tls_rule("secure", mode="SIMPLE", sni=SERVER, caCertificates=ca, subjectAltNames=[SERVER]),
    )
    until_status(tb, SECURE, "200")
    seen = handshakes(tb, SECURE, 2)
    assert all(tls == {"sni": SERVER} for tls in seen.values()), seen


def test_simple_without_sni_sends_the_service_host(clean: Testbed) -> None:
    """sni unset: Istio's auto_sni sends the request's host; the node sends the service's
    hostname (insecureSkipVerify: the test CA's certificate names secure.example only)."""
    tb = clean
    apply(tb, tls_rule("secure", mode="SIMPLE", insecureSkipVerify=True))
    until_status(tb, SECURE, "200")
    seen = handshakes(tb, SECURE, 2)
    assert all(tls == {"sni": FQDN} for tls in seen.values()), seen


def test_a_wrong_subject_alt_name_fails_the_call(clean: Testbed, pki: Path) -> None:
    """subjectAltNames the server certificate does not carry: the handshake fails, the caller
    gets 503 and the node's access log says why (an upstream failure flag)."""
    tb = clean
    ca = str(pki / "ca.pem")
    good = tls_rule("secure", mode="SIMPLE", sni=SERVER, caCertificates=ca)
    apply(tb, good)
    until_status(tb, SECURE, "200")
    apply(
        tb,
        tls_rule(
            "secure",
            mode="SIMPLE",
            sni=SERVER,
            caCertificates=ca,
            subjectAltNames=["wrong.example"],
        ),
    )
    until_status(tb, SECURE, "503")
    request_id = str(uuid.uuid4())
    proc = tb.exec(
        "default/sleep",
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-H",
            f"x-request-id: {request_id}",
            SECURE,
        ],
    )
    assert proc.stdout == "503"
    log = layout.logs_dir(tb.name) / "n1.envoy.log"
    wait_for(lambda: request_id in log.read_text(), 10, "the failed call's access log line")
    (line,) = [entry for entry in log.read_text().splitlines() if request_id in entry]
    # Envoy's flag: the upstream (originate-tls, which does the handshake) reset the request.
    assert " 503 UC upstream_reset_before_response_started" in line, line
    assert '"envoy://originate-tls/' in line, line
    # ... and why: the server certificate did not carry the SAN (Envoy's TLS stats).
    assert san_failures(tb) > 0


def san_failures(tb: Testbed) -> int:
    stats = envoy_admin(tb.name, "n1", "/stats?filter=originate-tls.ssl.fail_verify_san")
    return sum(int(line.rpartition(": ")[2]) for line in stats.splitlines() if line)


def test_mutual_presents_the_rules_client_certificate(clean: Testbed, pki: Path) -> None:
    """MUTUAL: the app requires a client certificate from its CA and sees the rule's
    (clientCertificate/privateKey); SIMPLE, without one, is refused by that app."""
    tb = clean
    ca = str(pki / "ca.pem")
    simple = tls_rule("secure-mutual", mode="SIMPLE", sni=SERVER, caCertificates=ca)
    apply(tb, simple)
    until_status(tb, MUTUAL, "503")
    mutual = tls_rule(
        "secure-mutual",
        mode="MUTUAL",
        sni=SERVER,
        caCertificates=ca,
        clientCertificate=str(pki / f"{CLIENT}.pem"),
        privateKey=str(pki / f"{CLIENT}.key"),
    )
    apply(tb, mutual)
    until_status(tb, MUTUAL, "200")
    (tls,) = handshakes(tb, MUTUAL, 1).values()
    assert tls == {
        "sni": SERVER,
        "client_cert": {"subject": f"commonName={CLIENT}", "sans": [f"DNS:{CLIENT}"]},
    }


def put_secret(tb: Testbed, name: str, pki: Path, client: str) -> None:
    """A kubernetes.io/tls Secret NAME in default with CLIENT's certificate and key and the
    test CA (ca.crt), as kubectl apply would write it to the API server."""
    files = {"tls.crt": f"{client}.pem", "tls.key": f"{client}.key", "ca.crt": "ca.pem"}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "default"},
        "data": {k: base64.b64encode((pki / f).read_bytes()).decode() for k, f in files.items()},
    }
    put_config(tb, f"secret-{name}.yaml", [secret])


def allow_secrets(tb: Testbed, *accounts: str) -> Path:
    """A Role that may list Secrets in default, bound to ACCOUNTS (of default): what Istio asks
    of a proxy's service account before it serves it a credentialName's certificate
    (istio/istio pilot/pkg/credentials/kube/secrets.go Authorize). Returns the file to remove."""
    group = "rbac.authorization.k8s.io"
    role = {
        "apiVersion": f"{group}/v1",
        "kind": "Role",
        "metadata": {"name": "secret-reader", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}],
    }
    binding = {
        "apiVersion": f"{group}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "secret-reader", "namespace": "default"},
        "roleRef": {"apiGroup": group, "kind": "Role", "name": "secret-reader"},
        "subjects": [
            {"kind": "ServiceAccount", "name": a, "namespace": "default"} for a in accounts
        ],
    }
    put_config(tb, "rbac-secret-reader.yaml", [role, binding])
    return layout.cluster_dir(tb.name) / "rbac-secret-reader.yaml"


@contextlib.contextmanager
def selector_credential(tb: Testbed, pki: Path) -> Iterator[None]:
    """sleep (whose account may list Secrets) calls MUTUAL with the Secret client-cred (CLIENT's
    certificate) named by a selector rule, and its calls succeed; the Secret and the RBAC
    objects are removed afterwards, also on failure."""
    secret_file = layout.cluster_dir(tb.name) / "secret-client-cred.yaml"
    rbac_file = allow_secrets(tb, "sleep")
    try:
        put_secret(tb, "client-cred", pki, CLIENT)
        rule = tls_rule("secure-mutual", mode="MUTUAL", sni=SERVER, credentialName="client-cred")
        rule["workloadSelector"] = {"matchLabels": {"app": "sleep"}}
        apply(tb, rule)
        until_status(tb, MUTUAL, "200")
        yield
    finally:
        secret_file.unlink(missing_ok=True)
        rbac_file.unlink(missing_ok=True)


def test_credential_name_in_a_selector_rule_presents_the_secrets_certificate(
    clean: Testbed, pki: Path
) -> None:
    """credentialName, read at sidecars in a rule with a workloadSelector
    (istio.io/latest/docs/reference/config/networking/destination-rule/#ClientTLSSettings):
    the node serves the Secret's certificate over SDS to the selected caller's TLS, and a
    rotated Secret is presented on new connections without a restart."""
    tb = clean
    with selector_credential(tb, pki):
        (tls,) = handshakes(tb, MUTUAL, 1).values()
        assert tls["client_cert"] == {
            "subject": f"commonName={CLIENT}",
            "sans": [f"DNS:{CLIENT}"],
        }, tls
        put_secret(tb, "client-cred", pki, ROTATED)
        failed: list[str] = []

        def presents_rotated() -> bool:
            proc = tb.exec("default/sleep", ["curl", "-sS", "--max-time", "10", MUTUAL])
            try:
                answer = json.loads(proc.stdout)
            except ValueError:
                failed.append(proc.stdout or proc.stderr)
                return False
            return bool(answer["tls"].get("client_cert", {}).get("sans") == [f"DNS:{ROTATED}"])

        wait_for(presents_rotated, 30, "the rotated client certificate presented", step=0.3)
        # No call failed while the Secret rotated (the socket's SDS secret changed in place).
        assert failed == [], failed


def test_credential_name_only_for_service_accounts_that_may_list_secrets(
    clean: Testbed, pki: Path
) -> None:
    """istiod serves a credentialName's certificate to a proxy, sidecars included, only when
    its service account may list Secrets in its namespace (istio/istio pilot/pkg/xds/sds.go
    filterAuthorizedResources; a SubjectAccessReview). Two callers with the same labels, one
    account bound to such a Role: it presents the certificate; the other's TLS fails."""
    tb = clean
    with selector_credential(tb, pki):
        (tls,) = handshakes(tb, MUTUAL, 1).values()
        assert tls["client_cert"]["subject"] == f"commonName={CLIENT}", tls
        # The refused account: its calls fail (503: the upstream TLS handshake fails), each
        # time, while the allowed one's keep working.
        for _ in range(3):
            assert http_status(tb.exec, "default/sleep-other", MUTUAL) == "503"
            assert status(tb, MUTUAL) == "200"
        # Each answer came from the API server's review of the account (not a default).
        log = (layout.logs_dir(tb.name) / "n1.agent.log").read_text(errors="replace")
        assert "system:serviceaccount:default:sleep-other may not list secrets in default" in log
        assert "system:serviceaccount:default:sleep may list secrets in default" in log


def _place(directory: Path, source: Path) -> None:
    """The client certificate and key of SOURCE (a pki directory) at DIRECTORY/client.pem and
    client.key, each replaced atomically as a mounted Secret's files are (a new inode)."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("key", "pem"):
        new = directory / f".client.{suffix}.new"
        new.write_bytes((source / f"{CLIENT}.{suffix}").read_bytes())
        os.replace(new, directory / f"client.{suffix}")


def _files_rule(ca: Path, directory: Path) -> dict[str, Any]:
    """MUTUAL with the files in DIRECTORY; one request per connection, so that every call makes
    a handshake with the secret Envoy holds then (a connection opened before a rotation keeps
    its certificate, at Istio's sidecar too)."""
    rule = tls_rule(
        "secure-mutual",
        mode="MUTUAL",
        sni=SERVER,
        caCertificates=str(ca),
        clientCertificate=str(directory / "client.pem"),
        privateKey=str(directory / "client.key"),
    )
    rule["trafficPolicy"]["connectionPool"] = {"http": {"maxRequestsPerConnection": 1}}
    return rule


def _agent_log(tb: Testbed) -> str:
    return (layout.logs_dir(tb.name) / "n1.agent.log").read_text(errors="replace")


def test_mutual_files_rotate_on_the_node_without_a_rule_change(
    clean: Testbed, pki: Path, tmp_path: Path
) -> None:
    """The files of a MUTUAL rule are watched, as istio-agent watches a sidecar's
    (istio/istio security/pkg/nodeagent/cache/secretcache.go): a client certificate rotated
    on the node to one the server does not trust fails the calls, and rotated back to a
    trusted one they succeed, with the DestinationRule never touched."""
    tb = clean
    untrusted = tmp_path / "untrusted-pki"
    write_app_pki(untrusted, CLIENT)  # another CA: the server refuses its certificates
    mounted = tmp_path / "mounted"
    _place(mounted, pki)
    apply(tb, _files_rule(pki / "ca.pem", mounted))
    until_status(tb, MUTUAL, "200")
    rule_file = layout.cluster_dir(tb.name) / "traffic.yaml"
    written = rule_file.read_bytes()
    _place(mounted, untrusted)
    until_status(tb, MUTUAL, "503")
    assert [status(tb, MUTUAL) for _ in range(3)] == ["503"] * 3
    _place(mounted, pki)
    until_status(tb, MUTUAL, "200")
    (tls,) = handshakes(tb, MUTUAL, 1).values()
    assert tls["client_cert"] == {"subject": f"commonName={CLIENT}", "sans": [f"DNS:{CLIENT}"]}
    assert rule_file.read_bytes() == written  # no config change did it


def test_a_missing_file_that_appears_later_is_taken_without_a_rule_change(
    clean: Testbed, pki: Path, tmp_path: Path
) -> None:
    """A client certificate file that is not on the node yet: the rule's calls fail (its SDS
    secret is a placeholder; the agent names the rule and the path), and once the files are
    written the calls succeed with them."""
    tb = clean
    mounted = tmp_path / "later"
    apply(tb, _files_rule(pki / "ca.pem", mounted))
    missing = f"clientCertificate {mounted / 'client.pem'}: no such file on this node"
    wait_for(lambda: missing in _agent_log(tb), 30, "the agent naming the missing file")
    assert "DestinationRule default/dr-0" in next(
        line for line in _agent_log(tb).splitlines() if missing in line
    )
    # The rule is in effect (Envoy holds its secret), and its calls fail.
    secret = f"file-cert:{mounted / 'client.pem'}~{mounted / 'client.key'}"
    wait_for(
        lambda: (
            secret in envoy_admin(tb.name, "n1", "/config_dump?resource=dynamic_active_secrets")
        ),
        30,
        "the rule's SDS secret in Envoy",
    )
    assert [status(tb, MUTUAL) for _ in range(3)] == ["503"] * 3
    _place(mounted, pki)
    until_status(tb, MUTUAL, "200")
    (tls,) = handshakes(tb, MUTUAL, 1).values()
    assert tls["client_cert"] == {"subject": f"commonName={CLIENT}", "sans": [f"DNS:{CLIENT}"]}


def _records(out: Path) -> list[dict[str, Any]]:
    """The steady client's requests answered so far (steady_client.py: one JSON line each)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for line in out.read_text().splitlines():
            with contextlib.suppress(ValueError):  # the line being written
                found.append(json.loads(line))
    return found


def flip_under_calls(
    tb: Testbed, url: str, flips: list[tuple[list[dict[str, Any]], Any]], tmp_path: Path
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Apply each (rules, seen) of FLIPS in turn, each waited for until the app's answer to a
    call of URL gives SEEN(answer's tls) true, while a steady client (a new connection per
    call, 100 a second) calls URL all along: (calls, the failed ones, failed probe calls)."""
    probes_failed: list[str] = []  # the waits' own calls count too

    def landed(seen: Any) -> bool:
        proc = tb.exec("default/sleep", ["curl", "-sS", "--max-time", "10", url])
        try:
            return bool(seen(json.loads(proc.stdout)["tls"]))
        except (ValueError, KeyError):
            probes_failed.append(proc.stdout or proc.stderr)
            return False

    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    out, stop = tmp_path / "steady.jsonl", tmp_path / "stop"
    argv = [PY, STEADY, host, port, "flip", "100", "300", str(out), str(stop)]
    client = subprocess.Popen(
        tb.exec_argv("default/sleep", argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: len(_records(out)) >= 10, 30, "the steady client's first calls")
        for rules, seen in flips:
            apply(tb, *rules)
            wait_for(lambda seen=seen: landed(seen), 30, "the flip landed", step=0.1)
        count = len(_records(out))
        wait_for(lambda: len(_records(out)) >= count + 25, 30, "calls after the last flip")
    finally:
        stop.touch()
        try:
            client.wait(timeout=10)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(timeout=10)
    records = _records(out)
    failed = [r for r in records if not r["ok"]]
    print(f"{len(records)} calls, {len(failed)} failed; probes failed: {probes_failed}")
    return len(records), failed, probes_failed


def test_no_call_fails_while_the_tls_setting_flips(
    clean: Testbed, pki: Path, tmp_path: Path
) -> None:
    """Make before break: each change of the rule's setting moves the service's clusters to
    another transport socket of the shared originate-tls cluster. A client calling all along
    sees no failed call while the setting flips 30 times, each flip waited for until the apps
    see its SNI (Istio's sidecar swaps a cluster's TLS context whole, so a call meets the old
    setting or the new one)."""
    verified = tls_rule(
        "secure",
        mode="SIMPLE",
        sni=SERVER,
        caCertificates=str(pki / "ca.pem"),
        subjectAltNames=[SERVER],
    )
    unverified = tls_rule("secure", mode="SIMPLE", insecureSkipVerify=True)  # SNI: the FQDN
    apply(clean, verified)
    until_status(clean, SECURE, "200")

    def sni(name: str) -> Any:
        return lambda tls: tls.get("sni") == name

    flips = [([unverified], sni(FQDN)), ([verified], sni(SERVER))] * 15
    calls, failed, probes_failed = flip_under_calls(clean, SECURE, flips, tmp_path)
    assert calls > 100
    assert failed == [], failed[:5]
    assert probes_failed == []
    # ... and the old sockets do not pile up: once Envoy holds the last setting's clusters,
    # originate-tls keeps that setting's socket only.
    wait_for(lambda: len(tls_sockets(clean, "n1")) == 1, 30, "one socket in originate-tls")


def tls_sockets(tb: Testbed, node: str) -> list[str]:
    """The DestinationRule sockets of NODE's originate-tls cluster, as its Envoy holds it."""
    dump = json.loads(envoy_admin(tb.name, node, "/config_dump?resource=dynamic_active_clusters"))
    names = [
        m["name"]
        for c in dump["configs"]
        if c["cluster"]["name"] == "originate-tls"
        for m in c["cluster"].get("transport_socket_matches", [])
    ]
    return [n for n in names if n.startswith("dr-tls-")]


@pytest.mark.parametrize("kept_named", [True, False], ids=["read-before", "not-read-yet"])
def test_no_call_fails_while_a_selector_rule_flips_its_credential(
    clean: Testbed, pki: Path, tmp_path: Path, kept_named: bool
) -> None:
    """The same with credentialName (a selector rule): each flip names the other Secret, so
    the new socket's certificate comes over SDS and originate-tls warms until it has it; the
    service's cluster, which only waits for its endpoints, must not name that socket before
    (originate-tls goes out first, see XdsServer.leaders). The app sees the flipped
    certificate; no call fails.

    KEPT_NAMED: both Secrets stay named all along, by a rule whose sockets use neither
    (SIMPLE, insecureSkipVerify: Envoy asks for no SDS secret of theirs), so the agent has
    read them while Envoy does not hold them. Without it, each flip names a Secret no rule
    named just before, so the agent starts reading it only then; until it is read it is
    pending (identity/credentials.py): no SDS secret is served for it, so Envoy's new
    originate-tls warms and the old one serves, as at Istio's sidecar (Envoy docs, cluster
    warming; xds_protocol, eventual consistency)."""
    tb = clean
    files = [layout.cluster_dir(tb.name) / f"secret-{n}.yaml" for n in ("cred-a", "cred-b")]
    files.append(allow_secrets(tb, "sleep"))  # sleep may present a credentialName (Authorize)
    try:
        put_secret(tb, "cred-a", pki, CLIENT)
        put_secret(tb, "cred-b", pki, ROTATED)
        rules = {}
        for name in ("cred-a", "cred-b"):
            rule = tls_rule("secure-mutual", mode="MUTUAL", sni=SERVER, credentialName=name)
            rule["workloadSelector"] = {"matchLabels": {"app": "sleep"}}
            rules[name] = rule
        keeper = {
            "host": "secure",
            "workloadSelector": {"matchLabels": {"app": "sleep"}},
            "subsets": [
                {
                    "name": name,
                    "labels": {"app": "secure"},
                    "trafficPolicy": {
                        "tls": {
                            "mode": "SIMPLE",
                            "insecureSkipVerify": True,
                            "credentialName": name,
                        }
                    },
                }
                for name in ("cred-a", "cred-b")
            ],
        }
        kept = [keeper] if kept_named else []
        apply(tb, rules["cred-a"], *kept)
        until_status(tb, MUTUAL, "200")

        def presents(san: str) -> Any:
            return lambda tls: tls.get("client_cert", {}).get("sans") == [f"DNS:{san}"]

        flips = [
            ([rules["cred-b"], *kept], presents(ROTATED)),
            ([rules["cred-a"], *kept], presents(CLIENT)),
        ] * 8
        calls, failed, probes_failed = flip_under_calls(tb, MUTUAL, flips, tmp_path)
        assert calls > 50
        assert failed == [], (len(failed), calls, failed[:5])
        assert probes_failed == []
    finally:
        for path in files:
            path.unlink(missing_ok=True)
