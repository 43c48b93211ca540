"""A small cluster for the CA service and its clients: the stand-in API server with two nodes,
each with a node agent pod whose token the TokenReview knows, and the real CAServer on
127.0.0.1 (tests of ``nodeagent ca`` and of the node agent as its client share them)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from apiserver_standin import APIServerStandIn

from nodeagent.caservice.config import CAConfig
from nodeagent.caservice.server import CAServer

NS = "nodeagent-system"
TD = "cluster.local"
TOKEN_A, TOKEN_B = "token-node-a", "token-node-b"
CART = f"spiffe://{TD}/ns/shop/sa/cart"  # a pod on node-a
WEB = f"spiffe://{TD}/ns/shop/sa/web"  # a pod on node-b only
CONFIGMAPS = "/api/v1/configmaps"


def pod(ns: str, name: str, sa: str, node: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa},
    }


def secret(name: str, files: dict[str, bytes]) -> dict[str, Any]:
    data = {k: base64.b64encode(v).decode() for k, v in files.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": NS, "name": name},
        "data": data,
    }


def cluster() -> APIServerStandIn:
    """Two nodes, each with its node agent pod (token bound to it, audience istio-ca); shop/cart
    runs on node-a, shop/web on node-b."""
    api = APIServerStandIn()
    api.add(pod(NS, "nodeagent-a", "nodeagent", "node-a", "uid-a"))
    api.add(pod(NS, "nodeagent-b", "nodeagent", "node-b", "uid-b"))
    api.add(pod("shop", "cart-1", "cart", "node-a", "uid-cart"))
    api.add(pod("shop", "web-1", "web", "node-b", "uid-web"))
    api.register_token(TOKEN_A, NS, "nodeagent", "nodeagent-a", "uid-a", ["istio-ca"])
    api.register_token(TOKEN_B, NS, "nodeagent", "nodeagent-b", "uid-b", ["istio-ca"])
    return api


def ca_config(kubeconfig: Path, **overrides: Any) -> CAConfig:
    settings: dict[str, Any] = {
        "kubeconfig": kubeconfig,
        "namespace": NS,
        "listen": ("127.0.0.1", 0),
        "server_names": ("127.0.0.1", "nodeagent-ca.nodeagent-system.svc"),
        "monitoring": ("127.0.0.1", 0),
        "reload_interval": 0.1,
    }
    settings.update(overrides)
    return CAConfig(**settings)


@asynccontextmanager
async def running(
    api: APIServerStandIn, tmp_path: Path, **overrides: Any
) -> AsyncIterator[CAServer]:
    if not api.port:
        await api.start()
    kubeconfig = api.write_kubeconfig(tmp_path / f"kubeconfig-{time.monotonic_ns()}")
    ca = CAServer(ca_config(kubeconfig, **overrides))
    stop = asyncio.Event()
    await asyncio.wait_for(ca.start(stop), 20)
    task = asyncio.create_task(ca.run(stop))
    try:
        yield ca
    finally:
        stop.set()
        await task
        await ca.stop()


def published_root(api: APIServerStandIn) -> bytes:
    """The root bundle as node agents get it: the ConfigMap's key."""
    config_map = api.objects[CONFIGMAPS][(NS, "nodeagent-ca-root")]
    return str(config_map["data"]["root-cert.pem"]).encode()
