"""The CA service (``nodeagent ca``) end to end: its real gRPC server over TLS on 127.0.0.1, the
stand-in API server in-process (TokenReview, pods, Secrets, ConfigMaps).

Istio is the reference: istiod's CA server (security/pkg/server/ca/server.go, CreateCertificate),
its node authorizer for ztunnel (security/pkg/server/ca/node_auth.go), the plug-in CA Secret
``cacerts`` (https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/) and the
self-signed ``istio-ca-secret``. Differences the issue asks for are asserted as such: the CSR's
SAN must be exactly the identity, refusals say why, a too long TTL is capped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from apiserver_standin import APIServerStandIn
from ca_client import Answer, create_certificate, make_csr, tamper
from ca_cluster import (
    CART,
    NS,
    TD,
    TOKEN_A,
    WEB,
)
from ca_cluster import cluster as _cluster
from ca_cluster import published_root as _published_root
from ca_cluster import running as _running
from cryptography import x509

from nodeagent.caservice.server import CAServer
from nodeagent.identity.certs import verify_chain
from tests.waiting import wait_for_async

SECRETS, CONFIGMAPS = "/api/v1/secrets", "/api/v1/configmaps"


async def _ask(
    ca: CAServer, api: APIServerStandIn, token: str | None, identity: str, **kw: Any
) -> Answer:
    csr = kw.pop("csr", None) or make_csr([identity])
    return await create_certificate(
        ca.port, _published_root(api), csr, token, impersonate=identity, **kw
    )


def _leaf(answer: Answer) -> x509.Certificate:
    return x509.load_pem_x509_certificate(answer.chain[0].encode())


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _counter(ca: CAServer, name: str, **labels: str) -> float:
    value = ca.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _get(url: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


# -- issuance ---------------------------------------------------------------------------------


def test_a_node_agent_gets_a_certificate_for_a_pod_on_its_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        api = _cluster()
        try:
            async with _running(api, tmp_path) as ca:
                answer = await _ask(ca, api, TOKEN_A, CART)
                assert answer.code == grpc.StatusCode.OK, answer.details
                # [leaf, root bundle]: the self-signed root signs directly, as istiod's does.
                assert len(answer.chain) == 2
                assert answer.chain[-1].encode() == _published_root(api)
                leaf = _leaf(answer)
                assert _uris(leaf) == [CART]
                verify_chain("".join(answer.chain[:-1]).encode(), answer.chain[-1].encode())
                # No validity asked: Istio's DEFAULT_WORKLOAD_CERT_TTL, 24h.
                lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
                assert timedelta(hours=23, minutes=58) < lifetime <= timedelta(hours=24)
                asked = await _ask(ca, api, TOKEN_A, CART, validity=3600)
                lifetime = _leaf(asked).not_valid_after_utc - datetime.now(UTC)
                assert timedelta(minutes=58) < lifetime <= timedelta(hours=1)
                assert _counter(ca, "nodeagent_ca_certificates_issued_total") == 2
                # Both requests timed as issued, each well within the client's 10 s deadline.
                duration = "nodeagent_ca_request_duration_seconds"
                assert _counter(ca, f"{duration}_count", outcome="issued") == 2
                assert 0 < _counter(ca, f"{duration}_sum", outcome="issued") < 20
                status, ready = await _get(f"http://127.0.0.1:{ca.monitoring_port}/ready")
                assert (status, ready.strip()) == (200, "ok")
                status, text = await _get(f"http://127.0.0.1:{ca.monitoring_port}/metrics")
                assert "nodeagent_ca_certificates_issued_total 2.0" in text
                root = x509.load_pem_x509_certificate(_published_root(api))
                expiry = _counter(ca, "nodeagent_ca_root_expiry_timestamp_seconds")
                assert expiry == root.not_valid_after_utc.timestamp()
                assert "nodeagent_ca_root_expiry_timestamp_seconds" in text
        finally:
            await api.stop()

    asyncio.run(main())
    assert (
        f"issued a certificate for {CART} to nodeagent-system/nodeagent"
        " (pod nodeagent-system/nodeagent-a)" in caplog.text
    )
    assert TOKEN_A not in caplog.text


def test_a_workload_token_gets_its_own_identity_without_impersonating(tmp_path: Path) -> None:
    """Istio: with no ImpersonatedIdentity, the caller's own identity (server.go)."""

    async def main() -> None:
        api = _cluster()
        api.register_token("cart-token", "shop", "cart", "cart-1", "uid-cart", ["istio-ca"])
        try:
            async with _running(api, tmp_path) as ca:
                answer = await create_certificate(
                    ca.port, _published_root(api), make_csr([CART]), "cart-token"
                )
                assert answer.code == grpc.StatusCode.OK, answer.details
                assert _uris(_leaf(answer)) == [CART]
        finally:
            await api.stop()

    asyncio.run(main())


