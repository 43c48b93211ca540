"""The Kubernetes API server as the agent's source: list, then watch, each kind the mesh needs.

Objects are converted with the directory source's ``parse_document``, so both sources produce the
same records for the same objects. Per kind: LIST (remember the collection's resourceVersion),
WATCH from it with bookmarks, apply ADDED/MODIFIED/DELETED as they come. A 410 Gone (an HTTP
status or an ERROR event) means the watch history we need was compacted away: LIST again and
replace that kind's records, deleting what vanished meanwhile. Connection errors back off
(bounded exponential) and re-watch from the last resourceVersion seen.

Kinds: Pods (of every node), Namespaces, Nodes (their locality labels only), Services,
EndpointSlices, ServiceAccounts, and every Istio kind of networking.istio.io and
security.istio.io at its preferred served version; and, one by one, the Secrets that this node's
DestinationRules name in ``tls.credentialName`` (``_follow_credentials``). Invalid Istio
objects are logged, kept in ``invalid`` and skipped.

Pods of every node, as istiod watches them: an endpoint on another node needs its pod's service
account (the SAN clients verify) and mesh membership (``tlsMode: istio``, auto mTLS). To keep
memory bounded, a pod of another node is kept as ``remote_pod`` trims it: identity, labels,
host network, IPs and only the annotations membership reads; its strings are interned (label
keys and values repeat across the replicas of a workload). This node's pods are kept whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as _client
from kubernetes_asyncio import config as _config
from kubernetes_asyncio.client.exceptions import ApiException

from nodeagent.mesh import credentials
from nodeagent.mesh.membership import POD_ANNOTATIONS, SIDECAR_STATUS
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources import changes
from nodeagent.sources.changes import Record
from nodeagent.sources.directory import ResourceError, parse_document
from nodeagent.sources.secret_access import Create, ReviewFailed, SecretAccessReviews

log = logging.getLogger("nodeagent.sources.kubernetes")

# What a pod of another node keeps of its annotations: mesh membership (membership.decide) and
# Istio's capture annotations (traffic.sidecar.istio.io/*). Anything else (the capture state we
# patch, tooling annotations, which can be large) matters only on the pod's own node.
REMOTE_ANNOTATIONS = POD_ANNOTATIONS
REMOTE_ANNOTATION_PREFIXES = ("traffic.sidecar.istio.io/",)

# The generated client is untyped; calls go through Any so strict mypy accepts them.
k8s: Any = _client
kconfig: Any = _config

ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io")
SOURCE = "kubernetes"
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
WATCH_TIMEOUT = 300  # seconds the API server keeps a watch open before ending it cleanly
LIST_TIMEOUT = 60.0
LIST_PAGE = 500  # objects per LIST page (client-go's reflectors page by 500 too)
CONNECT_TIMEOUT = 10.0
CREDENTIAL_INTERVAL = 1.0  # seconds between looks at which Secrets the node's rules name

Lister = Callable[..., Awaitable[Any]]


class _Gone(Exception):
    """The resourceVersion we watch from is too old (410): only a new LIST helps."""


def plural(kind: str) -> str:
    """The resource name of an Istio kind (ServiceEntry -> serviceentries, Gateway -> gateways)."""
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    namespaced: bool
    lister: Lister  # the client's list/watch function for the whole cluster
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # A watch of one object of the kind (Kind/namespace/name), beside others of that kind: its
    # records, resourceVersion and invalid entry are its own.
    watch_id: str = ""

    @property
    def id(self) -> str:
        return self.watch_id or self.kind

    def scopes(self, invalid_key: str) -> bool:
        """Whether INVALID_KEY (of KubernetesSource.invalid) is one of this watch's objects."""
        if self.watch_id:
            return invalid_key == self.watch_id
        return invalid_key.startswith(f"{self.kind}/")

    def keys(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        """(key of the record in the store, key in KubernetesSource.invalid) from metadata."""
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        name = str(meta.get("name") or "")
        if not self.namespaced:
            return name, f"{self.kind}/{name}"
        ns = str(meta.get("namespace") or "default")
        full = f"{self.kind}/{ns}/{name}"
        return (full if self.istio else f"{ns}/{name}"), full

    @property
    def collection(self) -> str:
        """The store collection of this kind's records."""
        return changes.collection_of(self.kind)

    @property
    def istio(self) -> bool:
        return self.api_version.rpartition("/")[0] in ISTIO_GROUPS


def _interned(values: Mapping[str, str]) -> dict[str, str]:
    return {sys.intern(k): sys.intern(v) for k, v in values.items()}


def remote_pod(pod: Pod) -> Pod:
    """POD as the store keeps a pod of another node: what translation and membership read."""
    return Pod(
        namespace=sys.intern(pod.namespace),
        name=pod.name,
        uid=pod.uid,
        node_name=sys.intern(pod.node_name),
        service_account=sys.intern(pod.service_account),
        labels=_interned(pod.labels),
        annotations=_interned(
            {
                # Istio's sidecar status is a large JSON; membership reads only its presence.
                k: "" if k == SIDECAR_STATUS else v
                for k, v in pod.annotations.items()
                if k in REMOTE_ANNOTATIONS or k.startswith(REMOTE_ANNOTATION_PREFIXES)
            }
        ),
        host_network=pod.host_network,
        pod_ips=pod.pod_ips,
    )


class _Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_MIN

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, BACKOFF_MAX)
        return delay

    def reset(self) -> None:
        self.delay = BACKOFF_MIN


