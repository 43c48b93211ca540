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
        (Pod("shop", "a"), PLAIN_NS, False, "neither pod nor namespace"),
        (Pod("shop", "a"), None, False, "neither pod nor namespace"),
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
