"""The testbed's cluster as Kubernetes objects, in the directory the node agents read.

A pod's object is written before its sandbox is created (as the API server has it before kubelet
runs the CNI chain), and again with ``status.podIP`` once the chain assigned one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from nodeagent.testbed.services import Endpoint
from nodeagent.testbed.topology import Namespace, Node, Pod, Service


def namespace_object(ns: Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": dict(ns.labels)},
    }


def node_object(node: Node) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": dict(node.labels)},
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
    if pod.deployment:
        # As a Deployment's pod is: generated name, its ReplicaSet as controller, whose name
        # ends in the pod-template-hash label.
        digest = hashlib.sha256(pod.deployment.encode()).hexdigest()[:10]
        replica_set = f"{pod.deployment}-{digest}"
        obj["metadata"]["generateName"] = f"{replica_set}-"
        obj["metadata"]["labels"]["pod-template-hash"] = digest
        obj["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set, "controller": True}
        ]
    return obj


def write(path: Path, objects: list[dict[str, Any]]) -> None:
    """Atomically (the agents poll this directory), as one multi-document YAML file whose
    documents are JSON: every string quoted, so no YAML reader takes "y" or "08" for anything
    else (PyYAML's dumper quotes only what YAML 1.1 would misread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text("".join(f"---\n{json.dumps(o, indent=2)}\n" for o in objects))
    tmp.replace(path)


def service_object(svc: Service) -> dict[str, Any]:
    ports = []
    for port in svc.ports:
        entry: dict[str, Any] = {
            "name": port.name,
            "port": port.port,
            "targetPort": port.target_port,
            "protocol": port.protocol,
        }
        if port.app_protocol:
            entry["appProtocol"] = port.app_protocol
        ports.append(entry)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": svc.namespace, "name": svc.name},
        "spec": {"clusterIP": str(svc.cluster_ip), "selector": dict(svc.selector), "ports": ports},
    }


def endpoint_slice_object(
    svc: Service, endpoints: dict[int, list[Endpoint]], nodes: dict[str, str]
) -> dict[str, Any]:
    """One slice per service (the testbed's endpoint controller); NODES maps pod key to node."""
    pods = sorted({ep.pod: ep.ip for eps in endpoints.values() for ep in eps}.items())
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": svc.namespace,
            "name": f"{svc.name}-testbed",
            "labels": {"kubernetes.io/service-name": svc.name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True},
                "nodeName": nodes.get(key, ""),
                "targetRef": {
                    "kind": "Pod",
                    "namespace": key.split("/")[0],
                    "name": key.split("/")[1],
                },
            }
            for key, ip in pods
        ],
        "ports": [
            {"name": port.name, "port": port.target_port, "protocol": port.protocol}
            for port in svc.ports
        ],
    }
