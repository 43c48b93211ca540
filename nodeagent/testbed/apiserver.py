"""A stand-in Kubernetes API server: stdlib asyncio HTTP/1.1, the list/watch protocol.

Why a stand-in: no real API server (etcd, kube-apiserver) can run where this project is built and
tested, yet the node agents must be exercised the way the DaemonSet runs them, through the
Kubernetes source. The testbed runs one per testbed (``serve``: in its underlay netns, mirroring
the testbed's published cluster directory) and the unit tests use it in-process.

It speaks the list/watch protocol of the resources the Kubernetes source reads: LIST (paged with
``limit``/``continue`` when asked) answers a
``<Kind>List`` with the collection's resourceVersion; ``watch=1`` streams chunked, newline
delimited events from the requested resourceVersion (history replayed, then live), honours
``fieldSelector=spec.nodeName=...`` for pods and sends BOOKMARKs on request. Tests mutate objects
through add/modify/delete (one global, increasing resourceVersion, as etcd has) and can expire
the history (410 Gone, as an ERROR event or an HTTP status) or drop watch connections abruptly.

It also answers GET of one namespaced object of a group (``/apis/apps/v1/namespaces/NS/daemonsets/
NAME``: the object, or 404), failing the next ones as ``failures`` says (an HTTP status, or 0 for
a connection closed without an answer).

PATCH of a pod (``/api/v1/namespaces/NS/pods/NAME``, JSON merge patch of its metadata) changes it
and its watchers see MODIFIED, as they would on a real server.

For the CA service (``nodeagent ca``): GET of a namespaced core object (``/api/v1/namespaces/NS/
{pods,secrets,configmaps,...}/NAME``), POST of one to its namespaced collection (201, or 409
AlreadyExists), PUT of one (200; 404; 409 Conflict on a stale resourceVersion), a namespaced
LIST/watch, and TokenReview (``/apis/authentication.k8s.io/v1/tokenreviews``) of the tokens
registered with ``register_token`` or listed in ``serve``'s tokens file (the kubelet's
TokenRequest, standing in): unknown, expired or wrong-audience tokens are not authenticated;
pod-bound ones carry the pod's name and uid in ``user.extra``. With ``configmap_dir``, every
ConfigMap's keys are written there as files (the kubelet's configMap volume).

SubjectAccessReview (``/apis/authorization.k8s.io/v1/subjectaccessreviews``) is answered from the
Roles, RoleBindings, ClusterRoles and ClusterRoleBindings it holds (rbac.py: a small RBAC
authorizer), as the node agents ask it for Istio's credentialName authorization.

What differs from a real API server: no authentication or authorization of its clients (RBAC is not
checked for them; TokenReview only answers for the tokens it was given, which are opaque strings,
not signed JWTs), no admission (objects are not validated: Istio objects the real server would
refuse reach the agents, which validate them themselves; only a Secret's ``stringData`` is folded
into ``data``), pages of a paged LIST are not one snapshot, no label selectors, field selectors
only ``spec.nodeName``, ``spec.serviceAccountName``, ``metadata.name`` and ``metadata.namespace``
(``=`` only), and the whole history is kept in memory until ``expire``. Objects have no server-set
fields beyond ``resourceVersion`` and ``creationTimestamp`` (set on create to the second, as the
API server does, kept on updates; a test may give one to model an object created earlier); no uid.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nodeagent import kubeyaml
from nodeagent.testbed import rbac

log = logging.getLogger("nodeagent.testbed.apiserver")

# path -> (kind, apiVersion) of the built-in resources; custom ones are generic.
CORE = {
    "/api/v1/namespaces": ("Namespace", "v1"),
    "/api/v1/nodes": ("Node", "v1"),
    "/api/v1/pods": ("Pod", "v1"),
    "/api/v1/services": ("Service", "v1"),
    "/api/v1/serviceaccounts": ("ServiceAccount", "v1"),
    "/api/v1/secrets": ("Secret", "v1"),
    "/api/v1/configmaps": ("ConfigMap", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
}
Obj = dict[str, Any]
Route = tuple[str, str, str]  # resource, kind, apiVersion served
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
RBAC_GROUP = "rbac.authorization.k8s.io"
# Field selectors the stand-in answers (a real server has a few more per kind), with the value a
# pod without the field has (the ServiceAccount admission plugin sets "default").
POD_FIELDS = {"spec.nodeName": "", "spec.serviceAccountName": "default"}
META_FIELDS = ("metadata.name", "metadata.namespace")  # every kind has them


def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def _true(value: str | None) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (clients send True too)."""
    return (value or "").lower() in ("1", "t", "true")


