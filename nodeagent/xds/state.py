"""Per-stream, per-type protocol state: subscriptions, what Envoy was sent and what it ACKed.

Pure bookkeeping, no I/O: the stream drivers (sotw, delta) feed it requests and ask it what to
send next. Resource versions are the snapshot's per-resource hashes, so "changed" means "changed
bytes", whatever the snapshot's version string says.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import any_pb2

from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot
from nodeagent.xds.references import eds_service_name, route_config_names

State = Literal["SYNCED", "STALE", "NACKED"]


@dataclass(frozen=True)
class TypeStatus:
    """What one Envoy has of one resource type, as its ACKs and NACKs told."""

    state: State
    version_sent: str
    version_acked: str
    last_nack: str
    connected: bool
    last_ack_time: float | None  # time.time() of the latest ACK

    def to_json(self) -> dict[str, object]:
        """As proxy-status shows it."""
        return {
            "state": self.state,
            "version_sent": self.version_sent,
            "version_acked": self.version_acked,
            "last_nack": self.last_nack,
            "connected": self.connected,
        }


@dataclass(frozen=True)
class Nack:
    """One response Envoy rejected: its type, Envoy's error_detail, and what it carried."""

    type_url: str
    message: str
    names: tuple[str, ...]  # the resources of the rejected response (SotW: all of the type)
    version_sent: str
    version_acked: str  # the snapshot version Envoy keeps for this type
    changed: tuple[str, ...] = ()  # of NAMES, those whose version Envoy had not ACKed before


@dataclass
class Plan:
    """One response to send: the resources it carries and what Envoy then has."""

    type_url: str
    upserts: dict[str, str]  # name -> resource version; in SotW every resource of the response
    removals: list[str]  # delta only: removed_resources
    after: dict[str, str]  # what Envoy has once it applies this response
    kept: dict[str, any_pb2.Any] = field(default_factory=dict)  # SotW: resources no longer in
    # the snapshot that stay in a full-state response until the removal phase


