"""The node agent as a client of the CA service: the IdentityManager with a RemoteCA against the
real CAServer (gRPC over TLS on 127.0.0.1) and the stand-in API server, as on a node.

What a node would see: certificates for its pods' identities asked by impersonation (as ztunnel
asks istiod), refusals and outages retried without dropping what serves, expiry failing closed,
the trust bundle following the root ConfigMap and the CA, answers checked before use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from apiserver_standin import APIServerStandIn
from ca_cluster import CART, NS, TD, TOKEN_A, WEB, cluster, published_root, running
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from nodeagent.caservice.keystore import signer_from_files
from nodeagent.caservice.server import CAServer
from nodeagent.caservice.servercert import server_certificate
from nodeagent.identity import manager as manager_module
from nodeagent.identity.ca import plugin_cacerts
from nodeagent.identity.certs import verify_chain
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.protocol import SERVICE, IstioCertificateRequest, IstioCertificateResponse
from nodeagent.identity.remote import DEFAULT_SERVER_NAME, RemoteCA
from nodeagent.identity.secrets import ROOTCA
from tests.waiting import wait_for_async

CART_SA = ("shop", "cart")  # a pod on node-a, this agent's node
WEB_SA = ("shop", "web")  # a pod on node-b only


class Node:
    """The files a node agent's pod has mounted: the root ConfigMap (kubelet layout: the file is a
    symlink through ``..data``, swapped atomically) and the projected token."""

    def __init__(self, root: Path, token: str) -> None:
        self.dir = root / "ca-root"
        self.dir.mkdir()
        self.root_file = self.dir / "root-cert.pem"
        self.token_file = root / "token"
        self._version = 0
        self.token_file.write_text(token)

    def mount_roots(self, pem: bytes) -> None:
        self._version += 1
        version = self.dir / f"..{self._version}"
        version.mkdir()
        (version / "root-cert.pem").write_bytes(pem)
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.dir / "..data")  # what the kubelet does on a ConfigMap update
        if not self.root_file.is_symlink():
            self.root_file.symlink_to("..data/root-cert.pem")

    def remote(self, port: int, **kw: Any) -> RemoteCA:
        ca = RemoteCA(
            f"127.0.0.1:{port}", self.root_file, self.token_file, DEFAULT_SERVER_NAME, **kw
        )
        ca.load_roots()
        return ca


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _requests(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("nodeagent_cert_requests_total", {"result": result}) or 0.0


def _served(mgr: IdentityManager, *identities: tuple[str, str]) -> dict[str, Any]:
    """What SDS serves now: secret name -> secret."""
    return {s.name: s for s in mgr.sds_secrets(identities)}


def _bundle(mgr: IdentityManager) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(mgr.root_pem)


def _ders(pem: bytes) -> set[bytes]:
    return {
        c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)
    }


@asynccontextmanager
async def _cluster_with_ca(tmp_path: Path) -> AsyncIterator[tuple[APIServerStandIn, CAServer]]:
    api = cluster()
    try:
        async with running(api, tmp_path) as ca:
            yield api, ca
    finally:
        await api.stop()


# -- issuance -------------------------------------------------------------------------------------


def test_a_local_identity_is_issued_by_impersonation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    changes: list[int] = []

    async def main() -> None:
        async with _cluster_with_ca(tmp_path) as (api, ca):
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(published_root(api))
            mgr = IdentityManager(
                node.remote(ca.port),
                TD,
                ttl=timedelta(hours=1),
                on_change=lambda: changes.append(1),
                registry=registry,
            )
            # The push only schedules: it never waits for the CA.
            assert set(_served(mgr, CART_SA)) == {ROOTCA}
            assert await mgr.renew_due() == 1
            assert changes == [1]  # the proxy is asked to push again
            served = _served(mgr, CART_SA)
            assert set(served) == {CART, ROOTCA}
            cert = mgr.certs()[CART]
            leaf = _leaf(cert.chain_pem)
            assert _uris(leaf) == [CART]
            verify_chain(cert.chain_pem, published_root(api))
            key = serialization.load_pem_private_key(cert.key_pem, None)
            assert _spki(key.public_key()) == _spki(leaf.public_key())
            lifetime = cert.not_after.timestamp() - time.time()
            assert 3500 < lifetime <= 3600  # the TTL asked for (validity_duration)
            assert served[ROOTCA].validation_context.trusted_ca.inline_bytes == published_root(api)
            assert served[CART].tls_certificate.private_key.inline_bytes == cert.key_pem
            await mgr.issuer.close()

    asyncio.run(main())
    assert _requests(registry, "ok") == 1
    # The CA saw the node agent's own token asking for the pod's identity (impersonation).
    assert (
        f"issued a certificate for {CART} to nodeagent-system/nodeagent"
        " (pod nodeagent-system/nodeagent-a)" in caplog.text
    )
    assert TOKEN_A not in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    # Keys stay in memory: nothing the agent or the test wrote holds one.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_a_refusal_is_counted_retried_with_backoff_and_installs_nothing(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    now = [1000.0]

    async def main() -> None:
        async with _cluster_with_ca(tmp_path) as (api, ca):
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(published_root(api))
            mgr = IdentityManager(node.remote(ca.port), TD, clock=lambda: now[0], registry=registry)
            mgr.set_local_identities([WEB_SA])  # no pod of shop/web runs on node-a
            assert await mgr.renew_due() == 0
            assert mgr.certs() == {}
            assert set(_served(mgr, WEB_SA)) == {ROOTCA}
            problem = mgr.identity_problem(WEB)
            assert "could not issue a certificate for" in problem
            assert "refused: " in problem and "PERMISSION_DENIED" in problem
            assert "node-a" in problem  # the CA's reason reaches the node
            assert mgr.problem().startswith(f"the CA service at 127.0.0.1:{ca.port} failed")
            assert "spiffe://" not in mgr.problem()  # readiness is unauthenticated
            assert await mgr.renew_due() == 0  # backoff: not asked again at once
            assert _requests(registry, "refused") == 1
            now[0] += 1.3 * manager_module.RETRY_INITIAL
            assert await mgr.renew_due() == 0
            assert _requests(registry, "refused") == 2
            await mgr.issuer.close()

    asyncio.run(main())
    assert _requests(registry, "ok") == 0


def test_a_ca_outage_keeps_the_current_certificate_then_renews_when_it_is_back(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    now = [1000.0]

    async def main() -> None:
        api = cluster()
        try:
            async with running(api, tmp_path) as ca:
                port = ca.port
                node = Node(tmp_path, TOKEN_A)
                node.mount_roots(published_root(api))
                mgr = IdentityManager(
                    node.remote(port),
                    TD,
                    ttl=timedelta(hours=1),
                    clock=lambda: now[0],
                    registry=registry,
                )
                mgr.set_local_identities([CART_SA])
                assert await mgr.renew_due() == 1
                first = mgr.certs()[CART]
            # The CA is gone: renewal fails, the current certificate keeps serving.
            now[0] += 1800
            assert await mgr.renew_due() == 0
            assert _requests(registry, "unavailable") == 1
            served = _served(mgr, CART_SA)
            assert served[CART].tls_certificate.certificate_chain.inline_bytes == first.chain_pem
            assert "unavailable" in mgr.problem()
            # Back on the same address: the same manager renews (gRPC reconnects on its own).
            async with running(api, tmp_path, listen=("127.0.0.1", port)):

                async def renewed() -> bool:
                    if await mgr.renew_due():
                        return True
                    now[0] += manager_module.RETRY_MAX  # the next retry is due
                    return False

                await wait_for_async(renewed, 10, "renewal after the CA's return", step=0.05)
                renewed = mgr.certs()[CART]
                assert renewed.serial != first.serial
                assert mgr.problem() == ""
            await mgr.issuer.close()
        finally:
            await api.stop()

    asyncio.run(main())
    assert registry.get_sample_value("nodeagent_cert_rotations_total") == 1


def test_a_certificate_that_expires_while_the_ca_is_down_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed: no certificate for the identity rather than an expired one."""
    registry = CollectorRegistry()
    changes: list[float] = []

    async def main() -> None:
        api = cluster()
        stop = asyncio.Event()
        try:
            async with running(api, tmp_path) as ca:
                node = Node(tmp_path, TOKEN_A)
                node.mount_roots(published_root(api))
                mgr = IdentityManager(
                    node.remote(ca.port),
                    TD,
                    ttl=timedelta(seconds=3),
                    on_change=lambda: changes.append(time.monotonic()),
                    registry=registry,
                )
                loop = asyncio.create_task(mgr.run(stop))
                mgr.set_local_identities([CART_SA])
                await wait_for_async(lambda: CART in mgr.certs(), 5, "the first certificate")
                cert = mgr.certs()[CART]
            # CA down; the renewal loop alone notices the expiry (nothing else asks).
            expired = "nodeagent_cert_expired_total"
            await wait_for_async(lambda: registry.get_sample_value(expired) == 1, 8, "the drop")
            assert time.time() >= cert.not_after.timestamp()
            assert set(_served(mgr, CART_SA)) == {ROOTCA}
            assert "could not issue" in mgr.identity_problem(CART)
            assert registry.get_sample_value("nodeagent_identities") == 0
            stop.set()
            await asyncio.wait_for(loop, 5)
        finally:
            stop.set()
            await api.stop()

    asyncio.run(main())
    assert len(changes) >= 2  # issued, then dropped: a push each time
    assert caplog.text.count(f"certificate for {CART} expired") == 1  # logged once


