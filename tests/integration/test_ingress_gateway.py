"""The ingress gateway (``nodeagent gateway``, issue #16) on a one-node testbed with real Envoys.

istio-system/istio-ingressgateway is a gateway pod (outside the mesh's capture, as Istio's
gateway pods run no istio-init) with Istio's labels; a client netns outside the mesh and the
nodes reaches only its address, as a load balancer in front of it would be reached. As in
Istio's tasks (istio.io/latest/docs/tasks/traffic-management/ingress/ingress-control/ and
secure-ingress/): a Gateway selecting ``istio: ingressgateway``, a VirtualService bound to it
with ``gateways``, HTTPS with ``credentialName`` (a kubernetes.io/tls Secret in the gateway's
namespace), and rotating that Secret changes the served certificate without a restart; a
MUTUAL server wants a client certificate from the Secret's CA.

AuthorizationPolicy and RequestAuthentication on the ingress gateway, as in
istio.io/latest/docs/tasks/security/authorization/authz-ingress/ and
istio.io/latest/docs/tasks/security/authentication/authn-policy/#end-user-authentication:
policies in istio-system selecting ``istio: ingressgateway``; a DENY on a path answers 403
``RBAC: access denied``; a RequestAuthentication whose jwksUri the gateway fetches (from the
testbed's external) answers 401 to a bad token, 200 to demo.jwt, and with an ALLOW on
requestPrincipals ["*"] 403 to a request without one; ipBlocks judge the connection's peer,
remoteIpBlocks the client X-Forwarded-For names once gatewayTopology.numTrustedProxies says a
proxy in front of the gateway is trusted.

The egress gateway (istio-system/istio-egressgateway, the same command with Istio's egress
labels), as in istio.io/latest/docs/tasks/traffic-management/egress/egress-gateway/: under
REGISTRY_ONLY a ServiceEntry names the testbed's external server, one VirtualService sends the
mesh's calls of it to the egress gateway and the gateway's out to it; dialling the external's
address instead is refused. As Istio's chart has it, the gateway's Service maps port 80 to the
pod's 8080, where the gateway listens for the Gateway's port-80 server (istiod's resolvePorts).
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    EXT_AUTHZ_APP,
    call,
    pod,
    put_yaml,
    running_testbed,
    service,
    topology_text,
    wait_for,
)
from tests.tls_certs import write_app_pki
from tests.unit.istio_data import istio_data

pytestmark = pytest.mark.integration

NAME = "tbingress"
GATEWAY_POD = "istio-system/istio-ingressgateway"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
HOST = "shop.example.com"
CLIENT = "client.example"
EGRESS_POD = "istio-system/istio-egressgateway"
EXTERNAL = "api.external.test"


def _topology() -> str:
    def app(name: str) -> dict[str, Any]:
        return pod(name, "n1", {"app": name}, workload={"type": "fake-service", "port": 8080})

    def gateway(kind: str) -> dict[str, Any]:
        labels = {"istio": f"{kind}gateway", "app": f"istio-{kind}gateway"}
        return pod(
            f"istio-{kind}gateway",
            "n1",
            labels,
            namespace="istio-system",
            workload={"type": "gateway"},
        )

    # Istio's sample external authorizer as a mesh pod (HTTP 8000, gRPC 9000), for CUSTOM.
    ext_authz = pod("ext-authz", "n1", {"app": "ext-authz"}, workload=EXT_AUTHZ_APP)
    text = topology_text(
        NAME,
        [app("web-api"), app("payments"), gateway("ingress"), gateway("egress"), ext_authz],
        [
            service("web-api", 8080, 8080),
            service("payments", 8080, 8080),
            service("istio-egressgateway", 80, 8080, namespace="istio-system"),
            {
                "name": "ext-authz",
                "namespace": "default",
                "selector": {"app": "ext-authz"},
                "ports": [
                    {"name": "http", "port": 8000, "targetPort": 8000},
                    {"name": "grpc", "port": 9000, "targetPort": 9000},
                ],
            },
        ],
        nodes=({"name": "n1"},),
        outside=("istio-system",),
    )
    return (
        text
        + f'outside: {{"pods": ["{GATEWAY_POD}"]}}\n'
        + f"externals:\n  - {{name: api, names: [{EXTERNAL}]}}\n"
    )


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_ingress_gateway") as bed:
        yield bed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two certificates for HOST from two CAs: the Secret's first content and its rotation."""
    base = tmp_path_factory.mktemp("ingress-pki")
    first, second = base / "first", base / "second"
    write_app_pki(first, HOST, CLIENT)  # the first CA also signs the MUTUAL server's clients
    write_app_pki(second, HOST)
    return first, second


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 8080, name: http-redirect, protocol: HTTP}
    hosts: ["secure.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 9443, name: https-mutual, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: MUTUAL, credentialName: shop-mtls}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: ["*"]
  gateways: [istio-system/shop-gateway]
  http:
  - match: [{uri: {prefix: /pay}}]
    route: [{destination: {host: payments}}]
  - route: [{destination: {host: web-api}}]
"""


def _secret(pki: Path, name: str = "shop-cert", client_ca: bool = False) -> str:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    ca = f"\n  ca.crt: {b64(pki / 'ca.pem')}" if client_ca else ""
    return f"""
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: istio-system}}
type: kubernetes.io/tls
data:
  tls.crt: {b64(pki / f"{HOST}.pem")}
  tls.key: {b64(pki / f"{HOST}.key")}{ca}
