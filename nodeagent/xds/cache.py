"""What to send: one consistent snapshot of Envoy resources per node id.

The server streams whatever snapshot is current; a snapshot is checked here, when it is set, so a
dangling EDS or RDS reference never reaches Envoy (Envoy would keep that cluster or listener
warming until its initial fetch timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from google.protobuf import any_pb2
from google.protobuf.message import Message

from nodeagent.xds import types
from nodeagent.xds.references import eds_service_name, route_config_names

# The field each resource type is named by; the snapshot's key must match it.
_NAME_FIELD = {
    types.CLUSTER: "name",
    types.ENDPOINT: "cluster_name",
    types.LISTENER: "name",
    types.ROUTE: "name",
    types.SECRET: "name",
}


class InconsistentSnapshot(ValueError):
    """A snapshot Envoy could not apply as a whole: a dangling reference or a misnamed resource."""


@dataclass(frozen=True)
class Snapshot:
    """Every resource one Envoy should have: type URL -> resource name -> protobuf message.

    Treat it as immutable once made: per-resource versions are computed once and cached. A
    message that is the very same object as in the snapshot before (``inherit``: translation
    hands back unchanged resources as they were) keeps that snapshot's encoding and version, so
    a push costs what changed, not the whole config.
    """

    version: str
    resources: Mapping[str, Mapping[str, Message]]

    def of(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, {})

    def versions(self, type_url: str) -> Mapping[str, str]:
        """Per-resource versions: a hash of the deterministic serialization of each resource."""
        return self._encoding[1].get(type_url, {})

    def packed(self, type_url: str, name: str) -> any_pb2.Any:
        return any_pb2.Any(type_url=type_url, value=self._encoding[0][type_url][name])

    def inherit(self, previous: Snapshot) -> None:
        """Reuse PREVIOUS's encodings (or those it inherited and did not use yet) for the
        messages both hold. Only the encodings are kept, never PREVIOUS itself."""
        if "_encoding" in self.__dict__ or previous is self:
            return
        if "_encoding" in previous.__dict__:
            self.__dict__["_inherited"] = (previous.resources, previous._encoding)
        elif "_inherited" in previous.__dict__:
            self.__dict__["_inherited"] = previous.__dict__["_inherited"]

    @cached_property
    def _encoding(self) -> tuple[dict[str, dict[str, bytes]], dict[str, dict[str, str]]]:
        """(type URL -> name -> serialized message, type URL -> name -> version)."""
        old_resources, (old_raw, old_versions) = self.__dict__.pop("_inherited", ({}, ({}, {})))
        encoded: dict[str, dict[str, bytes]] = {}
        versions: dict[str, dict[str, str]] = {}
        for type_url, by_name in self.resources.items():
            raws, hashes = encoded.setdefault(type_url, {}), versions.setdefault(type_url, {})
            before = old_resources.get(type_url, {})
            raw_before, version_before = old_raw.get(type_url, {}), old_versions.get(type_url, {})
            for name, msg in by_name.items():
                if before.get(name) is msg:
                    raws[name], hashes[name] = raw_before[name], version_before[name]
                    continue
                raws[name] = raw = msg.SerializeToString(deterministic=True)
                hashes[name] = hashlib.sha256(raw).hexdigest()[:16]
        return encoded, versions


def check_consistent(snapshot: Snapshot, previous: Snapshot | None = None) -> None:
    """Raise InconsistentSnapshot naming the first problem; return when Envoy can apply it.

    A message that is the very same object in PREVIOUS (checked before) is not walked again:
    what it references is taken from there."""
    if not snapshot.version:
        raise InconsistentSnapshot("snapshot version is empty: give every snapshot a version")
    known: dict[tuple[str, str], tuple[tuple[str, str], ...]] = (
        previous.__dict__.get("_references", {}) if previous is not None else {}
    )
    references: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    for type_url, by_name in snapshot.resources.items():
        if type_url not in _NAME_FIELD:
            raise InconsistentSnapshot(f"snapshot {snapshot.version}: unknown type {type_url!r}")
        expected = types.message_name(type_url)
        before = previous.of(type_url) if previous is not None else {}
        for name, msg in by_name.items():
            if before.get(name) is msg and (type_url, name) in known:
                references[(type_url, name)] = known[(type_url, name)]
                continue
            if msg.DESCRIPTOR.full_name != expected:
                raise InconsistentSnapshot(
                    f"snapshot {snapshot.version}: {name!r} is a {msg.DESCRIPTOR.full_name}, "
                    f"filed under {type_url}"
                )
            actual = getattr(msg, _NAME_FIELD[type_url])
            if actual != name:
                raise InconsistentSnapshot(
                    f"snapshot {snapshot.version}: {types.short_name(type_url)} resource filed "
                    f"as {name!r} is named {actual!r}"
                )
            if type_url == types.CLUSTER:
                service = eds_service_name(msg)
                references[(type_url, name)] = () if service is None else (("", service),)
            elif type_url == types.LISTENER:
                references[(type_url, name)] = tuple(route_config_names(msg))
    assignments = snapshot.of(types.ENDPOINT)
    for name in snapshot.of(types.CLUSTER):
        for _, service in references.get((types.CLUSTER, name), ()):
            if service not in assignments:
                raise InconsistentSnapshot(
                    f"snapshot {snapshot.version}: cluster {name!r} uses EDS service "
                    f"{service!r}, but the snapshot has no ClusterLoadAssignment of that name"
                )
    routes = snapshot.of(types.ROUTE)
    for name in snapshot.of(types.LISTENER):
        for chain, route_name in references.get((types.LISTENER, name), ()):
            if route_name not in routes:
                raise InconsistentSnapshot(
                    f"snapshot {snapshot.version}: listener {name!r} (filter chain {chain}) uses "
                    f"RDS route_config_name {route_name!r}, but the snapshot has no "
                    "RouteConfiguration of that name"
                )
    snapshot.__dict__["_references"] = references


class SnapshotCache:
    """The current snapshot of each node id. Use it from the event loop's thread only."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._set_at: dict[str, float] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        previous = self._snapshots.get(node_id)
        check_consistent(snapshot, previous)
        if previous is not None:
            snapshot.inherit(previous)
        self._snapshots[node_id] = snapshot
        self._set_at[node_id] = time.monotonic()
        event = self._changed.pop(node_id, None)
        if event is not None:
            event.set()

    def discard(self, node_id: str) -> None:
        """Forget a node id's snapshot (a sidecar that is gone); its streams are not ended."""
        self._snapshots.pop(node_id, None)
        self._set_at.pop(node_id, None)

    def get(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def set_at(self, node_id: str) -> float | None:
        """When (time.monotonic) the current snapshot of node_id was set."""
        return self._set_at.get(node_id)

    async def wait_newer(self, node_id: str, seen: Snapshot | None) -> Snapshot:
        """The node's current snapshot once it is not `seen` (at once if it already is not)."""
        while True:
            current = self._snapshots.get(node_id)
            if current is not None and current is not seen:
                return current
            await self._changed.setdefault(node_id, asyncio.Event()).wait()