@dataclass
class TypeState:
    type_url: str
    sotw: bool
    # Names whose update goes out alone, ahead of the rest of the type, once Envoy holds
    # resources of it (delta only): what others name without Envoy knowing (e.g. a transport
    # socket of a shared cluster), so it is active before what names it (make before break).
    leaders: frozenset[str] = frozenset()
    subscribed: bool = False  # Envoy asked for this type on this stream
    wildcard: bool = False
    named_ever: bool = False  # once Envoy named a resource, an empty list is no wildcard any more
    explicit: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version Envoy was given
    sent_any: dict[str, any_pb2.Any] = field(default_factory=dict)  # full-state: kept on adding
    acked: dict[str, str] = field(default_factory=dict)
    told_absent: set[str] = field(default_factory=set)  # delta: "does not exist" already said
    force: set[str] = field(default_factory=set)  # resend even if Envoy has this version
    respond: bool = False  # the subscription changed: answer even with nothing new
    # Names Envoy should subscribe to soon (EDS after CDS, RDS after LDS): later types wait.
    expect: set[str] = field(default_factory=set)
    expect_since: float | None = None
    # The latest response.
    nonce: str = ""
    sent_at: float | None = None
    answered: bool = True
    timed_out: bool = False
    pending_after: dict[str, str] = field(default_factory=dict)
    push_start: float = 0.0
    version_sent: str = ""
    version_acked: str = ""
    nacked: bool = False
    last_nack: str = ""
    last_ack_time: float | None = None
    upserted: set[str] = field(default_factory=set)  # what the latest response carried
    # Once the stream takes this snapshot, send this type again (the resources of the latest
    # response too), even if unchanged: the proxy wants Envoy's verdict on it.
    resend_with: Snapshot | None = None
    # Delta streams plan in O(changed): outside _unsettled, what Envoy was sent agrees with
    # what _basis (a snapshot planned against) holds for this subscription, and every
    # subscribed name it lacks was told absent. A snapshot that follows _basis adds the names
    # it changed (Snapshot.changes); anything else loses the basis (one full plan rebuilds it).
    _basis: Snapshot | None = None
    _unsettled: set[str] = field(default_factory=set)

    @property
    def full_state(self) -> bool:
        """SotW responses of this type carry every resource; absence means removal."""
        return self.sotw and self.type_url in types.WILDCARD_TYPES

    def interest(self, snapshot: Snapshot) -> Mapping[str, str]:
        """name -> version of the snapshot's resources this subscription covers (read only:
        the snapshot's own map when it covers them all, as it does for every wildcard type
        and mostly for RDS; asked on every plan, so no O(resources) Python loop)."""
        versions = snapshot.versions(self.type_url)
        if self.wildcard or versions.keys() <= self.explicit:
            return versions
        return {n: versions[n] for n in self.explicit & versions.keys()}

    def awaiting(self, now: float, timeout: float) -> bool:
        """The latest response is unanswered (for at most `timeout` seconds)."""
        return not self.answered and self.sent_at is not None and now - self.sent_at < timeout

    def expecting(self, now: float, timeout: float) -> bool:
        """Envoy is yet to subscribe to names its new clusters/listeners use (bounded wait)."""
        if self.expect_since is None:
            return False
        if self.expect <= self.explicit:  # met: a later unsubscribe must not re-arm it
            self.expect_since = None
            return False
        return now - self.expect_since < timeout

    def deadline(self, now: float, timeout: float) -> float | None:
        """When a running awaiting() or expecting() ends by itself."""
        times = []
        if not self.answered and self.sent_at is not None:
            times.append(self.sent_at + timeout)
        if self.expect_since is not None and self.expect - self.explicit:
            times.append(self.expect_since + timeout)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def plan(self, snapshot: Snapshot, removing: bool) -> Plan | None:
        """The next response of this type, or None when Envoy has what it should.

        Adding (removing=False) never withdraws a resource; removing sends only withdrawals.
        """
        if not self.subscribed:
            return None
        if self.sotw:
            return self._plan_sotw(self.interest(snapshot), removing)
        if snapshot is self._basis:
            return self._plan_unsettled(snapshot, removing)
        current = self.interest(snapshot)
        plan = self._plan_delta(current, removing, self._awaited(snapshot))
        self._set_basis(snapshot, current)
        return plan

    def unsettle(self, names: Iterable[str]) -> None:
        """The subscription or what Envoy holds changes for NAMES (a request, a forget)."""
        names = set(names)
        if names:
            self._detach()
            self._unsettled |= names

    def lose_basis(self) -> None:
        """Plan in full next time (a wildcard change, a new stream's initial versions)."""
        self._detach()
        self._basis = None

    def _detach(self) -> None:
        """Before ``sent`` changes in place: ``acked`` and ``pending_after``, which share it
        from the response's plan on (no copies per push), get their own."""
        if self.acked is self.sent:
            self.acked = dict(self.sent)
        if self.pending_after is self.sent:
            self.pending_after = dict(self.sent)

    def _set_basis(self, snapshot: Snapshot, current: Mapping[str, str]) -> None:
        """After a full plan: SNAPSHOT is the basis, the names where Envoy differs from it
        unsettled (O(resources), once per lost basis)."""
        sent = self.sent
        unsettled = {n for n, v in current.items() if sent.get(n) != v}
        unsettled |= sent.keys() - current.keys()
        unsettled |= self.explicit.difference(current.keys(), sent, self.told_absent)
        self._basis, self._unsettled = snapshot, unsettled

    def _covers(self, versions: Mapping[str, str], name: str) -> bool:
        return name in versions and (self.wildcard or name in self.explicit)

    def _settled(self, versions: Mapping[str, str], name: str) -> bool:
        """Envoy was sent what the basis has of NAME (or its removal, or its absence)."""
        if self._covers(versions, name):
            return self.sent.get(name) == versions[name]
        return name not in self.sent and (name not in self.explicit or name in self.told_absent)

    def _leading(self, upserts: dict[str, str]) -> dict[str, str]:
        """UPSERTS, or only the changed leaders among them: the rest go once Envoy ACKed those
        (warmed, see stream.py)."""
        if self.leaders and self.sent and len(upserts) > 1:
            leading = {n: v for n, v in upserts.items() if n in self.leaders}
            if leading and len(leading) < len(upserts):
                return leading
        return upserts

    def _plan_unsettled(self, snapshot: Snapshot, removing: bool) -> Plan | None:
        """_plan_delta against the basis, looking only at the unsettled (and forced) names."""
        versions = snapshot.versions(self.type_url)
        self._unsettled = {n for n in self._unsettled if not self._settled(versions, n)}
        sent = self.sent
        if removing:
            removals = sorted(
                n for n in self._unsettled if n in sent and not self._covers(versions, n)
            )
            if not removals:
                return None
            after = dict(sent)
            for name in removals:
                del after[name]
            return Plan(self.type_url, upserts={}, removals=removals, after=after)
        upserts = {
            n: versions[n]
            for n in self._unsettled | self.force
            if self._covers(versions, n) and (sent.get(n) != versions[n] or n in self.force)
        }
        upserts = self._leading(upserts)
        awaited = self._awaited(snapshot)
        absent = sorted(
            n
            for n in self._unsettled
            if n in self.explicit
            and n not in versions
            and n not in sent
            and n not in self.told_absent
            and n not in awaited
        )
        if not (upserts or absent or self.respond):
            return None
        after = dict(sent)
        after.update(upserts)
        return Plan(self.type_url, upserts=upserts, removals=absent, after=after)

    def _plan_sotw(self, current: Mapping[str, str], removing: bool) -> Plan | None:
        target = dict(current)
        kept: dict[str, any_pb2.Any] = {}
        if self.full_state and not removing:
            for name, version in self.sent.items():
                if name not in target and name in self.sent_any:
                    target[name] = version
                    kept[name] = self.sent_any[name]
        if removing:
            if not self.full_state or target == self.sent:
                return None
        elif not (
            self.respond
            or self.force & set(target)
            or any(self.sent.get(n) != v for n, v in target.items())
        ):
            return None
        return Plan(self.type_url, upserts=target, removals=[], after=dict(target), kept=kept)

    def _awaited(self, snapshot: Snapshot) -> frozenset[str]:
        """Names of this type never told absent with SNAPSHOT (Snapshot.awaited_secrets)."""
        return snapshot.awaited_secrets if self.type_url == types.SECRET else frozenset()

    def _plan_delta(
        self, current: Mapping[str, str], removing: bool, awaited: frozenset[str] = frozenset()
    ) -> Plan | None:
        # Set operations and comparisons of whole maps run at C speed: a plan that finds
        # nothing to send (most of them) walks no resource in Python.
        if removing:
            removals = sorted(self.sent.keys() - current.keys())
            if not removals:
                return None
            after = dict(self.sent)
            for name in removals:
                del after[name]
            return Plan(self.type_url, upserts={}, removals=removals, after=after)
        if current == self.sent:
            upserts = {n: current[n] for n in self.force if n in current}
        else:
            upserts = {n: v for n, v in current.items() if self.sent.get(n) != v or n in self.force}
        upserts = self._leading(upserts)
        absent = sorted(
            self.explicit.difference(current.keys(), self.sent, self.told_absent, awaited)
        )
        if not (upserts or absent or self.respond):
            return None
        after = dict(self.sent)
        after.update(upserts)
        return Plan(self.type_url, upserts=upserts, removals=absent, after=after)

    def on_sent(self, plan: Plan, snapshot: Snapshot, nonce: str, push_start: float) -> None:
        self.upserted = set(plan.upserts)
        self.sent = plan.after  # the plan's own map: shared with pending_after, then acked
        if self.full_state:
            self.sent_any = {
                n: plan.kept[n] if n in plan.kept else snapshot.packed(self.type_url, n)
                for n in plan.upserts
            }
        if not self.sotw:
            self.told_absent |= {n for n in plan.removals if n in self.explicit}
            self.told_absent -= set(plan.upserts)
        self.force -= set(plan.upserts)  # a forced name not subscribed yet waits for it
        self.respond = False
        self.nonce = nonce
        self.sent_at = time.monotonic()
        self.answered = False
        self.timed_out = False
        self.pending_after = self.sent
        self.push_start = push_start
        self.version_sent = snapshot.version
        self.nacked = False

    def take(self, snapshot: Snapshot) -> None:
        """The stream moves to SNAPSHOT: a resend asked for with it is armed now."""
        if self.resend_with is snapshot:
            self.resend_with = None
            self.respond = True
            self.force |= self.upserted
        basis = self._basis
        if basis is not None and basis is not snapshot:
            if snapshot.follows(basis):
                assert snapshot.changes is not None
                self._unsettled.update(snapshot.changes.names.get(self.type_url, ()))
                self._basis = snapshot
            else:
                self._basis = None

    def on_ack(self) -> None:
        self.answered = True
        if self.pending_after is self.sent:  # the usual case: nothing moved since the push
            self.acked = self.sent
        else:
            self.acked = {n: v for n, v in self.pending_after.items() if self.sent.get(n) == v}
        self.version_acked = self.version_sent
        self.last_ack_time = time.time()

    def on_nack(self, message: str) -> None:
        self.answered = True
        self.nacked = True
        self.last_nack = message

    def forget(self, name: str) -> None:
        """Envoy dropped a resource of its own accord (it unsubscribed)."""
        self.unsettle((name,))
        self.sent.pop(name, None)
        self.sent_any.pop(name, None)
        self.acked.pop(name, None)
        self.told_absent.discard(name)

    def status(self, snapshot: Snapshot | None, connected: bool) -> TypeStatus:
        return TypeStatus(
            state=self._state(snapshot),
            version_sent=self.version_sent,
            version_acked=self.version_acked,
            last_nack=self.last_nack,
            connected=connected,
            last_ack_time=self.last_ack_time,
        )

    def _state(self, snapshot: Snapshot | None) -> State:
        if self.nacked:
            return "NACKED"
        if snapshot is None or not self.answered:
            return "STALE"
        if not self.sotw and snapshot is self._basis and self.acked is self.sent:
            # Outside the unsettled names, what Envoy ACKed (= sent) agrees with the basis.
            versions = snapshot.versions(self.type_url)
            for name in self._unsettled:
                wanted = versions[name] if self._covers(versions, name) else None
                if self.acked.get(name) != wanted:
                    return "STALE"
            return "SYNCED"
        desired = self.interest(snapshot)
        if desired == self.acked:  # C speed, the usual case
            return "SYNCED"
        if any(self.acked.get(n) != v for n, v in desired.items()):
            return "STALE"
        # A SotW EDS/RDS name gone from the snapshot is just no longer referenced: Envoy drops it.
        if (self.full_state or not self.sotw) and self.acked.keys() - desired.keys():
            return "STALE"
        return "SYNCED"


def expected_subscriptions(snapshot: Snapshot, type_url: str, names: Mapping[str, str]) -> set[str]:
    """EDS/RDS names Envoy will subscribe to after applying these clusters/listeners."""
    resources = snapshot.of(type_url)
    wanted: set[str] = set()
    for name in names:
        msg = resources.get(name)
        if msg is None:
            continue
        if type_url == types.CLUSTER:
            service = eds_service_name(msg)
            if service is not None:
                wanted.add(service)
        elif type_url == types.LISTENER:
            wanted |= {route for _, route in route_config_names(msg)}
    return wanted
