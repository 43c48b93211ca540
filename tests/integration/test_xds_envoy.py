"""A real Envoy configured by the xDS server over ADS on a UNIX socket (SotW and delta).

Envoy serves a listener on loopback whose route comes over RDS; a snapshot Envoy rejects is
NACKed, reported, not resent, and leaves the previous listener serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry

from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot, SnapshotCache
from nodeagent.xds.server import XdsServer
from tests.waiting import wait_for_async

pytestmark = pytest.mark.integration

ENVOY = Path(sys.executable).parent / "envoy"
NODE = "node-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def packed(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def loopback(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def make_snapshot(version: str, port: int, body: str, duplicate_chain: bool = False) -> Snapshot:
    backend = cluster_pb2.Cluster(name="backend", type=cluster_pb2.Cluster.EDS)
    backend.connect_timeout.seconds = 1
    backend.eds_cluster_config.eds_config.CopyFrom(ads())
    assignment = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="backend",
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=loopback(free_port()))
                    )
                ]
            )
        ],
    )
    routes = route_pb2.RouteConfiguration(name="local")
    vhost = routes.virtual_hosts.add(name="all", domains=["*"])
    vhost.routes.append(
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=route_components_pb2.DirectResponseAction(
                status=200, body={"inline_string": body}
            ),
        )
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="http",
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name="local"),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
            )
        ],
    )
    chain = listener_components_pb2.FilterChain(
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=packed(hcm)
            )
        ]
    )
    # Two filter chains with the same (empty) match: Envoy rejects the whole listener.
    chains = [chain, chain] if duplicate_chain else [chain]
    listener = listener_pb2.Listener(name="http", address=loopback(port), filter_chains=chains)
    return Snapshot(
        version,
        {
            types.CLUSTER: {"backend": backend},
            types.ENDPOINT: {"backend": assignment},
            types.LISTENER: {"http": listener},
            types.ROUTE: {"local": routes},
        },
    )


def bootstrap(sock: Path, admin_port: int, api_type: str) -> dict[str, Any]:
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": NODE, "cluster": "nodeagent"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"pipe": {"path": str(sock)}}}}
                                ]
                            }
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ]
        },
    }


@pytest.fixture
def run_envoy(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], subprocess.Popen[bytes]]]:
    """Start Envoy with a bootstrap; it is killed afterwards, also when the test fails."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> subprocess.Popen[bytes]:
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(config))
        with (tmp_path / "envoy.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    str(ENVOY),
                    "-c",
                    str(path),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            body: bytes = response.read()
            return body.decode()
    except OSError as e:
        return f"error: {e}"


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_envoy_applies_snapshots_and_nacks_a_bad_one(
    tmp_path: Path, run_envoy: Callable[[dict[str, Any]], subprocess.Popen[bytes]], api_type: str
) -> None:
    sock = tmp_path / "xds" / "ads.sock"
    port = free_port()

    async def main() -> None:
        cache = SnapshotCache()
        registry = CollectorRegistry()
        server = XdsServer(cache, registry)
        await server.start(sock)
        try:
            await scenario(cache, server, registry)
        finally:
            await server.stop()

    async def body_is(text: str) -> bool:
        return await asyncio.to_thread(http_get, port) == text

    async def scenario(
        cache: SnapshotCache, server: XdsServer, registry: CollectorRegistry
    ) -> None:
        def states() -> dict[str, str]:
            return {types.short_name(t): s.state for t, s in server.status(NODE).items()}

        synced = {"CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED", "RDS": "SYNCED"}
        cache.set_snapshot(NODE, make_snapshot("v1", port, "hello v1"))
        run_envoy(bootstrap(sock, free_port(), api_type))
        await wait_for_async(lambda: body_is("hello v1"), 10, "Envoy to serve the direct response")
        await wait_for_async(
            lambda: states() == synced, 10, lambda: f"all types SYNCED: {states()}"
        )
        assert server.connected_nodes() == [NODE]
        assert {s.version_acked for s in server.status(NODE).values()} == {"v1"}

        def lds_pushes() -> float:
            return registry.get_sample_value("nodeagent_xds_pushes_total", {"type": "LDS"}) or 0

        before = lds_pushes()
        cache.set_snapshot(NODE, make_snapshot("v2", port, "hello v1", duplicate_chain=True))
        await wait_for_async(lambda: states().get("LDS") == "NACKED", 10, "Envoy to NACK it")
        lds = server.status(NODE)[types.LISTENER]
        assert "same matching rules" in lds.last_nack, lds.last_nack
        assert (lds.version_sent, lds.version_acked) == ("v2", "v1")
        await asyncio.sleep(2)  # a while in which the rejected listener must not be resent
        assert lds_pushes() - before <= 2, "the rejected listener was sent again and again"
        assert await body_is("hello v1"), "the previous listener stopped answering"
        nacks = registry.get_sample_value("nodeagent_xds_nacks_total", {"type": "LDS"})
        assert nacks == 1

        cache.set_snapshot(NODE, make_snapshot("v3", port, "hello v3"))
        await wait_for_async(lambda: body_is("hello v3"), 10, "Envoy to serve the v3 route")
        await wait_for_async(lambda: states() == synced, 10, lambda: f"SYNCED again: {states()}")
        assert server.status(NODE)[types.LISTENER].version_acked == "v3"

    try:
        asyncio.run(main())
    except AssertionError as e:
        log = (tmp_path / "envoy.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}\n--- envoy log (tail) ---\n{log}") from e