def _file_read(remote: RemoteCA) -> bool:
    """RemoteCA has read what the file holds now."""
    return remote.root_file.read_bytes() == remote._file_content


# -- the trust bundle -----------------------------------------------------------------------------


def test_the_bundle_is_the_union_and_follows_the_root_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    changes: list[int] = []
    other_root = plugin_cacerts(TD, intermediate=False)["root-cert.pem"]

    async def main() -> None:
        async with _cluster_with_ca(tmp_path) as (api, ca):
            ca_root = published_root(api)
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(ca_root)
            stop = asyncio.Event()
            mgr = IdentityManager(
                node.remote(ca.port, refresh_interval=0.1),
                TD,
                ttl=timedelta(hours=1),
                on_change=lambda: changes.append(1),
                registry=registry,
            )
            loop = asyncio.create_task(mgr.run(stop))
            mgr.set_local_identities([CART_SA])
            await wait_for_async(lambda: CART in mgr.certs(), 5, "the first certificate")
            first = mgr.certs()[CART]
            assert mgr.root_pem == ca_root

            # Root rotation starts: the ConfigMap gets a second root (the kubelet's swap).
            node.mount_roots(ca_root + other_root)
            await wait_for_async(lambda: len(_bundle(mgr)) == 2, 5, "the new bundle")
            await wait_for_async(lambda: mgr.certs()[CART].serial != first.serial, 5, "re-issue")
            served = _served(mgr, CART_SA)
            assert served[ROOTCA].validation_context.trusted_ca.inline_bytes == mgr.root_pem

            # The file drops the CA's root: the CA still sends it, the union keeps it.
            remote = mgr.issuer
            assert isinstance(remote, RemoteCA)
            node.mount_roots(other_root)
            await wait_for_async(
                lambda: remote.root_error == "" and _file_read(remote), 5, "reread"
            )
            assert _ders(mgr.root_pem) == _ders(ca_root + other_root)

            # A broken file: an error naming it, the last good bundle kept.
            before = mgr.root_pem
            node.mount_roots(b"not a certificate")
            await wait_for_async(lambda: "not a PEM" in remote.root_error, 5, "the error")
            assert mgr.root_pem == before
            stop.set()
            await asyncio.wait_for(loop, 5)

    asyncio.run(main())
    assert f"CA root file {tmp_path}/ca-root/root-cert.pem: not a PEM" in caplog.text
    assert "trust bundle changed" in caplog.text


