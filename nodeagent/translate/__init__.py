"""MeshStore + the node's captured pods -> the node Envoy's resources (pure: no I/O).

Per local pod: its two listeners. Per local identity (service account with a pod here): the
clusters and routes its pods use, which present that identity's certificate (mTLS). Shared by
everyone: endpoints. Nothing is generated for pods on other nodes, and only local identities'
secrets are included.

The sidecar form (``sidecar=True``, the sidecar model of the benchmarks): exactly one pod, whose
own Envoy runs inside its netns. The same clusters, routes, endpoints and TLS, but listeners bound
plainly where that Envoy runs, no netns stamp or upstream bind override (nor mark: the capture
rules skip the proxy's uid), inbound delivery from 127.0.0.6 as Istio's sidecars do, and only
that pod's identity among the secrets.

One bad object stays contained: an error while translating one Service or one pod drops that
object's resources only (named in ``Translation.problems``), and objects the caller excludes
(``excluded``: e.g. ones Envoy rejected) are left out. A left-out Service's VIP:port goes to the
black hole, not through the passthrough: its traffic fails closed.

One pure builder per output: ``clusters``, ``endpoints``, ``routes``, ``listeners`` (over
``services``' targets and ``tls``/``filters``); ``cache`` composes them per origin and recomputes
only what a change touched (``TranslationCache``, what the node proxy keeps); ``build`` here is a
fresh, full translation.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from google.protobuf.message import Message

from nodeagent.mesh.membership import DEFAULT_EXCLUDED_NAMESPACES
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate.cache import TranslationCache
from nodeagent.translate.listeners import inbound_name, outbound_name
from nodeagent.translate.services import BLACKHOLE
from nodeagent.translate.translation import POD, SERVICE, LocalPod, Origin, Resources, Translation


def translate(
    store: MeshStore,
    local_pods: Sequence[LocalPod],
    secrets: Sequence[Message] = (),
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
    sidecar: bool = False,
) -> Resources:
    return build(store, local_pods, secrets, excluded_namespaces, sidecar).resources


def build(
    store: MeshStore,
    local_pods: Sequence[LocalPod],
    secrets: Sequence[Message] = (),
    excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
    sidecar: bool = False,
    excluded: Collection[Origin] = (),
) -> Translation:
    """A full translation of the current view (a ``TranslationCache`` keeps one up to date)."""
    return TranslationCache().build(
        store, local_pods, secrets, excluded_namespaces, sidecar, excluded
    )


def pod_listener_names(namespace: str, name: str) -> tuple[str, str]:
    """The listeners every local pod has on the node: outbound and inbound. (Its fast-path
    listener, ``internal.fast_name``, exists only when a service names one of its ports.)"""
    pod = Pod(namespace, name)
    return outbound_name(pod), inbound_name(pod)


__all__ = [
    "BLACKHOLE",
    "POD",
    "SERVICE",
    "LocalPod",
    "Origin",
    "Resources",
    "Translation",
    "TranslationCache",
    "build",
    "pod_listener_names",
    "translate",
]
