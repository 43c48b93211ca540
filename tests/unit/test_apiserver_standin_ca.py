"""The stand-in API server's calls for the CA service, through the Kubernetes client the CA uses:
namespaced GET/POST/PUT, pod LIST by node and service account, TokenReview, the tokens file and
the ConfigMap volume (what the testbed relies on)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from apiserver_standin import APIServerStandIn

from nodeagent.caservice.kubeapi import APIError, ClusterAPI, Conflict, NotFound
from nodeagent.testbed.apiserver import TokensFile


def _pod(name: str, node: str, sa: str | None) -> dict[str, Any]:
    spec = {"nodeName": node} | ({"serviceAccountName": sa} if sa else {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name},
        "spec": spec,
    }


async def _with_api(server: APIServerStandIn, tmp_path: Path) -> ClusterAPI:
    await server.start()
    return await ClusterAPI.connect(server.write_kubeconfig(tmp_path / "kubeconfig"))


def test_objects_are_created_once_read_and_replaced(tmp_path: Path) -> None:
    async def main() -> None:
        server = APIServerStandIn()
        server.configmap_dir = tmp_path / "volumes"
        api = await _with_api(server, tmp_path)
        try:
            body = {"metadata": {"name": "root"}, "data": {"root-cert.pem": "A"}}
            created = await api.create("configmaps", "ns", body)
            assert created["metadata"]["namespace"] == "ns"
            with pytest.raises(Conflict, match="already exists"):
                await api.create("configmaps", "ns", body)
            read = await api.read("configmaps", "ns", "root")
            assert read["data"] == {"root-cert.pem": "A"}
            assert (tmp_path / "volumes/ns/root/root-cert.pem").read_text() == "A"
            read["data"]["root-cert.pem"] = "B"
            await api.replace("configmaps", "ns", "root", read)
            assert (tmp_path / "volumes/ns/root/root-cert.pem").read_text() == "B"
            with pytest.raises(Conflict, match="modified"):  # read's resourceVersion is stale
                await api.replace("configmaps", "ns", "root", read)
            with pytest.raises(NotFound):
                await api.replace(
                    "configmaps", "ns", "other", dict(read, metadata={"name": "other"})
                )
            with pytest.raises(NotFound):
                await api.read("secrets", "ns", "cacerts")
            secret = {"metadata": {"name": "s"}, "data": {"k": "dg=="}}
            await api.create("secrets", "ns", secret)
            assert (await api.read("secrets", "ns", "s"))["data"] == {"k": "dg=="}
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())


def test_pods_are_listed_by_namespace_node_and_service_account(tmp_path: Path) -> None:
    async def main() -> None:
        server = APIServerStandIn()
        server.add(_pod("a", "node-a", "cart"))
        server.add(_pod("b", "node-b", "cart"))
        server.add(_pod("c", "node-a", None))  # the ServiceAccount admission's "default"
        other = _pod("d", "node-a", "cart")
        other["metadata"]["namespace"] = "other"
        server.add(other)
        api = await _with_api(server, tmp_path)
        try:

            async def names(ns: str, selector: str) -> list[str]:
                return [p["metadata"]["name"] for p in await api.list_pods(ns, selector)]

            assert await names("shop", "spec.nodeName=node-a,spec.serviceAccountName=cart") == ["a"]
            assert await names("shop", "spec.nodeName=node-a,spec.serviceAccountName=default") == [
                "c"
            ]
            assert await names("shop", "spec.nodeName=node-c") == []
            assert await names("other", "spec.serviceAccountName=cart") == ["d"]
            with pytest.raises(APIError, match="field label not supported"):
                await names("shop", "status.phase=Running")
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())


def test_token_review_answers_for_registered_and_file_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        server = APIServerStandIn()
        server.register_token("t1", "sys", "agent", "agent-a", "uid-a", ["istio-ca"])
        server.register_token("old", "sys", "agent", None, None, ["istio-ca"], time.time() - 1)
        tokens = tmp_path / "tokens.json"
        entry = {
            "token": "t2",
            "namespace": "shop",
            "serviceAccount": "cart",
            "audiences": ["istio-ca"],
        }
        tokens.write_text(json.dumps([entry]))
        file_tokens = TokensFile(tokens, server)
        file_tokens.sync()
        api = await _with_api(server, tmp_path)
        try:
            status = await api.review_token("t1", ["istio-ca"])
            assert status["authenticated"] is True
            assert status["user"]["username"] == "system:serviceaccount:sys:agent"
            assert "system:serviceaccounts" in status["user"]["groups"]
            assert status["user"]["extra"] == {
                "authentication.kubernetes.io/pod-name": ["agent-a"],
                "authentication.kubernetes.io/pod-uid": ["uid-a"],
            }
            assert status["audiences"] == ["istio-ca"]
            assert "target audiences" in (await api.review_token("t1", ["other"]))["error"]
            assert "expired" in (await api.review_token("old", ["istio-ca"]))["error"]
            assert (await api.review_token("nope", ["istio-ca"]))["authenticated"] is False
            assert (await api.review_token("t2", ["istio-ca"]))["user"]["username"].endswith(
                "shop:cart"
            )
            tokens.write_text(json.dumps([dict(entry, token="t3")]))  # re-issued
            file_tokens.sync()
            assert (await api.review_token("t2", ["istio-ca"]))["authenticated"] is False
            assert (await api.review_token("t3", ["istio-ca"]))["authenticated"] is True
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())


def test_the_ca_command_needs_one_api_source() -> None:
    from click.testing import CliRunner

    from nodeagent.cli import cli

    for args in ([], ["--in-cluster", "--kubeconfig", __file__]):
        result = CliRunner().invoke(cli, ["ca", *args])
        assert result.exit_code == 2
        assert "exactly one of --in-cluster or --kubeconfig" in result.output
    result = CliRunner().invoke(cli, ["ca", "--in-cluster", "--trusted-node-account", "x"])
    assert result.exit_code == 2 and "expected NAMESPACE/SERVICEACCOUNT" in result.output
