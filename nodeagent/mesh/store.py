"""MeshStore: the agent's view of the cluster, fed by a source (directory or Kubernetes API).

Single-threaded (asyncio). Waiters can ask for a pod that a source has not delivered yet: a CNI
ADD may arrive before the watch event of the pod it is for.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from nodeagent.mesh.model import Namespace, Pod


class MeshStore:
    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[str, Pod] = {}
        self._pod_waiters: defaultdict[str, list[asyncio.Future[Pod]]] = defaultdict(list)
        self.synced = asyncio.Event()  # set once the source delivered its first full view

    def put_namespace(self, ns: Namespace) -> None:
        self.namespaces[ns.name] = ns

    def delete_namespace(self, name: str) -> None:
        self.namespaces.pop(name, None)

    def put_pod(self, pod: Pod) -> None:
        self.pods[pod.key] = pod
        for waiter in self._pod_waiters.pop(pod.key, []):
            if not waiter.done():
                waiter.set_result(pod)

    def delete_pod(self, key: str) -> None:
        self.pods.pop(key, None)

    async def wait_for_pod(self, namespace: str, name: str, timeout: float) -> Pod | None:
        """The pod, waiting up to TIMEOUT seconds for a source to deliver it (None: never came)."""
        key = f"{namespace}/{name}"
        if key in self.pods:
            return self.pods[key]
        waiter: asyncio.Future[Pod] = asyncio.get_running_loop().create_future()
        self._pod_waiters[key].append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._pod_waiters.get(key)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._pod_waiters[key]
