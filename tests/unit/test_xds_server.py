"""The xDS server as Envoy sees it: a gRPC client on the server's UNIX socket plays Envoy.

Each test runs its own event loop (asyncio.run), server and client; nothing needs privileges.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from nodeagent.xds import types
from nodeagent.xds.cache import Changes, InconsistentSnapshot, Snapshot, SnapshotCache
from nodeagent.xds.server import Nack, XdsServer
from tests.waiting import wait_for_async

NODE = "node-1"
CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


# Resources: just enough for the consistency check and for telling versions apart.
def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def cluster(name: str, timeout: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout
    c.eds_cluster_config.eds_config.CopyFrom(ads_source())
    return c


def cla(name: str, weight: int = 1) -> endpoint_pb2.ClusterLoadAssignment:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    assignment.policy.overprovisioning_factor.value = 100 + weight
    return assignment


def listener(name: str, route_name: str, prefix: str = "http") -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=prefix,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_name),
    )
    typed = any_pb2.Any()
    typed.Pack(hcm)
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="hcm", typed_config=typed)]
    )
    return listener_pb2.Listener(name=name, filter_chains=[chain])


def route(name: str, cluster_name: str = "a") -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=name)
    vhost = config.virtual_hosts.add(name="all", domains=["*"])
    vhost.routes.add().route.cluster = cluster_name
    return config


def snapshot(
    version: str,
    clusters: dict[str, Any] | None = None,
    assignments: dict[str, Any] | None = None,
    listeners: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
) -> Snapshot:
    return Snapshot(
        version,
        {
            CDS: clusters if clusters is not None else {"a": cluster("a")},
            EDS: assignments if assignments is not None else {"a": cla("a")},
            LDS: listeners if listeners is not None else {"l": listener("l", "r")},
            RDS: routes if routes is not None else {"r": route("r")},
        },
    )


# Envoy's side of the stream.
class FakeEnvoy:
    def __init__(self, path: Path, server: XdsServer, delta: bool, node_id: str = NODE) -> None:
        self.server = server
        self.delta = delta
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(f"unix:{path}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        rpc = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = rpc()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.received: list[Any] = []
        self._reader = asyncio.create_task(self._read())
        self._first = True

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in self.call:
                self.received.append(response)
                self.responses.put_nowait(response)

    async def send(self, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        request = cls(**fields)
        if self._first:
            request.node.CopyFrom(base_pb2.Node(id=self.node_id))
            self._first = False
        await self.call.write(request)

    async def request(self, type_url: str, names: list[str] | None = None, nonce: str = "") -> None:
        """SotW: the full list of names; delta: names to subscribe to."""
        if self.delta:
            await self.send(
                type_url=type_url, resource_names_subscribe=names or [], response_nonce=nonce
            )
        else:
            await self.send(type_url=type_url, resource_names=names or [], response_nonce=nonce)

    def server_holds_ack(self, response: Any) -> bool:
        """The server has taken this Envoy's ACK of RESPONSE (on its current stream)."""
        status = self.server.status(self.node_id).get(response.type_url)
        version = response.system_version_info if self.delta else response.version_info
        return status is not None and status.connected and status.version_acked == version

    async def recv(self, timeout: float = 3.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def silent(self, within: float) -> list[Any]:
        """Responses that arrive within `within` seconds (expected: none)."""
        await asyncio.sleep(within)
        got = []
        while not self.responses.empty():
            got.append(self.responses.get_nowait())
        return got

    async def ack(self, response: Any, names: list[str] | None = None) -> None:
        if self.delta:
            await self.send(type_url=response.type_url, response_nonce=response.nonce)
        else:
            await self.send(
                type_url=response.type_url,
                version_info=response.version_info,
                resource_names=names or [],
                response_nonce=response.nonce,
            )

    async def nack(self, response: Any, message: str, names: list[str] | None = None) -> None:
        error = status_pb2.Status(code=3, message=message)
        if self.delta:
            await self.send(
                type_url=response.type_url, response_nonce=response.nonce, error_detail=error
            )
        else:
            await self.send(
                type_url=response.type_url,
                version_info="",
                resource_names=names or [],
                response_nonce=response.nonce,
                error_detail=error,
            )

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close()


def names_of(response: Any) -> list[str]:
    """Resource names a response carries."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return sorted(r.name for r in response.resources)
    names = []
    for packed in response.resources:
        kind = {
            CDS: cluster_pb2.Cluster,
            EDS: endpoint_pb2.ClusterLoadAssignment,
            LDS: listener_pb2.Listener,
            RDS: route_pb2.RouteConfiguration,
        }[response.type_url]
        msg = kind()
        packed.Unpack(msg)
        names.append(msg.cluster_name if response.type_url == EDS else msg.name)
    return sorted(names)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "xds" / "ads.sock"
        self.cache = SnapshotCache()
        self.registry = CollectorRegistry()
        self.server = XdsServer(self.cache, self.registry)
        self.envoys: list[FakeEnvoy] = []

    def envoy(self, delta: bool = False, node_id: str = NODE) -> FakeEnvoy:
        envoy = FakeEnvoy(self.path, self.server, delta, node_id)
        self.envoys.append(envoy)
        return envoy

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def states(self, node_id: str = NODE) -> dict[str, str]:
        return {types.short_name(t): s.state for t, s in self.server.status(node_id).items()}


def run(tmp_path: Path, body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        env = Env(tmp_path)
        await env.server.start(env.path)
        try:
            await body(env)
        finally:
            for envoy in env.envoys:
                await envoy.close()
            await env.server.stop()

    asyncio.run(main())


async def initial_flow(envoy: FakeEnvoy) -> dict[str, Any]:
    """Envoy's start-up: CDS, then EDS for its clusters, LDS, then RDS; every response ACKed."""
    got: dict[str, Any] = {}
    await envoy.request(CDS)
    got["CDS"] = await envoy.recv()
    await envoy.request(EDS, ["a"])
    await envoy.ack(got["CDS"])
    got["EDS"] = await envoy.recv()
    await envoy.ack(got["EDS"], ["a"])
    await envoy.request(LDS)
    got["LDS"] = await envoy.recv()
    await envoy.request(RDS, ["r"])
    await envoy.ack(got["LDS"])
    got["RDS"] = await envoy.recv()
    await envoy.ack(got["RDS"], ["r"])
    await wait_for_async(
        lambda: envoy.server_holds_ack(got["RDS"]), 2, "the server to take the RDS ACK"
    )
    return got


async def wait_for_state(env: Env, type_name: str, state: str, timeout: float = 2.0) -> None:
    await wait_for_async(
        lambda: env.states().get(type_name) == state, timeout, f"{type_name} {state}"
    )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_initial_flow_acked_with_one_version(tmp_path: Path, delta: bool) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        got = await initial_flow(envoy)
        assert [r.type_url for r in envoy.received] == [CDS, EDS, LDS, RDS]
        for response in got.values():
            assert names_of(response)
            version = response.system_version_info if delta else response.version_info
            assert version == "v1"
        assert len({r.nonce for r in envoy.received}) == 4
        assert env.states() == {"CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED", "RDS": "SYNCED"}
        status = env.server.status(NODE)[LDS]
        assert (status.version_sent, status.version_acked, status.connected) == ("v1", "v1", True)
        assert status.last_ack_time is not None
        assert env.server.connected_nodes() == [NODE]
        assert env.metric("nodeagent_xds_connected_proxies") == 1
        assert env.metric("nodeagent_xds_pushes_total", type="LDS") == 1
        assert env.metric("nodeagent_xds_push_seconds_count", type="RDS") == 1
        for name, response in got.items():  # the bytes counted are the bytes Envoy received
            assert env.metric("nodeagent_xds_sent_bytes_total", type=name) == len(
                response.SerializeToString()
            )
        if delta:
            versions = {r.name: r.version for r in got["CDS"].resources}
            assert versions["a"] == env.cache.get(NODE).versions(CDS)["a"]  # type: ignore[union-attr]

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_holds_tells_whether_envoy_acked_the_current_tables(tmp_path: Path, delta: bool) -> None:
    """What a pod's readiness asks about route tables: Envoy ACKed the current snapshot's
    version of each one it subscribes to (one it does not watch is not waited for)."""

    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        assert not env.server.holds(NODE, RDS, ["r"])  # not connected yet
        await initial_flow(envoy)
        assert env.server.holds(NODE, RDS, ["r", "unwatched", "absent"])
        routes = {"r": route("r", "b"), "unwatched": route("unwatched")}
        env.cache.set_snapshot(NODE, snapshot("v2", routes=routes))
        assert not env.server.holds(NODE, RDS, ["r"])  # r changed: not ACKed yet
        assert env.server.holds(NODE, RDS, ["unwatched"])
        response = await envoy.recv()
        assert response.type_url == RDS
        await envoy.ack(response, ["r"])
        await wait_for_async(lambda: envoy.server_holds_ack(response), 2, "the RDS ACK")
        assert env.server.holds(NODE, RDS, ["r", "unwatched"])

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_new_snapshot_pushes_cds_before_lds(tmp_path: Path, delta: bool) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        await initial_flow(envoy)
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v2",
                clusters={"a": cluster("a"), "b": cluster("b")},
                assignments={"a": cla("a"), "b": cla("b")},
                listeners={"l": listener("l", "r", prefix="v2")},
                routes={"r": route("r", "b")},
            ),
        )
        cds = await envoy.recv()
        assert cds.type_url == CDS
        assert "b" in names_of(cds)
        assert await envoy.silent(0.3) == []  # LDS waits for the CDS answer
        await envoy.ack(cds)
        if delta:
            await envoy.request(EDS, ["b"])
        else:
            await envoy.request(EDS, ["a", "b"], nonce=envoy.received[1].nonce)
        eds = await envoy.recv()
        assert eds.type_url == EDS
        assert "b" in names_of(eds)
        await envoy.ack(eds, ["a", "b"])
        lds = await envoy.recv()
        assert lds.type_url == LDS
        await envoy.ack(lds)
        rds = await envoy.recv()
        assert rds.type_url == RDS
        await envoy.ack(rds, ["r"])
        assert [r.type_url for r in envoy.received[4:]] == [CDS, EDS, LDS, RDS]
        await wait_for_async(
            lambda: envoy.server_holds_ack(rds), 2, "the server to take the RDS ACK"
        )
        assert set(env.states().values()) == {"SYNCED"}

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_nack_recorded_and_not_resent_until_a_new_snapshot(tmp_path: Path, delta: bool) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        await initial_flow(envoy)
        env.cache.set_snapshot(NODE, snapshot("v2", listeners={"l": listener("l", "r", "bad")}))
        bad = await envoy.recv()
        assert bad.type_url == LDS
        await envoy.nack(bad, "listener l: duplicate filter chain match")
        await wait_for_state(env, "LDS", "NACKED")
        status = env.server.status(NODE)[LDS]
        assert status.last_nack == "listener l: duplicate filter chain match"
        assert (status.version_sent, status.version_acked) == ("v2", "v1")
        assert env.metric("nodeagent_xds_nacks_total", type="LDS") == 1
        assert env.states()["CDS"] == "SYNCED"
        assert await envoy.silent(0.5) == []  # no resend loop

        # A snapshot that changes something else does not resend the rejected listener.
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v3", assignments={"a": cla("a", 2)}, listeners={"l": listener("l", "r", "bad")}
            ),
        )
        eds = await envoy.recv()
        assert eds.type_url == EDS
        await envoy.ack(eds, ["a"])
        assert await envoy.silent(0.3) == []
        assert env.states()["LDS"] == "NACKED"

        # A snapshot that changes the listener is sent, and its ACK clears the NACK.
        env.cache.set_snapshot(NODE, snapshot("v4", assignments={"a": cla("a", 2)}))
        good = await envoy.recv()
        assert good.type_url == LDS
        await envoy.ack(good)
        await wait_for_state(env, "LDS", "SYNCED")
        assert env.server.status(NODE)[LDS].version_acked == "v4"
        assert env.metric("nodeagent_xds_nacks_total", type="LDS") == 1

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_nack_is_handed_on_with_what_was_rejected(tmp_path: Path, delta: bool) -> None:
    """The proxy isolates the object Envoy rejected (#12 defect 6): it is told the type, Envoy's
    message, the resources the rejected response carried, and the version Envoy keeps; and what
    Envoy ACKed is readable per resource."""

    async def body(env: Env) -> None:
        told: list[tuple[str, Nack]] = []
        env.server.on_nack = lambda node, nack: told.append((node, nack))
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        await initial_flow(envoy)
        assert env.server.acked(NODE, LDS).keys() == {"l"}
        bad = {"l": listener("l", "r"), "l2": listener("l2", "r", "bad")}
        env.cache.set_snapshot(NODE, snapshot("v2", listeners=bad))
        response = await envoy.recv()
        await envoy.nack(response, "Error adding/updating listener(s) l2: no")
        await wait_for_state(env, "LDS", "NACKED")
        ((node, nack),) = told
        assert node == NODE and nack.type_url == LDS
        assert nack.message == "Error adding/updating listener(s) l2: no"
        assert "l2" in nack.names
        assert (nack.version_sent, nack.version_acked) == ("v2", "v1")
        assert "l2" not in env.server.acked(NODE, LDS)

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_resend_asks_envoy_again_about_an_unchanged_type(tmp_path: Path, delta: bool) -> None:
    """After a NACK the proxy may push a config whose resources of that type did not change
    (it left out the culprit elsewhere, or tries half of the suspects): ``resend_with`` sends
    the type again with that snapshot, the previous response's resources included, so Envoy's
    answer tells whether it takes the config, and its ACK clears the NACK."""

    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        await initial_flow(envoy)
        bad = {"l": listener("l", "r"), "l2": listener("l2", "r", "bad")}
        env.cache.set_snapshot(NODE, snapshot("v2", listeners=bad))
        await envoy.nack(await envoy.recv(), "Error adding/updating listener(s) l2: no")
        await wait_for_state(env, "LDS", "NACKED")
        again = snapshot("v3", listeners=bad)
        env.cache.set_snapshot(NODE, again)
        env.server.resend_with(NODE, LDS, again)
        response = await envoy.recv()
        assert response.type_url == LDS and "l2" in names_of(response)
        await envoy.ack(response)
        await wait_for_state(env, "LDS", "SYNCED")
        assert await envoy.silent(0.3) == []  # once, not a loop

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_waiters_wake_on_each_answer_with_the_state_already_updated(
    tmp_path: Path, delta: bool
) -> None:
    """What ``NodeProxy.synced`` relies on instead of polling: ``progress`` wakes whoever waits
    past the generation it read before Envoy connected, ACKed or NACKed, and status() then shows
    that answer."""

    async def body(env: Env) -> None:
        progress = env.server.progress
        env.cache.set_snapshot(NODE, snapshot("v1"))
        before = progress.generation
        envoy = env.envoy(delta)
        await envoy.request(CDS)
        assert await progress.wait_past(before, 3)
        assert env.server.connected_nodes() == [NODE]
        cds = await envoy.recv()
        before = progress.generation
        assert not await progress.wait_past(before, 0.05)  # nothing new: the wait runs out
        await envoy.ack(cds)
        assert await progress.wait_past(before, 3)
        assert env.server.status(NODE)[CDS].version_acked == "v1"

        env.cache.set_snapshot(NODE, snapshot("v2", clusters={"a": cluster("a", 2)}))
        bad = await envoy.recv()
        before = progress.generation
        await envoy.nack(bad, "cluster a: bad timeout")
        assert await progress.wait_past(before, 3)
        assert env.states()["CDS"] == "NACKED"

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_stale_nonce_is_ignored(tmp_path: Path, delta: bool) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        got = await initial_flow(envoy)
        env.cache.set_snapshot(NODE, snapshot("v2", clusters={"a": cluster("a", timeout=2)}))
        cds = await envoy.recv()
        eds = await envoy.recv()  # the updated cluster warms until EDS names it again
        assert (cds.type_url, eds.type_url) == (CDS, EDS)
        await envoy.ack(eds, ["a"])
        # An answer to the previous CDS response: neither an ACK of v2 nor worth a response.
        await envoy.ack(got["CDS"])
        assert await envoy.silent(0.3) == []
        assert env.states()["CDS"] == "STALE"
        await envoy.ack(cds)
        await wait_for_state(env, "CDS", "SYNCED")

    run(tmp_path, body)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_secrets_go_out_while_a_warming_cds_is_unanswered(tmp_path: Path, delta: bool) -> None:
    """Envoy ACKs CDS only once new clusters warmed, which needs their EDS and their secrets."""

    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta)
        await initial_flow(envoy)
        v2 = snapshot(
            "v2",
            clusters={"a": cluster("a"), "b": cluster("b")},
            assignments={"a": cla("a"), "b": cla("b")},
        )
        v2.resources[types.SECRET] = {"cert": secret_pb2.Secret(name="cert")}
        env.cache.set_snapshot(NODE, v2)
        cds = await envoy.recv()
        assert cds.type_url == CDS
        # Envoy asks for the new cluster's endpoints and secret, and holds the CDS ACK.
        await envoy.request(EDS, ["a", "b"] if not delta else ["b"])
        await envoy.request(types.SECRET, ["cert"])
        got = {}
        for _ in range(2):
            response = await envoy.recv(timeout=1.0)  # well before the 5 s ACK timeout
            got[response.type_url] = response
        assert set(got) == {EDS, types.SECRET}
        await envoy.ack(got[EDS], ["a", "b"])
        await envoy.ack(got[types.SECRET], ["cert"])
        await envoy.ack(cds)
        await wait_for_state(env, "CDS", "SYNCED")
        await wait_for_state(env, "SDS", "SYNCED")

    run(tmp_path, body)