"""


def _mutual_secret(pki: Path) -> str:
    """The MUTUAL server's Secret: its certificate and the CA its clients must come from."""
    return _secret(pki, "shop-mtls", client_ca=True)


def _curl(tb: Testbed, url: str, *args: str) -> Any:
    return tb.outside_exec(["curl", "-sS", "--max-time", "5", *args, url], timeout=15)


def _answer(tb: Testbed, url: str, *args: str) -> dict[str, Any] | None:
    """The fake service's JSON answer to the outside client's request, or None."""
    import json

    proc = _curl(tb, url, *args)
    if proc.returncode != 0:
        return None
    try:
        answer: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return None
    return answer


def _served_pem(tb: Testbed, ip: str) -> str:
    """The certificate the gateway presents for HOST (SNI), read with openssl from outside."""
    openssl = f"openssl s_client -servername {HOST} -connect {ip}:8443 </dev/null 2>/dev/null"
    proc = tb.outside_exec(["sh", "-c", openssl], timeout=15)
    found = re.search(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", proc.stdout, re.DOTALL
    )
    return found.group(0) if found else ""


def _envoy_pid(tb: Testbed) -> str:
    gateway = tb.topology.find_pod(GATEWAY_POD)
    return (layout.gateway_dir(tb.name, gateway) / "envoy.pid").read_text().split()[0]


@pytest.fixture(scope="module")
def routed(tb: Testbed, pki: tuple[Path, Path]) -> Testbed:
    """The Gateway, its VirtualService and the first Secret applied (kubectl apply)."""
    put_yaml(tb, "gateway.yaml", GATEWAY, _secret(pki[0]), _mutual_secret(pki[0]))
    ip = tb.pod_ip(GATEWAY_POD)
    wait_for(
        lambda: (_answer(tb, f"http://{ip}:8080/") or {}).get("name") == "web-api",
        30,
        "web-api through the gateway",
        step=0.2,
    )
    return tb


def test_outside_client_reaches_web_api_over_http_with_the_gateway_identity(
    routed: Testbed,
) -> None:
    ip = routed.pod_ip(GATEWAY_POD)
    answer = _answer(routed, f"http://{ip}:8080/headers")
    assert answer is not None
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    # web-api's node Envoy took mTLS from the gateway, under its service account's identity.
    assert f"URI={GATEWAY_ID}" in headers["x-forwarded-client-cert"]


def test_virtual_service_on_the_gateway_routes_by_path(routed: Testbed) -> None:
    ip = routed.pod_ip(GATEWAY_POD)
    pay = _answer(routed, f"http://{ip}:8080/pay/now")
    home = _answer(routed, f"http://{ip}:8080/home")
    assert (pay or {}).get("name") == "payments"
    assert (home or {}).get("name") == "web-api"
    # A VirtualService bound to the gateway only leaves the mesh's own calls alone.
    assert call(routed, "payments", "http://web-api:8080/pay")["name"] == "web-api"


