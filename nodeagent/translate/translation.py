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
    # Local client namespace -> the route tables whose content changed when it joined the
    # node (its view was added to them). Its pods' first requests use those tables, and Envoy
    # applies RDS after LDS: a pod is ready only once Envoy holds them (proxy.py).
    route_guards: dict[str, frozenset[str]] = field(default_factory=dict)
    # originate-tls sockets the service clusters name (TranslationCache.release_sockets).
    tls_sockets: frozenset[str] = frozenset()
    # What differs from BASE (the resources of the translation before, from the same cache):
    # per type URL, names whose message is not the very same object there. None: not known.
    base: Resources | None = field(default=None, repr=False, compare=False)
    changed: dict[str, set[str]] | None = field(default=None, repr=False, compare=False)

    _objects: frozenset[Origin] | None = field(default=None, init=False, repr=False, compare=False)

    def objects(self) -> frozenset[Origin]:
        """Every object something was made from. Computed once: a translation handed out is
        never changed, and this is asked on each ACK (O(resources) at 5000 services)."""
        if self._objects is None:
            self._objects = frozenset(self.origins.values()) | frozenset(self.chains.values())
        return self._objects