@pytest.mark.parametrize("told", [False, True], ids=["whole", "told-changes"])
def test_a_leader_cluster_goes_out_alone_before_the_clusters_naming_it(
    tmp_path: Path, told: bool
) -> None:
    """Make before break: a leader (a shared cluster others name, e.g. by a transport socket)
    that changes with other clusters is sent alone; the rest follows once Envoy ACKed it (that
    is, once it warmed). Not on Envoy's first CDS response: nothing names it yet. The same
    whether the snapshot is planned whole or on the changes it was told."""

    async def body(env: Env) -> None:
        env.server.leaders = {CDS: frozenset({"shared"})}
        clusters = {"a": cluster("a"), "shared": cluster("shared")}
        assignments = {"a": cla("a"), "shared": cla("shared")}
        env.cache.set_snapshot(NODE, snapshot("v1", clusters, assignments))
        envoy = env.envoy(delta=True)
        await envoy.request(CDS)
        first = await envoy.recv()
        assert names_of(first) == ["a", "shared"]
        await envoy.request(EDS, ["a", "shared"])
        await envoy.ack(first)
        await envoy.ack(await envoy.recv())
        v1 = env.cache.get(NODE)
        assert v1 is not None
        parts: dict[str, Any] = {
            "clusters": {"a": cluster("a", 2), "shared": cluster("shared", 2)},
            "assignments": assignments,
        }
        v2 = changed(v1, "v2", **parts) if told else snapshot("v2", **parts)
        env.cache.set_snapshot(NODE, v2)
        leader = await envoy.recv()
        assert (leader.type_url, names_of(leader)) == (CDS, ["shared"])
        # The forced EDS of the warming leader goes out; the other cluster waits for its ACK.
        eds = await envoy.recv()
        assert (eds.type_url, names_of(eds)) == (EDS, ["shared"])
        assert await envoy.silent(0.3) == []
        await envoy.ack(eds)
        await envoy.ack(leader)
        rest = await envoy.recv()
        assert (rest.type_url, names_of(rest)) == (CDS, ["a"])

    run(tmp_path, body)


