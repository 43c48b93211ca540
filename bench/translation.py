"""Scenario 5b: the agent's CPU per endpoint change, in process (no testbed, no lock needed).

The view convergence uses (N services with one HTTP port and two endpoints each, one local
client pod), held in a MeshStore. Per size, CPU seconds (``time.process_time``) of:

- ``full_s``: a fresh full translation (what every push cost before the translation cache);
- ``change_s``: one endpoint change as the agent handles it: the store update, the node's
  ``TranslationCache`` bringing its translation up to date, a new xDS ``Snapshot`` set in the
  cache (consistency check) and its per-resource versions computed (what a push reads);
- ``full_change_s``: the same change with a full translation in place of the cache (the old way).

Not included: reading the change from the source (directory parse or API watch event) and
sending the xDS response (the delta of one ClusterLoadAssignment).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.common import Run, summary, table, write_result
from nodeagent.mesh.model import Endpoint, EndpointPort, EndpointSlice, Pod, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, Translation, TranslationCache, build
from nodeagent.xds.cache import Snapshot, SnapshotCache

SCENARIO = "translation"
NODE = "n1"


def view(services: int) -> tuple[MeshStore, list[LocalPod]]:
    store = MeshStore(NODE)
    for i in range(services):
        name = f"svc-{i}"
        store.put_service(
            Service(
                "synth",
                name,
                f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}",
                (ServicePort(8080, "http"),),
                {"app": name},
            )
        )
        store.put_endpoint_slice(
            EndpointSlice(
                "synth",
                f"{name}-abc",
                name,
                tuple(
                    Endpoint((f"10.250.{i // 250 % 250}.{i % 250 + k}",), True, "n2")
                    for k in (1, 2)
                ),
                (EndpointPort(8080, "http"),),
            )
        )
    client = Pod("bench", "client", "u1", NODE, "client", {"app": "client"}, pod_ips=("10.1.0.5",))
    store.put_pod(client)
    return store, [LocalPod(client, "/var/run/netns/client")]


def cpu(func: Callable[[], object]) -> float:
    start = time.process_time()
    func()
    return time.process_time() - start


def measure(services: int, changes: int) -> dict[str, object]:
    store, local = view(services)
    full = [cpu(lambda: build(store, local)) for _ in range(2)]
    cache = TranslationCache()
    snapshots = SnapshotCache()

    def push(translate: Callable[[], Translation], version: str) -> None:
        snapshot = Snapshot(version, translate().resources)
        snapshots.set_snapshot(NODE, snapshot)
        for type_url in snapshot.resources:
            snapshot.versions(type_url)

    push(lambda: cache.build(store, local), "0")
    results: dict[str, list[float]] = {"change_s": [], "full_change_s": []}
    for n in range(changes):
        for key, translate in (
            ("change_s", lambda: cache.build(store, local)),
            ("full_change_s", lambda: build(store, local)),
        ):
            ready = n % 2 == 0  # the second endpoint of svc-7 turns ready / not ready
            eps = EndpointSlice(
                "synth",
                "svc-7-abc",
                "svc-7",
                (
                    Endpoint(("10.250.0.8",), True, "n2"),
                    Endpoint(("10.250.0.9",), ready, "n2"),
                ),
                (EndpointPort(8080, "http"),),
            )

            start = time.process_time()
            store.put_endpoint_slice(eps)
            push(translate, f"{key}{n}")
            results[key].append(time.process_time() - start)
            store.delete_endpoint_slice("synth/svc-7-abc")  # the next one is a change again
            push(lambda: cache.build(store, local), f"reset{key}{n}")
    return {
        "services": services,
        "full_s": summary(full),
        **{key: summary(values) for key, values in results.items()},
        "full_recomputes": cache.full_recomputes,
    }


def run(run: Run) -> None:
    sizes: list[int] = run.pick([100, 1000, 5000], [20, 100])
    changes: int = run.pick(5, 2)
    entries = [measure(n, changes) for n in sizes]
    path = write_result(run, SCENARIO, {"sizes": sizes, "changes": changes}, {"sizes": entries})
    print(
        table(
            ["services", "full translation s", "change s (cache)", "change s (full)"],
            [
                [
                    e["services"],
                    e["full_s"]["median"],  # type: ignore[index]
                    e["change_s"]["median"],  # type: ignore[index]
                    e["full_change_s"]["median"],  # type: ignore[index]
                ]
                for e in entries
            ],
        )
    )
    print(f"results: {path}")