def test_the_token_file_is_read_for_every_request(tmp_path: Path) -> None:
    """The kubelet rotates the projected token: the next request uses the new one."""
    registry = CollectorRegistry()
    now = [1000.0]

    async def main() -> None:
        async with _cluster_with_ca(tmp_path) as (api, ca):
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(published_root(api))
            mgr = IdentityManager(node.remote(ca.port), TD, clock=lambda: now[0], registry=registry)
            mgr.set_local_identities([CART_SA])
            assert await mgr.renew_due() == 1
            # The old token expires (the API server no longer knows it), the file still has it.
            del api.tokens[TOKEN_A]
            api.register_token("token-a-2", NS, "nodeagent", "nodeagent-a", "uid-a", ["istio-ca"])
            now[0] += 86400
            assert await mgr.renew_due() == 0
            assert _requests(registry, "refused") == 1
            assert "refused: " in mgr.problem() and "UNAUTHENTICATED" in mgr.problem()
            node.token_file.write_text("token-a-2\n")  # the kubelet writes the new one
            now[0] += manager_module.RETRY_MAX * 2
            assert await mgr.renew_due() == 1
            await mgr.issuer.close()

    asyncio.run(main())
    assert _requests(registry, "ok") == 2


# -- answers are checked ---------------------------------------------------------------------------


