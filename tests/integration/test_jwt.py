"""RequestAuthentication through the real node Envoy (issue #17 part 2; SCENARIOS S5, the lines
that need no AuthorizationPolicy).

Two nodes: httpbin (the fake service) and sleep on n1, sleep-far on n2, so each request is
checked on the same-node fast path (sleep) and across nodes over mTLS (sleep-far). The testbed's
external ``keys`` (outside the mesh and every node) serves Istio's sample JWKS for ``jwksUri``.
Expected answers: istio.io/latest/docs/tasks/security/authentication/authn-policy/
#end-user-authentication (no token 200, an invalid token 401, a valid one 200) and
istio.io/latest/docs/reference/config/security/request_authentication/ (token locations,
outputPayloadToHeader, outputClaimToHeaders, forwardOriginalToken). The keys of a jwksUri are
fetched by the agent and inlined as istiod does (pilot/pkg/model/jwks_resolver.go): with the
server gone, the cached keys keep working and a token signed by another key is still refused.
The agents refresh keys every 2 s here (PILOT_JWT_PUB_KEY_REFRESH_INTERVAL), so the outage is
really met.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    pod,
    running_testbed,
    service,
    topology_text,
    wait_for,
)
from tests.unit.istio_data import istio_data

pytestmark = pytest.mark.integration

NAME = "tbjwt"
ISSUER = "testing@secure.istio.io"
JWKS = istio_data("jwt/jwks.json").read_text()
DEMO = istio_data("jwt/demo.jwt").read_text().strip()
URL = "http://httpbin:8000"
CALLERS = ("sleep", "sleep-far")  # same node as httpbin (fast path), the other node (mTLS)
KEYS_PORT = 8080


def _topology() -> str:
    httpbin = {"type": "fake-service", "port": 8000}
    pods = [
        pod("httpbin", "n1", {"app": "httpbin"}, workload=httpbin),
        pod("sleep", "n1", {"app": "sleep"}),
        pod("sleep-far", "n2", {"app": "sleep"}),
    ]
    text = topology_text(NAME, pods, [service("httpbin", 8000, 8000)])
    return text + "externals:\n  - {name: keys, names: [keys.external.test]}\n"


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL", "2s")  # read by the agents
        with running_testbed(_topology(), "test_jwt") as bed:
            yield bed


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    apply_docs(tb)
    yield tb
    apply_docs(tb)


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "httpbin", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": list(rules)},
    }


def status(tb: Testbed, caller: str, path: str = "/", *headers: str) -> str:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
    for header in headers:
        argv += ["-H", header]
    return tb.exec(caller, [*argv, URL + path]).stdout.strip() or "000"


def seen_headers(tb: Testbed, caller: str, path: str, *headers: str) -> dict[str, str]:
    """The request headers httpbin received (its /headers answer), lower-cased names."""
    argv = ["curl", "-sS", "--max-time", "5"]
    for header in headers:
        argv += ["-H", header]
    proc = tb.exec(caller, [*argv, URL + path])
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return {k.lower(): v for k, v in answer["headers"].items()}


Request = tuple[str, tuple[str, ...]]  # path, headers


def answers(tb: Testbed, requests: dict[str, Request]) -> dict[str, str]:
    """caller: label -> status, for every caller and each of REQUESTS (label -> request)."""
    return {
        f"{caller}: {label}": status(tb, caller, path, *headers)
        for caller in CALLERS
        for label, (path, headers) in requests.items()
    }


def settle(tb: Testbed, requests: dict[str, Request], expected: dict[str, str]) -> None:
    """Wait until every caller gets EXPECTED[label] for each request. A policy change takes
    effect for new connections: pooled ones made before it drain (answered once more under the
    old config, with Connection: close), as in Istio's sidecars, so the answers settle."""
    want = {f"{c}: {label}": expected[label] for c in CALLERS for label in requests}
    last: dict[str, str] = {}

    def settled() -> bool:  # twice in a row: each worker's pooled connection met
        last.update(answers(tb, requests))
        return last == want and answers(tb, requests) == want

    wait_for(settled, 30, lambda: f"answers {last}, expected {want}", step=0.3)


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def foreign_token() -> str:
    """A well-formed token of the right issuer and key id, signed by a key nobody published."""
    kid = json.loads(JWKS)["keys"][0]["kid"]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = _b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
    claims = {"iss": ISSUER, "sub": ISSUER, "exp": int(time.time()) + 3600}
    body = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{_b64(signature)}"


