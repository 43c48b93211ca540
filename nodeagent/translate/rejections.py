"""Which Kubernetes object a config that Envoy rejected (NACK) came from (pure).

Envoy's error_detail names what it rejected: ``Error adding/updating listener(s) NAME: why``
(one line per listener or cluster), and for clashing filter chains ``filter chain 'A' has the same
matching rules defined as 'B'``. Names lead to objects through the Translation that made them.
Of several suspects, those Envoy did not already hold (not in the config it keeps) are the
change it rejected; what it accepted before stays served.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from nodeagent.translate import Origin, Translation
from nodeagent.xds.state import Nack

# "filter chain 'A' has the same matching rules defined as 'B'": both are suspects.
_CHAIN = re.compile(r"(?:filter chain|defined as) '([^']+)'")


def rejected_part(message: str, name: str) -> str:
    """The line of MESSAGE about resource NAME (Envoy writes one per rejected resource)."""
    for line in message.splitlines():
        if name in line:
            return line.strip()
    return message.strip().splitlines()[0] if message.strip() else ""


def culprits(
    nack: Nack, translation: Translation, accepted: Collection[Origin]
) -> dict[Origin, str]:
    """Object -> the part of Envoy's message about it; empty when the message names none of
    the resources Envoy was sent."""
    found: dict[Origin, str] = {}
    for chain in _CHAIN.findall(nack.message):
        origin = translation.chains.get(chain)
        if origin is not None:
            found.setdefault(origin, rejected_part(nack.message, chain))
    if not found:  # no service's filter chain named: the resource itself is the culprit
        for name in nack.names:
            origin = translation.origins.get((nack.type_url, name))
            if origin is not None and re.search(rf"(^|\s|'){re.escape(name)}(:|')", nack.message):
                found.setdefault(origin, rejected_part(nack.message, name))
    new = {origin: why for origin, why in found.items() if origin not in accepted}
    return new or found


@dataclass
class Bisection:
    """Find the one object behind a NACK whose message names none: leave half the suspects out
    of a trial push and see whether Envoy takes it (then the culprit was in that half) or not
    (then it is among the rest), until one is left. Each step is one push and one answer."""

    type_url: str
    message: str  # Envoy's error, for the report
    suspects: list[Origin]
    trial: list[Origin] = field(default_factory=list)  # left out of the current trial push
    version: str = ""  # the snapshot version of the trial push, once pushed

    def __post_init__(self) -> None:
        self.trial = self.suspects[: len(self.suspects) // 2]

    def step(self, accepted: bool) -> Origin | None:
        """Envoy's verdict on the trial push; the culprit once it is found."""
        left = set(self.trial)
        self.suspects = [o for o in self.suspects if (o in left) == accepted]
        self.version = ""
        if len(self.suspects) == 1:
            return self.suspects[0]
        self.trial = self.suspects[: len(self.suspects) // 2]
        return None

    def answers(self, version: str) -> bool:
        """An answer about VERSION is a verdict on the trial (or a later push with it)."""
        return bool(self.version) and int(version or 0) >= int(self.version)
