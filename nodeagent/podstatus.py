"""Each pod's capture state, written on the pod itself so that `kubectl` shows it.

``nodeagent.io/capture`` holds the state (captured, not-in-mesh, failed, netns-missing), for a
captured pod ``nodeagent.io/capture-backend`` the backend that captures it (nftables or ebpf),
and, for the two failures, ``nodeagent.io/capture-reason`` says why. Patches go out in the
background: the capture path never waits on the API server, the latest state of a pod wins, a
patch the pod already carries is not sent, and a failed one is retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from nodeagent.mesh.store import MeshStore
from nodeagent.redirect.registry import CAPTURED, FAILED, NETNS_MISSING

log = logging.getLogger("nodeagent.podstatus")

CAPTURE_ANNOTATION = "nodeagent.io/capture"
REASON_ANNOTATION = "nodeagent.io/capture-reason"
BACKEND_ANNOTATION = "nodeagent.io/capture-backend"
RETRY_MIN, RETRY_MAX = 0.5, 30.0

Annotations = Mapping[str, str | None]  # None removes the annotation (JSON merge patch)
# (namespace, name, annotations) -> patched; raises LookupError when the pod no longer exists.
Patcher = Callable[[str, str, Annotations], Awaitable[None]]


def capture_annotations(state: str, reason: str, backend: str = "") -> dict[str, str | None]:
    failed = state in (FAILED, NETNS_MISSING)
    return {
        CAPTURE_ANNOTATION: state,
        REASON_ANNOTATION: reason if failed else None,
        BACKEND_ANNOTATION: backend if state == CAPTURED and backend else None,
    }


class PodAnnotator:
    def __init__(self, store: MeshStore, patch: Patcher) -> None:
        self.store = store
        self.patch = patch
        self.pending: dict[tuple[str, str], dict[str, str | None]] = {}
        self.patched = 0
        self._wake = asyncio.Event()

    def record(self, namespace: str, name: str, state: str, reason: str, backend: str = "") -> None:
        self.pending[(namespace, name)] = capture_annotations(state, reason, backend)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = RETRY_MIN
        while not stop.is_set():
            await _first(self._wake.wait(), stop.wait())
            self._wake.clear()
            if await self.flush():
                delay = RETRY_MIN
                continue
            await _first(asyncio.sleep(delay), stop.wait())  # some failed: back off, retry
            delay = min(RETRY_MAX, delay * 2)
            self._wake.set()

    async def flush(self) -> bool:
        """Send every pending patch; False when some failed and stay pending."""
        ok = True
        for key, wanted in list(self.pending.items()):
            if self._already(key, wanted):
                self.pending.pop(key, None)
                continue
            try:
                await self.patch(key[0], key[1], wanted)
            except LookupError:
                pass  # the pod is gone: nothing to show it on
            except Exception as e:
                log.warning("annotating pod %s/%s failed (will retry): %s", *key, e)
                ok = False
                continue
            else:
                self.patched += 1
            if self.pending.get(key) is wanted:  # unless a newer state arrived meanwhile
                del self.pending[key]
        return ok

    def _already(self, key: tuple[str, str], wanted: Annotations) -> bool:
        pod = self.store.pods.get(f"{key[0]}/{key[1]}")
        return pod is not None and all(pod.annotations.get(k) == v for k, v in wanted.items())


async def kubernetes_patcher(
    kubeconfig: Path | None,
) -> tuple[Patcher, Callable[[], Awaitable[None]]]:
    """A Patcher over the API server (JSON merge patch on the pod), and its close function."""
    from kubernetes_asyncio.client.exceptions import ApiException

    from nodeagent.sources.kubernetes import api_client, k8s

    api = await api_client(kubeconfig)
    core: Any = k8s.CoreV1Api(api)

    async def patch(namespace: str, name: str, annotations: Annotations) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        try:
            # The answer is not needed: skip building a V1Pod from it.
            response = await core.patch_namespaced_pod(
                name,
                namespace,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
            response.release()
        except ApiException as e:
            if e.status == 404:
                raise LookupError(f"pod {namespace}/{name} not found") from None
            raise

    return patch, api.close


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
