"""The ``nodeagent gateway`` process: source -> MeshStore, certificate, xDS/SDS, Envoy.

Reads the cluster as the agents do (a directory of YAML, or the API server: every kind the
mesh needs read-only, and only the Secrets its Gateways' TLS servers name, in its own
namespace, one watch each). Like an agent, it fetches the keys RequestAuthentications name by
URI (mesh/jwks.py) for its jwt_authn filters. Its certificate is its own service account's,
from the mesh's CA (the CA service with its own projected token: Istio's CA gives any caller
its own identity, or the plug-in CA files of a standalone setup); there is no built-in CA
here, as a gateway's certificate must chain to the mesh's root.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from nodeagent.agent import mesh_issuer
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.remote import DEFAULT_SERVER_NAME
from nodeagent.mesh.jwks import JwksResolver, refresh_interval
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource, MeshConfigFile
from nodeagent.supervise import TaskSupervisor
from nodeagent.translate import gateway

from .mirror import MESH_KEY, ROOT_KEY, ConfigMapMirror
from .proxy import GatewayProxy, GatewaySettings

log = logging.getLogger("nodeagent.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    proxy: GatewaySettings
    node_name: str = ""  # the node it runs on (the API source keeps that node's pods whole)
    source_dir: Path | None = None
    kubeconfig: Path | None = None
    in_cluster: bool = False
    mesh_config: Path | None = None
    ca_dir: Path | None = None
    ca_address: str | None = None
    ca_root_file: Path | None = None
    ca_token_file: Path | None = None
    ca_server_name: str = DEFAULT_SERVER_NAME
    cert_ttl: float = 24 * 3600.0
    # The control plane's namespace, whose mesh config and CA root ConfigMaps are mirrored into
    # --mesh-config and --ca-root-file (mirror.py); "" when they are files already.
    control_plane_namespace: str = ""


def _start_source(
    config: GatewayConfig, store: MeshStore, stop: asyncio.Event, tasks: TaskSupervisor
) -> None:
    if config.source_dir is not None:
        directory = DirectorySource(config.source_dir, store, mesh_config_path=config.mesh_config)
        tasks.spawn("source", lambda: directory.run(stop), stop=stop)
        return
    if config.mesh_config is not None:
        mesh = MeshConfigFile(config.mesh_config, store)
        mesh.scan()
        tasks.spawn("mesh-config", lambda: mesh.run(stop), stop=stop)
    from nodeagent.sources.kubernetes import KubernetesSource  # slow to import: only when used

    settings = config.proxy
    workload = gateway.Workload(settings.namespace, settings.labels, "")
    api = KubernetesSource(
        store,
        config.node_name,
        kubeconfig=config.kubeconfig,
        wanted_credentials=lambda s: gateway.credentials_named(s, workload),
        secret_reviews=False,
    )
    tasks.spawn("source", lambda: api.run(stop), stop=stop)


async def _start_mirror(config: GatewayConfig, stop: asyncio.Event, tasks: TaskSupervisor) -> None:
    """Mirror the control plane's ConfigMaps where --mesh-config and --ca-root-file point, and
    wait for the first round (a ConfigMap missing then is waited for by what reads it)."""
    paths = {config.mesh_config, config.ca_root_file}
    folders = {p.parent for p in paths if p is not None}
    if len(folders) != 1 or config.mesh_config is None or config.ca_root_file is None:
        raise ValueError("the mirrored mesh config and CA root must be files of one folder")
    if (config.mesh_config.name, config.ca_root_file.name) != (MESH_KEY, ROOT_KEY):
        raise ValueError(f"the mirrored files are named {MESH_KEY} and {ROOT_KEY}")
    first = asyncio.Event()
    mirror = ConfigMapMirror(config.control_plane_namespace, folders.pop(), config.kubeconfig)
    tasks.spawn("configmap-mirror", lambda: mirror.run(stop, first), stop=stop)
    await first.wait()


async def run(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = CollectorRegistry()
    tasks = TaskSupervisor(metrics)
    store = MeshStore(config.node_name)
    if config.control_plane_namespace:
        await _start_mirror(config, stop, tasks)
    _start_source(config, store, stop, tasks)
    await store.synced.wait()
    issuer = await mesh_issuer(
        config.ca_dir,
        config.ca_address,
        config.ca_root_file,
        config.ca_token_file,
        config.ca_server_name,
        stop,
    )
    identities = IdentityManager(
        issuer,
        store.mesh_config.trust_domain,
        ttl=timedelta(seconds=config.cert_ttl),
        registry=metrics,
    )
    proxy = GatewayProxy(config.proxy, store, identities, metrics, tasks)
    identities.on_change = proxy.changed.set
    # RequestAuthentication keys by URI, as the agents fetch them (a new key set is a store
    # change: the next push inlines it).
    resolver = JwksResolver(store, refresh=refresh_interval(os.environ))
    tasks.spawn("jwks", lambda: resolver.run(stop), stop=stop, critical=False)
    await proxy.start()
    tasks.spawn("cert-rotation", lambda: identities.run(stop), stop=stop)
    tasks.spawn("push", lambda: proxy.run(stop), stop=stop)
    log.info(
        "gateway %s/%s serving the Gateways selecting %s",
        config.proxy.namespace,
        config.proxy.pod_name,
        config.proxy.labels,
    )
    try:
        await stop.wait()
    finally:
        await proxy.stop()
        await tasks.cancel_all()
