"""Which pods join the mesh: the rules a platform team labels and annotates by."""

import pytest

from nodeagent.mesh.membership import decide
from nodeagent.mesh.model import Namespace, Pod

ENABLED_NS = Namespace("shop", {"nodeagent.io/mesh": "enabled"})
PLAIN_NS = Namespace("shop", {})


@pytest.mark.parametrize(
    ("pod", "namespace", "in_mesh", "words"),
    [
        (Pod("shop", "a"), ENABLED_NS, True, "namespace label"),
        (Pod("shop", "a", labels={"nodeagent.io/mesh": "enabled"}), PLAIN_NS, True, "pod label"),
        (Pod("shop", "a"), PLAIN_NS, False, "no mesh label"),
        (Pod("shop", "a"), None, False, "no mesh label"),
        (
            Pod("shop", "a", annotations={"nodeagent.io/mesh": "disabled"}),
            ENABLED_NS,
            False,
            "opts out",
        ),
        (
            Pod("shop", "a", labels={"nodeagent.io/mesh": "enabled"}, host_network=True),
            ENABLED_NS,
            False,
            "host-network",
        ),
        (
            Pod("kube-system", "dns", labels={"nodeagent.io/mesh": "enabled"}),
            Namespace("kube-system", {"nodeagent.io/mesh": "enabled"}),
            False,
            "excluded",
        ),
    ],
)
def test_membership(pod: Pod, namespace: Namespace | None, in_mesh: bool, words: str) -> None:
    decision = decide(pod, namespace, ("kube-system",))
    assert decision.in_mesh is in_mesh
    assert words in decision.reason


SIDECAR_PAGE = "istio.io: Installing the Sidecar > Controlling the injection policy"
AMBIENT_PAGE = (
    "istio.io: ambient > Add workloads to the mesh > Pod selection logic, Label reference"
)


@pytest.mark.parametrize(
    ("pod_labels", "pod_annotations", "ns_labels", "in_mesh", "words"),
    [
        # Sidecar injection keys (SIDECAR_PAGE): either disabled -> out; either enabled -> in.
        ({}, {}, {"istio-injection": "enabled"}, True, "namespace label istio-injection=enabled"),
        ({}, {}, {"istio-injection": "disabled"}, False, "istio-injection=disabled"),
        ({"sidecar.istio.io/inject": "true"}, {}, {}, True, "pod label sidecar.istio.io/inject"),
        ({}, {"sidecar.istio.io/inject": "true"}, {}, True, "annotation sidecar.istio.io/inject"),
        (
            {"sidecar.istio.io/inject": "false"},
            {},
            {"istio-injection": "enabled"},
            False,
            "opts out",
        ),
        (
            {},
            {"sidecar.istio.io/inject": "false"},
            {"istio-injection": "enabled"},
            False,
            "opts out",
        ),
        # "If either label is disabled, the pod is not injected": the namespace's disabled wins.
        (
            {"sidecar.istio.io/inject": "true"},
            {},
            {"istio-injection": "disabled"},
            False,
            "overrides",
        ),
        # The label is the newer API and wins over the annotation (istio-cni's plugin does so).
        (
            {"sidecar.istio.io/inject": "true"},
            {"sidecar.istio.io/inject": "false"},
            {},
            True,
            "pod label sidecar.istio.io/inject=true",
        ),
        # Not a bool: ignored, as strconv.ParseBool fails in Istio.
        ({"sidecar.istio.io/inject": "maybe"}, {}, {}, False, "no mesh label"),
        # Ambient (AMBIENT_PAGE): namespace or pod, the pod's label has precedence.
        ({}, {}, {"istio.io/dataplane-mode": "ambient"}, True, "istio.io/dataplane-mode=ambient"),
        ({"istio.io/dataplane-mode": "ambient"}, {}, {}, True, "pod label istio.io/dataplane-mode"),
        (
            {"istio.io/dataplane-mode": "none"},
            {},
            {"istio.io/dataplane-mode": "ambient"},
            False,
            "istio.io/dataplane-mode=none",
        ),
        (
            {"istio.io/dataplane-mode": "ambient"},
            {},
            {"istio.io/dataplane-mode": "none"},
            True,
            "pod label",
        ),
        ({}, {}, {"istio.io/dataplane-mode": "none"}, False, "namespace label"),
        # A pod Istio already gave a sidecar is not captured twice (AMBIENT_PAGE).
        (
            {},
            {"sidecar.istio.io/status": "{}"},
            {"istio.io/dataplane-mode": "ambient"},
            False,
            "own sidecar",
        ),
        # Both modes on one namespace: sidecar injection takes precedence (AMBIENT_PAGE).
        (
            {},
            {},
            {"istio-injection": "disabled", "istio.io/dataplane-mode": "ambient"},
            False,
            "istio-injection=disabled",
        ),
        # nodeagent's own key comes first, on the pod and on the namespace.
        (
            {"nodeagent.io/mesh": "enabled"},
            {},
            {"istio-injection": "disabled"},
            True,
            "pod label nodeagent.io/mesh",
        ),
        (
            {"istio.io/dataplane-mode": "ambient"},
            {"nodeagent.io/mesh": "disabled"},
            {},
            False,
            "nodeagent.io/mesh=disabled",
        ),
        (
            {},
            {},
            {"nodeagent.io/mesh": "disabled", "istio-injection": "enabled"},
            False,
            "nodeagent.io/mesh=disabled",
        ),
    ],
)
def test_istio_labels(
    pod_labels: dict[str, str],
    pod_annotations: dict[str, str],
    ns_labels: dict[str, str],
    in_mesh: bool,
    words: str,
) -> None:
    """Istio's own membership keys, with the precedence of SIDECAR_PAGE and AMBIENT_PAGE."""
    pod = Pod("shop", "a", labels=pod_labels, annotations=pod_annotations)
    decision = decide(pod, Namespace("shop", ns_labels), ("kube-system",))
    assert (decision.in_mesh, words in decision.reason) == (in_mesh, True), decision