def test_sotw_named_eds_subscription_gets_only_requested_names(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v1",
                clusters={"a": cluster("a"), "b": cluster("b")},
                assignments={"a": cla("a"), "b": cla("b"), "c": cla("c")},
            ),
        )
        envoy = env.envoy()
        await envoy.request(CDS)
        cds = await envoy.recv()
        assert names_of(cds) == ["a", "b"]  # wildcard: every cluster
        await envoy.ack(cds)
        await envoy.request(EDS, ["a"])
        eds = await envoy.recv()
        assert names_of(eds) == ["a"]
        await envoy.ack(eds, ["a"])
        await envoy.request(EDS, ["a", "b"], nonce=eds.nonce)
        eds = await envoy.recv()
        assert names_of(eds) == ["a", "b"]
        await envoy.ack(eds, ["a", "b"])
        # A change to an assignment nobody asked for is no reason to push.
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v2",
                clusters={"a": cluster("a"), "b": cluster("b")},
                assignments={"a": cla("a"), "b": cla("b"), "c": cla("c", 5)},
            ),
        )
        assert await envoy.silent(0.3) == []

    run(tmp_path, body)


def test_sotw_withdraws_a_cluster_only_after_the_routes_moved(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy()
        got = await initial_flow(envoy)
        # Cluster a is replaced by b and the route moves to b.
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v2",
                clusters={"b": cluster("b")},
                assignments={"b": cla("b")},
                routes={"r": route("r", "b")},
            ),
        )
        cds = await envoy.recv()
        assert (cds.type_url, names_of(cds)) == (CDS, ["a", "b"])  # a stays for now
        await envoy.request(EDS, ["a", "b"], nonce=got["EDS"].nonce)
        await envoy.ack(cds)
        eds = await envoy.recv()
        assert (eds.type_url, names_of(eds)) == (EDS, ["b"])
        await envoy.ack(eds, ["a", "b"])
        rds = await envoy.recv()
        assert (rds.type_url, names_of(rds)) == (RDS, ["r"])
        await envoy.ack(rds, ["r"])
        cds = await envoy.recv()
        assert (cds.type_url, names_of(cds), cds.version_info) == (CDS, ["b"], "v2")
        await envoy.request(EDS, ["b"], nonce=eds.nonce)
        await envoy.ack(cds)
        assert await envoy.silent(0.3) == []
        assert set(env.states().values()) == {"SYNCED"}

    run(tmp_path, body)


