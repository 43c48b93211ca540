"""The directory source delivers changes, not relists: a changed file is the only one re-read,
and only the records that changed reach the store (each write wakes translation)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_writes import Writes

from nodeagent import kubeyaml
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource

FILES = 1000


def _write(path: Path, text: str) -> None:
    """Writes TEXT so the next scan sees a change even within one mtime tick."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))


def _service(name: str, ip: str = "10.96.0.10") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
    }


def _slice(name: str, service: str, *ips: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "shop",
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": "http", "port": 8080}],
    }


def _endpoints(service: str, *ips: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"namespace": "shop", "name": service},
        "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": [{"port": 8080}]}],
    }


def _json(*objects: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})


def _svc_file(i: int, *ips: str) -> str:
    return _json(_service(f"svc-{i}"), _slice(f"svc-{i}-x", f"svc-{i}", *ips))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The texts the source parsed, one entry per file read."""
    seen: list[str] = []
    load_all = kubeyaml.load_all

    def counting(text: str) -> list[Any]:
        seen.append(text)
        return load_all(text)

    monkeypatch.setattr(kubeyaml, "load_all", counting)
    yield seen


def _thousand(root: Path) -> tuple[DirectorySource, MeshStore]:
    for i in range(FILES):
        _write(root / f"svc-{i:04d}.json", _svc_file(i, "10.244.1.1", "10.244.1.2"))
    store = MeshStore()
    source = DirectorySource(root, store)
    source.scan()
    assert len(store.services) == len(store.endpoint_slices) == FILES
    return source, store


def test_one_changed_file_among_a_thousand_is_the_only_one_read_and_written(
    tmp_path: Path, parses: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, store = _thousand(tmp_path)
    writes, generation = Writes(store, monkeypatch), store.generation
    services = dict(store.services)
    parses.clear()
    assert source.scan() is False and parses == [] and writes.calls == []

    changed = _svc_file(7, "10.244.1.1", "10.244.1.3")  # one endpoint replaced
    _write(tmp_path / "svc-0007.json", changed)
    assert source.scan() is True
    assert parses == [changed]
    assert writes.calls == ["put_endpoint_slice"] and store.generation == generation + 1
    assert [e.addresses for e in store.endpoint_slices["shop/svc-7-x"].endpoints] == [
        ("10.244.1.1",),
        ("10.244.1.3",),
    ]
    assert all(store.services[k] is v for k, v in services.items())  # nothing re-put


def test_a_deleted_file_deletes_only_its_records(
    tmp_path: Path, parses: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, store = _thousand(tmp_path)
    writes, generation = Writes(store, monkeypatch), store.generation
    parses.clear()
    (tmp_path / "svc-0042.json").unlink()
    assert source.scan() is True
    assert parses == []
    assert sorted(writes.calls) == ["delete_endpoint_slice", "delete_service"]
    assert store.generation == generation + 2
    assert "shop/svc-42" not in store.services and "shop/svc-42-x" not in store.endpoint_slices
    assert len(store.services) == FILES - 1


def test_a_file_that_is_not_yaml_keeps_its_last_good_records(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    _write(path, _svc_file(1, "10.244.1.1"))
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    generation = store.generation
    _write(path, '{"apiVersion": "v1", "kind": "List", "items": [')  # caught mid-write
    source.scan()
    assert "shop/svc-1" in store.services and store.generation == generation
    assert source.errors[path][0].startswith(f"{path}: cannot be read as YAML")
    assert source.errors[path][0].endswith("(keeping its last good resources)")
    _write(path, _svc_file(1, "10.244.1.2"))
    source.scan()
    assert path not in source.errors and store.generation == generation + 1
    assert store.endpoint_slices["shop/svc-1-x"].endpoints[0].addresses == ("10.244.1.2",)
    # A bad document (valid YAML) is not kept: the file says that resource is broken now.
    _write(path, _json(_service("svc-1"), {**_slice("svc-1-x", "svc-1"), "addressType": "IPv9"}))
    source.scan()
    assert "shop/svc-1-x" not in store.endpoint_slices and "shop/svc-1" in store.services


def test_the_file_sorting_last_wins_a_duplicate_and_its_removal_restores_the_other(
    tmp_path: Path, parses: list[str]
) -> None:
    _write(tmp_path / "a.json", _json(_service("web", "10.96.0.1")))
    _write(tmp_path / "b.json", _json(_service("web", "10.96.0.2")))
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert store.services["shop/web"].cluster_ip == "10.96.0.2"
    parses.clear()
    (tmp_path / "b.json").unlink()
    source.scan()
    assert parses == []  # a.json's records were kept, not re-read
    assert store.services["shop/web"].cluster_ip == "10.96.0.1"
    (tmp_path / "a.json").unlink()
    source.scan()
    assert store.services == {}


def test_endpoint_slices_of_a_service_displace_its_endpoints_and_give_them_back(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "endpoints.yaml", _json(_endpoints("web", "10.244.1.1")))
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert list(store.endpoint_slices) == ["shop/web"]
    slices = tmp_path / "slices.yaml"
    _write(slices, _json(_slice("web-abc", "web", "10.244.1.1")))
    source.scan()
    assert list(store.endpoint_slices) == ["shop/web-abc"]
    _write(slices, _json(_slice("web-abc", "api", "10.244.1.1")))  # now another service's
    source.scan()
    assert sorted(store.endpoint_slices) == ["shop/web", "shop/web-abc"]
    slices.unlink()
    source.scan()
    assert list(store.endpoint_slices) == ["shop/web"]


# -- the changes applied one by one end where a fresh read of the directory starts -------------

_NAMES = ("a", "b", "c")
_OBJECTS = st.sampled_from(
    [
        _service("web", "10.96.0.1"),
        _service("web", "10.96.0.2"),
        _service("api", "10.96.0.3"),
        _slice("web-1", "web", "10.244.1.1"),
        _slice("web-1", "web", "10.244.1.2"),
        _slice("web-1", "api", "10.244.1.2"),
        _slice("web", "api", "10.244.1.3"),
        _endpoints("web", "10.244.1.4"),
        _endpoints("api", "10.244.1.5"),
        {**_service("broken"), "spec": {"ports": [{"port": 0}]}},
    ]
)
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(_NAMES),
        st.one_of(st.none(), st.lists(_OBJECTS, max_size=3), st.just("{not yaml")),
    ),
    min_size=1,
    max_size=8,
)


def _view(store: MeshStore) -> tuple[Any, ...]:
    return (store.services, store.endpoint_slices, store.namespaces, store.istio)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_STEPS)
def test_changes_applied_one_by_one_equal_a_fresh_read(
    steps: list[tuple[str, list[dict[str, Any]] | str | None]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = MeshStore()
        source = DirectorySource(root, store)
        source.scan()
        for name, content in steps:
            path = root / f"{name}.yaml"
            if content is None:
                path.unlink(missing_ok=True)
            else:
                _write(path, content if isinstance(content, str) else _json(*content))
            source.scan()
            unreadable = [p for p, problems in source.errors.items() if "YAML" in problems[0]]
            if unreadable:
                continue  # a fresh read has no last good records to keep
            fresh = MeshStore()
            DirectorySource(root, fresh).scan()
            assert _view(store) == _view(fresh)


def test_a_configmap_volume_is_read_through_its_symlinks_and_its_swap_is_a_change(
    tmp_path: Path,
) -> None:
    """The kubelet's configMap volume: KEY -> ..data/KEY, ..data -> ..<timestamp>/, swapped
    atomically on update (hidden entries are not read themselves)."""
    volume = tmp_path / "volume"
    volume.mkdir()

    def publish(version: str, text: str) -> None:
        stamped = volume / f"..{version}"
        stamped.mkdir()
        (stamped / "mesh.json").write_text(text)
        (volume / "..data_tmp").symlink_to(stamped.name)
        (volume / "..data_tmp").replace(volume / "..data")

    publish("2026_1", _svc_file(1, "10.244.1.1"))
    (volume / "mesh.json").symlink_to("..data/mesh.json")
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    _write(tmp_path / "nested" / "deeper" / "api.yaml", _json(_service("api")))
    (tmp_path / "nested" / ".editor.yaml").write_text(_json(_service("ghost")))
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert sorted(store.services) == ["shop/api", "shop/svc-1"]
    assert source.scan() is False
    publish("2026_2", _svc_file(1, "10.244.1.2"))
    assert source.scan() is True
    assert store.endpoint_slices["shop/svc-1-x"].endpoints[0].addresses == ("10.244.1.2",)
