"""Which pods are in the mesh (pure).

In: a pod or namespace label ``nodeagent.io/mesh=enabled``.
Out, whatever the labels say: host-network pods, pods in an excluded namespace (kube-system by
default), pods with the annotation (or label) ``nodeagent.io/mesh=disabled``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from nodeagent.mesh.model import Namespace, Pod

MESH_KEY = "nodeagent.io/mesh"
ENABLED, DISABLED = "enabled", "disabled"
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)


@dataclass(frozen=True)
class Membership:
    in_mesh: bool
    reason: str


def decide(
    pod: Pod, namespace: Namespace | None, excluded_namespaces: Collection[str]
) -> Membership:
    if pod.host_network:
        return Membership(False, "host-network pod")
    if pod.namespace in excluded_namespaces:
        return Membership(False, f"namespace {pod.namespace} is excluded from the mesh")
    if pod.annotations.get(MESH_KEY) == DISABLED or pod.labels.get(MESH_KEY) == DISABLED:
        return Membership(False, f"pod opts out with {MESH_KEY}={DISABLED}")
    if pod.labels.get(MESH_KEY) == ENABLED:
        return Membership(True, f"pod label {MESH_KEY}={ENABLED}")
    if namespace is not None and namespace.labels.get(MESH_KEY) == ENABLED:
        return Membership(True, f"namespace label {MESH_KEY}={ENABLED}")
    return Membership(False, f"neither pod nor namespace is labelled {MESH_KEY}={ENABLED}")