async def api_client(kubeconfig: Path | None) -> Any:
    """A kubernetes-asyncio ApiClient from a kubeconfig, or the pod's service account (None).

    Close it with ``await client.close()``.
    """
    configuration = k8s.Configuration()
    if kubeconfig is None:
        kconfig.load_incluster_config(client_configuration=configuration)
    else:
        await kconfig.load_kube_config(
            config_file=str(kubeconfig),
            client_configuration=configuration,
            persist_config=False,  # never rewrite the operator's kubeconfig
        )
    return k8s.ApiClient(configuration)


class KubernetesSource:
    def __init__(
        self,
        store: MeshStore,
        node_name: str,
        kubeconfig: Path | None = None,
        schemas: IstioSchemas | None = None,
        wanted_credentials: Callable[[MeshStore], set[tuple[str, str]]] | None = None,
        secret_reviews: bool = True,
    ) -> None:
        self.store = store
        # Which Secrets (namespace, name) to follow: by default those this node's selector
        # DestinationRules name; a gateway (nodeagent.gateway) names its servers' credentials.
        self.wanted_credentials = wanted_credentials
        # SubjectAccessReviews of local service accounts (secret_access.py); a gateway has none.
        self.secret_reviews = secret_reviews
        # Secrets come one watch each, once named: pending until their LIST answers.
        store.credential_answers = set()
        self.node_name = node_name
        self.kubeconfig = kubeconfig  # None: in-cluster service account
        self.schemas = schemas or IstioSchemas.load()
        self.invalid: dict[str, list[str]] = {}  # Kind/namespace/name -> problems
        self.resource_versions: dict[str, str] = {}  # kind -> last resourceVersion seen
        self.relists: dict[str, int] = {}  # kind -> LISTs after the first (410 Gone)
        self._known: dict[str, set[str]] = {}  # kind -> store keys this source put
        self._listed: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        api = await self._api_client()
        try:
            kinds = self.kinds(api)
            tasks = [asyncio.create_task(self._follow(kind, len(kinds))) for kind in kinds]
            tasks.append(asyncio.create_task(self._follow_credentials(api, stop)))
            if self.secret_reviews:
                reviews = SecretAccessReviews(self.store, self.node_name, self._reviewer(api))
                tasks.append(asyncio.create_task(reviews.run(stop)))
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await api.close()

    async def _api_client(self) -> Any:
        return await api_client(self.kubeconfig)

    async def list_once(self) -> list[str]:
        """LIST every kind once into the store, without watching (``nodeagent analyze``).
        Returns the Istio kinds the API server does not serve (404: their CRD is not
        installed), which hold nothing then."""
        api = await self._api_client()
        missing: list[str] = []
        try:
            for kind in self.kinds(api):
                try:
                    await self._list(kind)
                except ApiException as e:
                    if e.status != 404 or not kind.istio:
                        raise
                    missing.append(kind.kind)
        finally:
            await api.close()
        self.store.synced.set()
        return missing

    def kinds(self, api: Any) -> list[_Kind]:
        core = k8s.CoreV1Api(api)
        discovery = k8s.DiscoveryV1Api(api)
        custom = k8s.CustomObjectsApi(api)
        kinds = [
            _Kind("Namespace", "v1", False, core.list_namespace),
            # Their locality labels rank endpoints (localityLbSetting); other fields are dropped.
            _Kind("Node", "v1", False, core.list_node),
            # Every node's pods (no field selector): remote endpoints need their identity.
            _Kind("Pod", "v1", True, core.list_pod_for_all_namespaces),
            _Kind("Service", "v1", True, core.list_service_for_all_namespaces),
            _Kind(
                "EndpointSlice",
                "discovery.k8s.io/v1",
                True,
                discovery.list_endpoint_slice_for_all_namespaces,
            ),
            _Kind("ServiceAccount", "v1", True, core.list_service_account_for_all_namespaces),
        ]
        for group, kind in sorted(self.schemas.kinds()):
            versions = self.schemas.served_versions(group, kind)
            if group in ISTIO_GROUPS and versions:
                kinds.append(
                    _Kind(
                        kind,
                        f"{group}/{versions[0]}",
                        True,
                        custom.list_cluster_custom_object,
                        args=(group, versions[0], plural(kind)),
                    )
                )
        return kinds

    # -- Secrets named by DestinationRule credentialName -------------------------------------------

    async def _follow_credentials(self, api: Any, stop: asyncio.Event) -> None:
        """Watch exactly the Secrets this node's selector DestinationRules name (and their
        ``-cacert`` companions, mesh/credentials.py), one watch each, field selector
        ``metadata.name``, in the rule's namespace: no Secret the node does not need crosses the
        wire or reaches memory, and a rotation arrives as a watch event (SDS pushes it). A
        cluster-wide Secret informer (istiod's way) would hold every token and key of the
        cluster on every node; GET on demand would have to poll for rotations. Which Secrets
        are named is looked at when the store changed, at most every CREDENTIAL_INTERVAL."""
        core = k8s.CoreV1Api(api)
        watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        generation = -1
        try:
            while not stop.is_set():
                if self.store.generation != generation:
                    generation = self.store.generation
                    if self.wanted_credentials is not None:
                        named = self.wanted_credentials(self.store)
                    else:
                        pods = self.store.pods_on_node(self.node_name)
                        named = credentials.referenced(self.store, pods)
                    wanted = credentials.with_companions(named)
                    for gone in sorted(watches.keys() - wanted):
                        await self._unwatch_secret(gone, watches.pop(gone))
                    for namespace, name in sorted(wanted - watches.keys()):
                        kind = _Kind(
                            "Secret",
                            "v1",
                            True,
                            core.list_namespaced_secret,
                            args=(namespace,),
                            kwargs={"field_selector": f"metadata.name={name}"},
                            watch_id=f"Secret/{namespace}/{name}",
                        )
                        watches[(namespace, name)] = asyncio.create_task(self._follow(kind, 0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CREDENTIAL_INTERVAL)
        finally:
            for key, task in list(watches.items()):
                await self._unwatch_secret(key, task)

    @staticmethod
    def _reviewer(api: Any) -> Create:
        """POST a SubjectAccessReview (sources/secret_access.py), its answer as JSON."""
        authorization = k8s.AuthorizationV1Api(api)

        async def create(body: dict[str, Any]) -> Mapping[str, Any]:
            try:
                answer = await authorization.create_subject_access_review(
                    body, _request_timeout=CONNECT_TIMEOUT
                )
            except ApiException as e:
                raise ReviewFailed(f"{e.status} {e.reason}", e.status or 0) from None
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                raise ReviewFailed(str(e) or type(e).__name__) from None
            sanitized: Mapping[str, Any] = api.sanitize_for_serialization(answer)
            return sanitized

        return create

    async def _unwatch_secret(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        """Stop one Secret's watch and forget what it brought (no rule needs it any more)."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        watch_id = "Secret/{}/{}".format(*key)
        self.store.forget_credential_answer("{}/{}".format(*key))
        self.resource_versions.pop(watch_id, None)
        self.invalid.pop(watch_id, None)
        for store_key in self._known.pop(watch_id, set()):
            changes.converge(self.store, changes.collection_of("Secret"), store_key, None)

    # -- one kind: list, watch, recover ----------------------------------------------------------

    async def _follow(self, kind: _Kind, total: int) -> None:
        backoff = _Backoff()
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list(kind)
                    self._answered(kind)
                    self._listed.add(kind.kind)
                    if total and len(self._listed) == total:
                        self.store.synced.set()
                await self._watch(kind, version, backoff)
            except _Gone:
                log.info("%s: resourceVersion %s expired (410 Gone); relisting", kind.id, version)
                self.relists[kind.id] = self.relists.get(kind.id, 0) + 1
                version = None
                continue
            except ApiException as e:
                if e.status in (403, 404):
                    self._answered(kind)  # no Secret to wait for: its TLS fails (logged)
                if e.status == 403 and kind.watch_id:
                    # Not granted by default (daemonset/credentials-clusterrole.yaml): say how.
                    log.error(
                        "%s: forbidden; grant ClusterRole nodeagent-credentials to the agent "
                        "with a RoleBinding in namespace %s (its TLS fails until then)",
                        kind.id,
                        kind.args[0],
                    )
                    delay = BACKOFF_MAX * 6
                else:
                    delay = backoff.next()
                    log.warning("%s: %s; retrying in %.1fs", kind.id, e or type(e).__name__, delay)
                await asyncio.sleep(delay)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                delay = backoff.next()
                log.warning("%s: %s; retrying in %.1fs", kind.id, e or type(e).__name__, delay)
                await asyncio.sleep(delay)
            except Exception:  # a bug or a surprising object must not stop this kind for good
                delay = backoff.next()
                log.exception("%s: unexpected error; retrying in %.1fs", kind.id, delay)
                await asyncio.sleep(delay)
            if version is not None:
                # Resume after the last event or bookmark seen (a failed LIST is simply redone).
                version = self.resource_versions.get(kind.id, version)

    def _answered(self, kind: _Kind) -> None:
        """A credential Secret's LIST answered (found, absent or refused): not pending."""
        if kind.watch_id:
            self.store.answer_credential(kind.watch_id.removeprefix("Secret/"))

    async def _request(self, kind: _Kind, **params: Any) -> Any:
        """The raw aiohttp response of the client's list function (JSON, no model objects:
        parse_document wants documents, and model deserialisation rejects odd objects)."""
        resp = await kind.lister(*kind.args, **kind.kwargs, _preload_content=False, **params)
        if resp.status == 410:
            resp.release()
            raise _Gone
        if not 200 <= resp.status <= 299:
            body = await resp.text()
            resp.release()
            raise ApiException(status=resp.status, reason=body[:200])
        return resp

    async def _list(self, kind: _Kind) -> str:
        """LIST in pages of LIST_PAGE (the API server's consistent snapshot): only one page's
        JSON is in memory at a time, which bounds the agent's peak for 10 000s of pods. An
        expired continue token is a 410: the whole LIST starts over."""
        wanted: dict[str, Record] = {}
        self.invalid = {k: v for k, v in self.invalid.items() if not kind.scopes(k)}
        token, version = "", ""
        while True:
            page = {"_continue": token} if token else {}
            resp = await self._request(kind, _request_timeout=LIST_TIMEOUT, limit=LIST_PAGE, **page)
            try:
                body = json.loads(await resp.read())
            finally:
                resp.release()
            for item in body.get("items") or []:
                key, record = self._convert(kind, item)
                if record is not None:
                    wanted[key] = record
            meta = body.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            token = str(meta.get("continue") or "")
            del body
            if not token:
                break
        # Only the differences: a relist after 410 Gone finds most objects unchanged.
        for key in self._known.get(kind.id, set()) - wanted.keys():
            changes.converge(self.store, kind.collection, key, None)
        for key, record in wanted.items():
            changes.converge(self.store, kind.collection, key, record)
        self._known[kind.id] = set(wanted)
        self.resource_versions[kind.id] = version
        return version

    async def _watch(self, kind: _Kind, version: str, backoff: _Backoff) -> None:
        """Applies events until the server ends the watch, keeping resource_versions current."""
        resp = await self._request(
            kind,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT,
            _request_timeout=(CONNECT_TIMEOUT, WATCH_TIMEOUT + 30),
        )
        try:
            while line := await resp.content.readline():
                backoff.reset()  # the connection works again
                event = json.loads(line)
                if new_version := self._event(kind, event):
                    self.resource_versions[kind.id] = new_version
        finally:
            resp.release()

    def _event(self, kind: _Kind, event: Mapping[str, Any]) -> str | None:
        """Applies one watch event; the resourceVersion it carries, if any."""
        kind_of_event, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event without an object: {str(event)[:200]}")
        if kind_of_event == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise ApiException(status=obj.get("code") or 0, reason=str(obj.get("message")))
        meta = obj.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind_of_event in ("ADDED", "MODIFIED"):
            key, record = self._convert(kind, obj)
            known = self._known.setdefault(kind.id, set())
            if record is None:
                if key in known:  # became invalid: drop the old record, as the directory does
                    known.discard(key)
                    changes.converge(self.store, kind.collection, key, None)
            else:
                known.add(key)  # an equal record (a status-only change) writes nothing
                changes.converge(self.store, kind.collection, key, record)
        elif kind_of_event == "DELETED":
            key, invalid_key = kind.keys(obj)
            self.invalid.pop(invalid_key, None)
            if key in self._known.get(kind.id, set()):
                self._known[kind.id].discard(key)
                changes.converge(self.store, kind.collection, key, None)
        elif kind_of_event != "BOOKMARK":
            log.debug("%s: ignoring watch event %s", kind.id, kind_of_event)
        return str(version) if version else None

    def _convert(self, kind: _Kind, obj: dict[str, Any]) -> tuple[str, Record | None]:
        """The store key and record of OBJ (None: invalid, logged and kept in self.invalid)."""
        key, invalid_key = kind.keys(obj)
        # List items carry no kind/apiVersion; the served version is the one we asked for.
        doc = {**obj, "apiVersion": kind.api_version, "kind": kind.kind}
        try:
            parsed = parse_document(doc, SOURCE, 0, self.schemas)
        except ResourceError as e:
            log.error("%s is invalid, skipped: %s", invalid_key, "; ".join(e.problems))
            self.invalid[invalid_key] = list(e.problems)
            return key, None
        self.invalid.pop(invalid_key, None)
        for p in parsed:
            record = p.record
            if isinstance(record, Pod) and record.node_name != self.node_name:
                record = remote_pod(record)
            return p.key[1], record
        return key, None