def test_delta_sends_only_changes_and_withdraws_after_additions(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy(delta=True)
        await initial_flow(envoy)
        # Only the assignment changes: one EDS response carrying only it.
        env.cache.set_snapshot(NODE, snapshot("v2", assignments={"a": cla("a", 3)}))
        eds = await envoy.recv()
        assert (eds.type_url, names_of(eds), list(eds.removed_resources)) == (EDS, ["a"], [])
        await envoy.ack(eds)
        assert await envoy.silent(0.3) == []

        # Cluster a is replaced by b, and the route moves to b: b and the route go first,
        # a is withdrawn last.
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v3",
                clusters={"b": cluster("b")},
                assignments={"b": cla("b")},
                routes={"r": route("r", "b")},
            ),
        )
        cds = await envoy.recv()
        assert (cds.type_url, names_of(cds), list(cds.removed_resources)) == (CDS, ["b"], [])
        await envoy.ack(cds)
        await envoy.request(EDS, ["b"])
        eds = await envoy.recv()
        assert (eds.type_url, names_of(eds)) == (EDS, ["b"])
        await envoy.ack(eds)
        rds = await envoy.recv()
        assert (rds.type_url, names_of(rds)) == (RDS, ["r"])
        await envoy.ack(rds)
        removal = await envoy.recv()
        assert (removal.type_url, names_of(removal), list(removal.removed_resources)) == (
            CDS,
            [],
            ["a"],
        )
        # Envoy drops the cluster's EDS subscription before it ACKs the removal.
        await envoy.send(type_url=EDS, resource_names_unsubscribe=["a"])
        await envoy.send(type_url=CDS, response_nonce=removal.nonce)
        assert await envoy.silent(0.3) == []
        assert set(env.states().values()) == {"SYNCED"}

    run(tmp_path, body)


