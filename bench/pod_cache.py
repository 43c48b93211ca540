"""Memory of the Kubernetes source's pod cache: every node's pods, as the agent keeps them.

The agent watches the pods of every node (issue #12: remote endpoints need their pod's identity
and mesh membership) and keeps a pod of another node trimmed (``remote_pod``). This measures, with
tracemalloc, what the agent holds after a LIST of N realistic pods (a Deployment's pod as the API
server returns it: managedFields, containers with env, probes and resources, status with
conditions), through the real path: the stand-in API server (a process of its own), paged LISTs
over HTTP, kubernetes-asyncio, the conversion, the MeshStore. It also reports the agent's peak
during the LIST (a page's body and its parse are transient) and, for comparison, the held memory
when other nodes' pods are kept whole.

No privileges needed: ``.venv/bin/python -m bench.pod_cache [--pods 10000] [--nodes 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources import kubernetes

NODE = "node-0"


def realistic_pod(i: int, nodes: int, apps: int = 200) -> dict[str, Any]:
    """Pod I of a Deployment (one of APPS), on node I % NODES, as a real API server lists it."""
    app, node = f"app-{i % apps}", f"node-{i % nodes}"
    ns = f"team-{i % 20}"
    name = f"{app}-7d9c8b6f5-{i:05x}"
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return {
        "metadata": {
            "name": name,
            "generateName": f"{app}-7d9c8b6f5-",
            "namespace": ns,
            "uid": str(uuid.UUID(int=i)),
            "resourceVersion": str(1000 + i),
            "creationTimestamp": "2026-11-30T10:00:00Z",
            "labels": {
                "app": app,
                "app.kubernetes.io/name": app,
                "app.kubernetes.io/part-of": "shop",
                "version": "v1",
                "pod-template-hash": "7d9c8b6f5",
            },
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-30T09:59:00Z",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
                "nodeagent.io/capture": "captured",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7d9c8b6f5",
                    "uid": str(uuid.UUID(int=10**9 + i % apps)),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-30T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}},
                        "f:spec": {"f:containers": {f'k:{{"name":"{app}"}}': {".": {}}}},
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-30T10:00:05Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {}}},
                    "subresource": "status",
                },
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": app,
                    "image": f"registry.example.com/shop/{app}:1.4.2",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [
                        {"name": "LOG_LEVEL", "value": "info"},
                        {"name": "UPSTREAM", "value": "http://backend:8080"},
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                    ],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-x7k2p",
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                            "readOnly": True,
                        }
                    ],
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": []}}],
            "nodeName": node,
            "serviceAccountName": app,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
            ],
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-11-30T10:00:05Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": f"192.168.0.{i % nodes}",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": "2026-11-30T10:00:00Z",
            "containerStatuses": [
                {
                    "name": app,
                    "ready": True,
                    "restartCount": 0,
                    "image": f"registry.example.com/shop/{app}:1.4.2",
                    "imageID": "registry.example.com/shop/app@sha256:" + "ab" * 32,
                    "containerID": "containerd://" + f"{i:064x}",
                    "started": True,
                    "state": {"running": {"startedAt": "2026-11-30T10:00:04Z"}},
                }
            ],
            "qosClass": "Burstable",
        },
    }


async def measure(kubeconfig: Path, pods: int, trim: bool) -> dict[str, float]:
    """Held and peak bytes of the source + store after syncing PODS pods from the stand-in."""
    schemas = IstioSchemas.load()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MeshStore(NODE)
    source = kubernetes.KubernetesSource(store, NODE, kubeconfig, schemas)
    stop = asyncio.Event()
    started = time.monotonic()
    keep_whole = mock.patch.object(kubernetes, "remote_pod", side_effect=lambda p: p)
    with keep_whole if not trim else contextlib.nullcontext():
        task = asyncio.create_task(source.run(stop))
        await asyncio.wait_for(store.synced.wait(), 600)
        synced = time.monotonic() - started
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
        stop.set()
        await task
    tracemalloc.stop()
    assert len(store.pods) == pods, len(store.pods)
    return {
        "held_bytes": held - base,
        "peak_bytes": peak - base,
        "sync_seconds": synced,
        "local_pods": sum(p.node_name == NODE for p in store.pods.values()),
    }


@contextlib.contextmanager
def apiserver(folder: Path, pods: int, nodes: int) -> Iterator[Path]:
    """The stand-in API server, in a process of its own (its memory is not the agent's),
    serving PODS pods; yields its kubeconfig."""
    cluster = folder / "cluster"
    cluster.mkdir()
    items = [{"apiVersion": "v1", "kind": "Pod", **realistic_pod(i, nodes)} for i in range(pods)]
    (cluster / "pods.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    del items
    kubeconfig = folder / "kubeconfig"
    argv = [sys.executable, "-m", "nodeagent.testbed.apiserver", str(cluster)]
    proc = subprocess.Popen([*argv, "--listen", "127.0.0.1:0", "--kubeconfig", str(kubeconfig)])
    try:
        deadline = time.monotonic() + 300
        while not kubeconfig.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stand-in API server did not start")
            time.sleep(0.1)
        yield kubeconfig
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pod_cache", description=__doc__)
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    body = len(json.dumps(realistic_pod(1, args.nodes)))
    results = {}
    with (
        tempfile.TemporaryDirectory() as folder,
        apiserver(Path(folder), args.pods, args.nodes) as kubeconfig,
    ):
        for trim in (True, False):
            label = "trimmed" if trim else "whole"
            results[label] = asyncio.run(measure(kubeconfig, args.pods, trim))
    mib = 1024 * 1024
    print(f"{args.pods} pods on {args.nodes} nodes, {body} bytes of JSON each")
    print("other nodes' pods   held MiB   bytes/pod   peak MiB (LIST)   sync s")
    for label, r in results.items():
        print(
            f"{label:<18}  {r['held_bytes'] / mib:8.1f}   {r['held_bytes'] / args.pods:9.0f}"
            f"   {r['peak_bytes'] / mib:15.1f}   {r['sync_seconds']:6.1f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"pods": args.pods, "nodes": args.nodes, **results}))


if __name__ == "__main__":
    main()
