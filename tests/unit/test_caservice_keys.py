"""The CA service's signing material, read through the API: Istio's plug-in ``cacerts`` Secret
first (https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/), else one
self-signed root in Secret ``nodeagent-ca`` shared by every replica (istiod's
``istio-ca-secret``); re-read periodically (root rotation without a restart) and published in
ConfigMap ``nodeagent-ca-root`` (istiod's ``istio-ca-root-cert``)."""

from __future__ import annotations

import asyncio
import copy
import logging
import ssl
from pathlib import Path
from typing import Any

import grpc
import pytest
from apiserver_standin import APIServerStandIn
from ca_client import create_certificate, make_csr
from ca_cluster import CART, CONFIGMAPS, NS, TD, TOKEN_A
from ca_cluster import cluster as _cluster
from ca_cluster import published_root as _published_root
from ca_cluster import running as _running
from ca_cluster import secret as _secret
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from test_caservice import SECRETS, _uris

from nodeagent.identity.ca import CA_KEY, CERT_CHAIN, ROOT_CERT, plugin_cacerts
from nodeagent.identity.certs import verify_chain
from tests.waiting import wait_for_async


async def _issue(port: int, trust: bytes) -> list[str]:
    answer = await create_certificate(port, trust, make_csr([CART]), TOKEN_A, impersonate=CART)
    assert answer.code == grpc.StatusCode.OK, answer.details
    return answer.chain


