"""The testbed's control plane with ``ca: service``: the CA service and what talks to it.

The CA service (``nodeagent ca``, the Deployment of daemonset/ on a cluster) runs on a host of its
own: network namespace ``tb-<name>.control-plane``, attached to the underlay bridge like a node,
at the underlay's second-to-last address (``Network.control_plane_ip``; the stand-in API server
has the last, in the underlay netns). Why not beside the API server in the underlay netns (which
would have been simpler): the CA is a workload reached over the network, as a pod behind its
Service is, and a host of its own lets a test cut or stop the CA without touching the API server
the agents watch. It listens on ``<ip>:15012`` (gRPC over TLS, istiod's port) and
``<ip>:15014`` (/metrics, /ready), reads the testbed's stand-in API server through its
kubeconfig, keeps its Secrets and the root ConfigMap in nodeagent-system.

Where this differs from the Deployment: one replica; no Service (the agents dial its address and
check the name ``nodeagent-ca.nodeagent-system.svc`` in its certificate, as they would behind
the Service); the Secrets are read every 2 s instead of 10 s, so that a test's cacerts change
takes effect quickly; the API server is the stand-in (see nodeagent.testbed.apiserver: no RBAC,
opaque tokens).

Tests talk to the stand-in's API here as ``kubectl`` would (``api_request``: curl inside the
underlay netns, the only place the API server is reached from outside the nodes).
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Mapping
from typing import Any

from nodeagent.testbed import layout, netns

CA_PORT = 15012  # istiod's CA/xDS port over TLS (nodeagent.identity.protocol.DEFAULT_PORT)
MONITORING_PORT = 15014  # istiod's monitoring port
SERVER_NAME = f"nodeagent-ca.{layout.CA_NAMESPACE}.svc"  # the CA's Service name
RELOAD_INTERVAL = 2.0


class APIRequestError(RuntimeError):
    pass


def ca_argv(testbed: str, ip: str) -> list[str]:
    """`nodeagent ca` arguments, as the Deployment passes them (plus the testbed's kubeconfig)."""
    return [
        "ca",
        "--kubeconfig",
        str(layout.apiserver_kubeconfig(testbed)),
        "--namespace",
        layout.CA_NAMESPACE,
        "--listen",
        f"{ip}:{CA_PORT}",
        "--monitoring",
        f"{ip}:{MONITORING_PORT}",
        "--server-name",
        SERVER_NAME,
        "--server-name",
        f"{SERVER_NAME}.cluster.local",
        "--reload-interval",
        str(RELOAD_INTERVAL),
    ]


def monitoring_get(testbed: str, ip: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(HTTP status, body) of GET PATH on the CA's monitoring port, from the control-plane
    netns; status 0 when nothing answered."""
    argv = netns.in_netns(
        layout.control_plane_netns(testbed),
        [
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "-w",
            "\n%{http_code}",
            f"http://{ip}:{MONITORING_PORT}{path}",
        ],
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    if proc.returncode != 0 or not code.isdigit():
        return 0, proc.stderr.strip()
    return int(code), body


def api_request(
    testbed: str, apiserver: str, method: str, path: str, body: Mapping[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of one call to the stand-in API server at APISERVER (host:port),
    made from the underlay netns; the body goes through stdin (never on a command line)."""
    argv = netns.in_netns(
        layout.underlay_netns(testbed),
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            *(["--data-binary", "@-"] if body is not None else []),
            "-w",
            "\n%{http_code}",
            f"http://{apiserver}{path}",
        ],
    )
    proc = subprocess.run(
        argv,
        input=json.dumps(body) if body is not None else None,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    text, _, code = proc.stdout.rpartition("\n")
    if proc.returncode != 0 or not code.isdigit():
        raise APIRequestError(f"{method} {path}: {proc.stderr.strip() or 'no answer'}")
    try:
        answer = json.loads(text) if text.strip() else {}
    except ValueError:
        answer = {"raw": text}
    return int(code), answer if isinstance(answer, dict) else {"raw": answer}


def secret_object(
    namespace: str, name: str, data: Mapping[str, bytes], type_: str = "Opaque"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": namespace, "name": name},
        "type": type_,
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def apply(testbed: str, apiserver: str, collection: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create or replace a namespaced core object (``kubectl apply``, without the merge): POST,
    or PUT over the current version. COLLECTION: "secrets", "configmaps"."""
    meta = obj["metadata"]
    base = f"/api/v1/namespaces/{meta['namespace']}/{collection}"
    status, current = api_request(testbed, apiserver, "GET", f"{base}/{meta['name']}")
    if status == 404:
        status, answer = api_request(testbed, apiserver, "POST", base, obj)
    elif status == 200:
        body = json.loads(json.dumps(obj))
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        status, answer = api_request(testbed, apiserver, "PUT", f"{base}/{meta['name']}", body)
    else:
        answer = current
    if status not in (200, 201):
        raise APIRequestError(
            f"apply {collection} {meta['namespace']}/{meta['name']}: {status} "
            f"{answer.get('message', answer)}"
        )
    return answer


def read(testbed: str, apiserver: str, collection: str, namespace: str, name: str) -> Any:
    """A namespaced core object, or None when there is none."""
    path = f"/api/v1/namespaces/{namespace}/{collection}/{name}"
    status, answer = api_request(testbed, apiserver, "GET", path)
    if status == 404:
        return None
    if status != 200:
        raise APIRequestError(f"GET {path}: {status} {answer.get('message', answer)}")
    return answer
