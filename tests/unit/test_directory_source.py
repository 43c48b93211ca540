"""The directory source: Kubernetes YAML files in, MeshStore records out, bad documents named."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeagent.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: shop
  name: web-1
  uid: u-1
  labels: {app: web}
  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "5432"}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web}
spec: {ports: [{port: 80}]}
"""


def test_pods_and_namespaces_are_read(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(PODS)
    store = MeshStore()
    DirectorySource(tmp_path, store).scan()
    assert store.namespaces["shop"].labels == {"nodeagent.io/mesh": "enabled"}
    pod = store.pods["shop/web-1"]
    assert (pod.uid, pod.node_name, pod.service_account, pod.pod_ips) == (
        "u-1",
        "node1",
        "web",
        ("10.244.1.7",),
    )
    assert pod.annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] == "5432"


def test_changes_and_removals_apply(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(PODS)
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert source.scan() is False  # nothing changed, nothing re-read
    path.write_text(PODS.replace("app: web", "app: web2"))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    assert source.scan() is True
    assert store.pods["shop/web-1"].labels == {"app": "web2"}
    path.unlink()
    source.scan()
    assert store.pods == {} and store.namespaces == {}


def test_a_bad_document_is_named_and_the_rest_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: shop}\n---\n" + PODS
    (tmp_path / "bad.yaml").write_text(bad)
    (tmp_path / "broken.yaml").write_text("kind: [unclosed")
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    with caplog.at_level(logging.ERROR):
        source.scan()
    assert "shop/web-1" in store.pods
    problems = source.errors[tmp_path / "bad.yaml"]
    assert problems == [
        f"{tmp_path / 'bad.yaml'}: document 0: Pod shop/<unnamed>: metadata.name: "
        "required string is missing"
    ]
    assert "cannot be read as YAML" in source.errors[tmp_path / "broken.yaml"][0]
    assert "metadata.name" in caplog.text


def test_a_waiter_gets_the_pod_when_the_source_delivers_it(tmp_path: Path) -> None:
    async def scenario() -> tuple[str | None, str | None]:
        store = MeshStore()
        source = DirectorySource(tmp_path, store, interval=0.02)
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        waiting = asyncio.create_task(store.wait_for_pod("shop", "web-1", 5))
        never = await store.wait_for_pod("shop", "ghost", 0.1)
        (tmp_path / "cluster.yaml").write_text(PODS)
        pod = await waiting
        stop.set()
        await task
        return (pod.name if pod else None), (never.name if never else None)

    assert asyncio.run(scenario()) == ("web-1", None)


BOMB = "".join(  # "billion laughs": 9^9 values from a few hundred bytes
    f"{k}: &{k} [{', '.join([f'*{p}'] * 9 if p else ['x'] * 9)}]\n"
    for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply to parse"),
        ("a: " + "[" * 2000 + "]" * 2000, "nested too deeply to parse"),
        ("&x [*x]\n", "document 0: nested deeper than 100 levels"),
        ("a: b\n---\n&x {apiVersion: v1, kind: Pod, metadata: *x}\n", "document 1: nested deeper"),
        (BOMB, "document 0: aliases expand the text to more than"),
        ("kind: Service\nspec: {ports: [{port: " + "9" * 5000 + "}]}", "integer out of range"),
        ('{"kind": "Namespace", "metadata": {"name": "\\ud800"}}', "unpaired surrogate"),
        ('kind: Namespace\nmetadata: {name: "\\udc00x"}\n', "unpaired surrogate"),
    ],
    ids=[
        "deep-json",
        "deep-yaml",
        "alias-loop",
        "alias-loop-2",
        "alias-bomb",
        "huge-int",
        "surrogate-json",
        "surrogate-yaml",
    ],
)
def test_a_file_beyond_the_reader_s_bounds_is_named_and_the_rest_keeps_working(
    tmp_path: Path, text: str, words: str
) -> None:
    """Found by fuzzing (test_fuzz_directory_source): each of these raised out of scan()
    (RecursionError, ValueError) and stopped the source, took minutes (the alias bomb), or put a
    string no UTF-8 encoder takes into the store (an unpaired surrogate)."""
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text(PODS)
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert "shop/web-1" in store.pods
    (problem,) = source.errors[tmp_path / "bad.yaml"]
    assert (
        problem.startswith(f"{tmp_path / 'bad.yaml'}: cannot be read as YAML: ")
        and words in problem
    )
    assert len(problem) < 1000


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ("apiVersion: v1\nkind: ''\nmetadata: {name: a}", "<no kind> default/a: kind: expected a"),
        ("apiVersion: v1\nkind: [x]\nmetadata: {name: a}", '["x"] default/a: kind: expected a'),
        (
            "kind: Pod\nmetadata: {name: a}",
            "Pod default/a: apiVersion: expected a non-empty string",
        ),
        (
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: [{'a' * 5000}], namespace: shop}}",
            f'Pod shop/["{"a" * 55}...: metadata.name: ',
        ),
    ],
    ids=["empty-kind", "list-kind", "no-api-version", "huge-name"],
)
def test_a_document_s_kind_and_name_are_named_briefly(
    tmp_path: Path, document: str, where: str
) -> None:
    """Found by fuzzing: an empty kind left the object unnamed (": default/a:"), and a name that
    is a long list was copied whole into the message (10 kB for a 10 kB name)."""
    (tmp_path / "bad.yaml").write_text(document)
    source = DirectorySource(tmp_path, MeshStore())
    source.scan()
    (problem,) = source.errors[tmp_path / "bad.yaml"]
    assert problem.startswith(f"{tmp_path / 'bad.yaml'}: document 0: {where}"), problem