def resource_of(obj: Obj) -> str:
    """The collection an object lives in: a CORE path, or group/plural of a custom kind."""
    api, kind = str(obj["apiVersion"]), str(obj["kind"])
    for path, (k, a) in CORE.items():
        if (k, a) == (kind, api):
            return path
    return f"{api.rpartition('/')[0]}/{plural(kind)}"


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _identity(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    namespaced = obj["kind"] not in ("Namespace", "Node")
    return (meta.get("namespace") or "default") if namespaced else "", meta["name"]


def _content_length(head: bytes) -> int:
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value.strip())
    return 0


def _merge(target: Obj, patch: Obj) -> None:
    """RFC 7386 JSON merge patch: null removes, objects merge, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):  # into a new object too: its nulls are no values
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _compose(acc: Obj, patch: Obj) -> None:
    """Folds merge patch PATCH into ACC, so that applying ACC once equals applying both."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(acc.get(key), dict):
            _compose(acc[key], value)
        else:
            acc[key] = copy.deepcopy(value)


def _secret_data(obj: Obj) -> None:
    """A Secret's stringData folded into data (base64), as the API server stores it."""
    if obj.get("kind") == "Secret" and isinstance(obj.get("stringData"), dict):
        data = obj.setdefault("data", {})
        for key, value in obj.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()


def _fields(query: dict[str, str]) -> dict[str, str]:
    """The ``fieldSelector`` terms (``a=b,c=d``); ValueError names one the stand-in lacks."""
    out: dict[str, str] = {}
    supported = [*POD_FIELDS, *META_FIELDS]
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        name, eq, value = term.partition("=")
        value = value.removeprefix("=")  # "==" is the same operator
        if not eq or name not in supported:
            raise ValueError(f'"{term}": field label not supported (only {", ".join(supported)})')
        out[name] = value
    return out