def test_s5_invalid_token_401_none_200_valid_200_on_both_paths(clean: Testbed) -> None:
    requests: dict[str, Request] = {
        "no token": ("/", ()),
        "bad token": ("/", (bearer("deadbeef"),)),
        "demo.jwt": ("/", (bearer(DEMO),)),
        "unknown key": ("/", (bearer(foreign_token()),)),
    }
    apply_docs(clean, policy({"issuer": ISSUER, "jwks": JWKS}))
    settle(
        clean,
        requests,
        {"no token": "200", "bad token": "401", "demo.jwt": "200", "unknown key": "401"},
    )
    apply_docs(clean)  # the policy gone: tokens are the app's business again
    settle(clean, requests, dict.fromkeys(requests, "200"))


def test_payload_and_claims_to_headers_and_the_forwarded_token(clean: Testbed) -> None:
    rule = {
        "issuer": ISSUER,
        "jwks": JWKS,
        "outputPayloadToHeader": "x-jwt-payload",
        "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}],
        "forwardOriginalToken": True,
    }
    bad: dict[str, Request] = {"bad": ("/", (bearer("x"),))}
    apply_docs(clean, policy(rule))
    settle(clean, bad, {"bad": "401"})
    seen: dict[str, dict[str, str]] = {}

    def outputs() -> bool:
        for caller in CALLERS:
            seen[caller] = seen_headers(clean, caller, "/headers", bearer(DEMO))
        return all("x-jwt-payload" in headers for headers in seen.values())

    wait_for(outputs, 30, lambda: f"the payload header, in {seen}", step=0.3)
    for caller, headers in seen.items():
        payload = json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "=="))
        assert payload["iss"] == ISSUER and payload["foo"] == "bar"
        assert headers["x-jwt-sub"] == ISSUER
        assert headers["authorization"] == f"Bearer {DEMO}", caller  # forwardOriginalToken
    # Not forwarded (Istio's default): the app never sees the token.
    apply_docs(clean, policy({**rule, "forwardOriginalToken": False}))
    wait_for(
        lambda: all(
            "authorization" not in seen_headers(clean, c, "/headers", bearer(DEMO)) for c in CALLERS
        ),
        30,
        "the token removed after verification",
        step=0.3,
    )


def test_token_locations_from_params_and_from_headers(clean: Testbed) -> None:
    """A rule with fromParams/fromHeaders looks only there: the Authorization header is then
    not a token location of it."""
    rule = {
        "issuer": ISSUER,
        "jwks": JWKS,
        "fromParams": ["jwt"],
        "fromHeaders": [{"name": "x-token", "prefix": "Token "}],
    }
    requests: dict[str, Request] = {
        "param": (f"/?jwt={DEMO}", ()),
        "bad param": ("/?jwt=deadbeef", ()),
        "header": ("/", (f"x-token: Token {DEMO}",)),
        "bad header": ("/", ("x-token: Token deadbeef",)),
        "bearer": ("/", (bearer("deadbeef"),)),  # not looked at
    }
    apply_docs(clean, policy(rule))
    expected = {"param": "200", "bad param": "401", "header": "200", "bad header": "401"}
    settle(clean, requests, {**expected, "bearer": "200"})


@pytest.fixture
def keys_server(tb: Testbed) -> Iterator[subprocess.Popen[bytes]]:
    """Istio's sample JWKS served over HTTP by the external ``keys`` (stopped on leaving)."""
    ip = str(tb.external("keys").ip)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "jwks.json").write_text(JWKS)
        server = [sys.executable, "-m", "http.server", "-b", ip, "-d", folder, str(KEYS_PORT)]
        proc = subprocess.Popen(
            netns.in_netns(layout.external_netns(NAME, "keys"), server),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


def _agent_log(tb: Testbed, node: str) -> str:
    return (layout.logs_dir(tb.name) / f"{node}.agent.log").read_text(errors="replace")


def test_jwks_uri_keys_are_fetched_and_survive_the_servers_outage(
    clean: Testbed, keys_server: subprocess.Popen[bytes]
) -> None:
    uri = f"http://{clean.external('keys').ip}:{KEYS_PORT}/jwks.json"
    requests: dict[str, Request] = {
        "no token": ("/", ()),
        "bad token": ("/", (bearer("deadbeef"),)),
        "demo.jwt": ("/", (bearer(DEMO),)),
        "unknown key": ("/", (bearer(foreign_token()),)),
    }
    expected = {"no token": "200", "bad token": "401", "demo.jwt": "200", "unknown key": "401"}
    apply_docs(clean, policy({"issuer": ISSUER, "jwksUri": uri}))
    settle(clean, requests, expected)
    keys_server.terminate()
    keys_server.wait(10)
    for node in ("n1", "n2"):
        wait_for(
            lambda n=node: "cached keys stay in use" in _agent_log(clean, n),
            20,
            f"{node}: a refresh meeting the outage",
            step=0.3,
        )
    # The cached keys still verify demo.jwt, and an unknown key is still refused.
    settle(clean, requests, expected)
