"""NodeProxy: the node's one Envoy and what it is told.

Owns the xDS server, the Envoy supervisor and the push loop: whenever the MeshStore or the set of
captured pods changes, it translates and hands the node's snapshot to the xDS cache (what changes
during a push is taken by the next one in one go). CNI ADD waits on ``synced`` so a pod starts
only once Envoy holds its listeners (and the route tables its namespace's joining changed); DEL
waits the same way so a pod's listeners are gone before its network namespace is. Those waits
wake on events (a push, Envoy's ACK or NACK), never on a timer.

Fail closed, one object at a time: a captured pod missing from the source gets no certificate and
no listeners (its traffic is refused) until its pod is known; an object Envoy rejects (NACK) or
that cannot be translated is left out of the config, named in ``proxy-status``, and only that
pod's ADD fails, until the object changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.envoy.admin import EnvoyAdmin
from nodeagent.envoy.bootstrap import (
    admin_socket_path,
    bootstrap,
    bootstrap_path,
    write_bootstrap,
)
from nodeagent.envoy.supervisor import MANAGED, EnvoySupervisor
from nodeagent.identity.certs import spiffe_id
from nodeagent.identity.credentials import CredentialSecrets
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.tls_files import FileSecrets
from nodeagent.mesh import credentials, secret_access
from nodeagent.mesh.store import MeshStore
from nodeagent.metrics import DenialCollector
from nodeagent.redirect.registry import CAPTURED, PodRegistry
from nodeagent.supervise import TaskSupervisor
from nodeagent.translate import (
    POD,
    SERVICE,
    LocalPod,
    Origin,
    Translation,
    TranslationCache,
    denials,
    pod_listener_names,
)
from nodeagent.translate.internal import ORIGINATE_TLS, OUTBOUND_INTERNAL, fast_name
from nodeagent.translate.rejections import Bisection, culprits
from nodeagent.xds import types
from nodeagent.xds.cache import Changes, InconsistentSnapshot, Snapshot, SnapshotCache
from nodeagent.xds.server import Nack, XdsServer

log = logging.getLogger("nodeagent.proxy")

KEPT_VERSIONS = 64  # translations remembered to tell which object a late NACK is about
IDENTITY_UNKNOWN = "identity unknown: pod not in the source (no certificate, no listeners)"


def _holds_chains(listener: str) -> bool:
    """outbound-internal, or a Sidecar scope's copy of part of it (outbound-internal/...)."""
    return listener == OUTBOUND_INTERNAL or listener.startswith(OUTBOUND_INTERNAL + "/")


