"""The testbed's state file: an intent log of everything ``up`` creates.

Each namespace, file and process is recorded *before* it is created and the file is replaced
atomically, so after a crash at any point ``down`` still knows everything there is to remove.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OWNER_ENV = "NODEAGENT_TESTBED_OWNER"
RUN_DIR = Path(os.environ.get("NODEAGENT_TESTBED_RUN_DIR", "/run/nodeagent/testbed"))


@dataclass
class PodRecord:
    netns: str
    node: str
    container_id: str
    uid: str
    ip: str = ""
    pid: int | None = None
    start_time: int | None = None
    labels: dict[str, str] = field(default_factory=dict)  # endpoints follow them
    ready: bool = False  # an endpoint only once its workload is ready, as in Kubernetes
    service_account: str = "default"
    # Wall seconds of the pod network's CNI ADD (the runtime's call for the whole chain).
    cni_add_seconds: float = 0.0


@dataclass
class DaemonRecord:
    """A node-level process (the node agent, install-cni, the node's Envoy with envoyContainer)
    or, with node "", a control-plane one (the stand-in API server, the CA service)."""

    node: str
    name: str
    pid: int
    start_time: int | None
    address: str = ""  # the CA's underlay IP (its monitoring port answers /ready there)


@dataclass
class TestbedState:
    name: str
    topology_source: str
    topology_text: str
    phase: str = "creating"  # creating -> up
    netns: list[str] = field(default_factory=list)
    etc_dirs: list[str] = field(default_factory=list)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    daemons: list[DaemonRecord] = field(default_factory=list)
    # Services changed or added after `up` (set_service), in topology form, by namespace/name.
    service_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The testbed's cgroup folder (pods' cgroups, as kubelet's, are below it).
    cgroup: str = ""
    # nodeagent installed on a running testbed (`testbed install`), after its pods were created.
    installed_later: bool = False
    # Who brought it up (NODEAGENT_TESTBED_OWNER): a test run cleans up only its own testbeds.
    owner: str = field(default_factory=lambda: os.environ.get(OWNER_ENV, ""))

    @staticmethod
    def directory(name: str) -> Path:
        return RUN_DIR / name

    @property
    def path(self) -> Path:
        return self.directory(self.name) / "state.json"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, name: str) -> TestbedState | None:
        try:
            raw: dict[str, Any] = json.loads((cls.directory(name) / "state.json").read_text())
        except FileNotFoundError:
            return None
        pods = {k: PodRecord(**v) for k, v in raw.pop("pods", {}).items()}
        daemons = [DaemonRecord(**d) for d in raw.pop("daemons", [])]
        return cls(pods=pods, daemons=daemons, **raw)


def known_testbeds() -> list[str]:
    if not RUN_DIR.is_dir():
        return []
    return sorted(d.name for d in RUN_DIR.iterdir() if (d / "state.json").exists())
