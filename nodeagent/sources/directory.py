"""A directory of Kubernetes YAML as the agent's source (standalone nodes and the testbed).

Every ``*.yaml``/``*.yml``/``*.json`` file may hold several documents. Changes are picked up by
polling (modification time, size, inode) and applied to the MeshStore as a diff, so a file that
changes touches only what it holds. A bad document is reported with file, document index, kind,
namespace/name and field; every other resource keeps working.

Kinds read so far: Namespace, Pod. Other kinds are left for the modules that need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.mesh.model import Namespace, Pod
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.sources.directory")

SUFFIXES = (".yaml", ".yml", ".json")
Record = Namespace | Pod


class ResourceError(ValueError):
    """A document that cannot be used; the message says where and what."""


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


def _where(source: str, index: int, doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or "<unnamed>")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{source}: document {index}: {doc.get('kind', '?')} {name}"


def _string_map(value: Any, where: str, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ResourceError(f"{where}: {field}: expected a mapping of strings")
    return {k: str(v) for k, v in value.items()}


def _name(meta: Mapping[str, Any], where: str, field: str) -> str:
    value = meta.get(field)
    if not isinstance(value, str) or not value:
        raise ResourceError(f"{where}: metadata.{field}: required string is missing")
    return value


def parse_document(doc: Any, source: str, index: int) -> Record | None:
    """One YAML document to a record; None for kinds this source does not read."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ResourceError(f"{source}: document {index}: expected a mapping")
    where = _where(source, index, doc)
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api, str):
        raise ResourceError(f"{where}: apiVersion and kind are required")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ResourceError(f"{where}: metadata: required mapping is missing")
    if kind == "Namespace" and api == "v1":
        return Namespace(
            _name(meta, where, "name"), _string_map(meta.get("labels"), where, "metadata.labels")
        )
    if kind == "Pod" and api == "v1":
        spec = doc.get("spec") or {}
        status = doc.get("status") or {}
        if not isinstance(spec, dict) or not isinstance(status, dict):
            raise ResourceError(f"{where}: spec and status must be mappings")
        ips = [
            str(i.get("ip"))
            for i in status.get("podIPs") or []
            if isinstance(i, dict) and i.get("ip")
        ]
        if not ips and status.get("podIP"):
            ips = [str(status["podIP"])]
        return Pod(
            namespace=str(meta.get("namespace") or "default"),
            name=_name(meta, where, "name"),
            uid=str(meta.get("uid") or ""),
            node_name=str(spec.get("nodeName") or ""),
            service_account=str(spec.get("serviceAccountName") or "default"),
            labels=_string_map(meta.get("labels"), where, "metadata.labels"),
            annotations=_string_map(meta.get("annotations"), where, "metadata.annotations"),
            host_network=bool(spec.get("hostNetwork", False)),
            pod_ips=tuple(ips),
        )
    return None


def _key(record: Record) -> tuple[str, str]:
    return ("Namespace", record.name) if isinstance(record, Namespace) else ("Pod", record.key)


class DirectorySource:
    def __init__(self, root: Path, store: MeshStore, interval: float = 0.2) -> None:
        self.root = root
        self.store = store
        self.interval = interval
        self.errors: dict[Path, list[str]] = {}  # current problems, per file
        self._stamps: dict[Path, _FileStamp] = {}
        self._records: dict[Path, dict[tuple[str, str], Record]] = {}

    def scan(self) -> bool:
        """One pass over the directory; applies what changed. True if anything did."""
        current = self._list_files()
        changed = False
        for path in list(self._records):
            if path not in current:
                del self._records[path], self._stamps[path]
                self.errors.pop(path, None)
                changed = True
        for path, stamp in current.items():
            if self._stamps.get(path) != stamp:
                self._stamps[path] = stamp
                self._records[path] = self._read(path)
                changed = True
        if changed:
            self._apply()
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        self.scan()
        self.store.synced.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            self.scan()

    def _list_files(self) -> dict[Path, _FileStamp]:
        files: dict[Path, _FileStamp] = {}
        if not self.root.is_dir():
            return files
        for path in sorted(self.root.rglob("*")):
            if path.suffix in SUFFIXES and path.is_file():
                st = path.stat()
                files[path] = _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)
        return files

    def _read(self, path: Path) -> dict[tuple[str, str], Record]:
        records: dict[tuple[str, str], Record] = {}
        problems: list[str] = []
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as e:
            problems.append(f"{path}: cannot be read as YAML: {e}")
            docs = []
        for index, doc in enumerate(docs):
            try:
                record = parse_document(doc, str(path), index)
            except ResourceError as e:
                problems.append(str(e))
                continue
            if record is not None:
                records[_key(record)] = record
        for problem in problems:
            log.error("%s", problem)
        if problems:
            self.errors[path] = problems
        else:
            self.errors.pop(path, None)
        return records

    def _apply(self) -> None:
        merged: dict[tuple[str, str], Record] = {}
        for path in sorted(self._records):
            merged.update(self._records[path])
        for (kind, key), _ in list(self._known().items()):
            if (kind, key) not in merged:
                if kind == "Pod":
                    self.store.delete_pod(key)
                else:
                    self.store.delete_namespace(key)
        for record in merged.values():
            if isinstance(record, Pod):
                if self.store.pods.get(record.key) != record:
                    self.store.put_pod(record)
            elif self.store.namespaces.get(record.name) != record:
                self.store.put_namespace(record)

    def _known(self) -> dict[tuple[str, str], Record]:
        known: dict[tuple[str, str], Record] = {("Pod", k): p for k, p in self.store.pods.items()}
        known.update({("Namespace", k): n for k, n in self.store.namespaces.items()})
        return known
