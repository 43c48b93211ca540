"""The capture state written on each pod: what is patched, when, and what is not sent again."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.podstatus import (
    BACKEND_ANNOTATION,
    CAPTURE_ANNOTATION,
    REASON_ANNOTATION,
    PodAnnotator,
)
from tests.waiting import wait_for_async


class FakeApi:
    """Applies merge patches to the store's pods, as the API server and a watch would."""

    def __init__(self, store: MeshStore, failures: int = 0) -> None:
        self.store = store
        self.failures = failures
        self.patches: list[tuple[str, str, dict[str, str | None]]] = []

    async def patch(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("API server unreachable")
        pod = self.store.pods.get(f"{namespace}/{name}")
        if pod is None:
            raise LookupError(f"pod {namespace}/{name} not found")
        self.patches.append((namespace, name, dict(annotations)))
        merged = {**pod.annotations, **annotations}
        kept = {k: v for k, v in merged.items() if v is not None}
        self.store.put_pod(Pod(namespace, name, annotations=kept))


def test_latest_state_is_patched_once_and_not_again() -> None:
    async def scenario() -> None:
        store = MeshStore()
        store.put_pod(Pod("shop", "web", annotations={"team": "a"}))
        api = FakeApi(store)
        annotator = PodAnnotator(store, api.patch)
        annotator.record("shop", "web", "failed", "listeners not ready")
        # the latest wins; a captured pod shows its backend too
        annotator.record("shop", "web", "captured", "namespace label", "ebpf")
        assert await annotator.flush()
        captured = {CAPTURE_ANNOTATION: "captured", REASON_ANNOTATION: None}
        assert api.patches == [("shop", "web", {**captured, BACKEND_ANNOTATION: "ebpf"})]
        assert store.pods["shop/web"].annotations == {
            "team": "a",
            CAPTURE_ANNOTATION: "captured",
            BACKEND_ANNOTATION: "ebpf",
        }
        # Reconcile settles the same state every minute: the pod already shows it, no patch.
        annotator.record("shop", "web", "captured", "verified", "ebpf")
        assert await annotator.flush()
        assert len(api.patches) == 1

        annotator.record("shop", "web", "netns-missing", "network namespace /x is gone", "ebpf")
        assert await annotator.flush()
        assert store.pods["shop/web"].annotations[REASON_ANNOTATION] == (
            "network namespace /x is gone"
        )
        assert BACKEND_ANNOTATION not in store.pods["shop/web"].annotations  # not captured now
        assert annotator.pending == {}

    asyncio.run(scenario())


def test_a_failed_patch_is_retried_and_a_deleted_pod_dropped() -> None:
    async def scenario() -> None:
        store = MeshStore()
        store.put_pod(Pod("shop", "web"))
        api = FakeApi(store, failures=2)
        annotator = PodAnnotator(store, api.patch)
        stop = asyncio.Event()
        runner = asyncio.create_task(annotator.run(stop))
        annotator.record("shop", "web", "captured", "")
        annotator.record("shop", "gone", "captured", "")  # deleted before it could be shown
        await wait_for_async(lambda: not annotator.pending, 5, "every annotation settled")
        stop.set()
        await runner
        assert annotator.pending == {}
        assert [p[:2] for p in api.patches] == [("shop", "web")]
        assert store.pods["shop/web"].annotations[CAPTURE_ANNOTATION] == "captured"

    asyncio.run(scenario())
