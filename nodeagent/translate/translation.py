"""What a translation yields: the resources, the object each came from, and what failed."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import Message

from nodeagent.mesh.model import Pod
from nodeagent.translate.services import Identity

Resources = dict[str, dict[str, Message]]

SERVICE, POD = "Service", "Pod"


@dataclass(frozen=True, order=True)
class Origin:
    """The Kubernetes object a resource (or a filter chain) was made from."""

    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"


@dataclass(frozen=True)
class LocalPod:
    """A pod on this node whose traffic is captured, and where its network namespace is."""

    pod: Pod
    netns: str

    @property
    def identity(self) -> Identity:
        return (self.pod.namespace, self.pod.service_account)


@dataclass
class Translation:
    """The resources, what each came from, and the objects that could not be translated."""

    resources: Resources
    # (type URL, resource name) -> the one object it was made from (shared ones are absent).
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    # Listener filter chain name -> the object it was made from (services' outbound chains).
    chains: dict[str, Origin] = field(default_factory=dict)
    # Objects whose translation raised, dropped from the resources: why.
    problems: dict[Origin, str] = field(default_factory=dict)

    def objects(self) -> set[Origin]:
        return set(self.origins.values()) | set(self.chains.values())