def test_a_ttl_above_the_maximum_is_capped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        api = _cluster()
        try:
            async with _running(api, tmp_path, max_cert_ttl=7200.0) as ca:
                answer = await _ask(ca, api, TOKEN_A, CART, validity=10**7)
                assert answer.code == grpc.StatusCode.OK, answer.details
                lifetime = _leaf(answer).not_valid_after_utc - datetime.now(UTC)
                assert timedelta(minutes=118) < lifetime <= timedelta(hours=2)
        finally:
            await api.stop()

    asyncio.run(main())
    assert f"asked for a 10000000s certificate for {CART}: capped to 7200s" in caplog.text


# -- refusals ---------------------------------------------------------------------------------

OTHER_TD = "spiffe://other.example/ns/shop/sa/cart"


def _two_sans() -> str:
    return make_csr([CART, f"spiffe://{TD}/ns/shop/sa/admin"])


REFUSALS = {
    # name: (token, identity, csr, code, reason, detail)
    "node A asks for an identity only on node B": (
        TOKEN_A,
        WEB,
        None,
        grpc.StatusCode.PERMISSION_DENIED,
        "not_authorized",
        "no pod of shop/web on node node-a",
    ),
    "forged token": (
        "forged",
        CART,
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "unauthenticated",
        "token rejected by TokenReview: invalid bearer token",
    ),
    "wrong audience": (
        "token-other-audience",
        CART,
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "unauthenticated",
        "is invalid for the target audiences ['istio-ca']",
    ),
    "expired token": (
        "token-expired",
        CART,
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "unauthenticated",
        "token has expired",
    ),
    "no token": (
        None,
        CART,
        None,
        grpc.StatusCode.UNAUTHENTICATED,
        "unauthenticated",
        "no authorization metadata",
    ),
    "CSR SAN differs from the identity": (
        TOKEN_A,
        CART,
        make_csr([WEB]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "san_mismatch",
        f"the CSR asks for URI {WEB}; want exactly one SAN, URI {CART}",
    ),
    "CSR with two SANs": (
        TOKEN_A,
        CART,
        _two_sans(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "san_mismatch",
        "the CSR has 2 SANs",
    ),
    "CSR with a bad signature": (
        TOKEN_A,
        CART,
        tamper(make_csr([CART])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_csr",
        "signature does not verify",
    ),
    "not a CSR": (
        TOKEN_A,
        CART,
        "hello",
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_csr",
        "not a PEM certificate request",
    ),
    "other trust domain": (
        TOKEN_A,
        OTHER_TD,
        make_csr([OTHER_TD]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_identity",
        "is in trust domain 'other.example', not this CA's 'cluster.local'",
    ),
    "untrusted account impersonating": (
        "cart-token",
        WEB,
        None,
        grpc.StatusCode.PERMISSION_DENIED,
        "not_authorized",
        "shop/cart is not a trusted node account",
    ),
    "token of a replaced pod": (
        "token-stale-pod",
        CART,
        None,
        grpc.StatusCode.PERMISSION_DENIED,
        "not_authorized",
        "has uid 'uid-a', the token 'uid-old'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_says_why_is_logged_and_counted(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token, identity, csr, code, reason, detail = REFUSALS[case]
    caplog.set_level(logging.INFO)

    async def main() -> None:
        api = _cluster()
        api.register_token(
            "token-other-audience", NS, "nodeagent", "nodeagent-a", "uid-a", ["kubernetes"]
        )
        api.register_token(
            "token-expired", NS, "nodeagent", "nodeagent-a", "uid-a", ["istio-ca"], time.time() - 1
        )
        api.register_token("cart-token", "shop", "cart", "cart-1", "uid-cart", ["istio-ca"])
        api.register_token(
            "token-stale-pod", NS, "nodeagent", "nodeagent-a", "uid-old", ["istio-ca"]
        )
        try:
            async with _running(api, tmp_path) as ca:
                answer = await _ask(ca, api, token, identity, csr=csr)
                assert (answer.code, answer.chain) == (code, [])
                assert detail in answer.details
                # The server counts after the client has its answer (the request's duration is
                # observed when the handler returns): wait for it, briefly.
                duration = "nodeagent_ca_request_duration_seconds_count"
                await wait_for_async(
                    lambda: _counter(ca, duration, outcome="refused") == 1, 5, "the duration"
                )
                assert _counter(ca, "nodeagent_ca_refusals_total", reason=reason) == 1
                others = sum(
                    _counter(ca, "nodeagent_ca_refusals_total", reason=r)
                    for r in (
                        "unauthenticated",
                        "not_authorized",
                        "bad_csr",
                        "san_mismatch",
                        "bad_identity",
                    )
                )
                assert others == 1
                assert _counter(ca, "nodeagent_ca_certificates_issued_total") == 0
                assert _counter(ca, duration, outcome="issued") == 0
        finally:
            await api.stop()

    asyncio.run(main())
    refusals = [
        r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()
    ]
    assert len(refusals) == 1
    line = refusals[0].getMessage()
    assert f"refused a certificate for {identity} to " in line
    assert f"({reason}): " in line and detail in line
    if token not in (None, "forged", "token-other-audience", "token-expired"):
        assert "nodeagent-system/nodeagent" in line or "shop/cart" in line  # who asked
    if token is not None:
        assert token not in caplog.text  # never the token
