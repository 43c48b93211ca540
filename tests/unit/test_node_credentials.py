"""The testbed's node credentials for the CA service (``ca: service``): what it publishes must pass
the CA's own authentication and node authorization, through the stand-in API server, as the
DaemonSet's projected tokens pass them on a cluster."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
from apiserver_standin import APIServerStandIn

from nodeagent.caservice import authn
from nodeagent.caservice.authz import NodeAuthorizer, parse_identity
from nodeagent.caservice.config import DEFAULT_NAMESPACE, DEFAULT_NODE_ACCOUNT
from nodeagent.caservice.kubeapi import ClusterAPI
from nodeagent.caservice.refusal import Refused
from nodeagent.caservice.rootcert import ROOT_CONFIGMAP
from nodeagent.identity.ca import ROOT_CERT
from nodeagent.identity.protocol import TOKEN_AUDIENCE
from nodeagent.testbed import layout, node_credentials
from nodeagent.testbed.apiserver import TokensFile
from nodeagent.testbed.topology import loads_topology

TOPOLOGY = """
name: t1
nodes: [{name: node1}, {name: node2}]
pods:
  - {name: web, namespace: shop, node: node1, serviceAccount: web}
  - {name: db, namespace: shop, node: node2, serviceAccount: db}
"""


def test_the_testbed_names_what_the_ca_uses() -> None:
    assert layout.CA_NAMESPACE == DEFAULT_NAMESPACE
    assert layout.CA_ROOT_CONFIGMAP == ROOT_CONFIGMAP
    assert layout.CA_ROOT_KEY == ROOT_CERT
    assert node_credentials.NODE_SERVICE_ACCOUNT == DEFAULT_NODE_ACCOUNT


def test_node_credentials_pass_the_cas_authentication_and_node_authorization(
    tmp_path: Path,
) -> None:
    topo = loads_topology(TOPOLOGY, "t.yaml")
    creds = node_credentials.make(topo.nodes)
    assert len({c.token for c in creds}) == 2 and all(len(c.token) >= 40 for c in creds)
    assert all(c.token not in repr(c) for c in creds)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(node_credentials.token_entries(creds)))

    async def main() -> None:
        server = APIServerStandIn()
        TokensFile(tokens, server).sync()  # as the testbed's stand-in reads its --tokens
        for obj in node_credentials.objects(creds):
            server.add(obj)
        for pod in topo.pods:  # the workloads, as the testbed publishes them
            server.add(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.name},
                    "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account},
                }
            )
        await server.start()
        api = await ClusterAPI.connect(server.write_kubeconfig(tmp_path / "kubeconfig"))
        try:
            node1 = await authn.authenticate(api, creds[0].token, TOKEN_AUDIENCE)
            assert (node1.namespace, node1.service_account) == ("nodeagent-system", "nodeagent")
            assert node1.pod_name == "nodeagent-node1" and node1.pod_uid == creds[0].pod_uid
            authorizer = NodeAuthorizer(api, {(DEFAULT_NAMESPACE, DEFAULT_NODE_ACCOUNT)})
            web = parse_identity("spiffe://cluster.local/ns/shop/sa/web", "cluster.local")
            db = parse_identity("spiffe://cluster.local/ns/shop/sa/db", "cluster.local")
            assert await authorizer.authorize(node1, web) == "node1"
            with pytest.raises(Refused, match="no pod of shop/db on node node1"):
                await authorizer.authorize(node1, db)
            node2 = await authn.authenticate(api, creds[1].token, TOKEN_AUDIENCE)
            assert await authorizer.authorize(node2, db) == "node2"
            with pytest.raises(Refused, match="token rejected"):
                await authn.authenticate(api, creds[0].token, "another-audience")
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())


def test_the_agents_pods_are_host_network_pods_of_their_node() -> None:
    topo = loads_topology(TOPOLOGY, "t.yaml")
    creds = node_credentials.make(topo.nodes)
    pods = [o for o in node_credentials.objects(creds) if o["kind"] == "Pod"]
    assert [(p["metadata"]["name"], p["spec"]["nodeName"]) for p in pods] == [
        ("nodeagent-node1", "node1"),
        ("nodeagent-node2", "node2"),
    ]
    # The agents leave them alone (membership: a host-network pod is never captured).
    assert all(p["spec"]["hostNetwork"] is True for p in pods)
    assert [p["metadata"]["uid"] for p in pods] == [c.pod_uid for c in creds]


def test_secret_files_are_never_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "node" / "ca-token"
    node_credentials._write_secret(path, b"t0ken")
    assert path.read_bytes() == b"t0ken"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    node_credentials._write_secret(path, b"t1")  # replaced, not appended, still 0600
    assert path.read_bytes() == b"t1" and stat.S_IMODE(path.stat().st_mode) == 0o600
