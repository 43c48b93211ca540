"""The testbed's cluster as Kubernetes objects, in the directory the node agents read.

A pod's object is written before its sandbox is created (as the API server has it before kubelet
runs the CNI chain), and again with ``status.podIP`` once the chain assigned one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nodeagent.testbed.topology import Namespace, Pod


def namespace_object(ns: Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": dict(ns.labels)},
    }


def pod_object(pod: Pod, uid: str, ip: str = "") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": uid,
            "labels": dict(pod.labels),
            "annotations": dict(pod.annotations),
        },
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account},
        "status": {"phase": "Running" if ip else "Pending"},
    }
    if ip:
        obj["status"] |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return obj


def write(path: Path, objects: list[dict[str, Any]]) -> None:
    """Atomically (the agents poll this directory), as one multi-document YAML file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    tmp.replace(path)
