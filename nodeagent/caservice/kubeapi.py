"""The few API calls the CA makes, as plain JSON objects: its Secrets and ConfigMap, pods (node
authorization) and TokenReview. Built on the same client as the Kubernetes source (kubeconfig or
in-cluster service account)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from nodeagent.sources.kubernetes import api_client, k8s

Obj = dict[str, Any]
TIMEOUT = 10.0  # seconds per API call: a hung API server must not hang a CSR for long
# Collections the CA touches -> the name CoreV1Api's methods use for them.
KINDS = {"secrets": "secret", "configmaps": "config_map", "pods": "pod"}


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotFound(APIError):
    pass


class Conflict(APIError):
    """409: AlreadyExists on create, a stale resourceVersion on replace."""


class ClusterAPI:
    def __init__(self, client: Any) -> None:
        self._client = client
        self._core: Any = k8s.CoreV1Api(client)
        self._authn: Any = k8s.AuthenticationV1Api(client)

    @classmethod
    async def connect(cls, kubeconfig: Path | None) -> ClusterAPI:
        return cls(await api_client(kubeconfig))

    async def close(self) -> None:
        await self._client.close()

    async def read(self, kind: str, namespace: str, name: str) -> Obj:
        method = getattr(self._core, f"read_namespaced_{KINDS[kind]}")
        return await self._call(f"GET {kind} {namespace}/{name}", method, name, namespace)

    async def create(self, kind: str, namespace: str, obj: Obj) -> Obj:
        method = getattr(self._core, f"create_namespaced_{KINDS[kind]}")
        return await self._call(f"POST {kind} {namespace}", method, namespace, obj)

    async def replace(self, kind: str, namespace: str, name: str, obj: Obj) -> Obj:
        method = getattr(self._core, f"replace_namespaced_{KINDS[kind]}")
        return await self._call(f"PUT {kind} {namespace}/{name}", method, name, namespace, obj)

    async def list_pods(self, namespace: str, field_selector: str) -> list[Obj]:
        what = f"LIST pods {namespace} {field_selector}"
        found = await self._call(
            what, self._core.list_namespaced_pod, namespace, field_selector=field_selector
        )
        return list(found.get("items") or [])

    async def review_token(self, token: str, audiences: list[str]) -> Obj:
        """The TokenReview's status (authentication.k8s.io/v1)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        review = await self._call("POST tokenreviews", self._authn.create_token_review, body)
        return dict(review.get("status") or {})

    @staticmethod
    async def _call(what: str, method: Any, *args: Any, **kwargs: Any) -> Obj:
        try:
            response = await method(
                *args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs
            )
            try:
                data = await response.read()
                status = int(response.status)
            finally:
                response.release()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise APIError(0, f"{what}: API server unreachable: {e}") from None
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {}
        if 200 <= status < 300 and isinstance(body, dict):
            return body
        message = f"{what}: {status} {body.get('message', '') if isinstance(body, dict) else ''}"
        if status == 404:
            raise NotFound(status, message)
        if status == 409:
            raise Conflict(status, message)
        raise APIError(status, message)
