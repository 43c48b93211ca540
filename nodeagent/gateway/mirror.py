"""The control plane's ConfigMaps a gateway pod cannot mount: mirrored into files.

A pod mounts ConfigMaps of its own namespace only. The node agents run beside the CA in the
control plane's namespace and mount its root bundle (``nodeagent-ca-root``, which the CA
publishes there) and the mesh config (``nodeagent-mesh``); a gateway runs in its own namespace
(``istio-system``, where its credentialName Secrets are). Istio solves this by publishing
``istio-ca-root-cert`` into every namespace; here the gateway reads the two ConfigMaps by name
(RBAC ``get`` on those two names only, daemonset/gateways/) and keeps a file of each key, which
the CA client and the mesh config watcher read as they read the agents' mounted files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("nodeagent.gateway")

MESH_CONFIGMAP, MESH_KEY = "nodeagent-mesh", "mesh.yaml"
ROOT_CONFIGMAP, ROOT_KEY = "nodeagent-ca-root", "root-cert.pem"
MIRRORED = ((MESH_CONFIGMAP, MESH_KEY), (ROOT_CONFIGMAP, ROOT_KEY))
INTERVAL = 10.0  # seconds between reads (the kubelet refreshes a ConfigMap volume in ~1 min)


def write_if_changed(path: Path, text: str) -> bool:
    """PATH holds TEXT afterwards (written aside and renamed: readers never see half of it)."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
    return True


class ConfigMapMirror:
    """Reads the MIRRORED ConfigMaps of NAMESPACE into FOLDER/<key>, every INTERVAL seconds."""

    def __init__(
        self, namespace: str, folder: Path, kubeconfig: Path | None, interval: float = INTERVAL
    ) -> None:
        self.namespace = namespace
        self.folder = folder
        self.kubeconfig = kubeconfig
        self.interval = interval
        self._problems: dict[str, str] = {}  # ConfigMap -> the problem last logged

    def path(self, key: str) -> Path:
        return self.folder / key

    async def once(self, core: Any) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        for name, key in MIRRORED:
            try:
                config_map = await core.read_namespaced_config_map(name, self.namespace)
                value = (config_map.data or {}).get(key)
                problem = "" if value is not None else f"has no key {key}"
            except ApiException as e:
                value, problem = None, f"cannot be read: {e.status} {e.reason}"
            except OSError as e:
                value, problem = None, f"cannot be read: {e}"
            if problem and self._problems.get(name) != problem:
                log.error("ConfigMap %s/%s %s", self.namespace, name, problem)
            if problem:
                self._problems[name] = problem
                continue
            self._problems.pop(name, None)
            if value is not None and write_if_changed(self.path(key), value):
                log.info("ConfigMap %s/%s: %s updated", self.namespace, name, self.path(key))

    async def run(self, stop: asyncio.Event, first: asyncio.Event | None = None) -> None:
        """Mirror until STOP; FIRST is set once the first round is done."""
        from kubernetes_asyncio import client

        from nodeagent.sources.kubernetes import api_client

        api = await api_client(self.kubeconfig)
        try:
            core = client.CoreV1Api(api)
            while not stop.is_set():
                await self.once(core)
                if first is not None:
                    first.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await api.close()
