"""The pod registry on disk: one file per pod, what an agent that restarts reads back."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from nodeagent.redirect.registry import (
    CAPTURED,
    FAILED,
    PodCapture,
    PodRegistry,
    discovered_key,
)


def capture(name: str, cid: str = "", state: str = CAPTURED) -> PodCapture:
    return PodCapture(
        "shop", name, cid or f"id-{name}", f"/run/netns/{name}", ips=["10.0.0.1"], state=state
    )


def restarted(registry: PodRegistry) -> PodRegistry:
    again = PodRegistry(registry.directory)
    again.load()
    return again


def test_each_change_survives_a_restart_and_touches_only_its_pod(tmp_path: Path) -> None:
    registry = PodRegistry(tmp_path / "pods")
    for name in ("a", "b", "c"):
        registry.put(capture(name))
    files = {p.name: p.stat().st_mtime_ns for p in registry.directory.iterdir()}
    assert len(files) == 3

    changed = registry.pods["id-b"]
    changed.state, changed.reason = FAILED, "gone wrong"
    registry.put(changed)
    registry.pop("id-c")

    after = {p.name: p.stat().st_mtime_ns for p in registry.directory.iterdir()}
    assert set(after) == set(files) - {"id-c.json"}
    assert after["id-a.json"] == files["id-a.json"]  # untouched
    again = restarted(registry)
    assert sorted(again.pods) == ["id-a", "id-b"]
    assert (again.pods["id-b"].state, again.pods["id-b"].reason) == (FAILED, "gone wrong")
    assert asdict(again.pods["id-a"]) == asdict(registry.pods["id-a"])


def test_an_unchanged_record_is_not_written_again(tmp_path: Path) -> None:
    registry = PodRegistry(tmp_path / "pods")
    registry.put(capture("a"))
    before = restarted(registry).pods["id-a"].updated
    (path,) = registry.directory.iterdir()
    inode = path.stat().st_ino
    registry.put(registry.pods["id-a"])
    assert path.stat().st_ino == inode
    assert restarted(registry).pods["id-a"].updated == before


def test_the_single_file_registry_is_migrated_once(tmp_path: Path) -> None:
    legacy = tmp_path / "pods.json"
    old = {"pods": {c.container_id: asdict(c) for c in (capture("a"), capture("b"))}}
    legacy.write_text(json.dumps(old, indent=1))
    registry = PodRegistry(tmp_path / "pods")
    newer = capture("b", state=FAILED)
    registry.put(newer)  # written after the old file: the directory's record is the newer one

    again = restarted(registry)
    assert sorted(again.pods) == ["id-a", "id-b"]
    assert again.pods["id-b"].state == FAILED
    assert not legacy.exists()
    assert sorted(p.name for p in registry.directory.iterdir()) == ["id-a.json", "id-b.json"]
    assert sorted(restarted(registry).pods) == ["id-a", "id-b"]


def test_unreadable_records_are_left_out_and_the_others_load(tmp_path: Path) -> None:
    registry = PodRegistry(tmp_path / "pods")
    registry.put(capture("a"))
    (registry.directory / "id-broken.json").write_text("{not json")
    (registry.directory / "id-a.json.tmp").write_text("{half")  # a write cut short
    again = restarted(registry)
    assert list(again.pods) == ["id-a"]
    assert not (registry.directory / "id-a.json.tmp").exists()


def test_sandbox_ids_never_name_a_path_outside(tmp_path: Path) -> None:
    registry = PodRegistry(tmp_path / "state" / "pods")
    registry.put(capture("a", cid="../../escape"))
    registry.put(capture("b", cid=discovered_key("0f3c-uid")))
    assert (
        sorted(p.parent for p in (tmp_path / "state").rglob("*.json")) == [registry.directory] * 2
    )
    assert sorted(restarted(registry).pods) == ["../../escape", "discovered:0f3c-uid"]


def test_remove_leaves_nothing_on_disk(tmp_path: Path) -> None:
    registry = PodRegistry(tmp_path / "pods")
    registry.put(capture("a"))
    (tmp_path / "pods.json").write_text('{"pods": {}}')
    registry.remove()
    assert not registry.exists() and registry.pods == {}
