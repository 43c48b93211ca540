"""eBPF capture across an upgrade that changes a pinned map's layout, the parts without
privileges: comparing pinned maps with what bpf/ declares, ebpf_maps.MAPS against
bpf/capture.h's declarations, a pod's links found running older programs' maps, and a pod's
re-apply writing its entries before it moves its links."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nodeagent.redirect import bpf_sys, ebpf, ebpf_load
from nodeagent.redirect.bpf_sys import Link, MapLayout, ProgInfo
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.ebpf_maps import MAPS, pod_entries

HEADER = (Path(__file__).resolve().parents[2] / "bpf" / "capture.h").read_text()
HASH, LRU_HASH = 1, 9
C_TYPES = {"__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32}
C_TYPES["__u64"] = ctypes.c_uint64


def header_maps() -> dict[str, tuple[int, int, int, str]]:
    """capture.h's maps: name -> (key size, value size, max_entries, type), the sizes as C lays
    out its structs (ctypes: the same alignment rules)."""
    types: dict[str, type[ctypes._SimpleCData] | type[ctypes.Structure]] = dict(C_TYPES)
    for name, body in re.findall(r"struct (\w+) \{(.*?)\n\};", HEADER, re.S):
        fields = [
            (field, C_TYPES[kind] * int(count) if count else C_TYPES[kind])
            for kind, field, count in re.findall(r"(__u\d+) (\w+)(?:\[(\d+)\])?;", body)
        ]
        types[f"struct {name}"] = type(name, (ctypes.Structure,), {"_fields_": fields})
    declared = re.findall(
        r'BPF_TABLE_MAYBE_PINNED\("(\w+)", ([\w ]+?), ([\w ]+?), (\w+), (\d+), \w+\);', HEADER
    )
    return {
        name: (ctypes.sizeof(types[key]), ctypes.sizeof(types[value]), int(entries), kind)
        for kind, key, value, name, entries in declared
    }


def test_maps_mirrors_the_key_and_value_sizes_capture_h_declares() -> None:
    declared = header_maps()
    assert set(declared) == set(MAPS) == set(ebpf_load.MAP_NAMES)
    assert {name: sizes[:2] for name, sizes in declared.items()} == MAPS
    assert declared["origin_by_peer"] == (32, 20, 262144, "lru_hash")  # the parser reads it


def test_a_pinned_map_is_reused_only_with_the_very_layout_bpf_declares() -> None:
    pods = MapLayout(HASH, 8, 4, 65536, 0)
    peer = MapLayout(LRU_HASH, 32, 20, 262144, 0)
    assert (
        ebpf_load.changed(
            {"pods": pods, "origin_by_peer": peer}, {"pods": pods, "origin_by_peer": peer}
        )
        == {}
    )
    for other in (
        MapLayout(HASH, 8, 4, 4096, 0),  # max_entries
        MapLayout(HASH, 8, 8, 65536, 0),  # a field added to the value
        MapLayout(HASH, 16, 4, 65536, 0),  # the key
        MapLayout(LRU_HASH, 8, 4, 65536, 0),  # the map type
        MapLayout(HASH, 8, 4, 65536, 1),  # BPF_F_NO_PREALLOC
    ):
        assert ebpf_load.changed(
            {"pods": other, "origin_by_peer": peer}, {"pods": pods, "origin_by_peer": peer}
        ) == {"pods": (other, pods)}
    # a map bpf/ adds is created, one it no longer declares is unpinned: neither is "changed"
    assert ebpf_load.changed({"retired": pods}, {"pods": pods}) == {}
    assert str(peer) == "lru_hash key 32 value 20 max_entries 262144 flags 0x0"


def test_the_prelude_keeps_a_pinned_maps_flags_in_its_declaration() -> None:
    """bcc describes a pinned table by its declaration: without the flags, an lpm_trie
    (BPF_F_NO_PREALLOC) would look changed at every start."""
    text = ebpf_load.prelude(Path("/sys/fs/bpf/x/maps"), {"ranges_ex"})
    body = 'BPF_TABLE_PINNED(t, k, v, n, m, "/sys/fs/bpf/x/maps/ranges_ex", f)'
    assert f"#define BPF_MAYBE_ranges_ex(t, k, v, n, m, f) {body}" in text


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ebpf.EbpfBackend:
    """An EbpfBackend whose pinned links and programs are fakes: one connect4 link to
    TMP_PATH, running program 7."""
    backend = ebpf.EbpfBackend(tmp_path / "pins", tmp_path)
    backend._programs["connect4"] = ProgInfo(3, b"tag-of-c", frozenset({21, 22}))
    link = Link(bpf_sys.LINK_TYPE_CGROUP, 7, tmp_path.stat().st_ino, bpf_sys.CGROUP_INET4_CONNECT)

    @contextmanager
    def pinned(path: str) -> Iterator[int]:
        yield 99

    monkeypatch.setattr(bpf_sys, "pinned", pinned)
    monkeypatch.setattr(bpf_sys, "link_info", lambda fd: link)
    return backend


def test_a_link_running_this_code_on_replaced_maps_is_a_problem(
    backend: ebpf.EbpfBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The kernel's tag masks map references: after an upgrade that only changed a map's
    max_entries, the pod's older program has this agent's tag, and the older map."""

    def problem(running: ProgInfo) -> str:
        monkeypatch.setattr(bpf_sys, "prog_info_by_id", lambda prog_id: running)
        return backend._link_problem("connect4", bpf_sys.CGROUP_INET4_CONNECT, tmp_path, tmp_path)

    assert problem(ProgInfo(7, b"tag-of-c", frozenset({21, 22}))) == ""
    assert problem(ProgInfo(7, b"tag-of-c", frozenset({21, 5}))) == (
        "connect4: runs program 7 on other maps than this agent's"
    )
    assert problem(ProgInfo(7, b"older-c", frozenset({21, 22}))) == (
        "connect4: runs program 7, not this agent's bpf/connect4.c"
    )


def test_a_pods_entries_and_listener_go_in_before_its_links_move(
    backend: ebpf.EbpfBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A link updated to this agent's program finds the pod in the new maps."""
    calls: list[str] = []
    entries = pod_entries(4097, CaptureSpec(), ["10.244.1.5"])
    monkeypatch.setattr(backend, "_pod_cgroup", lambda uid: tmp_path)
    monkeypatch.setattr(backend, "_wanted", lambda netns, spec: (4097, entries))
    monkeypatch.setattr(backend, "_entries_of", lambda cookie: {n: set() for n in MAPS})
    monkeypatch.setattr(bpf_sys, "map_update", lambda fd, k, v: calls.append("entry"))
    monkeypatch.setattr(backend, "_steer", lambda netns, cookie: calls.append("listener") or "")
    monkeypatch.setattr(backend, "_link", lambda hook, *_: calls.append(f"link {hook}"))
    monkeypatch.setattr(backend.leftover, "holds_table", lambda netns: False)
    backend._maps = dict.fromkeys(MAPS, 3)
    backend.apply(tmp_path, CaptureSpec(), "uid-1")
    links = [c for c in calls if c.startswith("link")]
    assert links == [f"link {hook}" for hook in (*ebpf.POD_HOOKS, ebpf.NETNS_HOOK[0])]
    first_link = calls.index(links[0])
    assert calls[:first_link] == ["entry"] * sum(map(len, entries.maps.values())) + ["listener"]
