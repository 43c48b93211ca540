"""Incremental ADS (DeltaAggregatedResources): only changed resources, explicit removals."""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot
from nodeagent.xds.state import Plan, TypeState
from nodeagent.xds.stream import AdsStream


class DeltaStream(AdsStream):
    sotw = False
    kind = "delta"

    def _apply(self, request: Any, state: TypeState) -> None:
        nonce: str = request.response_nonce
        if nonce:
            error = request.error_detail if request.HasField("error_detail") else None
            # A stale nonce only voids the ACK/NACK: subscription changes still count (the
            # protocol says so for delta, where they are not repeated in later requests).
            self._reply(state, nonce, error)
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        if not state.subscribed:
            state.subscribed = True
            state.respond = True  # even "nothing yet" ends Envoy's initial fetch wait
            # Resources Envoy kept from an earlier stream: not sent again unless changed.
            state.lose_basis()
            for name, version in request.initial_resource_versions.items():
                state.sent[name] = version
                state.acked[name] = version
            if not subscribe and not unsubscribe and state.type_url in types.WILDCARD_TYPES:
                state.wildcard = True
            first = True
        else:
            first = False
        if "*" in subscribe or "*" in unsubscribe:
            state.lose_basis()
        state.unsettle(n for n in (*subscribe, *unsubscribe) if n != "*")
        for name in subscribe:
            if name == "*":
                state.wildcard = True
                state.respond = True
                continue
            if not first:
                state.sent.pop(name, None)  # asked again: Envoy may have forgotten it
            state.explicit.add(name)
            state.told_absent.discard(name)
        for name in unsubscribe:
            if name == "*":
                state.wildcard = False
                for gone in set(state.sent) - state.explicit:
                    state.forget(gone)
                continue
            state.explicit.discard(name)
            if state.wildcard:
                state.force.add(name)  # still covered by "*": Envoy needs to know it stays
            else:
                state.forget(name)

    def _response(self, plan: Plan, snapshot: Snapshot, nonce: str) -> Any:
        resources = [
            discovery_pb2.Resource(
                name=name, version=version, resource=snapshot.packed(plan.type_url, name)
            )
            for name, version in sorted(plan.upserts.items())
        ]
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snapshot.version,
            resources=resources,
            type_url=plan.type_url,
            removed_resources=plan.removals,
            nonce=nonce,
        )
