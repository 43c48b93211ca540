"""The pods this node's agent has been handed, and their capture state, kept across restarts.

Keyed by sandbox (container id). Saved atomically after every change so that an agent that
restarts (or crashes) re-verifies exactly the pods it had captured.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CAPTURED = "captured"
NOT_IN_MESH = "not-in-mesh"
FAILED = "failed"
NETNS_MISSING = "netns-missing"
STATES = (CAPTURED, NOT_IN_MESH, FAILED, NETNS_MISSING)


@dataclass
class PodCapture:
    namespace: str
    name: str
    container_id: str
    netns: str
    uid: str = ""
    ips: list[str] = field(default_factory=list)
    state: str = FAILED
    reason: str = ""
    spec: dict[str, Any] | None = None  # CaptureSpec.to_json() for pods in the mesh
    backend: str = ""
    network: str = ""  # the CNI network (conflist name) the pod was ADDed on: GC is per network
    # Found at agent start (running before the agent, no CNI ADD seen): keyed by pod UID, since
    # the sandbox id is not known.
    discovered: bool = False
    updated: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pods: dict[str, PodCapture] = {}

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        self.pods = {cid: PodCapture(**rec) for cid, rec in raw.get("pods", {}).items()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pods": {k: asdict(v) for k, v in self.pods.items()}}, indent=1))
        os.replace(tmp, self.path)

    def put(self, capture: PodCapture) -> None:
        capture.updated = time.time()
        self.pods[capture.container_id] = capture
        self.save()

    def pop(self, container_id: str) -> PodCapture | None:
        capture = self.pods.pop(container_id, None)
        if capture is not None:
            self.save()
        return capture

    def find(
        self, container_id: str, namespace: str, name: str, uid: str = ""
    ) -> PodCapture | None:
        """By sandbox id; a discovered pod by its UID; by pod name when the runtime gave no id."""
        if container_id in self.pods:
            return self.pods[container_id]
        if uid and self.discovered(uid):
            return self.discovered(uid)
        if container_id:
            return None
        matches = [p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)]
        return matches[-1] if matches else None

    def discovered(self, uid: str) -> PodCapture | None:
        return self.pods.get(discovered_key(uid))


def discovered_key(uid: str) -> str:
    return f"discovered:{uid}"