def test_delta_unsubscribe_and_resubscribe(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        clusters = {"a": cluster("a"), "b": cluster("b")}
        env.cache.set_snapshot(
            NODE, snapshot("v1", clusters=clusters, assignments={"a": cla("a"), "b": cla("b")})
        )
        envoy = env.envoy(delta=True)
        await envoy.request(CDS)
        await envoy.ack(await envoy.recv())
        await envoy.request(EDS, ["a", "b"])
        eds = await envoy.recv()
        assert names_of(eds) == ["a", "b"]
        await envoy.ack(eds)
        await envoy.send(type_url=EDS, resource_names_unsubscribe=["b"])
        assert await envoy.silent(0.3) == []  # unsubscribing needs no answer
        env.cache.set_snapshot(
            NODE, snapshot("v2", clusters=clusters, assignments={"a": cla("a"), "b": cla("b", 7)})
        )
        assert await envoy.silent(0.3) == []  # b is no longer of interest
        await envoy.request(EDS, ["b"])
        eds = await envoy.recv()
        assert names_of(eds) == ["b"]  # asked again: sent again
        await envoy.ack(eds)
        await envoy.request(EDS, ["missing"])
        eds = await envoy.recv()
        assert (names_of(eds), list(eds.removed_resources)) == ([], ["missing"])  # does not exist

    run(tmp_path, body)


def test_delta_reconnect_with_initial_versions_resends_only_changes(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v1",
                clusters={"a": cluster("a"), "b": cluster("b")},
                assignments={"a": cla("a"), "b": cla("b")},
            ),
        )
        first = env.envoy(delta=True)
        await first.request(CDS)
        cds = await first.recv()
        known = {r.name: r.version for r in cds.resources}
        await first.close()
        env.cache.set_snapshot(
            NODE,
            snapshot(
                "v2",
                clusters={"a": cluster("a", 3), "b": cluster("b"), "c": cluster("c")},
                assignments={"a": cla("a"), "b": cla("b"), "c": cla("c")},
            ),
        )
        known["gone"] = "x"
        second = env.envoy(delta=True)
        await second.send(type_url=CDS, initial_resource_versions=known)
        cds = await second.recv()
        assert names_of(cds) == ["a", "c"]  # b is unchanged
        await second.request(EDS, ["a", "b", "c"])
        await second.ack(cds)
        await second.ack(await second.recv())
        removal = await second.recv()
        assert removal.type_url == CDS
        assert list(removal.removed_resources) == ["gone"]

    run(tmp_path, body)