async def _served_by(port: int, issuer_pem: bytes) -> bool:
    """Whether the CA's TLS certificate, as a client sees it, is signed by ISSUER_PEM."""
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
    leaf = x509.load_pem_x509_certificate(pem.encode())
    try:
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(issuer_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_the_self_signed_root_is_created_once_and_shared_by_replicas(tmp_path: Path) -> None:
    async def main() -> None:
        api = _cluster()
        try:
            async with _running(api, tmp_path) as first:
                secret = copy.deepcopy(api.objects[SECRETS][(NS, "nodeagent-ca")])
                assert secret["type"] == "istio.io/ca-root"
                root = _published_root(api)
                async with _running(api, tmp_path) as second:
                    chains = [await _issue(ca.port, root) for ca in (first, second)]
            async with _running(api, tmp_path) as restarted:  # a restart: the same root
                chains.append(await _issue(restarted.port, root))
            assert api.objects[SECRETS][(NS, "nodeagent-ca")] == secret  # never rewritten
            assert sum(r == f"POST /api/v1/namespaces/{NS}/secrets" for r in api.requests) == 1
            for chain in chains:
                assert chain[-1].encode() == root
                verify_chain(chain[0].encode(), root)
        finally:
            await api.stop()

    asyncio.run(main())


def test_two_replicas_creating_the_root_at_once_end_with_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        api = _cluster()
        await api.start()
        try:
            async with _running(api, tmp_path) as a, _running(api, tmp_path) as b:
                pass  # warm-up: nothing; the race is below
            del api.objects[SECRETS][(NS, "nodeagent-ca")]
            api.requests.clear()
            # Both start at once: both find no Secret, both create; one gets 409. Each replica's
            # read of the Secret is answered only once both asked (on a loaded machine one could
            # otherwise create it before the other reads, and there would be no race).
            both_asked, asked = asyncio.Event(), []
            get = api._get

            async def get_once_both_asked(writer: Any, path: str, *args: Any) -> None:
                if path.endswith("/secrets/nodeagent-ca") and len(asked) < 2:
                    asked.append(path)
                    if len(asked) == 2:
                        both_asked.set()
                    await asyncio.wait_for(both_asked.wait(), 10)
                await get(writer, path, *args)

            api._get = get_once_both_asked  # type: ignore[method-assign]
            cas = [_running(api, tmp_path), _running(api, tmp_path)]
            a, b = await asyncio.gather(*(c.__aenter__() for c in cas))
            try:
                assert len(asked) == 2, api.requests
                posts = [r for r in api.requests if r == f"POST /api/v1/namespaces/{NS}/secrets"]
                assert len(posts) == 2, api.requests
                assert a.signer is not None and b.signer is not None
                assert a.signer.root_pem == b.signer.root_pem
                root = _published_root(api)
                assert root == a.signer.root_pem
                for ca in (a, b):
                    verify_chain((await _issue(ca.port, root))[0].encode(), root)
            finally:
                for c in cas:
                    await c.__aexit__(None, None, None)
        finally:
            await api.stop()

    asyncio.run(main())
    assert "was created by another CA replica first: using its root" in caplog.text


def test_a_cacerts_secret_wins_and_its_rotation_is_picked_up_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    old = plugin_cacerts(TD)  # root -> intermediate -> leaves

    async def main() -> None:
        api = _cluster()
        api.add(_secret("cacerts", old))
        try:
            async with _running(api, tmp_path) as ca:
                assert (NS, "nodeagent-ca") not in api.objects.get(SECRETS, {})
                assert _published_root(api) == old[ROOT_CERT]
                chain = await _issue(ca.port, old[ROOT_CERT])
                # [leaf, intermediate, root bundle], as istiod answers with a plug-in CA.
                assert len(chain) == 3 and chain[-1].encode() == old[ROOT_CERT]
                assert _uris(x509.load_pem_x509_certificate(chain[0].encode())) == [CART]
                verify_chain("".join(chain[:2]).encode(), old[ROOT_CERT])
                assert await _served_by(ca.port, old[CA_CERT_])

                # Rotation, step 1: a new root and intermediate; both roots trusted.
                new = plugin_cacerts(TD)
                rotated = dict(new, **{ROOT_CERT: new[ROOT_CERT] + old[ROOT_CERT]})
                api.modify(_secret("cacerts", rotated))
                await wait_for_async(
                    lambda: _published_root(api) == rotated[ROOT_CERT], 10, "new bundle"
                )
                # A client trusting only the new root reaches the CA: a new server certificate.
                chain = await _issue(ca.port, new[ROOT_CERT])
                assert chain[-1].encode() == rotated[ROOT_CERT]
                verify_chain("".join(chain[:2]).encode(), new[ROOT_CERT])
                assert await _served_by(ca.port, new[CA_CERT_])
                assert not await _served_by(ca.port, old[CA_CERT_])
                config_map = api.objects[CONFIGMAPS][(NS, "nodeagent-ca-root")]
                assert config_map["data"]["root-cert.pem"] == rotated[ROOT_CERT].decode()
        finally:
            await api.stop()

    asyncio.run(main())
    assert "the signing material changed (Secret nodeagent-system/cacerts)" in caplog.text


CA_CERT_ = "ca-cert.pem"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (
            CA_KEY,
            b"not a key",
            "Secret nodeagent-system/cacerts key ca-key.pem: not a PEM private key",
        ),
        (
            CERT_CHAIN,
            b"",
            "Secret nodeagent-system/cacerts key cert-chain.pem: not a PEM certificate file",
        ),
        (CA_KEY, None, "Secret nodeagent-system/cacerts key ca-key.pem: missing"),
    ],
)
def test_a_bad_cacerts_secret_is_named_and_the_previous_signer_kept(
    key: str, value: bytes | None, error: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = plugin_cacerts(TD)

    async def main() -> None:
        api = _cluster()
        api.add(_secret("cacerts", good))
        try:
            async with _running(api, tmp_path) as ca:
                bad = dict(good)
                if value is None:
                    del bad[key]
                else:
                    bad[key] = value
                if key == CA_KEY and value is not None:
                    # A matching-looking rotation whose key is broken.
                    bad = dict(plugin_cacerts(TD), **{CA_KEY: value})
                api.modify(_secret("cacerts", bad))
                await wait_for_async(lambda: error in ca.last_error, 10, "the error")
                await asyncio.sleep(0.3)  # several reloads with the bad Secret: none may take it
                assert ca.ready() == ""
                assert _published_root(api) == good[ROOT_CERT]
                chain = await _issue(ca.port, good[ROOT_CERT])
                verify_chain("".join(chain[:2]).encode(), good[ROOT_CERT])
                assert chain[-1].encode() == good[ROOT_CERT]
        finally:
            await api.stop()

    asyncio.run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once, not at every reload
    assert errors[0].startswith(error)
    assert errors[0].endswith("(keeping the signer from Secret nodeagent-system/cacerts; retrying)")


def test_a_bad_cacerts_secret_at_start_leaves_the_ca_not_ready(tmp_path: Path) -> None:
    """No silent fallback to another root: the mesh's trust would change under it."""

    async def main() -> None:
        api = _cluster()
        api.add(_secret("cacerts", dict(plugin_cacerts(TD), **{ROOT_CERT: b"junk"})))
        await api.start()
        try:
            from ca_cluster import ca_config as _config

            from nodeagent.caservice.server import CAServer

            ca = CAServer(_config(api.write_kubeconfig(tmp_path / "kc")))
            stop = asyncio.Event()
            start = asyncio.create_task(ca.start(stop))
            await wait_for_async(lambda: "root-cert.pem" in ca.last_error, 10, "the error")
            assert ca.ready().startswith(
                "no signing key: Secret nodeagent-system/cacerts key root-cert.pem"
            )
            assert (NS, "nodeagent-ca") not in api.objects.get(SECRETS, {})
            api.modify(_secret("cacerts", plugin_cacerts(TD)))  # fixed: the CA starts
            await asyncio.wait_for(start, 15)
            assert ca.port and ca.ready() == ""
            stop.set()
            await ca.stop()
        finally:
            await api.stop()

    asyncio.run(main())


def test_the_stand_in_is_what_the_ca_sees(tmp_path: Path) -> None:
    """Guard for the tests above: a Secret added as stringData reads back as data."""
    api = APIServerStandIn()
    api.add(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": NS, "name": "s"},
            "stringData": {"k": "v"},
        }
    )
    assert api.objects[SECRETS][(NS, "s")]["data"] == {"k": "dg=="}