@dataclass(frozen=True)
class Rejection:
    """An object left out of the node's config: Envoy rejected what it became, or it could not
    be translated. It is tried again once the object changes (FINGERPRINT differs)."""

    origin: Origin
    by: str  # "LDS", "CDS", ... (Envoy's NACK) or "translation"
    reason: str
    fingerprint: str

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.origin.kind,
            "namespace": self.origin.namespace,
            "name": self.origin.name,
            "by": self.by,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ProxySettings:
    node_name: str
    run_dir: Path  # xDS socket, Envoy's bootstrap, admin socket and pidfile
    envoy_binary: Path
    envoy_log: Path
    stats_host: str = "0.0.0.0"  # Envoy's :15090 (Prometheus stats, /ready) binds this address
    stats_port: int = 15090
    # "managed": the agent starts and restarts Envoy; "external": Envoy runs in its own container
    # (``nodeagent envoy``) and the agent only writes its bootstrap, configures and watches it.
    envoy_mode: str = MANAGED
    # "node": one Envoy for the node (this class); "sidecar": one Envoy inside each captured
    # pod, as Istio's sidecars (nodeagent.testbed.sidecar, the benchmarks' baseline).
    proxy_model: str = "node"
    sidecar_dir: Path | None = None  # sidecar model: xDS socket + per-pod dirs; run_dir/sidecars
    sidecar_log_dir: Path = Path("/var/log/nodeagent-sidecars")  # <ns>.<pod>.envoy.log

    @property
    def node_id(self) -> str:
        return f"nodeagent~{self.node_name}"

    @property
    def xds_socket(self) -> Path:
        return self.run_dir / "xds.sock"

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin: a root-only UNIX socket, never a TCP port (#12)."""
        return admin_socket_path(self.run_dir)


class NodeProxy:
    def __init__(
        self,
        settings: ProxySettings,
        store: MeshStore,
        registry: PodRegistry,
        metrics: CollectorRegistry,
        identities: IdentityManager,
        excluded_namespaces: tuple[str, ...] = (),
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks or TaskSupervisor()  # the agent's, for its metrics and readiness
        self.store = store
        self.registry = registry
        self.identities = identities
        self.credential_secrets = CredentialSecrets()
        self.tls_files = FileSecrets()  # DestinationRule tls files, watched
        self.excluded_namespaces = excluded_namespaces
        self.cache = SnapshotCache()
        self.xds = XdsServer(self.cache, metrics)
        self.admin = EnvoyAdmin(settings.admin_socket)
        self.changed = asyncio.Event()
        # Pushes asked for by synced() and taken by the push loop (see _request_push).
        self._requested = 0
        self._pushed = 0
        self.version = 0
        self.last_error = ""
        self.rejected: dict[Origin, Rejection] = {}  # by Envoy: left out until they change
        self.failed: dict[Origin, Rejection] = {}  # translation raised (this push)
        self.identity_unknown: list[str] = []  # captured pods missing from the source
        self.unattributed_nack = ""  # a NACK naming nothing we could leave out
        self._translations: OrderedDict[str, Translation] = OrderedDict()
        self._translator = TranslationCache()  # recomputes only what changed since last push
        self._bisection: Bisection | None = None
        # Per type: the translation Envoy last ACKed (its objects: what Envoy already holds;
        # worked out only when a NACK needs them, as that is O(resources)).
        self._accepted: dict[str, Translation] = {}
        self._resend: set[str] = set()  # types whose next push asks Envoy's verdict again
        self.xds.on_nack = self._on_nack
        self.xds.on_ack = self._on_ack
        # originate-tls first: Envoy activates a service cluster once its EDS arrives, before
        # SDS could warm a new socket of originate-tls that the cluster names.
        self.xds.leaders = {types.CLUSTER: frozenset({ORIGINATE_TLS})}
        self.rejections = Counter(
            "nodeagent_config_rejections",
            "Objects left out of the node's Envoy config, by kind and cause (NACK: Envoy"
            " rejected what they became; translation: building it failed).",
            ["kind", "cause"],
            registry=metrics,
        )
        self.rejected_now = Gauge(
            "nodeagent_config_rejected",
            "Objects currently left out of the node's Envoy config, by kind.",
            ["kind"],
            registry=metrics,
        )
        Gauge(
            "nodeagent_pods_identity_unknown",
            "Captured pods missing from the source: no certificate and no listeners (their"
            " traffic is refused) until their pod is known.",
            registry=metrics,
        ).set_function(lambda: float(len(self.identity_unknown)))
        self.envoy_restarts = Counter(
            "nodeagent_envoy_restarts",
            "Times the node's Envoy died and was restarted (external mode: came back after its"
            " admin API stopped answering).",
            registry=metrics,
        )
        self.supervisor = EnvoySupervisor(
            settings.envoy_binary,
            bootstrap_path(settings.run_dir),
            settings.run_dir,
            settings.envoy_log,
            self.admin,
            on_restart=self.envoy_restarts.inc,
            mode=settings.envoy_mode,
            tasks=self.tasks,
        )
        metrics.register(
            DenialCollector(
                lambda: self.admin.stats(denials.STATS_FILTER),
                lambda: [
                    (c.namespace, c.name)
                    for c in list(self.registry.pods.values())
                    if c.state == CAPTURED
                ],
            )
        )
        Gauge(
            "nodeagent_envoy_ready",
            "1 while the node's Envoy can serve (managed: its process runs; external: its admin"
            " /ready says LIVE), else 0.",
            registry=metrics,
        ).set_function(lambda: 0.0 if self.problem() else 1.0)

    def problem(self) -> str:
        """Empty while the node's proxy can serve; otherwise why not (readiness)."""
        return self.supervisor.problem()

    async def wait_ready(self, timeout: float) -> bool:
        return await self.supervisor.wait_ready(timeout)

    async def start(self) -> None:
        """xDS first (Envoy connects to it), a first snapshot, the bootstrap, then Envoy (started
        or adopted; in external mode only watched: its own container waits for the bootstrap)."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.xds.start(self.settings.xds_socket)
        self.push()
        write_bootstrap(
            bootstrap_path(self.settings.run_dir),
            bootstrap(
                self.settings.node_id,
                self.settings.node_name,
                self.settings.xds_socket,
                admin_socket=self.settings.admin_socket,
                stats_host=self.settings.stats_host,
                stats_port=self.settings.stats_port,
            ),
        )
        await self.supervisor.start()

    async def stop(self) -> None:
        """Leaves Envoy running: an agent restart must not interrupt traffic."""
        await self.supervisor.stop(kill_envoy=False)
        await self.xds.stop()

    def local_pods(self) -> list[LocalPod]:
        """Captured pods with what the source says about them. A pod the source does not have
        is left out: its service account (its identity) is unknown, and inventing one ("default")
        would hand it another workload's certificate."""
        out = []
        unknown = []
        for capture in self.registry.pods.values():
            if capture.state != CAPTURED:
                continue
            pod = self.store.pods.get(capture.key)
            # A record of another node's (or an earlier) pod of that name is not this pod.
            if (
                pod is None
                or not self.store.on_this_node(pod)
                or (capture.uid and pod.uid and capture.uid != pod.uid)
            ):
                unknown.append(capture.key)
                continue
            out.append(LocalPod(pod, capture.netns))
        if sorted(unknown) != self.identity_unknown:
            for key in sorted(set(unknown) - set(self.identity_unknown)):
                log.warning("pod %s: %s", key, IDENTITY_UNKNOWN)
        self.identity_unknown = sorted(unknown)
        return out

    def push(self) -> str:
        """Translate the current view and hand it to the xDS cache; returns the version."""
        self.version += 1
        version = str(self.version)
        local = self.local_pods()
        self._retry_changed()
        # A certificate exists exactly while a pod of its identity runs on this node.
        secrets = self.identities.sds_secrets({lp.identity for lp in local})
        # DestinationRule credentialName: the Secrets of selector rules of this node's pods.
        wanted = credentials.referenced(self.store, [lp.pod for lp in local])
        # Their certificates only where a local caller may have them (mesh/secret_access.py).
        allowed = [lp.pod for lp in local if not secret_access.unauthorized(self.store, lp.pod)]
        presented = credentials.referenced(self.store, allowed)
        refused = len(allowed) < len(local)
        secrets += self.credential_secrets.sds_secrets(self.store, wanted, presented, refused)
        self.credential_secrets.wake_at_deadline(self.changed.set)
        # DestinationRule tls files (paths on the node), read again when they change.
        secrets += self.tls_files.sds_secrets(self.store)
        try:
            excluded = set(self.rejected)
            if self._bisection is not None:
                excluded |= set(self._bisection.trial)
            translation = self._translator.build(
                self.store, local, secrets, self.excluded_namespaces, excluded=excluded
            )
            failed = {
                origin: Rejection(origin, "translation", why, self._fingerprint(origin))
                for origin, why in translation.problems.items()
            }
            for origin in failed.keys() - self.failed.keys():
                self.rejections.labels(origin.kind, "translation").inc()
            self.failed = failed
            changes = None
            if translation.base is not None and translation.changed is not None:
                changes = Changes(translation.base, translation.changed)
            snapshot = Snapshot(
                version,
                translation.resources,
                changes,
                awaited_secrets=frozenset(self.credential_secrets.pending),
            )
            self.cache.set_snapshot(self.settings.node_id, snapshot)
            self._translations[version] = translation
            if self._bisection is not None and not self._bisection.version:
                self._bisection.version = version
                self._resend.add(self._bisection.type_url)
            for type_url in self._resend:  # Envoy's verdict, even on what did not change
                self.xds.resend_with(self.settings.node_id, type_url, snapshot)
            self._resend.clear()
            while len(self._translations) > KEPT_VERSIONS:
                self._translations.popitem(last=False)
            self.last_error = ""
        except (InconsistentSnapshot, ValueError) as e:
            self.last_error = f"snapshot {version} not pushed: {e}"
            log.error("%s", self.last_error)
        for kind in (SERVICE, POD):
            left_out = {o for o in [*self.rejected, *self.failed] if o.kind == kind}
            self.rejected_now.labels(kind).set(len(left_out))
        return version

    def _fingerprint(self, origin: Origin) -> str:
        objects = self.store.services if origin.kind == SERVICE else self.store.pods
        obj = objects.get(origin.key)
        return "" if obj is None else repr(obj)

    def _retry_changed(self) -> None:
        """An object Envoy rejected is tried again once it changed (or forgotten once gone)."""
        for origin, rejection in list(self.rejected.items()):
            if self._fingerprint(origin) != rejection.fingerprint:
                del self.rejected[origin]
                log.info("%s changed since Envoy rejected it: trying it again", origin)

    def _on_nack(self, node_id: str, nack: Nack) -> None:
        """Leave out the object whose config Envoy rejected, and push the rest again."""
        if node_id != self.settings.node_id:
            return
        translation = self._translations.get(nack.version_sent)
        if translation is None:
            return
        kind = types.short_name(nack.type_url)
        bisection = self._bisection
        if bisection is not None and nack.type_url == bisection.type_url:
            if bisection.answers(nack.version_sent):
                self._bisect(accepted=False)
            return
        accepted = self._accepted.get(nack.type_url)
        held = accepted.objects() if accepted is not None else frozenset()
        found = culprits(nack, translation, held)
        if found:
            self.unattributed_nack = ""
            for origin, why in found.items():
                self._leave_out(origin, nack.type_url, why)
            return
        # Envoy's message names nothing of ours: bisect over what that response changed.
        origins = {translation.origins.get((nack.type_url, name)) for name in nack.changed}
        if nack.type_url == types.LISTENER and any(map(_holds_chains, nack.changed)):
            # The node's listener of every service's chains (or a Sidecar scope's, of some):
            # any service may be it.
            origins |= set(translation.chains.values())
        suspects = sorted({o for o in origins if o is not None and o not in self.rejected})
        first_line = nack.message.strip().splitlines()[0] if nack.message.strip() else ""
        if len(suspects) == 1:
            self._leave_out(suspects[0], nack.type_url, first_line)
        elif suspects:
            self._bisection = Bisection(nack.type_url, first_line, suspects)
            log.warning(
                "Envoy rejected %s without naming what (%s): finding which of %d objects by"
                " re-pushing halves",
                kind,
                first_line,
                len(suspects),
            )
            self.changed.set()
        else:
            self.unattributed_nack = f"{kind} version {nack.version_sent}: {nack.message}"
            log.error("Envoy rejected %s, naming nothing we can leave out", self.unattributed_nack)

    def _on_ack(self, node_id: str, type_url: str, version: str) -> None:
        if node_id != self.settings.node_id:
            return
        translation = self._translations.get(version)
        if translation is not None:
            self._accepted[type_url] = translation
        if type_url == types.CLUSTER:
            self._release_sockets()
        bisection = self._bisection
        if bisection is not None and type_url == bisection.type_url and bisection.answers(version):
            self._bisect(accepted=True)

    def _release_sockets(self) -> None:
        """Once Envoy holds every cluster of the current snapshot (CDS SYNCED: not just the
        response it ACKed, which may be originate-tls alone, see XdsServer.leaders), the
        originate-tls sockets only older clusters named can go (make before break, see
        TranslationCache.release_sockets)."""
        node = self.settings.node_id
        snapshot = self.cache.get(node)
        status = self.xds.status(node).get(types.CLUSTER)
        if snapshot is None or status is None or status.state != "SYNCED":
            return
        current = self._translations.get(snapshot.version)
        if current is not None and self._translator.release_sockets(current.tls_sockets):
            self.changed.set()

    def _bisect(self, accepted: bool) -> None:
        bisection = self._bisection
        assert bisection is not None
        culprit = bisection.step(accepted)
        if culprit is not None:
            self._bisection = None
            why = f"{bisection.message} (found by re-pushing halves)"
            self._leave_out(culprit, bisection.type_url, why)
        self.changed.set()

    def _leave_out(self, origin: Origin, type_url: str, why: str) -> None:
        kind = types.short_name(type_url)
        self.rejected[origin] = Rejection(origin, kind, why, self._fingerprint(origin))
        self.rejections.labels(origin.kind, "NACK").inc()
        self.unattributed_nack = ""
        self._resend.add(type_url)  # so Envoy's verdict on the rest clears the NACK
        log.error(
            "Envoy rejected the %s config of %s; it is left out until it changes: %s",
            kind,
            origin,
            why,
        )
        self.changed.set()

    def pod_problem(self, key: str) -> str:
        """Why pod KEY (namespace/name) gets no listeners, or ""."""
        if key in self.identity_unknown:
            return IDENTITY_UNKNOWN
        namespace, _, name = key.partition("/")
        origin = Origin(POD, namespace, name)
        for left_out in (self.rejected, self.failed):
            rejection = left_out.get(origin)
            if rejection is not None:
                return f"its config was left out ({rejection.by}): {rejection.reason}"
        return ""

    async def run(self, stop: asyncio.Event) -> None:
        """Push whenever the store, the captured pods, a certificate or a DestinationRule's
        tls file change."""
        rotation = self.tasks.spawn("cert-rotation", lambda: self.identities.run(stop), stop=stop)
        files = self.tasks.spawn(
            "tls-files", lambda: self.tls_files.watch(stop, self.changed.set), stop=stop
        )
        try:
            await self._push_loop(stop)
        finally:
            rotation.cancel()
            files.cancel()

    async def _push_loop(self, stop: asyncio.Event) -> None:
        """Push as soon as something changed; what changes while a push runs (or while Envoy
        takes it) is taken by the next one in one go: bursts coalesce without a fixed wait."""
        while not stop.is_set():
            if not (self.store.changed.is_set() or self.changed.is_set()):
                store_changed = asyncio.create_task(self.store.changed.wait())
                pods_changed = asyncio.create_task(self.changed.wait())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait(
                    {store_changed, pods_changed, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in (store_changed, pods_changed, stopping):
                    task.cancel()
            if stop.is_set():
                return
            self.store.changed.clear()
            self.changed.clear()
            taken = self._requested
            try:
                await self.apply()
            finally:
                self._pushed = taken
                self.xds.progress.advance()

    async def apply(self) -> None:
        """One round of the push loop: translate and hand the snapshot over."""
        self.push()

    def _request_push(self) -> int:
        """Ask the push loop for a push; returns the number a ``_pushed`` at least as large
        says has been taken."""
        self._requested += 1
        self.changed.set()
        return self._requested

    async def synced(
        self, timeout: float, types_: tuple[str, ...] = (types.LISTENER,), pod: str = ""
    ) -> str:
        """Wait until Envoy holds the latest snapshot for TYPES_; "" or why it does not.

        POD (namespace/name) names the pod whose change this is: then only its own listeners
        count (held at their latest version while it is captured, gone once it is not), so a
        resource Envoy rejected elsewhere does not hold up this pod.

        No polling: it looks again only when the push loop pushed or Envoy answered (an ACK or
        NACK, a stream opening or closing), and only once the push that took the caller's
        change is out.
        """
        wanted = self._request_push()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = self.xds.progress.generation  # before looking: see Progress
            if self._pushed >= wanted:
                verdict = self._pod_synced(pod) if pod else self._types_synced(types_)
                if verdict is not None:
                    return verdict
            left = deadline - loop.time()
            if left <= 0:
                return self._not_synced(timeout, types_, pod)
            await self.xds.progress.wait_past(seen, left)

    def _types_synced(self, types_: tuple[str, ...]) -> str | None:
        """ "" once Envoy holds the snapshot's TYPES_, a reason it never will, or None."""
        status = self.xds.status(self.settings.node_id)
        states = {t: status.get(t) for t in types_}
        if all(s is not None and s.state == "SYNCED" for s in states.values()):
            return ""
        for type_url, s in states.items():
            if s is not None and s.state == "NACKED" and self.unattributed_nack:
                return f"Envoy rejected {types.short_name(type_url)}: {s.last_nack}"
        return None

    def _not_synced(self, timeout: float, types_: tuple[str, ...], pod: str) -> str:
        """Why the wait of ``synced`` ran out."""
        cert = self._pod_cert_problem(pod) if pod else ""
        if cert:
            return f"{cert} (waited {timeout:.0f}s)"
        status = self.xds.status(self.settings.node_id)
        seen = {
            types.short_name(t): (s.state if (s := status.get(t)) else "not connected")
            for t in types_
        }
        why = f"Envoy did not confirm its configuration within {timeout:.0f}s ({seen})"
        nacks = "; ".join(
            f"{types.short_name(t)} NACK: {s.last_nack}"
            for t in types_
            if (s := status.get(t)) is not None and s.state == "NACKED"
        )
        envoy = self.supervisor.problem()
        return "; ".join(x for x in (why, nacks, envoy) if x)

    def _pod_synced(self, key: str) -> str | None:
        """ "" once Envoy holds what pod KEY should have, a reason it never will, or None."""
        captured = any(c.key == key and c.state == CAPTURED for c in self.registry.pods.values())
        namespace, name = key.split("/", 1)
        always = set(pod_listener_names(namespace, name))
        names = always | {fast_name(namespace, name)}  # the fast path's when a service names it
        acked = self.xds.acked(self.settings.node_id, types.LISTENER)
        if not captured:
            return None if names & set(acked) else ""
        problem = self.pod_problem(key)
        if problem:
            return problem
        snapshot = self.cache.get(self.settings.node_id)
        wanted = snapshot.versions(types.LISTENER) if snapshot is not None else {}
        if not always <= wanted.keys():
            return None
        if not all(acked.get(n) == wanted[n] for n in names if n in wanted):
            return None
        # The route tables its namespace's joining changed: Envoy applies RDS after LDS, so
        # without them its first requests could still meet another view's routes (or 404).
        translation = self._translations.get(snapshot.version) if snapshot is not None else None
        guarded = translation.route_guards.get(namespace, ()) if translation is not None else ()
        if guarded and not self.xds.holds(self.settings.node_id, types.ROUTE, guarded):
            return None
        # Ready only once Envoy holds the pod's certificate: before that its mTLS would fail.
        sid = self._pod_identity(key)
        if sid is None or self.identities.identity_problem(sid):
            return None
        secrets = snapshot.versions(types.SECRET) if snapshot is not None else {}
        held = self.xds.acked(self.settings.node_id, types.SECRET)
        if sid not in secrets or held.get(sid) != secrets[sid]:
            return None
        return ""

    def _pod_identity(self, key: str) -> str | None:
        pod = self.store.pods.get(key)
        if pod is None:
            return None
        return spiffe_id(self.store.mesh_config.trust_domain, pod.namespace, pod.service_account)

    def _pod_cert_problem(self, key: str) -> str:
        """Why pod KEY's identity has no certificate yet ("" when it has one)."""
        sid = self._pod_identity(key)
        return "" if sid is None else self.identities.identity_problem(sid)

    def status_table(self) -> dict[str, object]:
        status = self.xds.status(self.settings.node_id)
        return {
            "node": self.settings.node_name,
            "envoy_mode": self.supervisor.mode,
            "envoy_pid": self.supervisor.pid,
            "envoy_state": self.supervisor.state,
            "envoy_problem": self.supervisor.problem(),
            "envoy_restarts": self.supervisor.restarts,
            "envoy_last_exit": self.supervisor.last_exit,
            "version": str(self.version),
            "error": self.last_error,
            "rejected": [
                r.to_json()
                for r in sorted(
                    [*self.rejected.values(), *self.failed.values()], key=lambda r: r.origin
                )
            ],
            "unattributed_nack": self.unattributed_nack,
            "identity_unknown": list(self.identity_unknown),
            "types": {types.short_name(t): s.to_json() for t, s in status.items()},
        }
