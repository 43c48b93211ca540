"""State-of-the-world ADS (StreamAggregatedResources): full resource lists, one version per type."""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot
from nodeagent.xds.state import Plan, TypeState
from nodeagent.xds.stream import AdsStream


class SotwStream(AdsStream):
    sotw = True
    kind = "sotw"

    def _apply(self, request: Any, state: TypeState) -> None:
        nonce: str = request.response_nonce
        if nonce:
            error = request.error_detail if request.HasField("error_detail") else None
            if not self._reply(state, nonce, error):
                return  # stale: a newer response is on its way, and its ACK will carry the names
        names = set(request.resource_names)
        first = not state.subscribed
        state.subscribed = True
        if names:
            state.named_ever = True
        # An empty list is a wildcard only until Envoy first names a resource (legacy semantics).
        wildcard = "*" in names or (
            not names and not state.named_ever and state.type_url in types.WILDCARD_TYPES
        )
        explicit = names - {"*"}
        if first or not nonce or wildcard != state.wildcard:
            state.respond = True
        # Newly requested names are sent again even if Envoy was given them before; dropping a
        # name needs no answer.
        state.force |= explicit - state.explicit
        if not wildcard:
            for name in set(state.sent) - explicit:
                state.forget(name)
        state.wildcard = wildcard
        state.explicit = explicit

    def _response(self, plan: Plan, snapshot: Snapshot, nonce: str) -> Any:
        resources = [
            plan.kept[name] if name in plan.kept else snapshot.packed(plan.type_url, name)
            for name in sorted(plan.upserts)
        ]
        return discovery_pb2.DiscoveryResponse(
            version_info=snapshot.version,
            resources=resources,
            type_url=plan.type_url,
            nonce=nonce,
        )