def shared_eds_snapshot(version: str, sources: list[str]) -> Snapshot:
    """One service's endpoints used by a cluster per source identity (nodeagent's clusters are
    keyed by source service account and share the destination's EDS service name)."""
    clusters = {}
    for source in sources:
        clusters[f"svc~{source}"] = c = cluster(f"svc~{source}")
        c.eds_cluster_config.service_name = "svc"
    return snapshot(version, clusters=clusters, assignments={"svc": cla("svc")})


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_new_cluster_on_a_watched_eds_name_gets_that_name_again(
    tmp_path: Path, delta: bool
) -> None:
    """Envoy sends no request for an EDS name it already watches: the added cluster warms until
    an EDS response names it again, although the assignment did not change."""

    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, shared_eds_snapshot("v1", ["web"]))
        envoy = env.envoy(delta)
        await envoy.request(CDS)
        cds = await envoy.recv()
        await envoy.request(EDS, ["svc"])
        await envoy.ack(cds)
        await envoy.ack(await envoy.recv(), ["svc"])
        env.cache.set_snapshot(NODE, shared_eds_snapshot("v2", ["web", "late"]))
        cds = await envoy.recv()
        assert (cds.type_url, "svc~late" in names_of(cds)) == (CDS, True)
        eds = await envoy.recv(timeout=1.0)  # before the 5 s ACK timeout: CDS is held
        assert (eds.type_url, names_of(eds)) == (EDS, ["svc"])

    run(tmp_path, body)


def test_delta_reconnect_resends_a_watched_eds_name_to_a_cluster_added_first(
    tmp_path: Path,
) -> None:
    """The agent restarted while Envoy kept running: Envoy reconnects with what it holds and
    gets the new identity's cluster first; its EDS request, sent only once it applied that CDS
    response, says it holds the shared assignment already. The new cluster still needs it."""

    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, shared_eds_snapshot("v1", ["web"]))
        before = env.cache.get(NODE)
        assert before is not None
        env.cache.set_snapshot(NODE, shared_eds_snapshot("v2", ["web", "late"]))
        envoy = env.envoy(delta=True)
        await envoy.send(type_url=CDS, initial_resource_versions=dict(before.versions(CDS)))
        cds = await envoy.recv()
        assert names_of(cds) == ["svc~late"]
        await envoy.send(
            type_url=EDS,
            resource_names_subscribe=["svc"],
            initial_resource_versions=dict(before.versions(EDS)),
        )
        eds = await envoy.recv(timeout=1.0)  # before the 5 s ACK timeout: CDS is held
        assert (eds.type_url, names_of(eds)) == (EDS, ["svc"])
        await envoy.ack(eds)
        await envoy.ack(cds)
        await wait_for_state(env, "CDS", "SYNCED")
        assert await envoy.silent(0.3) == []  # sent once, not again

    run(tmp_path, body)


