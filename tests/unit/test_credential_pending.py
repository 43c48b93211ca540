"""A credentialName Secret named but not read yet is PENDING (identity/credentials.py): its SDS
secrets are withheld, so Envoy keeps the cluster naming them warming while the one it replaces
serves, as Istio's sidecar does (Envoy docs, cluster warming: "a cluster warms until ... the SDS
secrets it needs arrive"; xds_protocol, eventual consistency). Read, it is served; said not to
exist, it is the placeholder; pending too long, the placeholder too."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from nodeagent.identity.credentials import CredentialSecrets
from nodeagent.mesh.model import Credential
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.kubernetes import KubernetesSource
from nodeagent.xds import types
from tests.unit.apiserver_standin import APIServerStandIn
from tests.unit.test_dr_credential import NODE, WAIT, _dr, _pod, _rule, _secret, _until
from tests.unit.test_proxy_contained import make_proxy, mesh_store, resources

CERT, BUNDLE = "kubernetes://shop/client", "kubernetes://shop/client-cacert"
WANTED = {("shop", "client")}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _kubernetes_like() -> MeshStore:
    """A store whose source reads Secrets one by one (answers kept), as the Kubernetes one."""
    store = MeshStore()
    store.credential_answers = set()
    return store


def _served(sds: CredentialSecrets, store: MeshStore) -> set[str]:
    return {s.name for s in sds.sds_secrets(store, WANTED)}


def test_a_secret_not_read_yet_is_withheld_then_served_once_read() -> None:
    store, clock = _kubernetes_like(), Clock()
    sds = CredentialSecrets(pending_limit=5.0, clock=clock)
    assert _served(sds, store) == set()
    assert sds.pending == {CERT, BUNDLE} and sds.missing == set()
    assert sds.deadline() == 105.0
    clock.now = 102.0
    store.put_credential(Credential("shop", "client", b"C", b"K", b"CA"))
    store.answer_credential("shop/client")
    # The companion -cacert is not answered yet: it would win over the own CA, so it waits.
    assert _served(sds, store) == {CERT}
    assert sds.pending == {BUNDLE}
    store.answer_credential("shop/client-cacert")  # does not exist
    assert _served(sds, store) == {CERT, BUNDLE}
    assert sds.pending == set() and sds.missing == set() and sds.deadline() is None


def test_a_secret_the_source_says_does_not_exist_is_the_placeholder_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _kubernetes_like()
    sds = CredentialSecrets(clock=Clock())
    store.answer_credential("shop/client")
    store.answer_credential("shop/client-cacert")
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        assert _served(sds, store) == {CERT, BUNDLE}
    assert sds.pending == set() and sds.missing == {CERT, BUNDLE}
    assert "fails until it exists" in caplog.text


def test_pending_is_bounded_then_the_placeholder_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, clock = _kubernetes_like(), Clock()
    sds = CredentialSecrets(pending_limit=5.0, clock=clock)
    assert _served(sds, store) == set()
    clock.now = 104.9
    assert _served(sds, store) == set()
    clock.now = 105.0
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        assert _served(sds, store) == {CERT, BUNDLE}
        clock.now = 200.0
        assert _served(sds, store) == {CERT, BUNDLE}  # given up stays given up
    assert sds.pending == set() and sds.deadline() is None
    assert caplog.text.count("not read within 5s") == 2  # the Secret and its companion, once
    # Read at last: the real one replaces the placeholder.
    store.put_credential(Credential("shop", "client", b"C", b"K", b"CA"))
    store.answer_credential("shop/client")
    assert _served(sds, store) == {CERT, BUNDLE} and CERT not in sds.missing


def test_a_source_holding_every_secret_at_once_has_none_pending() -> None:
    """The directory source (credential_answers None): a Secret it lacks does not exist."""
    sds = CredentialSecrets(clock=Clock())
    assert _served(sds, MeshStore()) == {CERT, BUNDLE}
    assert sds.pending == set() and sds.missing == {CERT, BUNDLE}


def test_the_kubernetes_source_answers_a_named_secret_found_or_not(tmp_path: Path) -> None:
    """Named Secrets are pending until their LIST answers, whether the Secret exists or not;
    a rule naming them no more forgets the answer (named again, pending again)."""

    async def scenario() -> None:
        server = APIServerStandIn()
        await server.start()
        for obj in (
            _pod("front", NODE),
            _dr({"app": "front"}, "client"),
            _secret("client", cert=b"C1", key=b"K1", ca_crt=b"CA"),
        ):
            server.add(obj)
        s = MeshStore(node_name=NODE)
        source = KubernetesSource(s, NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kc"))
        assert s.credential_pending("shop/client")
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        try:
            both = {"shop/client", "shop/client-cacert"}
            await _until(lambda: s.credential_answers == both, "both answered")
            assert set(s.credentials) == {"shop/client"}  # the companion does not exist
            assert not s.credential_pending("shop/client-cacert")
            server.modify(_dr({"app": "elsewhere"}, "client"))
            await _until(lambda: not s.credential_answers, "answers forgotten")
            assert s.credential_pending("shop/client-cacert")
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task
            await server.stop()

    asyncio.run(scenario())


def test_the_node_awaits_a_pending_secret_and_wakes_to_give_it_up(tmp_path: Path) -> None:
    """The agent's snapshot names the pending SDS secrets as awaited (never told absent,
    xds/state.py) and serves them once read; pending too long, a push comes by itself."""

    async def scenario() -> None:
        s = mesh_store()  # pod shop/web-1, labels app=web
        s.credential_answers = set()
        proxy, _ = make_proxy(tmp_path, s, "web-1")
        proxy.credential_secrets.pending_limit = 0.2
        s.put_istio(_rule({"mode": "MUTUAL", "credentialName": "client"}, {"app": "web"}))
        proxy.push()
        snapshot = proxy.cache.get(proxy.settings.node_id)
        assert snapshot is not None and snapshot.awaited_secrets == {CERT, BUNDLE}
        assert not {CERT, BUNDLE} & resources(proxy, types.SECRET).keys()
        proxy.changed.clear()
        async with asyncio.timeout(WAIT):  # the push loop's wake-up at the limit
            await proxy.changed.wait()
        proxy.push()
        assert {CERT, BUNDLE} <= resources(proxy, types.SECRET).keys()  # placeholders
        snapshot = proxy.cache.get(proxy.settings.node_id)
        assert snapshot is not None and snapshot.awaited_secrets == frozenset()

    asyncio.run(scenario())