class FakeCA:
    """A CA that answers wrongly on purpose (TLS like the real one, its own root)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        files = plugin_cacerts(TD, intermediate=False)
        self.signer = signer_from_files(files, "fake")
        self.other = signer_from_files(plugin_cacerts(TD, intermediate=False), "other")
        self.root_pem = self.signer.root_pem
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        cert = server_certificate(self.signer, [DEFAULT_SERVER_NAME])
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                            self.create,
                            request_deserializer=IstioCertificateRequest.FromString,
                            response_serializer=IstioCertificateResponse.SerializeToString,
                        )
                    },
                )
            ]
        )
        credentials = grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)])
        self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self.server = server

    async def create(self, request: Any, context: Any) -> Any:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        wanted = str(request.metadata.fields["ImpersonatedIdentity"].string_value)
        key, identity, signer = csr.public_key(), wanted, self.signer
        if self.answer == "wrong_san":
            identity = wanted.replace("/sa/cart", "/sa/admin")
        elif self.answer == "wrong_key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif self.answer == "wrong_signer":
            signer = self.other
        chain = signer.ca.sign(key, identity, timedelta(hours=1))  # type: ignore[arg-type]
        return IstioCertificateResponse(
            cert_chain=[c.decode() for c in chain] + [self.root_pem.decode()]
        )


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("wrong_san", "its URI SANs are ['spiffe://cluster.local/ns/shop/sa/admin']"),
        ("wrong_key", "its public key is not the one we sent"),
        ("wrong_signer", "chain does not verify to the root"),
    ],
)
def test_a_bad_answer_is_not_installed(tmp_path: Path, answer: str, why: str) -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        fake = FakeCA(answer)
        await fake.start()
        try:
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(fake.root_pem)
            mgr = IdentityManager(node.remote(fake.port), TD, registry=registry)
            mgr.set_local_identities([CART_SA])
            assert await mgr.renew_due() == 0
            assert mgr.certs() == {}
            assert set(_served(mgr, CART_SA)) == {ROOTCA}
            problem = mgr.identity_problem(CART)
            assert problem.startswith(f"the CA service at 127.0.0.1:{fake.port} could not")
            assert "bad_answer" in problem and why in problem
            await mgr.issuer.close()
        finally:
            assert fake.server is not None
            await fake.server.stop(None)

    asyncio.run(main())
    assert _requests(registry, "bad_answer") == 1


def test_a_good_answer_from_the_fake_ca_is_installed(tmp_path: Path) -> None:
    """The checks above fail for their reason only: the same fake, answering right, passes."""

    async def main() -> None:
        fake = FakeCA("right")
        await fake.start()
        try:
            node = Node(tmp_path, TOKEN_A)
            node.mount_roots(fake.root_pem)
            mgr = IdentityManager(node.remote(fake.port), TD)
            mgr.set_local_identities([CART_SA])
            assert await mgr.renew_due() == 1
            await mgr.issuer.close()
        finally:
            assert fake.server is not None
            await fake.server.stop(None)

    asyncio.run(main())


# -- the agent's choice of issuer -----------------------------------------------------------------


def test_the_agent_picks_its_issuer_and_waits_for_the_root_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nodeagent import agent
    from nodeagent.identity.ca import create_plugin_cacerts
    from nodeagent.identity.issuer import LocalIssuer

    async def main() -> None:
        stop = asyncio.Event()
        builtin = await agent._issuer(agent.AgentConfig("n1", state_dir=tmp_path / "s"), TD, stop)
        assert isinstance(builtin, LocalIssuer) and builtin.name == "the built-in CA"
        create_plugin_cacerts(tmp_path / "cacerts", TD)
        plugin = await agent._issuer(agent.AgentConfig("n1", ca_dir=tmp_path / "cacerts"), TD, stop)
        assert isinstance(plugin, LocalIssuer) and "plug-in CA" in plugin.name

        node = Node(tmp_path, TOKEN_A)
        config = agent.AgentConfig(
            "n1",
            ca_address="127.0.0.1:15012",
            ca_root_file=node.root_file,
            ca_token_file=node.token_file,
        )
        waiting = asyncio.create_task(agent._issuer(config, TD, stop))
        await wait_for_async(
            lambda: "waiting for it before serving" in caplog.text, 5, "the agent to say it waits"
        )
        assert not waiting.done()  # no trust bundle yet: nothing could be verified
        root = plugin_cacerts(TD, intermediate=False)["root-cert.pem"]
        node.mount_roots(root)
        remote = await asyncio.wait_for(waiting, 5)
        assert isinstance(remote, RemoteCA) and remote.root_pem == root
        assert remote.server_name == DEFAULT_SERVER_NAME

    asyncio.run(main())
    assert f"CA root file {tmp_path}/ca-root/root-cert.pem: missing" in caplog.text