def test_mutual_tls_server_requires_a_client_certificate_from_the_secrets_ca(
    routed: Testbed, pki: tuple[Path, Path]
) -> None:
    ip = routed.pod_ip(GATEWAY_POD)
    first = pki[0]
    url = f"https://{HOST}:9443/"
    base = ("--resolve", f"{HOST}:9443:{ip}", "--cacert", str(first / "ca.pem"))
    client = ("--cert", str(first / f"{CLIENT}.pem"), "--key", str(first / f"{CLIENT}.key"))
    wait_for(
        lambda: (_answer(routed, url, *base, *client) or {}).get("name") == "web-api",
        30,
        "web-api over MUTUAL TLS with a client certificate",
        step=0.2,
    )
    assert _curl(routed, url, *base).returncode != 0  # no client certificate: refused


def test_https_redirect_server_answers_301_to_https(routed: Testbed) -> None:
    ip = routed.pod_ip(GATEWAY_POD)
    proc = _curl(
        routed,
        f"http://{ip}:8080/x",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: secure.example.com",
    )
    assert proc.stdout == "301 https://secure.example.com/x"


def test_https_with_credential_name_and_rotation_without_restart(
    routed: Testbed, pki: tuple[Path, Path]
) -> None:
    ip = routed.pod_ip(GATEWAY_POD)
    url = f"https://{HOST}:8443/"
    resolve = f"{HOST}:8443:{ip}"
    first, second = pki

    def via_https(ca: Path) -> bool:
        answer = _answer(routed, url, "--resolve", resolve, "--cacert", str(ca / "ca.pem"))
        return (answer or {}).get("name") == "web-api"

    wait_for(lambda: via_https(first), 30, "web-api over HTTPS with the first Secret", step=0.2)
    assert _served_pem(routed, ip) == (first / f"{HOST}.pem").read_text().strip()
    envoy, process = _envoy_pid(routed), routed.state.pods[GATEWAY_POD].pid

    # The Secret rotated (the MUTUAL server's stays).
    put_yaml(routed, "gateway.yaml", GATEWAY, _secret(second), _mutual_secret(first))
    wanted = (second / f"{HOST}.pem").read_text().strip()
    wait_for(lambda: _served_pem(routed, ip) == wanted, 30, "the rotated certificate", step=0.2)
    assert via_https(second)
    assert not via_https(first)  # the old CA does not vouch for the new certificate
    assert (_envoy_pid(routed), routed.state.pods[GATEWAY_POD].pid) == (envoy, process)


# Istio's egress gateway task (istio.io/latest/docs/tasks/traffic-management/egress/
# egress-gateway/), for the testbed's external server: the ServiceEntry, a Gateway for the
# egress gateway, and one VirtualService for both the mesh (to the gateway) and the gateway (out).
EGRESS = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [{EXTERNAL}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istio-egressgateway, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [{EXTERNAL}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: direct-api-through-egress-gateway, namespace: default}}
spec:
  hosts: [{EXTERNAL}]
  gateways: [istio-system/istio-egressgateway, mesh]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
  - match: [{{gateways: [istio-system/istio-egressgateway], port: 80}}]
    route: [{{destination: {{host: {EXTERNAL}, port: {{number: 80}}}}}}]
