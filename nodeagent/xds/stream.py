"""How to stream: one ADS stream's loop, shared by the SotW and delta variants.

Ordering rule, per snapshot: walk the types in ORDER and send the first one whose resources
differ from what Envoy has; a later type waits while an earlier one's response is unanswered
(bounded by the ACK timeout), and while Envoy is yet to subscribe to the EDS/RDS names of the
clusters/listeners it was just sent. The exceptions are EDS and SDS behind an unanswered CDS (see
_EXEMPT). Within a type, a changed leader (XdsServer.leaders) goes out alone first, the rest
once Envoy ACKed it (delta). Once no addition is left, withdrawals go out in
REMOVAL_ORDER under the same rule. A NACKed response is not sent again: a type is only sent
when its resources differ from the last response, so after a NACK the next push of that type
comes with a snapshot that changes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot, SnapshotCache
from nodeagent.xds.metrics import XdsMetrics
from nodeagent.xds.state import Nack, Plan, TypeState, expected_subscriptions

log = logging.getLogger("nodeagent.xds")

# Resources a response of the key type makes Envoy subscribe to, of the value type.
_DEPENDENTS = {types.CLUSTER: types.ENDPOINT, types.LISTENER: types.ROUTE}
# While a CDS response is unanswered, EDS and SDS still go out (after it, on the same ordered
# stream): Envoy holds the CDS ACK of an updated cluster while it warms, that is until an EDS
# response names it and the secrets of its TLS transport socket have arrived.
_EXEMPT: dict[str, tuple[str, ...]] = {types.CLUSTER: (types.ENDPOINT, types.SECRET)}


class StreamHost(Protocol):
    """What a stream needs from the server that runs it."""

    cache: SnapshotCache
    metrics: XdsMetrics
    ack_timeout: float
    leaders: Mapping[str, frozenset[str]]  # type URL -> TypeState.leaders

    def attach(self, stream: AdsStream) -> None: ...

    def detach(self, stream: AdsStream) -> None: ...

    def nacked(self, node_id: str, nack: Nack) -> None: ...

    def ack_received(self, node_id: str, type_url: str, version: str) -> None: ...


class ProtocolError(Exception):
    """The client broke the protocol; the stream is closed with this message."""


class _Eof:
    pass


_EOF = _Eof()


class AdsStream(ABC):
    """One Envoy's ADS stream. Subclasses read requests and build responses of one variant."""

    sotw: bool
    kind: str

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self.node_id: str | None = None
        self.snapshot: Snapshot | None = None
        self.opened_at = time.monotonic()
        self.states = {
            t: TypeState(t, sotw=self.sotw, leaders=host.leaders.get(t, frozenset()))
            for t in types.ORDER
        }
        self._nonces = itertools.count(1)
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._unknown_types: set[str] = set()

    @abstractmethod
    def _apply(self, request: Any, state: TypeState) -> None:
        """Take one request of a known type: ACK/NACK (see _reply) and subscription changes."""

    @abstractmethod
    def _response(self, plan: Plan, snapshot: Snapshot, nonce: str) -> Any:
        """The protobuf response carrying `plan`."""

    async def run(self, requests: AsyncIterator[Any], context: Any) -> None:
        reader = asyncio.create_task(self._read(requests))
        watcher: asyncio.Task[None] | None = None
        try:
            while True:
                now = time.monotonic()
                plan = self._next_plan(now)
                if plan is not None and self.snapshot is not None:
                    await self._send(plan, self.snapshot, context)
                    continue
                timeout = self._wake_in(now)
                try:
                    event = await asyncio.wait_for(self._events.get(), timeout)
                except TimeoutError:
                    continue
                events = [event]
                while not self._events.empty():  # take every queued event before planning
                    events.append(self._events.get_nowait())
                for event in events:
                    if event is _EOF:
                        return
                    if isinstance(event, ProtocolError):
                        raise event
                    if isinstance(event, Snapshot):
                        self.snapshot = event
                        for state in self.states.values():
                            state.take(event)
                        continue
                    if self.node_id is None:
                        watcher = asyncio.create_task(self._watch(self._identify(event)))
                    self._on_request(event)
        finally:
            reader.cancel()
            if watcher is not None:
                watcher.cancel()
            if self.node_id is not None:
                self.host.detach(self)
                log.info("xDS %s stream of %s closed", self.kind, self.node_id)

    def close(self) -> None:
        """End the stream (with an OK status) once it has sent what it is sending."""
        self._events.put_nowait(_EOF)

    def _identify(self, request: Any) -> str:
        node_id: str = request.node.id
        if not node_id:
            raise ProtocolError("the first request of an ADS stream must carry node.id")
        self.node_id = node_id
        self.host.attach(self)
        log.info("xDS %s stream of %s opened", self.kind, node_id)
        return node_id

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        count = 0
        try:
            async for request in requests:
                count += 1
                self._events.put_nowait(request)
        except DecodeError as e:  # bytes that are no request: the client is told, not dropped
            self._events.put_nowait(
                ProtocolError(f"message {count + 1} of this {self.kind} stream: {e}")
            )
        except Exception as e:  # the client went away mid-message: just end this stream
            log.debug("xDS stream read ended: %s", e)
        finally:
            self._events.put_nowait(_EOF)

    async def _watch(self, node_id: str) -> None:
        seen: Snapshot | None = None
        while True:
            seen = await self.host.cache.wait_newer(node_id, seen)
            self._events.put_nowait(seen)

    def _on_request(self, request: Any) -> None:
        log.debug(
            "xDS request %s %s nonce %r%s",
            self.node_id,
            types.short_name(request.type_url),
            request.response_nonce,
            " (NACK)" if request.HasField("error_detail") else "",
        )
        state = self.states.get(request.type_url)
        if state is None:
            if request.type_url not in self._unknown_types:
                self._unknown_types.add(request.type_url)
                log.warning("xDS %s asked for unsupported type %s", self.node_id, request.type_url)
            return
        self._apply(request, state)

    def _reply(self, state: TypeState, nonce: str, error: Any | None) -> bool:
        """ACK/NACK bookkeeping for a request carrying `nonce`; False when the nonce is stale."""
        if nonce != state.nonce:
            return False
        if state.answered:
            return True  # a later request about the same response (e.g. new resource names)
        name = types.short_name(state.type_url)
        if error is None:
            state.on_ack()
            self.host.ack_received(self.node_id or "", state.type_url, state.version_sent)
            self.host.metrics.push_seconds.labels(name).observe(
                max(0.0, time.monotonic() - state.push_start)
            )
            return True
        message = error.message or f"code {error.code}"
        names = tuple(sorted(state.pending_after))
        changed = tuple(n for n in names if state.acked.get(n) != state.pending_after[n])
        state.on_nack(message)
        self.host.metrics.nacks.labels(name).inc()
        log.warning(
            "Envoy %s rejected %s version %s (keeps version %r): %s",
            self.node_id,
            name,
            state.version_sent,
            state.version_acked,
            message,
        )
        dependent = _DEPENDENTS.get(state.type_url)
        if dependent is not None:  # Envoy will not subscribe to what it rejected
            self.states[dependent].expect_since = None
        nack = Nack(
            state.type_url, message, names, state.version_sent, state.version_acked, changed
        )
        self.host.nacked(self.node_id or "", nack)
        return True

    def _next_plan(self, now: float) -> Plan | None:
        if self.snapshot is None:
            return None
        timeout = self.host.ack_timeout
        blocker: str | None = None
        for type_url in types.ORDER:
            if blocker is not None and type_url not in _EXEMPT.get(blocker, ()):
                continue
            state = self.states[type_url]
            awaiting = self._awaiting(state, now)
            if not awaiting:
                plan = state.plan(self.snapshot, removing=False)
                if plan is not None:
                    return plan
            if (awaiting or state.expecting(now, timeout)) and blocker is None:
                blocker = type_url
        if blocker is not None:
            return None
        for type_url in types.REMOVAL_ORDER:
            state = self.states[type_url]
            if self._awaiting(state, now):
                return None
            plan = state.plan(self.snapshot, removing=True)
            if plan is not None:
                return plan
        return None

    def _awaiting(self, state: TypeState, now: float) -> bool:
        if state.awaiting(now, self.host.ack_timeout):
            return True
        if not state.answered and not state.timed_out:
            state.timed_out = True
            log.warning(
                "Envoy %s did not answer %s nonce %s within %.1fs; pushing on",
                self.node_id,
                types.short_name(state.type_url),
                state.nonce,
                self.host.ack_timeout,
            )
        return False

    def _wake_in(self, now: float) -> float | None:
        deadlines = [
            d
            for s in self.states.values()
            if (d := s.deadline(now, self.host.ack_timeout)) is not None
        ]
        return max(0.0, min(deadlines) - now) if deadlines else None

    async def _send(self, plan: Plan, snapshot: Snapshot, context: Any) -> None:
        state = self.states[plan.type_url]
        changed = {n: v for n, v in plan.upserts.items() if state.sent.get(n) != v}
        nonce = str(next(self._nonces))
        set_at = self.host.cache.set_at(self.node_id or "") or self.opened_at
        state.on_sent(plan, snapshot, nonce, push_start=max(set_at, self.opened_at))
        dependent_type = _DEPENDENTS.get(plan.type_url)
        if dependent_type is not None and changed:
            dependent = self.states[dependent_type]
            wanted = expected_subscriptions(snapshot, plan.type_url, changed)
            dependent.expect = wanted
            dependent.expect_since = time.monotonic()
            if plan.type_url == types.CLUSTER:
                # An added or updated EDS cluster warms until an EDS response names it, even
                # unchanged: Envoy asks for no name it already watches for another cluster.
                # Forced whether or not Envoy is known to hold it yet: on a new stream, Envoy's
                # EDS request (initial_resource_versions) comes only after this CDS response.
                dependent.force |= wanted
        response = self._response(plan, snapshot, nonce)
        self.host.metrics.pushes.labels(types.short_name(plan.type_url)).inc()
        self.host.metrics.sent_bytes.labels(types.short_name(plan.type_url)).inc(
            response.ByteSize()
        )
        log.debug(
            "xDS push %s %s version %s nonce %s: %d resources, %d removed",
            self.node_id,
            types.short_name(plan.type_url),
            snapshot.version,
            nonce,
            len(plan.upserts),
            len(plan.removals),
        )
        await context.write(response)
