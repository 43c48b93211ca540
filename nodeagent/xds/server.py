"""The ADS gRPC server on a root-only UNIX socket: both SotW and delta, one Envoy per node id.

Each stream is independent: an error in one ends that stream only. A reconnecting Envoy opens a
new stream and is sent the node's current snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client import CollectorRegistry

from nodeagent.xds.cache import Snapshot, SnapshotCache
from nodeagent.xds.delta import DeltaStream
from nodeagent.xds.metrics import XdsMetrics
from nodeagent.xds.sotw import SotwStream
from nodeagent.xds.state import Nack, TypeStatus
from nodeagent.xds.stream import AdsStream, ProtocolError

log = logging.getLogger("nodeagent.xds")

__all__ = ["Nack", "Progress", "TypeStatus", "XdsServer"]


class Progress:
    """Wakes those who wait for what Envoy holds to change, without polling.

    Read ``generation`` BEFORE looking at the state, then ``wait_past`` it if the state is not
    there yet: an ``advance()`` in between has moved the generation on, so no change is missed.
    Not bound to one event loop (tests run several in turn).
    """

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def advance(self) -> None:
        self.generation += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_past(self, generation: int, timeout: float) -> bool:
        """Until the generation moves past GENERATION; False if TIMEOUT seconds passed first."""
        if self.generation != generation:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(waiter)
        return True


class XdsServer:
    """AggregatedDiscoveryService over the snapshots of `cache`."""

    def __init__(
        self, cache: SnapshotCache, registry: CollectorRegistry, *, ack_timeout: float = 5.0
    ) -> None:
        self.cache = cache
        self.metrics = XdsMetrics(registry)
        self.ack_timeout = ack_timeout
        # Per type, names updated in a response of their own before the rest (delta streams;
        # see TypeState.leaders). Set before Envoy connects.
        self.leaders: Mapping[str, frozenset[str]] = {}
        self._streams: dict[str, list[AdsStream]] = {}
        self._last_status: dict[str, dict[str, TypeStatus]] = {}
        self._server: Any = None
        self._path: Path | None = None
        # Told of every NACK (node id, what was rejected): the proxy isolates the bad resource.
        self.on_nack: Callable[[str, Nack], None] | None = None
        self.on_ack: Callable[[str, str, str], None] | None = None  # node id, type, version
        # Advanced on every ACK or NACK and whenever a stream opens or closes: what status()
        # and acked() report may have changed (after on_ack/on_nack ran).
        self.progress = Progress()

    async def start(self, path: Path, group: int | None = None) -> None:
        """Serve on UNIX socket `path`: 0600 in a 0700 directory; a stale socket is replaced.

        GROUP (the sidecar model: Envoys running as Istio's proxy uid/gid 1337) may connect too:
        the directory is then 0750 and the socket 0660, both of group GROUP.
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700 if group is None else 0o750)
        if group is not None:
            os.chown(path.parent, -1, group)
        if path.is_socket():
            path.unlink()  # left by an earlier agent: nobody listens on it any more
        elif path.exists():
            raise FileExistsError(f"{path} exists and is not a socket: remove it or choose another")
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on unix:{path}")
        await server.start()
        os.chmod(path, 0o600 if group is None else 0o660)
        if group is not None:
            os.chown(path, -1, group)
        self._server = server
        self._path = path
        log.info("xDS server listening on unix:%s", path)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is None:
            return
        for streams in self._streams.values():
            for stream in streams:
                stream.close()  # end each stream cleanly; Envoy reconnects to the next server
        await self._server.stop(grace)
        self._server = None
        if self._path is not None and self._path.is_socket():
            self._path.unlink()

    # AggregatedDiscoveryService
    async def StreamAggregatedResources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(SotwStream(self), requests, context)

    async def DeltaAggregatedResources(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve(DeltaStream(self), requests, context)

    async def _serve(self, stream: AdsStream, requests: AsyncIterator[Any], context: Any) -> None:
        try:
            await stream.run(requests, context)
        except asyncio.CancelledError:
            # Envoy went away (or the server stops): the stream has cleaned up; ending quietly
            # keeps grpc from logging each disconnect as an unhandled error.
            return
        except ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception:
            log.exception("xDS %s stream of %s failed", stream.kind, stream.node_id)
            await context.abort(grpc.StatusCode.INTERNAL, "xDS server error on this stream")

    # StreamHost
    def attach(self, stream: AdsStream) -> None:
        assert stream.node_id is not None
        self._streams.setdefault(stream.node_id, []).append(stream)
        self.metrics.connected.set(len(self._streams))
        self.progress.advance()

    def detach(self, stream: AdsStream) -> None:
        assert stream.node_id is not None
        streams = self._streams.get(stream.node_id, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self._streams.pop(stream.node_id, None)
            self._last_status[stream.node_id] = self._status_of(stream, connected=False)
        self.metrics.connected.set(len(self._streams))
        self.progress.advance()

    def nacked(self, node_id: str, nack: Nack) -> None:
        if self.on_nack is not None:
            try:
                self.on_nack(node_id, nack)
            except Exception:  # the stream goes on whatever the listener of NACKs does
                log.exception("handling a NACK of %s failed", node_id)
        self.progress.advance()

    def ack_received(self, node_id: str, type_url: str, version: str) -> None:
        if self.on_ack is not None:
            try:
                self.on_ack(node_id, type_url, version)
            except Exception:
                log.exception("handling an ACK of %s failed", node_id)
        self.progress.advance()

    def resend_with(self, node_id: str, type_url: str, snapshot: Snapshot) -> None:
        """Send TYPE_URL to NODE_ID's Envoy again with SNAPSHOT (just set), changed or not, so
        its ACK or NACK tells whether Envoy takes that config (see TypeState.take)."""
        for stream in self._streams.get(node_id, []):
            stream.states[type_url].resend_with = snapshot

    # Status
    def acked(self, node_id: str, type_url: str) -> dict[str, str]:
        """name -> version of the resources of TYPE_URL that Envoy ACKed on its open stream."""
        streams = self._streams.get(node_id)
        if not streams:
            return {}
        return dict(streams[-1].states[type_url].acked)

    def holds(self, node_id: str, type_url: str, names: Iterable[str]) -> bool:
        """Whether NODE_ID's Envoy ACKed the current snapshot's version of each of NAMES it
        subscribes to (a name it does not subscribe to, or the snapshot lacks, is not waited
        for). O(len(NAMES))."""
        streams = self._streams.get(node_id)
        snapshot = self.cache.get(node_id)
        if not streams or snapshot is None:
            return False
        state = streams[-1].states[type_url]
        versions = snapshot.versions(type_url)
        for name in names:
            wanted = versions.get(name)
            if wanted is None or not (state.wildcard or name in state.explicit):
                continue
            if state.acked.get(name) != wanted:
                return False
        return True

    def connected_nodes(self) -> list[str]:
        return sorted(self._streams)

    def status(self, node_id: str) -> dict[str, TypeStatus]:
        """type URL -> status, for each type Envoy subscribed to on its latest stream."""
        streams = self._streams.get(node_id)
        if not streams:
            return dict(self._last_status.get(node_id, {}))
        return self._status_of(streams[-1], connected=True)

    def _status_of(self, stream: AdsStream, connected: bool) -> dict[str, TypeStatus]:
        snapshot = self.cache.get(stream.node_id or "")
        return {
            type_url: state.status(snapshot, connected)
            for type_url, state in stream.states.items()
            if state.subscribed
        }