def test_disconnect_cleans_up_and_reconnect_gets_current_snapshot(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        first = env.envoy()
        await initial_flow(first)
        await first.close()
        await wait_for_async(lambda: env.server.connected_nodes() == [], 2, "the server to drop it")
        assert env.metric("nodeagent_xds_connected_proxies") == 0
        assert {s.connected for s in env.server.status(NODE).values()} == {False}
        env.cache.set_snapshot(NODE, snapshot("v2", assignments={"a": cla("a", 4)}))
        second = env.envoy()
        got = await initial_flow(second)
        assert {r.version_info for r in got.values()} == {"v2"}
        assert env.server.connected_nodes() == [NODE]
        assert set(env.states().values()) == {"SYNCED"}

    run(tmp_path, body)


def test_a_broken_stream_does_not_affect_others(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.cache.set_snapshot(NODE, snapshot("v1"))
        good = env.envoy()
        await good.request(CDS)
        await good.recv()
        bad = env.envoy(node_id="")  # the first request carries no node id
        await bad.request(CDS)
        assert await bad.call.code() == grpc.StatusCode.INVALID_ARGUMENT
        await good.request(EDS, ["a"])
        assert names_of(await good.recv()) == ["a"]
        assert env.server.connected_nodes() == [NODE]

    run(tmp_path, body)


def test_socket_is_private_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "xds" / "ads.sock"
    path.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()

    async def body(env: Env) -> None:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        env.cache.set_snapshot(NODE, snapshot("v1"))
        envoy = env.envoy()
        await envoy.request(CDS)
        assert names_of(await envoy.recv()) == ["a"]

    run(tmp_path, body)


def test_dangling_eds_reference_is_rejected() -> None:
    cache = SnapshotCache()
    cache.set_snapshot(NODE, snapshot("v1"))
    with pytest.raises(InconsistentSnapshot, match=r"cluster 'b' uses EDS service 'b'"):
        cache.set_snapshot(NODE, snapshot("v2", clusters={"a": cluster("a"), "b": cluster("b")}))
    named = cluster("c")
    named.eds_cluster_config.service_name = "svc"
    with pytest.raises(InconsistentSnapshot, match=r"EDS service 'svc'"):
        cache.set_snapshot(NODE, snapshot("v3", clusters={"c": named}, assignments={"c": cla("c")}))
    assert cache.get(NODE).version == "v1"  # type: ignore[union-attr]


def test_dangling_rds_reference_is_rejected() -> None:
    cache = SnapshotCache()
    with pytest.raises(InconsistentSnapshot, match=r"listener 'l'.*route_config_name 'other'"):
        cache.set_snapshot(NODE, snapshot("v1", listeners={"l": listener("l", "other")}))
    assert cache.get(NODE) is None


def test_misfiled_resource_is_rejected() -> None:
    with pytest.raises(InconsistentSnapshot, match=r"filed as 'x' is named 'a'"):
        SnapshotCache().set_snapshot(NODE, snapshot("v1", clusters={"x": cluster("a")}))


def changed(base: Snapshot, version: str, **parts: dict[str, Any]) -> Snapshot:
    """SNAPSHOT("version", **PARTS) told as changes against BASE (the names that differ)."""
    made = snapshot(version, **parts)
    names = {
        t: {
            n
            for n in base.of(t).keys() | made.of(t).keys()
            if base.of(t).get(n) is not made.of(t).get(n)
        }
        for t in made.resources
    }
    return Snapshot(version, made.resources, Changes(base.resources, names))


def test_a_snapshot_told_its_changes_is_checked_on_them() -> None:
    """Only what changed is looked at, yet a dangling reference is still refused: a changed
    listener naming a missing table, a table removed while an unchanged listener names it, a
    changed cluster whose assignment is gone, a misfiled one; the versions are those a
    snapshot encoded from scratch has."""
    cache = SnapshotCache()
    first = snapshot("v1", routes={"r": route("r"), "r2": route("r2")})
    cache.set_snapshot(NODE, first)
    first.versions(RDS)  # encoded: the next one reuses it
    keep: dict[str, Any] = dict(first.resources)
    with pytest.raises(InconsistentSnapshot, match=r"listener 'l'.*route_config_name 'other'"):
        cache.set_snapshot(
            NODE,
            changed(first, "v2", listeners={"l": listener("l", "other")}, routes=dict(keep[RDS])),
        )
    with pytest.raises(InconsistentSnapshot, match=r"listener 'l'.*route_config_name 'r'"):
        cache.set_snapshot(
            NODE, changed(first, "v2", listeners=dict(keep[LDS]), routes={"r2": keep[RDS]["r2"]})
        )
    with pytest.raises(InconsistentSnapshot, match=r"cluster 'b' uses EDS service 'b'"):
        cache.set_snapshot(NODE, changed(first, "v2", clusters={**keep[CDS], "b": cluster("b")}))
    with pytest.raises(InconsistentSnapshot, match=r"filed as 'x' is named 'a'"):
        cache.set_snapshot(NODE, changed(first, "v2", clusters={**keep[CDS], "x": cluster("a")}))
    assert cache.get(NODE) is first
    second = changed(
        first,
        "v2",
        clusters=dict(keep[CDS]),
        assignments=dict(keep[EDS]),
        listeners=dict(keep[LDS]),
        routes={"r": route("r", "b"), "r3": route("r3")},
    )
    cache.set_snapshot(NODE, second)
    fresh = Snapshot("v2", second.resources)
    assert second.versions(RDS) == fresh.versions(RDS) and set(second.versions(RDS)) == {"r", "r3"}
    assert second.versions(CDS) == fresh.versions(CDS)


@pytest.mark.parametrize("told", [False, True], ids=["full", "told-changes"])
def test_delta_plans_on_told_changes_as_on_the_whole_snapshot(tmp_path: Path, told: bool) -> None:
    """A delta stream whose snapshots name their changes plans on those names only (its cost
    follows the change, not the config): it sends, tells absent, withdraws and reports status
    exactly as when it compares whole snapshots."""

    def following(base: Snapshot, version: str, **parts: dict[str, Any]) -> Snapshot:
        made = changed(base, version, **parts)
        return made if told else Snapshot(version, made.resources)

    def seen(response: Any) -> tuple[str, list[str], list[str]]:
        return (
            types.short_name(response.type_url),
            names_of(response),
            sorted(response.removed_resources),
        )

    async def body(env: Env) -> None:
        first = snapshot("v1")
        env.cache.set_snapshot(NODE, first)
        envoy = env.envoy(delta=True)
        await initial_flow(envoy)
        parts = {"clusters": CDS, "assignments": EDS, "listeners": LDS, "routes": RDS}
        keep: dict[str, Any] = {part: dict(first.of(t)) for part, t in parts.items()}
        await envoy.request(RDS, ["extra"])  # not in the config: told absent
        absent = await envoy.recv()
        assert seen(absent) == ("RDS", [], ["extra"])
        await envoy.ack(absent)

        # The table Envoy asked for appears, and r changes: both go out, nothing else.
        routes = {"r": route("r", "b"), "extra": route("extra")}
        second = following(first, "v2", **{**keep, "routes": routes})
        env.cache.set_snapshot(NODE, second)
        rds = await envoy.recv()
        assert seen(rds) == ("RDS", ["extra", "r"], [])
        await wait_for_state(env, "RDS", "STALE")
        await envoy.ack(rds)
        await wait_for_state(env, "RDS", "SYNCED")

        # Only an assignment changes: one EDS response.
        third = following(
            second, "v3", **{**keep, "routes": routes, "assignments": {"a": cla("a", 5)}}
        )
        env.cache.set_snapshot(NODE, third)
        eds = await envoy.recv()
        assert seen(eds) == ("EDS", ["a"], [])
        await envoy.ack(eds)
        await wait_for_state(env, "EDS", "SYNCED")
        assert await envoy.silent(0.2) == []

        # extra is gone from the config: withdrawn (Envoy still subscribes to it).
        fourth = {**keep, "assignments": dict(third.of(EDS)), "routes": {"r": routes["r"]}}
        env.cache.set_snapshot(NODE, following(third, "v4", **fourth))
        removal = await envoy.recv()
        assert seen(removal) == ("RDS", [], ["extra"])
        await envoy.ack(removal)
        assert await envoy.silent(0.2) == []
        await wait_for_state(env, "RDS", "SYNCED")
        assert set(env.states().values()) == {"SYNCED"}

    run(tmp_path, body)


def _with_secrets(
    version: str, secrets: dict[str, Any], awaited: set[str], base: Snapshot | None
) -> Snapshot:
    """snapshot(VERSION) with SECRETS, AWAITED not told absent; told its changes from BASE."""
    made = snapshot(version)
    resources = {**made.resources, types.SECRET: secrets}
    changes = None
    if base is not None:
        names = {
            t: {
                n
                for n in base.of(t).keys() | resources[t].keys()
                if base.of(t).get(n) is not resources[t].get(n)
            }
            for t in resources
        }
        changes = Changes(base.resources, names)
    return Snapshot(version, resources, changes, awaited_secrets=frozenset(awaited))


@pytest.mark.parametrize("told", [False, True], ids=["whole", "told-changes"])
def test_an_awaited_secret_is_not_told_absent_and_goes_out_once_there(
    tmp_path: Path, told: bool
) -> None:
    """A delta "removed" for an SDS name ends the warming of the cluster naming it (Envoy
    source/common/secret/sds_api.cc), which would then serve without its certificate: a
    Secret not read yet is awaited, never said absent; once in a snapshot it goes out."""

    async def body(env: Env) -> None:
        old = secret_pb2.Secret(name="old")
        v1 = _with_secrets("v1", {"old": old}, set(), None)
        env.cache.set_snapshot(NODE, v1)
        envoy = env.envoy(delta=True)
        await initial_flow(envoy)
        await envoy.request(types.SECRET, ["old"])
        sds = await envoy.recv()
        assert names_of(sds) == ["old"]
        await envoy.ack(sds)
        v2 = _with_secrets("v2", {"old": old}, {"new"}, v1 if told else None)
        env.cache.set_snapshot(NODE, v2)
        await envoy.request(types.SECRET, ["new"])
        assert await envoy.silent(0.3) == []  # no "removed": Envoy keeps waiting for it
        new = secret_pb2.Secret(name="new")
        v3 = _with_secrets("v3", {"old": old, "new": new}, set(), v2 if told else None)
        env.cache.set_snapshot(NODE, v3)
        sds = await envoy.recv()
        assert (names_of(sds), list(sds.removed_resources)) == (["new"], [])
        await envoy.ack(sds)
        # Not awaited (a Secret that is no TLS credential of ours): told absent as before.
        await envoy.request(types.SECRET, ["unknown"])
        sds = await envoy.recv()
        assert (names_of(sds), list(sds.removed_resources)) == ([], ["unknown"])

    run(tmp_path, body)
