"""What to send: one consistent snapshot of Envoy resources per node id.

The server streams whatever snapshot is current; a snapshot is checked here, when it is set, so a
dangling EDS or RDS reference never reaches Envoy (Envoy would keep that cluster or listener
warming until its initial fetch timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
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
class Changes:
    """What a snapshot's resources differ in from BASE (another snapshot's resources mapping):
    per type URL, the names whose message is not the very same object as in BASE (added,
    replaced or removed; more names are harmless). With it, setting and encoding the snapshot
    costs what changed, not the whole config."""

    base: Mapping[str, Mapping[str, Message]]
    names: Mapping[str, Collection[str]]


Reference = tuple[str, str]  # (type URL of what is referenced, its name)
_TARGET = {types.CLUSTER: types.ENDPOINT, types.LISTENER: types.ROUTE}


@dataclass(frozen=True)
class Snapshot:
    """Every resource one Envoy should have: type URL -> resource name -> protobuf message.

    Treat it as immutable once made: per-resource versions are computed once and cached. A
    message that is the very same object as in the snapshot before (``inherit``: translation
    hands back unchanged resources as they were) keeps that snapshot's encoding and version, so
    a push costs what changed, not the whole config. CHANGES, when it names the snapshot before
    as its base, spares even the walk over the unchanged names.
    """

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    changes: Changes | None = field(default=None, compare=False, repr=False)
    # SDS names the snapshot lacks for now on purpose (a Secret not read yet): Envoy is not
    # told they are absent, since a delta "removed" for an SDS name ends the warming of what
    # names it (Envoy source/common/secret/sds_api.cc: "the owning resource (LDS/CDS) should
    # still complete warming"); the cluster naming one keeps warming, the one it replaces serving.
    awaited_secrets: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def of(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, {})

    def versions(self, type_url: str) -> Mapping[str, str]:
        """Per-resource versions: a hash of the deterministic serialization of each resource."""
        return self._encoding[1].get(type_url, {})

    def packed(self, type_url: str, name: str) -> any_pb2.Any:
        return any_pb2.Any(type_url=type_url, value=self._encoding[0][type_url][name])

    def follows(self, previous: Snapshot | None) -> bool:
        """Whether CHANGES says what differs from PREVIOUS."""
        return (
            previous is not None
            and self.changes is not None
            and self.changes.base is previous.resources
        )

    def inherit(self, previous: Snapshot) -> None:
        """Reuse PREVIOUS's encodings (or those it inherited and did not use yet) for the
        messages both hold. Only the encodings are kept, never PREVIOUS itself."""
        if "_encoding" in self.__dict__ or previous is self:
            return
        if "_encoding" in previous.__dict__:
            incremental = self.follows(previous)
            self.__dict__["_inherited"] = (previous.resources, previous._encoding, incremental)
        elif "_inherited" in previous.__dict__:
            resources, encoding, _ = previous.__dict__["_inherited"]
            self.__dict__["_inherited"] = (resources, encoding, False)

    @cached_property
    def _encoding(self) -> tuple[dict[str, dict[str, bytes]], dict[str, dict[str, str]]]:
        """(type URL -> name -> serialized message, type URL -> name -> version)."""
        old_resources, (old_raw, old_versions), incremental = self.__dict__.pop(
            "_inherited", ({}, ({}, {}), False)
        )
        encoded: dict[str, dict[str, bytes]] = {}
        versions: dict[str, dict[str, str]] = {}
        for type_url, by_name in self.resources.items():
            before = old_resources.get(type_url, {})
            raw_before, version_before = old_raw.get(type_url, {}), old_versions.get(type_url, {})
            if incremental and type_url in old_raw:
                assert self.changes is not None
                names: Iterable[str] = self.changes.names.get(type_url, ())
                if not names:  # the very maps before: encodings are never changed once made
                    encoded[type_url], versions[type_url] = raw_before, version_before
                    continue
                # Copies (C speed), then only the names that changed.
                raws, hashes = dict(raw_before), dict(version_before)
            else:
                raws, hashes, names = {}, {}, by_name
            encoded[type_url], versions[type_url] = raws, hashes
            for name in names:
                msg = by_name.get(name)
                if msg is None:
                    raws.pop(name, None)
                    hashes.pop(name, None)
                elif before.get(name) is msg and name in raw_before:
                    raws[name], hashes[name] = raw_before[name], version_before[name]
                else:
                    raws[name] = raw = msg.SerializeToString(deterministic=True)
                    hashes[name] = hashlib.sha256(raw).hexdigest()[:16]
        return encoded, versions


def _references(type_url: str, msg: Message) -> tuple[tuple[str, str], ...]:
    """(filter chain or "", referenced name) of what MSG makes Envoy subscribe to."""
    if type_url == types.CLUSTER:
        service = eds_service_name(msg)
        return () if service is None else (("", service),)
    if type_url == types.LISTENER:
        return tuple(route_config_names(msg))
    return ()


def _checked(snapshot: Snapshot, type_url: str, name: str, msg: Message) -> None:
    expected = types.message_name(type_url)
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


def _dangling(snapshot: Snapshot, type_url: str, name: str, chain: str, target: str) -> str:
    if type_url == types.CLUSTER:
        return (
            f"snapshot {snapshot.version}: cluster {name!r} uses EDS service "
            f"{target!r}, but the snapshot has no ClusterLoadAssignment of that name"
        )
    return (
        f"snapshot {snapshot.version}: listener {name!r} (filter chain {chain}) uses "
        f"RDS route_config_name {target!r}, but the snapshot has no "
        "RouteConfiguration of that name"
    )


def check_consistent(snapshot: Snapshot, previous: Snapshot | None = None) -> None:
    """Raise InconsistentSnapshot naming the first problem; return when Envoy can apply it.

    A message that is the very same object in PREVIOUS (checked before) is not walked again:
    what it references is taken from there. When SNAPSHOT's changes follow PREVIOUS, only the
    changed names are looked at (and what referenced a removed one)."""
    if not snapshot.version:
        raise InconsistentSnapshot("snapshot version is empty: give every snapshot a version")
    for type_url in snapshot.resources:
        if type_url not in _NAME_FIELD:
            raise InconsistentSnapshot(f"snapshot {snapshot.version}: unknown type {type_url!r}")
    known: dict[tuple[str, str], tuple[tuple[str, str], ...]] = (
        previous.__dict__.get("_references", {}) if previous is not None else {}
    )
    if previous is not None and snapshot.follows(previous) and "_uses" in previous.__dict__:
        _check_changes(snapshot, previous, known, previous.__dict__["_uses"])
        return
    references: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    for type_url, by_name in snapshot.resources.items():
        before = previous.of(type_url) if previous is not None else {}
        referrer = type_url in _TARGET
        for name, msg in by_name.items():
            if before.get(name) is msg and (not referrer or (type_url, name) in known):
                if referrer:  # checked in PREVIOUS, and what it references known
                    references[(type_url, name)] = known[(type_url, name)]
                continue
            _checked(snapshot, type_url, name, msg)
            if type_url in _TARGET:
                references[(type_url, name)] = _references(type_url, msg)
    uses: dict[Reference, int] = {}
    for (type_url, name), refs in references.items():
        wanted = snapshot.of(_TARGET[type_url])
        for chain, target in refs:
            if target not in wanted:
                raise InconsistentSnapshot(_dangling(snapshot, type_url, name, chain, target))
            key = (_TARGET[type_url], target)
            uses[key] = uses.get(key, 0) + 1
    snapshot.__dict__["_references"] = references
    snapshot.__dict__["_uses"] = uses


def _check_changes(
    snapshot: Snapshot,
    previous: Snapshot,
    known: dict[tuple[str, str], tuple[tuple[str, str], ...]],
    known_uses: dict[Reference, int],
) -> None:
    """check_consistent for the names SNAPSHOT's changes name: O(changed) past two copies."""
    assert snapshot.changes is not None
    references, uses = known, known_uses  # shared while no cluster or listener changed
    if any(snapshot.changes.names.get(type_url) for type_url in _TARGET):
        references, uses = dict(known), dict(known_uses)  # copies (C speed)
    referrers: list[tuple[str, str]] = []  # changed clusters and listeners now present
    for type_url, names in snapshot.changes.names.items():
        by_name, before = snapshot.of(type_url), previous.of(type_url)
        for name in names:
            old = references.pop((type_url, name), None)
            for _, target in old or ():
                key = (_TARGET[type_url], target)
                uses[key] -= 1
                if not uses[key]:
                    del uses[key]
            msg = by_name.get(name)
            if msg is None:
                continue
            if not (before.get(name) is msg and old is not None):
                _checked(snapshot, type_url, name, msg)
            if type_url in _TARGET:
                refs = old if before.get(name) is msg and old is not None else None
                references[(type_url, name)] = refs or _references(type_url, msg)
                referrers.append((type_url, name))
                for _, target in references[(type_url, name)]:
                    key = (_TARGET[type_url], target)
                    uses[key] = uses.get(key, 0) + 1
    for type_url, name in referrers:
        wanted = snapshot.of(_TARGET[type_url])
        for chain, target in references[(type_url, name)]:
            if target not in wanted:
                raise InconsistentSnapshot(_dangling(snapshot, type_url, name, chain, target))
    # A removed EDS or RDS name that something unchanged still references.
    for type_url in _TARGET.values():
        wanted = snapshot.of(type_url)
        for name in snapshot.changes.names.get(type_url, ()):
            if name in wanted or not uses.get((type_url, name)):
                continue
            for (referrer_type, referrer), refs in references.items():
                for chain, target in refs:
                    if _TARGET[referrer_type] == type_url and target == name:
                        raise InconsistentSnapshot(
                            _dangling(snapshot, referrer_type, referrer, chain, target)
                        )
    snapshot.__dict__["_references"] = references
    snapshot.__dict__["_uses"] = uses


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
