"""Which pods are in the mesh (pure): nodeagent's own label and Istio's, most specific first.

Never, whatever the labels say: host-network pods, pods in an excluded namespace (kube-system by
default, as istio-cni's ``excludeNamespaces``), and pods that already run Istio's own sidecar
(annotation ``sidecar.istio.io/status``, as Istio's ambient mode leaves them alone).

Then the pod decides, opt-outs first:
1. ``nodeagent.io/mesh=disabled`` (annotation or label) -> out; label ``enabled`` -> in.
2. Istio's sidecar injection key ``sidecar.istio.io/inject`` (label, else the older annotation;
   the label wins, as in istio-cni): ``"false"`` -> out; ``"true"`` -> in unless the namespace
   says ``istio-injection=disabled`` (Istio: "If either label is disabled, the pod is not
   injected").
3. Istio's ambient label ``istio.io/dataplane-mode``: ``none`` -> out, ``ambient`` -> in (the
   pod's label has precedence over its namespace's).
Then the namespace:
4. ``nodeagent.io/mesh``: ``enabled`` -> in, ``disabled`` -> out.
5. ``istio-injection``: ``disabled`` -> out, ``enabled`` -> in (sidecar injection takes
   precedence over ambient when both are set, as in Istio).
6. ``istio.io/dataplane-mode``: ``none`` -> out, ``ambient`` -> in.
Otherwise out (Istio's ``enableNamespacesByDefault`` is off by default).

Sources: istio.io "Installing the Sidecar" > "Controlling the injection policy"; istio.io
"Add workloads to the mesh" (ambient) > "Pod selection logic" and "Label reference".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from nodeagent.mesh.model import Namespace, Pod

MESH_KEY = "nodeagent.io/mesh"
ENABLED, DISABLED = "enabled", "disabled"
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)

# Istio's keys (istio.io/api label and annotation names).
INJECTION_LABEL = "istio-injection"  # namespace: enabled | disabled
SIDECAR_INJECT = "sidecar.istio.io/inject"  # pod label (or annotation): "true" | "false"
SIDECAR_STATUS = "sidecar.istio.io/status"  # set by Istio's injector on pods it gave a sidecar
DATAPLANE_MODE = "istio.io/dataplane-mode"  # namespace or pod: ambient | none
AMBIENT, NONE = "ambient", "none"
# The pod annotations decide() reads: a source that trims pods must keep these.
POD_ANNOTATIONS = (MESH_KEY, SIDECAR_INJECT, SIDECAR_STATUS)

# The spellings Go's strconv.ParseBool accepts, which Istio uses for sidecar.istio.io/inject.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True)
class Membership:
    in_mesh: bool
    reason: str


def decide(
    pod: Pod, namespace: Namespace | None, excluded_namespaces: Collection[str]
) -> Membership:
    ns_labels: Mapping[str, str] = namespace.labels if namespace is not None else {}
    if pod.host_network:
        return Membership(False, "host-network pod")
    if pod.namespace in excluded_namespaces:
        return Membership(False, f"namespace {pod.namespace} is excluded from the mesh")
    if SIDECAR_STATUS in pod.annotations:
        return Membership(False, f"pod runs Istio's own sidecar (annotation {SIDECAR_STATUS})")

    # The pod's own say.
    if pod.annotations.get(MESH_KEY) == DISABLED or pod.labels.get(MESH_KEY) == DISABLED:
        return Membership(False, f"pod opts out with {MESH_KEY}={DISABLED}")
    if pod.labels.get(MESH_KEY) == ENABLED:
        return Membership(True, f"pod label {MESH_KEY}={ENABLED}")
    inject, where = _sidecar_inject(pod)
    if inject is False:
        return Membership(False, f"pod opts out with {where} {SIDECAR_INJECT}=false")
    if inject is True:
        if ns_labels.get(INJECTION_LABEL) == DISABLED:
            return Membership(
                False,
                f"namespace label {INJECTION_LABEL}={DISABLED} overrides pod {where} "
                f"{SIDECAR_INJECT}=true",
            )
        return Membership(True, f"pod {where} {SIDECAR_INJECT}=true")
    mode = pod.labels.get(DATAPLANE_MODE)
    if mode == NONE:
        return Membership(False, f"pod opts out with label {DATAPLANE_MODE}={NONE}")
    if mode == AMBIENT:
        return Membership(True, f"pod label {DATAPLANE_MODE}={AMBIENT}")

    # Its namespace's.
    for key, yes, no in (
        (MESH_KEY, ENABLED, DISABLED),
        (INJECTION_LABEL, ENABLED, DISABLED),
        (DATAPLANE_MODE, AMBIENT, NONE),
    ):
        value = ns_labels.get(key)
        if value == yes:
            return Membership(True, f"namespace label {key}={yes}")
        if value == no:
            return Membership(False, f"namespace label {key}={no}")
    return Membership(
        False,
        f"no mesh label on pod or namespace ({MESH_KEY}=enabled, {INJECTION_LABEL}=enabled, "
        f"{DATAPLANE_MODE}=ambient)",
    )


def _sidecar_inject(pod: Pod) -> tuple[bool | None, str]:
    """sidecar.istio.io/inject as a bool (None: unset or not a bool) and where it was found."""
    if SIDECAR_INJECT in pod.labels:
        raw, where = pod.labels[SIDECAR_INJECT], "label"
    elif SIDECAR_INJECT in pod.annotations:
        raw, where = pod.annotations[SIDECAR_INJECT], "annotation"
    else:
        return None, ""
    if raw in _TRUE:
        return True, where
    if raw in _FALSE:
        return False, where
    return None, where
