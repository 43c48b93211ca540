"""The node agents' credentials for the CA service (``ca: service``), made as a cluster makes them.

On a cluster the DaemonSet's pod on each node runs as ServiceAccount nodeagent-system/nodeagent,
and the kubelet mounts into it a projected token for audience ``istio-ca`` bound to that pod
(TokenRequest). The CA reviews the token (TokenReview), reads the pod it is bound to and takes the
pod's ``spec.nodeName`` as the node the agent speaks for (nodeagent.caservice.authz, as istiod's
node authorizer for ztunnel). The testbed does the same, per node:

- publishes the pod ``nodeagent-<node>`` in nodeagent-system (``nodeName``, ``serviceAccountName``
  nodeagent, a uid, ``hostNetwork`` as the DaemonSet's pod is) in the cluster directory, which the
  stand-in API server serves; the agents see it too and leave it alone (a host-network pod);
- gives the stand-in a token bound to that pod, audience istio-ca, in its tokens file
  (``--tokens``, re-read when it changes: the kubelet's TokenRequest, standing in);
- writes the token to the node's token file (mode 0600), the agent's ``--ca-token-file``.

Where this differs from the DaemonSet on a cluster, and why: the token is an opaque random string
that the stand-in knows, not a JWT signed by the API server (no real API server runs here), and it
neither expires nor is rotated by a kubelet; the stand-in checks no RBAC (the DaemonSet's
ClusterRole is not exercised); the pod object is written by the testbed, not by the DaemonSet
controller. The CA's side is the same code path as on a cluster: TokenReview, GET pod, LIST pods.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.identity.protocol import TOKEN_AUDIENCE
from nodeagent.testbed import layout, resources
from nodeagent.testbed.topology import Node

NODE_SERVICE_ACCOUNT = "nodeagent"  # the DaemonSet's (daemonset/), a trusted node account


def pod_name(node: str) -> str:
    return f"nodeagent-{node}"


@dataclass(frozen=True)
class NodeCredential:
    node: Node
    pod_uid: str
    token: str = field(repr=False)  # never in a repr, a log or an error


def make(nodes: Sequence[Node]) -> list[NodeCredential]:
    """A fresh pod uid and token per node (256 random bits: not guessable)."""
    return [NodeCredential(n, str(uuid.uuid4()), secrets.token_urlsafe(32)) for n in nodes]


def objects(credentials: Sequence[NodeCredential]) -> list[dict[str, Any]]:
    """The namespace, service account and each node's agent pod, as the API server has them."""
    namespace = layout.CA_NAMESPACE
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"namespace": namespace, "name": NODE_SERVICE_ACCOUNT},
        },
    ]
    for c in credentials:
        ip = str(c.node.underlay_ip)  # a host-network pod has its node's address
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": namespace,
                    "name": pod_name(c.node.name),
                    "uid": c.pod_uid,
                    "labels": {"app": "nodeagent"},
                },
                "spec": {
                    "nodeName": c.node.name,
                    "serviceAccountName": NODE_SERVICE_ACCOUNT,
                    "hostNetwork": True,
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
    return out


def token_entries(credentials: Sequence[NodeCredential]) -> list[dict[str, Any]]:
    """The stand-in's tokens file entries (nodeagent.testbed.apiserver.load_tokens)."""
    return [
        {
            "token": c.token,
            "namespace": layout.CA_NAMESPACE,
            "serviceAccount": NODE_SERVICE_ACCOUNT,
            "podName": pod_name(c.node.name),
            "podUid": c.pod_uid,
            "audiences": [TOKEN_AUDIENCE],
        }
        for c in credentials
    ]


def publish(testbed: str, nodes: Sequence[Node]) -> list[NodeCredential]:
    """Make and publish every node's credentials (pods, tokens file, token files)."""
    credentials = make(nodes)
    for c in credentials:
        _write_secret(layout.node_token_file(testbed, c.node.name), c.token.encode())
    _write_secret(layout.apiserver_tokens(testbed), json.dumps(token_entries(credentials)).encode())
    resources.write(credentials_file(testbed), objects(credentials))
    return credentials


def publish_workload_token(
    testbed: str, namespace: str, pod: str, service_account: str, pod_uid: str, folder: Path
) -> Path:
    """A projected token (audience istio-ca) for a workload pod that asks the CA itself (a
    gateway): added to the stand-in's tokens file, written to FOLDER/ca-token (0600)."""
    token = secrets.token_urlsafe(32)
    path = layout.apiserver_tokens(testbed)
    entries = [e for e in json.loads(path.read_bytes()) if e.get("podName") != pod]
    entries.append(
        {
            "token": token,
            "namespace": namespace,
            "serviceAccount": service_account,
            "podName": pod,
            "podUid": pod_uid,
            "audiences": [TOKEN_AUDIENCE],
        }
    )
    _write_secret(folder / "ca-token", token.encode())
    _write_secret(path, json.dumps(entries).encode())
    return folder / "ca-token"


def credentials_file(testbed: str) -> Path:
    """The cluster directory file holding the agents' namespace, service account and pods."""
    return layout.cluster_dir(testbed) / f"{layout.CA_NAMESPACE}.yaml"


def _write_secret(path: Path, content: bytes) -> None:
    """Atomically, mode 0600 from the start (never readable by others, even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.replace(tmp, path)
