"""Traffic capture inside pod network namespaces: one interface, nftables or eBPF behind it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nodeagent.redirect.capture import CaptureSpec


@dataclass(frozen=True)
class CaptureCheck:
    """The outcome of verifying a pod's capture: ``ok``, or why not (missing, altered...)."""

    ok: bool
    reason: str = ""


class RedirectBackend(Protocol):
    """Installs, checks and removes one pod's capture. Blocking calls: run them in a thread.

    Every method enters the pod's network namespace (``netns`` is a path such as
    /run/netns/x or /proc/PID/ns/net) only on the calling thread, and leaves it before returning.
    ``uid`` is the pod's UID: eBPF capture finds the pod's cgroup by it (nftables needs none).
    """

    name: str

    def apply(self, netns: Path, spec: CaptureSpec, uid: str = "") -> None:
        """Install capture atomically; applying twice yields the same rules."""

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        """Whether the pod holds exactly the capture ``spec`` asks for (stateless)."""

    def remove(self, netns: Path, uid: str = "") -> None:
        """Remove the pod's capture; no error when there is none."""
