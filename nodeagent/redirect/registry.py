"""The pods this node's agent has been handed, and their capture state, kept across restarts.

Keyed by sandbox (container id). One small file per pod in the registry's directory, replaced
atomically (write aside, rename) on every change of that pod and unlinked when it goes: a change
costs what it touches, however many pods the node runs, and an agent that restarts (or crashes)
re-verifies exactly the pods it had captured. A record whose content did not change is not
written again. The older single-file registry (``pods.json`` beside the directory) is read once
and migrated.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

log = logging.getLogger("nodeagent.capture")

CAPTURED = "captured"
NOT_IN_MESH = "not-in-mesh"
FAILED = "failed"
NETNS_MISSING = "netns-missing"
STATES = (CAPTURED, NOT_IN_MESH, FAILED, NETNS_MISSING)

RECORD = ".json"  # a pod's file: its quoted sandbox id, then this
_ASIDE = ".tmp"  # being written; never read


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
    """The records, in memory (``pods``) and in DIRECTORY, one file per sandbox."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pods: dict[str, PodCapture] = {}
        self._written: dict[str, str] = {}  # sandbox id -> its file's content, less `updated`

    @property
    def legacy(self) -> Path:
        """The single-file registry of earlier versions: ``pods.json`` beside the directory."""
        return self.directory.with_name(self.directory.name + ".json")

    def exists(self) -> bool:
        """Whether anything of the registry is on disk."""
        return self.legacy.exists() or self.directory.exists()

    def load(self) -> None:
        """Read every record; a record that cannot be read is logged (naming its file) and
        left out. A legacy single file is migrated: its records are written out one per pod
        (those the directory already has are newer), then it is removed."""
        self.pods = {}
        self._written = {}
        found = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.endswith(_ASIDE):
                    path.unlink(missing_ok=True)  # a write the agent did not finish
                elif path.name.endswith(RECORD):
                    capture = _read(path)
                    if capture is not None:
                        found.append(capture)
        for capture in sorted(found, key=lambda c: c.updated):  # oldest first, as they came
            self.pods[capture.container_id] = capture
            self._written[capture.container_id] = _content(capture)
        if self.legacy.exists():
            self._migrate()

    def _migrate(self) -> None:
        try:
            raw = json.loads(self.legacy.read_text())
            records = {cid: PodCapture(**rec) for cid, rec in raw.get("pods", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.error(
                "pod registry %s is unreadable (%s): its pods are not re-verified; moved to %s.bad",
                self.legacy,
                e,
                self.legacy,
            )
            os.replace(self.legacy, self.legacy.with_name(self.legacy.name + ".bad"))
            return
        for cid, capture in records.items():
            if cid not in self.pods:
                self.pods[cid] = capture
                self._write(capture)
        self.legacy.unlink()
        log.info(
            "pod registry %s migrated to one file per pod in %s (%d pods)",
            self.legacy,
            self.directory,
            len(records),
        )

    def put(self, capture: PodCapture) -> None:
        self.pods[capture.container_id] = capture
        if self._written.get(capture.container_id) != _content(capture):
            capture.updated = time.time()
            self._write(capture)

    def pop(self, container_id: str) -> PodCapture | None:
        capture = self.pods.pop(container_id, None)
        if capture is not None:
            self._written.pop(container_id, None)
            self._file(container_id).unlink(missing_ok=True)
        return capture

    def remove(self) -> None:
        """Delete what is left on disk (uninstall, once every pod was let go)."""
        for cid in list(self.pods):
            self.pop(cid)
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                path.unlink()
            self.directory.rmdir()
        self.legacy.unlink(missing_ok=True)

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

    def _file(self, container_id: str) -> Path:
        # Sandbox ids are the runtime's: quoted so that none can name a path outside.
        return self.directory / (quote(container_id, safe="") + RECORD)

    def _write(self, capture: PodCapture) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._file(capture.container_id)
        aside = path.with_name(path.name + _ASIDE)
        aside.write_text(json.dumps(asdict(capture)))
        os.replace(aside, path)  # atomic: a crash leaves the old record or the new one
        self._written[capture.container_id] = _content(capture)


def read_records(directory: Path) -> list[PodCapture]:
    """The records in DIRECTORY, read only (``nodeagent doctor``, beside a running agent: a
    record being written aside is neither read nor removed)."""
    if not directory.is_dir():
        return []
    found = [_read(p) for p in sorted(directory.iterdir()) if p.name.endswith(RECORD)]
    return sorted((c for c in found if c is not None), key=lambda c: c.key)


def _content(capture: PodCapture) -> str:
    """What a record says, its time of writing aside (a no-op change writes nothing)."""
    record = asdict(capture)
    del record["updated"]
    return json.dumps(record, sort_keys=True)


def _read(path: Path) -> PodCapture | None:
    try:
        capture = PodCapture(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        log.error("pod registry record %s is unreadable, left out: %s", path, e)
        return None
    expected = unquote(path.name.removesuffix(RECORD))
    if capture.container_id != expected:
        log.error(
            "pod registry record %s is of sandbox %r, not %r: left out",
            path,
            capture.container_id,
            expected,
        )
        return None
    return capture


def discovered_key(uid: str) -> str:
    return f"discovered:{uid}"
