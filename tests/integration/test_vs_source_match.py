"""A VirtualService match's sourceLabels and sourceNamespace, decided per request by a real Envoy.

The node Envoy is shared, so these are route matchers on filter state the caller's listener
stamps (translate/internal.py stamp_caller) and that crosses into the shared internal listener
where the service port's routes live (translate/virtual_service.py). Here two loopback
listeners stand for two calling pods and hand their connections to one internal listener, as
outbound-internal does; the route each request takes shows which caller Envoy saw. Loopback
only: no namespace, no capture.

Istio: https://istio.io/latest/docs/reference/config/networking/virtual-service/#HTTPMatchRequest
(sourceLabels, sourceNamespace).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from nodeagent.envoy.bootstrap import STATIC_RUNTIME
from nodeagent.mesh.model import IstioResource
from nodeagent.translate import internal
from nodeagent.translate.envoy import Cluster, Listener, message
from nodeagent.translate.filters import http_connection_manager, tcp_proxy
from nodeagent.translate.virtual_service import http_routes
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENVOY = Path(sys.executable).parent / "envoy"
SERVICE = "outbound-internal"

# Each rule answers with its own name, so the body says which route the request took.
VS = IstioResource(
    "networking.istio.io",
    "v1",
    "VirtualService",
    "shop",
    "reviews",
    {
        "hosts": ["reviews"],
        "http": [
            {
                "match": [{"sourceLabels": {"app": "web", "version": "v2"}}],
                "directResponse": {"status": 200, "body": {"string": "web-v2"}},
            },
            {
                "match": [{"sourceNamespace": "front"}],
                "directResponse": {"status": 200, "body": {"string": "front"}},
            },
            {"directResponse": {"status": 200, "body": {"string": "anyone"}}},
        ],
    },
)

CALLERS = {
    "web-v2": ("shop", {"app": "web", "version": "v2", "pod-template-hash": "x"}),
    "front": ("front", {"app": "web", "version": "v1"}),
    "anyone": ("shop", {"app": "web", "version": "v1"}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def json_of(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return out


def caller_listener(name: str, port: int, namespace: str, labels: dict[str, str]) -> Listener:
    """What a pod's outbound listener does, on loopback: stamp the caller, hand over."""
    spiffe = f"spiffe://cluster.local/ns/{namespace}/sa/default"
    return message(
        Listener,
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        internal.stamp_caller(
                            "/run/netns/unused", spiffe, f"{namespace}/{name}", "", labels
                        ),
                        tcp_proxy(name, SERVICE, "outbound", name),
                    ]
                }
            ],
        },
    )


def config(ports: dict[str, int], admin_port: int) -> dict[str, Any]:
    hcm = http_connection_manager(SERVICE, SERVICE, "outbound", "caller")
    del hcm["typed_config"]["rds"]
    hcm["typed_config"]["route_config"] = {
        "name": SERVICE,
        "virtual_hosts": [
            {"name": "reviews", "domains": ["*"], "routes": http_routes(VS, 80, lambda d: "")}
        ],
    }
    shared = message(
        Listener, {"name": SERVICE, "internal_listener": {}, "filter_chains": [{"filters": [hcm]}]}
    )
    listeners = [shared] + [
        caller_listener(name, ports[name], *CALLERS[name]) for name in sorted(CALLERS)
    ]
    clusters: list[Cluster] = [internal.internal_cluster(SERVICE)]
    return {
        "node": {"id": "vs-source-match", "cluster": "nodeagent"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "layered_runtime": {"layers": [{"name": "static", "static_layer": STATIC_RUNTIME}]},
        "static_resources": {
            "listeners": [json_of(listener) for listener in listeners],
            "clusters": [json_of(cluster) for cluster in clusters],
        },
    }


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[tuple[dict[str, int], Path]]:
    """A real Envoy with the callers' listeners; killed afterwards, also when the test fails."""
    ports = {name: free_port() for name in CALLERS}
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(config(ports, free_port())))
    log = tmp_path / "envoy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield ports, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            body: bytes = response.read()
            return body.decode()
    except OSError as e:
        return f"error: {e}"


def test_each_caller_takes_the_route_its_labels_and_namespace_select(
    envoy: tuple[dict[str, int], Path],
) -> None:
    ports, log = envoy
    wait_for(
        lambda: not get(ports["anyone"]).startswith("error"),
        30,
        lambda: f"Envoy serving the callers' listeners; log: {log.read_text()[-2000:]}",
    )
    assert {name: get(port) for name, port in ports.items()} == {name: name for name in CALLERS}