"""


def _egress_log(tb: Testbed) -> Path:
    return layout.gateway_envoy_log(tb.name, tb.topology.find_pod(EGRESS_POD))


def _logged_after(path: Path, offset: int, *words: str) -> bool:
    with path.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    return any(all(w in line for w in words) for line in lines)


def _status(tb: Testbed, url: str) -> str:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url]
    return tb.exec("web-api", argv).stdout.strip() or "000"


def test_mesh_traffic_leaves_through_the_egress_gateway_and_cannot_bypass_it(
    routed: Testbed,
) -> None:
    """REGISTRY_ONLY: web-api's call to the external host goes to the egress gateway (the mesh
    route), which calls it (the gateway route; its access log names the external's cluster);
    dialling the external's address itself, which no registry entry names: refused (502)."""
    tb = routed
    tb.set_mesh_config({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})
    put_yaml(tb, "egress.yaml", EGRESS)
    try:
        log = _egress_log(tb)
        url = f"http://{EXTERNAL}/"
        offset = log.stat().st_size
        cluster = f"outbound|80||{EXTERNAL}"

        def through_the_gateway() -> bool:
            """A call answered, and (Envoy flushes its log each second) one has been logged by
            the egress gateway as sent to the external host's cluster."""
            answered = _status(tb, url) == "200"
            return answered and _logged_after(log, offset, EGRESS_POD, " 200 ", cluster)

        wait_for(through_the_gateway, 30, "the external host through the egress gateway", 0.3)
        assert call(tb, "web-api", url)["name"] == "api"
        # The bypass: the external's address, which no registry entry names. On the entry's
        # HTTP port the Host decides (Istio's block_all: 502 from the BlackHoleCluster).
        bypass = f"http://{tb.topology.externals[0].ip}/"
        wait_for(lambda: _status(tb, bypass) == "502", 20, "REGISTRY_ONLY refusing the bypass")
        assert call(tb, "web-api", url)["name"] == "api"  # the gateway's way still works
    finally:
        put_yaml(tb, "egress.yaml")
        tb.set_mesh_config({})


# -- AuthorizationPolicy and RequestAuthentication on the ingress gateway ------------------------

ISSUER = "testing@secure.istio.io"
JWKS = istio_data("jwt/jwks.json").read_text()
DEMO = istio_data("jwt/demo.jwt").read_text().strip()
KEYS_PORT = 8081  # on the external ``api`` (its own servers use 80 and 443)
SELECT_INGRESS = "selector: {matchLabels: {istio: ingressgateway}}"


def _code(tb: Testbed, path: str, *headers: str) -> str:
    """The HTTP status the outside client gets from the gateway for PATH (000: none)."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
    for header in headers:
        argv += ["-H", header]
    proc = tb.outside_exec([*argv, f"http://{tb.pod_ip(GATEWAY_POD)}:8080{path}"], timeout=15)
    return proc.stdout.strip() or "000"


def _settle(tb: Testbed, expected: dict[str, tuple[str, ...]]) -> None:
    """Wait until each request (label -> (path, *headers)) gets its expected status, given as
    the label's first word: twice in a row, so both of Envoy's workers have the new config."""
    want = {label: label.split()[0] for label in expected}
    seen: dict[str, str] = {}

    def answers() -> dict[str, str]:
        return {label: _code(tb, *request) for label, request in expected.items()}

    def settled() -> bool:
        seen.update(answers())
        return seen == want and answers() == want

    wait_for(settled, 30, lambda: f"answers {seen}, expected {want}", step=0.3)


@pytest.fixture
def keys_uri(routed: Testbed) -> Iterator[str]:
    """Istio's sample JWKS served over HTTP by the external ``api``: the gateway fetches it."""
    ip = str(routed.external("api").ip)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "jwks.json").write_text(JWKS)
        server = [sys.executable, "-m", "http.server", "-b", ip, "-d", folder, str(KEYS_PORT)]
        proc = subprocess.Popen(
            netns.in_netns(layout.external_netns(NAME, "api"), server),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield f"http://{ip}:{KEYS_PORT}/jwks.json"
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def policies(routed: Testbed) -> Iterator[Testbed]:
    """The test's security policies go to gateway-policies.yaml, removed on leaving."""
    yield routed
    put_yaml(routed, "gateway-policies.yaml")
    routed.set_mesh_config({})


def test_deny_on_a_path_at_the_gateway_answers_403(policies: Testbed) -> None:
    deny = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: istio-system}}
spec:
  {SELECT_INGRESS}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
"""
    put_yaml(policies, "gateway-policies.yaml", deny)
    _settle(policies, {"403 admin": ("/admin/x",), "200 home": ("/home",)})
    ip = policies.pod_ip(GATEWAY_POD)
    wait_for(  # bounded, as _settle: each of Envoy's workers takes the new listener in turn
        lambda: _curl(policies, f"http://{ip}:8080/admin").stdout == "RBAC: access denied",
        10,
        "RBAC's 403 body",
    )


def test_jwt_at_the_gateway_401_for_a_bad_token_and_an_allow_on_request_principals(
    policies: Testbed, keys_uri: str
) -> None:
    authn = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: istio-system}}
spec:
  {SELECT_INGRESS}
  jwtRules: [{{issuer: "{ISSUER}", jwksUri: "{keys_uri}", timeout: 2s}}]
"""
    bad, good = f"Authorization: Bearer {DEMO[:-4]}xxxx", f"Authorization: Bearer {DEMO}"
    put_yaml(policies, "gateway-policies.yaml", authn)
    _settle(policies, {"401 bad": ("/", bad), "200 valid": ("/", good), "200 none": ("/",)})
    allow = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: istio-system}}