def _matches(obj: Obj, namespace: str | None, fields: dict[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    if namespace is not None and meta.get("namespace") != namespace:
        return False
    spec = obj.get("spec") or {}
    for name, value in fields.items():
        if name in META_FIELDS:
            actual = str(meta.get(name.removeprefix("metadata.")) or "")
        else:
            actual = str(spec.get(name.removeprefix("spec.")) or POD_FIELDS[name])
        if actual != value:
            return False
    return True


@dataclass(frozen=True)
class Token:
    """A service account token the stand-in's TokenReview accepts (what TokenRequest issued)."""

    token: str = field(repr=False)
    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    audiences: tuple[str, ...] = ()
    expires_at: float | None = None  # seconds since the epoch; None: never


def load_tokens(path: Path) -> dict[str, Token]:
    """A tokens file: a JSON list of {token, namespace, serviceAccount, podName, podUid,
    audiences, expiresAt}."""
    out: dict[str, Token] = {}
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of tokens")
    for i, e in enumerate(entries):
        try:
            t = Token(
                token=str(e["token"]),
                namespace=str(e["namespace"]),
                service_account=str(e["serviceAccount"]),
                pod_name=e.get("podName"),
                pod_uid=e.get("podUid"),
                audiences=tuple(e.get("audiences") or ()),
                expires_at=e.get("expiresAt"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: token #{i}: missing or bad field {exc}") from None
        out[t.token] = t
    return out


@dataclass
class _Event:
    version: int
    resource: str
    type: str
    object: Obj


@dataclass(eq=False)
class _Watcher:
    resource: str
    namespace: str | None  # a namespaced watch
    fields: dict[str, str]  # pods: field selector terms
    bookmarks: bool
    queue: asyncio.Queue[_Event | None] = field(default_factory=asyncio.Queue)
    writer: asyncio.StreamWriter | None = None


class APIServerStandIn:
    def __init__(self, max_history: int | None = None) -> None:
        self.max_history = max_history  # events kept for watch replays (None: all)
        self.version = 1
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {}
        self.history: list[_Event] = []
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.gone_as_status = False  # 410 as an HTTP status instead of an ERROR event
        self.hidden = False  # mutations reach history, not open watches (a stalled watch)
        self.requests: list[str] = []  # "LIST <path>" / "WATCH <path> <rv>" / "GET <path>"
        self.failures: list[int] = []  # answers to the next object GETs: a status, 0 = hang up
        # Every merge patch clients sent, composed per object (resource, (namespace, name)):
        # what a writer of the whole object (the testbed's mirror) must keep.
        self.patches: dict[tuple[str, tuple[str, str]], Obj] = {}
        self._watchers: set[_Watcher] = set()
        self._kinds: dict[str, str] = {}  # custom resource -> its kind
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.tokens: dict[str, Token] = {}  # register_token's
        self.file_tokens: dict[str, Token] = {}  # the tokens file's (serve)
        self.configmap_dir: Path | None = None  # ConfigMaps' keys written here (kubelet volume)
        self.host = "127.0.0.1"
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_watches()
        if self._server is not None:
            self._server.close()
        # Let the connection handlers finish rather than be cancelled at loop shutdown.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "nobody", "user": {}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "nobody"}}],
            "current-context": "standin",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # -- tokens (tests; the testbed through a tokens file) ---------------------------------------

    def register_token(
        self,
        token: str,
        namespace: str,
        service_account: str,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        audiences: tuple[str, ...] | list[str] = (),
        expires_at: float | None = None,
    ) -> None:
        """A token TokenReview accepts for AUDIENCES until EXPIRES_AT (epoch seconds); bound to a
        pod when POD_NAME/POD_UID are given (the kubelet's projected tokens are)."""
        self.tokens[token] = Token(
            token, namespace, service_account, pod_name, pod_uid, tuple(audiences), expires_at
        )

    def _review(self, spec: Any) -> Obj:
        """TokenReview's status for SPEC, as the API server's service account authenticator
        answers (pod-bound tokens carry the pod's name and uid in ``user.extra``)."""
        spec = spec if isinstance(spec, dict) else {}
        wanted = [str(a) for a in spec.get("audiences") or []]
        token = self.tokens.get(str(spec.get("token") or "")) or self.file_tokens.get(
            str(spec.get("token") or "")
        )
        if token is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        if token.expires_at is not None and token.expires_at <= time.time():
            return {"authenticated": False, "error": "invalid bearer token, token has expired"}
        audiences = [a for a in wanted if a in token.audiences] if wanted else []
        if wanted and not audiences:
            return {
                "authenticated": False,
                "error": f"invalid bearer token, token audiences {list(token.audiences)} is "
                f"invalid for the target audiences {wanted}",
            }
        extra: dict[str, list[str]] = {}
        if token.pod_name is not None:
            extra["authentication.kubernetes.io/pod-name"] = [token.pod_name]
        if token.pod_uid is not None:
            extra["authentication.kubernetes.io/pod-uid"] = [token.pod_uid]
        user = {
            "username": f"system:serviceaccount:{token.namespace}:{token.service_account}",
            "uid": f"sa-{token.namespace}-{token.service_account}",
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{token.namespace}",
                "system:authenticated",
            ],
            "extra": extra,
        }
        return {"authenticated": True, "user": user, "audiences": audiences or wanted}

    # -- mutations (tests) ------------------------------------------------------------------------

    def add(self, obj: Obj) -> int:
        return self._write("ADDED", obj)

    def modify(self, obj: Obj) -> int:
        return self._write("MODIFIED", obj)

    def delete(self, obj: Obj) -> int:
        resource = resource_of(obj)
        stored = self.objects.get(resource, {}).pop(_identity(obj))
        self.patches.pop((resource, _identity(obj)), None)
        self.version += 1
        stored = copy.deepcopy(stored)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self._publish(_Event(self.version, resource, "DELETED", stored))
        return self.version

    def _write(self, type_: str, obj: Obj) -> int:
        self.version += 1
        stored = copy.deepcopy(obj)
        _secret_data(stored)
        meta = stored.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.version)
        resource = resource_of(stored)
        before = self.objects.get(resource, {}).get(_identity(stored))
        created = (before or {}).get("metadata", {}).get("creationTimestamp")
        meta["creationTimestamp"] = created or meta.get("creationTimestamp") or _now_rfc3339()
        self.objects.setdefault(resource, {})[_identity(stored)] = stored
        self._kinds[resource] = str(stored["kind"])
        self._publish(_Event(self.version, resource, type_, stored))
        return self.version

    def _publish(self, event: _Event) -> None:
        if event.resource == "/api/v1/configmaps" and self.configmap_dir is not None:
            self._mount(event)
        self.history.append(event)
        if self.max_history is not None and len(self.history) > self.max_history:
            # Compacted, as etcd does: a watch from before the oldest kept event gets 410.
            dropped = self.history[: len(self.history) - self.max_history]
            del self.history[: len(dropped)]
            self.compacted = dropped[-1].version
        if not self.hidden:
            for watcher in self._watchers:
                if watcher.resource == event.resource and self._selected(watcher, event.object):
                    watcher.queue.put_nowait(event)

    def _mount(self, event: _Event) -> None:
        """A ConfigMap's keys as files (the kubelet's configMap volume): each written atomically
        when it changed; a deleted ConfigMap's directory emptied."""
        assert self.configmap_dir is not None
        namespace, name = _identity(event.object)
        where = self.configmap_dir / namespace / name
        data = {} if event.type == "DELETED" else dict(event.object.get("data") or {})
        where.mkdir(parents=True, exist_ok=True)
        for old in where.iterdir():
            if old.is_file() and not old.name.startswith(".") and old.name not in data:
                old.unlink()
        for key, value in data.items():
            if "/" in key or key.startswith("."):
                log.warning("ConfigMap %s/%s: key %r not written as a file", namespace, name, key)
                continue
            path = where / key
            content = str(value).encode()
            with contextlib.suppress(OSError):
                if path.read_bytes() == content:
                    continue
            partial = where / f".{key}.tmp"
            partial.write_bytes(content)
            os.replace(partial, path)

    # -- failures (tests) -------------------------------------------------------------------------

    def bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion to every watch that allows them."""
        for watcher in self._watchers:
            if watcher.bookmarks:
                obj = {"metadata": {"resourceVersion": str(self.version)}}
                watcher.queue.put_nowait(_Event(self.version, watcher.resource, "BOOKMARK", obj))

    def expire(self) -> None:
        """Compacts the history: open watches get a 410 ERROR event, old resourceVersions 410."""
        self.compacted = self.version
        self.hidden = False
        for watcher in self._watchers:
            gone = {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired"}
            watcher.queue.put_nowait(_Event(self.version, watcher.resource, "ERROR", gone))
            watcher.queue.put_nowait(None)

    def drop_watches(self, compact: bool = False) -> None:
        """Cuts every watch connection mid-stream (no final chunk); COMPACT: history too."""
        if compact:
            self.compacted = self.version
        self.hidden = False
        for watcher in list(self._watchers):
            self._watchers.discard(watcher)
            watcher.queue.put_nowait(None)
            if watcher.writer is not None:
                watcher.writer.transport.abort()

    def watches(self) -> int:
        return len(self._watchers)

    # -- HTTP -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body: Any = None
            if method in ("POST", "PUT", "PATCH"):
                length = _content_length(head)
                try:
                    body = json.loads(await reader.readexactly(length)) if length else {}
                except ValueError as e:
                    await self._reply(writer, 400, _status(400, "BadRequest", f"body: {e}"))
                    return
            collection, namespace = _namespaced(url.path)
            route = self._route(collection)
            one = self._object(url.path)
            if method == "POST" and url.path == TOKENREVIEWS:
                await self._token_review(writer, body)
            elif method == "POST" and url.path == SUBJECT_ACCESS_REVIEWS:
                await self._access_review(writer, body)
            elif method == "GET" and one is not None:
                await self._get(writer, url.path, *one)
            elif method == "PATCH":
                await self._patch(writer, url.path, head, body)
            elif method == "PUT" and one is not None:
                await self._put(writer, url.path, *one, body)
            elif method == "POST" and namespace is not None and route is not None:
                await self._create(writer, url.path, route, namespace, body)
            elif method != "GET" or route is None:
                await self._reply(writer, 404, {"kind": "Status", "code": 404})
            elif _true(query.get("watch")):
                await self._watch(writer, url.path, route, query, namespace)
            else:
                await self._list(writer, url.path, route, query, namespace)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, path: str) -> Route | None:
        """(resource, kind, apiVersion served) of a collection path."""
        if path in CORE:
            kind, api = CORE[path]
            return path, kind, api
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == "apis":
            group, version, name = parts[1:]
            resource = f"{group}/{name}"
            return resource, self._kinds.get(resource, name), f"{group}/{version}"
        return None

    @staticmethod
    def _object(path: str) -> tuple[str, tuple[str, str]] | None:
        """(resource, (namespace, name)) of a namespaced object path (core, or of a group)."""
        parts = path.strip("/").split("/")
        if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
            return f"{parts[1]}/{parts[5]}", (parts[4], parts[6])
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
            resource = f"/api/v1/{parts[4]}"
            if resource in CORE:
                return resource, (parts[3], parts[5])
        return None

    async def _token_review(self, writer: asyncio.StreamWriter, body: Any) -> None:
        self.requests.append(f"POST {TOKENREVIEWS}")
        spec = body.get("spec") if isinstance(body, dict) else None
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {},
            "spec": spec or {},
            "status": self._review(spec),
        }
        await self._reply(writer, 201, review)

    def access_review(self, spec: Any) -> Obj:
        """SubjectAccessReview's status for SPEC from the Roles, RoleBindings, ClusterRoles
        and ClusterRoleBindings held (rbac.py). ValueError naming the field of a bad SPEC."""
        request = rbac.request_of(spec if isinstance(spec, dict) else {})
        held = {
            kind: list(self.objects.get(f"{RBAC_GROUP}/{kind}", {}).values())
            for kind in ("roles", "rolebindings", "clusterroles", "clusterrolebindings")
        }
        allowed, reason = rbac.authorize(
            request,
            held["roles"],
            held["rolebindings"],
            held["clusterroles"],
            held["clusterrolebindings"],
        )
        return {"allowed": allowed, "reason": reason} if reason else {"allowed": allowed}

    async def _access_review(self, writer: asyncio.StreamWriter, body: Any) -> None:
        self.requests.append(f"POST {SUBJECT_ACCESS_REVIEWS}")
        spec = body.get("spec") if isinstance(body, dict) else None
        try:
            status = self.access_review(spec)
        except ValueError as e:
            await self._reply(writer, 400, _status(400, "BadRequest", str(e)))
            return
        review = {
            "kind": "SubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {},
            "spec": spec,
            "status": status,
        }
        await self._reply(writer, 201, review)

    async def _create(
        self, writer: asyncio.StreamWriter, path: str, route: Route, namespace: str, body: Any
    ) -> None:
        """POST of a namespaced core object: 201, or 409 AlreadyExists."""
        self.requests.append(f"POST {path}")
        resource, kind, api = route
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            await self._reply(writer, 400, _status(400, "BadRequest", "metadata.name required"))
            return
        obj = copy.deepcopy(body)
        obj.update(kind=kind, apiVersion=api)
        obj["metadata"]["namespace"] = namespace
        obj["metadata"].pop("resourceVersion", None)
        key = (namespace, obj["metadata"]["name"])
        if key in self.objects.get(resource, {}):
            message = f'{resource.rpartition("/")[2]} "{key[1]}" already exists'
            await self._reply(writer, 409, _status(409, "AlreadyExists", message))
            return
        self.add(obj)
        await self._reply(writer, 201, self.objects[resource][key])

    async def _put(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        resource: str,
        key: tuple[str, str],
        body: Any,
    ) -> None:
        """PUT of one object: 200, 404, or 409 Conflict on a stale metadata.resourceVersion."""
        self.requests.append(f"PUT {path}")
        stored = self.objects.get(resource, {}).get(key)
        if stored is None:
            await self._reply(writer, 404, _status(404, "NotFound", f'"{key[1]}" not found'))
            return
        if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != key[1]:
            await self._reply(writer, 400, _status(400, "BadRequest", "metadata.name differs"))
            return
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version and version != stored["metadata"]["resourceVersion"]:
            message = (
                "the object has been modified; please apply your changes to the latest version"
            )
            await self._reply(writer, 409, _status(409, "Conflict", message))
            return
        obj = copy.deepcopy(body)
        obj.update(kind=stored["kind"], apiVersion=stored["apiVersion"])
        obj["metadata"]["namespace"] = key[0]
        self.modify(obj)
        await self._reply(writer, 200, self.objects[resource][key])

    async def _get(
        self, writer: asyncio.StreamWriter, path: str, resource: str, key: tuple[str, str]
    ) -> None:
        self.requests.append(f"GET {path}")
        if self.failures:
            status = self.failures.pop(0)
            if status == 0:
                writer.transport.abort()
                return
            await self._reply(writer, status, {"kind": "Status", "code": status})
            return
        obj = self.objects.get(resource, {}).get(key)
        if obj is None:
            await self._reply(writer, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        else:
            await self._reply(writer, 200, obj)

    async def _patch(self, writer: asyncio.StreamWriter, path: str, head: bytes, body: Any) -> None:
        self.requests.append(f"PATCH {path}")
        parts = path.strip("/").split("/")
        pod = None
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            pod = self.objects.get("/api/v1/pods", {}).get((parts[3], parts[5]))
        if pod is None:
            await self._reply(writer, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            return
        if b"application/merge-patch+json" not in head.lower() or not isinstance(body, dict):
            await self._reply(writer, 415, {"kind": "Status", "code": 415})
            return
        changed = copy.deepcopy(pod)
        _merge(changed, body)
        _compose(self.patches.setdefault(("/api/v1/pods", (parts[3], parts[5])), {}), body)
        self.modify(changed)
        await self._reply(writer, 200, self.objects["/api/v1/pods"][(parts[3], parts[5])])

    def _selected(self, watcher: _Watcher, obj: Obj) -> bool:
        return _matches(obj, watcher.namespace, watcher.fields)

    @staticmethod
    def _served(obj: Obj, path: str, api: str) -> Obj:
        out = copy.deepcopy(obj)
        if path.startswith("/apis/") and path not in CORE:
            out["apiVersion"] = api  # served at the version asked for, as for CRDs
        return out

    async def _list(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        route: Route,
        q: dict[str, str],
        namespace: str | None = None,
    ) -> None:
        """A LIST, in pages when asked (``limit``): the continue token names the snapshot's
        resourceVersion and the last key sent; the next page holds the keys after it. Unlike a
        real server, a later page shows objects as they are now (a watch from the snapshot's
        version replays what changed, so the client converges all the same)."""
        resource, kind, api = route
        self.requests.append(f"LIST {path}")
        try:
            fields = _fields(q) if q.get("fieldSelector") else {}
        except ValueError as e:
            await self._reply(writer, 400, _status(400, "BadRequest", str(e)))
            return
        version, after = self.version, None
        if q.get("continue"):
            token = json.loads(base64.urlsafe_b64decode(q["continue"]))
            version, after = int(token["rv"]), tuple(token["after"])
            if version < self.compacted:
                gone = {"kind": "Status", "code": 410, "reason": "Expired"}
                await self._reply(writer, 410, gone)
                return
        limit = int(q.get("limit") or 0)
        items: list[Obj] = []
        last: tuple[str, str] | None = None
        for key in sorted(self.objects.get(resource, {})):
            obj = self.objects[resource][key]
            if after is not None and key <= after:
                continue
            if not _matches(obj, namespace, fields):
                continue
            if limit and len(items) == limit:
                break
            item = self._served(obj, path, api)
            if resource in CORE:  # typed lists carry no kind/apiVersion on their items
                item.pop("kind", None)
                item.pop("apiVersion", None)
            items.append(item)
            last = key
        else:
            last = None  # nothing left after this page
        meta: Obj = {"resourceVersion": str(version)}
        if last is not None:
            token = json.dumps({"rv": version, "after": list(last)}).encode()
            meta["continue"] = base64.urlsafe_b64encode(token).decode()
        body = {"kind": f"{kind}List", "apiVersion": api, "metadata": meta, "items": items}
        await self._reply(writer, 200, body)

    async def _watch(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        route: Route,
        q: dict[str, str],
        namespace: str | None = None,
    ) -> None:
        resource, kind, api = route
        since = int(q.get("resourceVersion") or 0)
        self.requests.append(f"WATCH {path} {since}")
        try:
            fields = _fields(q) if q.get("fieldSelector") else {}
        except ValueError as e:
            await self._reply(writer, 400, _status(400, "BadRequest", str(e)))
            return
        gone = {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired"}
        if since < self.compacted and self.gone_as_status:
            await self._reply(writer, 410, gone)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        if since < self.compacted:
            await self._chunk(writer, {"type": "ERROR", "object": gone})
            await self._end(writer)
            return
        watcher = _Watcher(
            resource, namespace, fields, _true(q.get("allowWatchBookmarks")), writer=writer
        )
        # Replay and subscribe with no await in between: no event is lost or doubled.
        for event in self.history:
            fresh = event.version > since and event.resource == resource
            if fresh and self._selected(watcher, event.object):
                watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        timeout = float(q.get("timeoutSeconds") or 3600)
        try:
            async with asyncio.timeout(timeout):
                while (live := await watcher.queue.get()) is not None:
                    obj = live.object
                    if live.type not in ("ERROR", "BOOKMARK"):
                        obj = self._served(obj, path, api)
                    elif live.type == "BOOKMARK":
                        obj = {"kind": kind, "apiVersion": api, **obj}
                    await self._chunk(writer, {"type": live.type, "object": obj})
        except TimeoutError:
            pass  # the server ends a watch cleanly after timeoutSeconds
        finally:
            self._watchers.discard(watcher)
        await self._end(writer)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        reason = {
            200: "OK",
            201: "Created",
            400: "Bad Request",
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not Found",
            409: "Conflict",
            410: "Gone",
            415: "Unsupported Media Type",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    async def _end(writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _namespaced(path: str) -> tuple[str, str | None]:
    """A namespaced core collection path (``/api/v1/namespaces/NS/pods``) as the cluster-wide
    one and its namespace; any other path as is."""
    parts = path.strip("/").split("/")
    if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"]:
        collection = f"/api/v1/{parts[4]}"
        if collection in CORE:
            return collection, parts[3]
    return path, None


# -- the testbed's API server: its cluster directory, served --------------------------------------

SUFFIXES = (".yaml", ".yml", ".json")
Identity = tuple[str, tuple[str, str]]  # (resource, (namespace, name))


def _documents(path: Path) -> list[Obj]:
    """The objects of one file (YAML documents, or JSON; a ``kind: List``'s items count)."""
    text = path.read_text()
    # As the directory source reads them (YAML as Kubernetes reads it, JSON documents as JSON).
    docs = [json.loads(text)] if path.suffix == ".json" else kubeyaml.load_all(text)
    out: list[Obj] = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if (doc.get("apiVersion"), doc.get("kind")) == ("v1", "List"):
            out += [item for item in doc.get("items") or [] if isinstance(item, dict)]
        else:
            out.append(doc)
    return out


def _as_stored(desired: Obj, stored: Obj) -> None:
    """DESIRED (a private copy) as the server stores it over STORED: its creationTimestamp
    kept, a Secret's stringData folded. Compared so: an object whose file did not change is
    not MODIFIED again (a real API server sends no event for a write that changes nothing;
    re-sending every object of the cluster at each sync made watchers' work grow with it)."""
    _secret_data(desired)
    created = stored.get("metadata", {}).get("creationTimestamp")
    meta = desired.setdefault("metadata", {})
    if created and not meta.get("creationTimestamp"):
        meta["creationTimestamp"] = created


def _without_version(obj: Obj) -> Obj:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return out


class ClusterMirror:
    """Keeps a stand-in's objects equal to those of a directory of Kubernetes YAML/JSON files.

    The testbed publishes its cluster (namespaces, pods, services, EndpointSlices, and the Istio
    objects tests apply) as files; each ``sync`` turns what changed into ADDED, MODIFIED and
    DELETED events, as a controller's writes reach a real API server. What clients PATCHed onto
    an object (the agents' capture annotations) is kept when its file is rewritten. Hidden files
    are skipped (the testbed writes a temporary file and renames it); a file that does not parse
    (caught mid-write) is read again at the next sync.
    """

    def __init__(self, root: Path, server: APIServerStandIn) -> None:
        self.root = root
        self.server = server
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._objects: dict[Path, dict[Identity, Obj]] = {}  # per file: its objects, by identity
        self._owners: dict[Identity, set[Path]] = {}  # the files holding each object

    def _files(self) -> Iterator[tuple[Path, tuple[int, int, int]]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(self.root).parts)
            if hidden or path.suffix not in SUFFIXES:
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                if path.is_file():
                    yield path, (st.st_mtime_ns, st.st_size, st.st_ino)

    def sync(self) -> bool:
        """Applies what changed in the directory since the last sync; True if anything did.

        Only the objects of added, changed and removed files are compared with the server's:
        a real API server does no work for the objects nobody wrote, and comparing every object
        of a 5000-service directory at each change cost ~0.2 s of CPU beside the agents."""
        files = dict(self._files())
        touched: dict[Identity, None] = {}  # ordered: events go out in the files' order
        changed = False
        for path in [p for p in self._objects if p not in files]:
            touched.update(dict.fromkeys(self._forget(path)))
            del self._stamps[path]
            changed = True
        for path, stamp in files.items():
            if self._stamps.get(path) == stamp:
                continue
            try:
                docs = _documents(path)
            except (OSError, ValueError, kubeyaml.YAMLError) as e:
                log.warning("%s: not readable yet (%s); trying again", path, e)
                continue
            self._stamps[path] = stamp
            touched.update(dict.fromkeys(self._forget(path)))
            objects = self._objects[path] = self._valid(path, docs)
            for identity in objects:
                self._owners.setdefault(identity, set()).add(path)
            touched.update(dict.fromkeys(objects))
            changed = True
        if touched:
            self._apply(touched)
        return changed

    def _forget(self, path: Path) -> list[Identity]:
        """Drops PATH's objects from the owner index; their identities."""
        gone = list(self._objects.pop(path, {}))
        for identity in gone:
            owners = self._owners[identity]
            owners.discard(path)
            if not owners:
                del self._owners[identity]
        return gone

    @staticmethod
    def _valid(path: Path, docs: list[Obj]) -> dict[Identity, Obj]:
        out: dict[Identity, Obj] = {}
        for obj in docs:
            meta = obj.get("metadata")
            if not isinstance(meta, dict) or not meta.get("name") or not obj.get("kind"):
                log.warning("%s: an object without kind or metadata.name, skipped", path)
                continue
            if not isinstance(obj.get("apiVersion"), str):
                continue
            out[(resource_of(obj), _identity(obj))] = obj  # a later document wins
        return out

    def _apply(self, touched: dict[Identity, None]) -> None:
        """Brings the server's copy of each TOUCHED object to what its files now say: the last
        file (in path order) holding it wins, as when every file is read in order."""
        server = self.server
        gone = sorted(i for i in touched if i not in self._owners)
        for resource, key in gone:
            stored = server.objects.get(resource, {}).get(key)
            if stored is not None:
                server.delete(stored)
        for resource, key in (i for i in touched if i in self._owners):
            obj = self._objects[max(self._owners[(resource, key)])][(resource, key)]
            desired = copy.deepcopy(obj)
            _merge(desired, server.patches.get((resource, key), {}))
            stored = server.objects.get(resource, {}).get(key)
            if stored is None:
                server.add(desired)
                continue
            _as_stored(desired, stored)
            if _without_version(stored) != _without_version(desired):
                server.modify(desired)


class TokensFile:
    """The tokens file (``--tokens``): re-read when it changes, as the kubelet's TokenRequest
    would hand out new tokens; a file that does not parse keeps the tokens read before."""

    def __init__(self, path: Path, server: APIServerStandIn) -> None:
        self.path = path
        self.server = server
        self._content: bytes | None = None

    def sync(self) -> None:
        try:
            content = self.path.read_bytes()  # small: compared whole, no timestamp granularity
        except FileNotFoundError:
            self.server.file_tokens = {}
            self._content = None
            return
        except OSError as e:
            log.warning("%s: not readable (%s); trying again", self.path, e)
            return
        if content == self._content:
            return
        try:
            self.server.file_tokens = load_tokens(self.path)
        except (OSError, ValueError) as e:
            log.warning("%s: not readable yet (%s); trying again", self.path, e)
            return
        self._content = content


async def serve(
    cluster_dir: Path,
    host: str,
    port: int,
    kubeconfig: Path,
    interval: float = 0.1,
    tokens_file: Path | None = None,
    configmap_dir: Path | None = None,
) -> None:
    """Serve CLUSTER_DIR on HOST:PORT until SIGTERM; KUBECONFIG is written once it listens.

    TOKENS_FILE: the tokens TokenReview accepts (see ``load_tokens``), re-read at each sync;
    CONFIGMAP_DIR: every ConfigMap's keys written to ``DIR/<ns>/<name>/<key>``.
    """
    server = APIServerStandIn(max_history=20000)
    server.configmap_dir = configmap_dir
    mirror = ClusterMirror(cluster_dir, server)
    tokens = TokensFile(tokens_file, server) if tokens_file is not None else None
    if tokens is not None:
        tokens.sync()
    mirror.sync()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(host, port)
    partial = kubeconfig.with_name(f".{kubeconfig.name}.tmp")
    partial.parent.mkdir(parents=True, exist_ok=True)
    server.write_kubeconfig(partial)
    os.replace(partial, kubeconfig)
    log.info("serving %s on %s", cluster_dir, server.url)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if tokens is not None:
                tokens.sync()
            mirror.sync()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent.testbed.apiserver",
        description="The testbed's stand-in API server, serving its cluster directory.",
    )
    parser.add_argument("cluster_dir", type=Path)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--kubeconfig", required=True, type=Path, help="written once listening")
    parser.add_argument(
        "--tokens", type=Path, default=None, help="JSON list of tokens TokenReview accepts"
    )
    parser.add_argument(
        "--configmap-dir", type=Path, default=None, help="ConfigMaps' keys written here"
    )
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(
        serve(
            args.cluster_dir,
            host,
            int(port),
            args.kubeconfig,
            tokens_file=args.tokens,
            configmap_dir=args.configmap_dir,
        )
    )


if __name__ == "__main__":
    main()