spec:
  {SELECT_INGRESS}
  rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    put_yaml(policies, "gateway-policies.yaml", authn, allow)
    _settle(policies, {"403 none": ("/",), "200 valid": ("/", good), "401 bad": ("/", bad)})


def test_ip_blocks_judge_the_peer_remote_ip_blocks_the_client_behind_trusted_proxies(
    policies: Testbed,
) -> None:
    """authz-ingress: the outside client stands for a load balancer; with numTrustedProxies 1
    (meshConfig.defaultConfig.gatewayTopology) the client it names in X-Forwarded-For is the
    remote IP a remoteIpBlocks DENY judges; without it, the peer is, and XFF is not believed."""
    outside = policies.topology.outside
    assert outside is not None
    deny = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-clients, namespace: istio-system}}
spec:
  {SELECT_INGRESS}
  action: DENY
  rules:
  - from: [{{source: {{remoteIpBlocks: ["203.0.113.7"]}}}}]
  - from: [{{source: {{ipBlocks: ["{outside.ip}/32"]}}}}]
    to: [{{operation: {{paths: ["/peer-denied"]}}}}]
"""
    named, other = "X-Forwarded-For: 203.0.113.7", "X-Forwarded-For: 198.51.100.1"
    put_yaml(policies, "gateway-policies.yaml", deny)
    # No trusted proxy: the remote address is the peer; a forged XFF changes nothing.
    _settle(policies, {"200 named": ("/", named), "403 peer": ("/peer-denied", other)})
    policies.set_mesh_config({"defaultConfig": {"gatewayTopology": {"numTrustedProxies": 1}}})
    _settle(
        policies,
        {"403 named": ("/", named), "200 other": ("/", other), "403 peer": ("/peer-denied", other)},
    )


# istio.io/latest/docs/tasks/security/authorization/authz-custom/: its two providers (MeshConfig
# extensionProviders) and its CUSTOM policy, here on the ingress gateway (Istio's common use:
# ext-authz or oauth2-proxy at the edge).
EXT_AUTHZ_HOST = "ext-authz.default.svc.cluster.local"
EXT_AUTHZ_PROVIDERS = {
    "extensionProviders": [
        {"name": "grpc", "envoyExtAuthzGrpc": {"service": EXT_AUTHZ_HOST, "port": 9000}},
        {
            "name": "http",
            "envoyExtAuthzHttp": {
                "service": EXT_AUTHZ_HOST,
                "port": 8000,
                "includeRequestHeadersInCheck": ["x-ext-authz"],
                "headersToUpstreamOnAllow": ["x-ext-authz-check-received"],
                "headersToDownstreamOnDeny": ["x-ext-authz-check-result"],
            },
        },
    ]
}


def test_custom_ext_authz_at_the_gateway_with_both_providers(policies: Testbed) -> None:
    """The authz-custom task's policy on the ingress gateway (CUSTOM on /headers): allowed with
    ``x-ext-authz: allow``, 403 without, the provider's ``x-ext-authz-check-result: denied``
    reaching the client; / never checked. The gateway calls the provider (a mesh
    pod) itself, over mTLS as its own identity: the x-forwarded-client-cert the check arrived
    with, which the provider hands upstream, names the gateway."""
    policies.set_mesh_config(EXT_AUTHZ_PROVIDERS)
    ip = policies.pod_ip(GATEWAY_POD)
    allow = "x-ext-authz: allow"
    for provider in ("http", "grpc"):
        custom = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz, namespace: istio-system}}
spec:
  {SELECT_INGRESS}
  action: CUSTOM
  provider: {{name: {provider}}}
  rules: [{{to: [{{operation: {{paths: ["/headers"]}}}}]}}]
"""
        put_yaml(policies, "gateway-policies.yaml", custom)
        _settle(
            policies,
            {"200 allowed": ("/headers", allow), "403 denied": ("/headers",), "200 home": ("/",)},
        )
        answer = _answer(policies, f"http://{ip}:8080/headers", "-H", allow) or {}
        headers = {k.lower(): v for k, v in answer.get("headers", {}).items()}
        assert f"URI={GATEWAY_ID}" in headers.get("x-ext-authz-check-received", ""), answer
        denied = _curl(policies, f"http://{ip}:8080/headers", "-i").stdout.lower()
        assert "x-ext-authz-check-result: denied" in denied, (provider, denied)
