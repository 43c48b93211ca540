"""Compile bpf/*.c with bcc and pin the programs (and, the first time, the maps): run as a
short-lived process (``python -m nodeagent.redirect.ebpf_load BPF_DIR PIN_DIR``) so that LLVM,
which bcc keeps mapped for the life of a process, never stays in the agent (ebpf.py).

Maps already pinned under PIN_DIR/maps are reused (BPF_TABLE_PINNED), each by itself, so pods
captured before an agent restart keep their entries and a map a newer bpf/ adds is created beside
them; programs are pinned anew under PIN_DIR/progs. A pinned map keeps the layout it was made with
(type, key and value size, max_entries, flags), and bcc does not compare it with the declaration:
a map whose layout bpf/ changed is made anew and its pin replaced (``maps_replaced``), and the pin
of a map bpf/ no longer declares goes (``maps_removed``). Prints one JSON line: the programs' ids,
the maps created, replaced and removed, and this process's peak RSS.

Pods keep their capture through a replacement: their links run the older programs, which hold the
older maps and their entries, until the agent re-applies the pod at its start-up reconcile (its
verify sees programs on other maps), writing its entries into the new maps before it updates each
link in place; a replaced listeners sockhash is refilled by that re-apply and the steer loop.
What remains is the node's getsockopt program, updated in place at start and so reading the new
maps before the pods are re-applied: when origin_by_peer itself is replaced, a connection the
pod's older programs redirected (its origin in the older origin_by_peer) in between loses its
original destination to Envoy's SO_ORIGINAL_DST; likewise, when pods is replaced, inbound steered
meanwhile gets no SO_ORIGINAL_DST answer (the pod is not in the new pods map yet).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import resource
import sys
from pathlib import Path

from nodeagent.redirect import bpf_sys
from nodeagent.redirect.bpf_sys import MapLayout

# hook file -> (function, program type, expected attach type): bcc's numbers are the kernel's
HOOKS = {
    "connect4.c": ("connect4", 18, 10),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, INET4_CONNECT
    "connect6.c": ("connect6", 18, 11),  # ..., INET6_CONNECT
    "sendmsg4.c": ("sendmsg4", 18, 14),  # ..., UDP4_SENDMSG
    "sendmsg6.c": ("sendmsg6", 18, 15),  # ..., UDP6_SENDMSG
    "recvmsg4.c": ("recvmsg4", 18, 19),  # ..., UDP4_RECVMSG
    "recvmsg6.c": ("recvmsg6", 18, 20),  # ..., UDP6_RECVMSG
    "getpeername4.c": ("getpeername4", 18, 29),  # ..., INET4_GETPEERNAME
    "getpeername6.c": ("getpeername6", 18, 30),  # ..., INET6_GETPEERNAME
    "sockops.c": ("sockops", 13, 3),  # BPF_PROG_TYPE_SOCK_OPS, CGROUP_SOCK_OPS
    "getsockopt.c": ("getsockopt", 25, 21),  # BPF_PROG_TYPE_CGROUP_SOCKOPT, GETSOCKOPT
    "sklookup.c": ("sklookup", 30, 36),  # BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP
}
MAP_NAMES = (
    "pods",
    "ports_out",
    "ranges_ex",
    "ranges_in",
    "ports_in",
    "pod_addrs",
    "listeners",
    "origin_by_cookie",
    "origin_by_peer",
)


def prelude(maps: Path, pinned: set[str]) -> str:
    """BPF_TABLE_MAYBE_PINNED, per map: the one pinned at MAPS/<name> when PINNED names it,
    else a fresh one (a map this bpf/ adds to an older node's set, or replaces). Either way bcc
    keeps the whole declaration, flags too, for ``declared``."""
    lines = ["#define BPF_TABLE_MAYBE_PINNED(t, k, v, n, m, f) BPF_MAYBE_##n(t, k, v, n, m, f)"]
    for name in MAP_NAMES:
        if name in pinned:
            body = f'BPF_TABLE_PINNED(t, k, v, n, m, "{maps}/{name}", f)'
        else:
            body = "BPF_F_TABLE(t, k, v, n, m, f)"
        lines.append(f"#define BPF_MAYBE_{name}(t, k, v, n, m, f) {body}")
    return "\n".join(lines) + "\n"


def source(bpf_dir: Path) -> str:
    """capture.h, then each hook file without its include of it: one text, as bcc rewrites map
    calls in the text it is given."""
    parts = [(bpf_dir / "capture.h").read_text()]
    for hook in HOOKS:
        text = (bpf_dir / hook).read_text()
        parts.append(text.replace('#include "capture.h"', ""))
    return "\n".join(parts)


def declared(bpf: object, name: str) -> MapLayout:
    """Map NAME as bpf/ declares it: bcc's description of the table keeps the declaration even
    when the map itself is a pinned one of another layout."""
    from bcc.libbcc import lib  # type: ignore[import-untyped]

    module, table = bpf.module, name.encode()  # type: ignore[attr-defined]
    for call, result in (
        (lib.bpf_table_type, ctypes.c_int),
        (lib.bpf_table_flags, ctypes.c_int),
        (lib.bpf_table_max_entries, ctypes.c_size_t),
        (lib.bpf_table_key_size, ctypes.c_size_t),
        (lib.bpf_table_leaf_size, ctypes.c_size_t),
    ):  # libbcc.py declares only some of them
        call.restype, call.argtypes = result, [ctypes.c_void_p, ctypes.c_char_p]
    return MapLayout(
        lib.bpf_table_type(module, table),
        lib.bpf_table_key_size(module, table),
        lib.bpf_table_leaf_size(module, table),
        lib.bpf_table_max_entries(module, table),
        lib.bpf_table_flags(module, table),
    )


def changed(
    pinned: dict[str, MapLayout], wanted: dict[str, MapLayout]
) -> dict[str, tuple[MapLayout, MapLayout]]:
    """The pinned maps bpf/ declares with another layout: name -> (pinned, declared)."""
    return {
        name: (layout, wanted[name])
        for name, layout in pinned.items()
        if name in wanted and layout != wanted[name]
    }


def load(bpf_dir: Path, pin_dir: Path) -> dict[str, object]:
    from bcc import BPF  # type: ignore[import-untyped]  # only in this process: LLVM
    from bcc.libbcc import lib

    maps, progs = pin_dir / "maps", pin_dir / "progs"
    pinned = {}
    for name in MAP_NAMES:
        with contextlib.suppress(FileNotFoundError), bpf_sys.pinned(str(maps / name)) as fd:
            pinned[name] = bpf_sys.map_info(fd).layout
    bpf = BPF(text=prelude(maps, set(pinned)) + source(bpf_dir))
    replaced = changed(pinned, {name: declared(bpf, name) for name in pinned})
    if replaced:  # compiled again, with new maps for those: programs refer to theirs
        bpf.cleanup()
        bpf = BPF(text=prelude(maps, set(pinned) - set(replaced)) + source(bpf_dir))
    # Every program through the verifier before any pin changes: a refused one leaves the node
    # as the older agent left it.
    loaded = {}
    for _file, (func, prog_type, attach_type) in HOOKS.items():
        loaded[func] = bpf.load_func(func, prog_type, attach_type=attach_type)
    maps.mkdir(parents=True, exist_ok=True)
    progs.mkdir(parents=True, exist_ok=True)
    created = [name for name in MAP_NAMES if name not in pinned or name in replaced]
    for name in created:
        # by fd: bcc's Python tables know no sockhash (bcc 0.26: "Unknown table type 18")
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise RuntimeError(f"bcc has no map {name}")
        # bpffs refuses rename (EPERM): unpin, pin. Programs hold their maps, not these pins.
        (maps / name).unlink(missing_ok=True)
        bpf_sys.obj_pin(fd, str(maps / name))
    removed = sorted(p.name for p in maps.iterdir() if p.name not in MAP_NAMES)
    for name in removed:  # what an older bpf/ declared: nothing of this one refers to it
        (maps / name).unlink()
    ids = {}
    for func, fn in loaded.items():
        # bpffs refuses rename (EPERM): unpin, pin. Links hold their programs, not these pins.
        (progs / func).unlink(missing_ok=True)
        bpf_sys.obj_pin(fn.fd, str(progs / func))
        ids[func] = bpf_sys.prog_info(fn.fd).id
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "programs": ids,
        "maps_created": [name for name in created if name not in replaced],
        "maps_replaced": [f"{name}: {old} -> {new}" for name, (old, new) in replaced.items()],
        "maps_removed": removed,
        "loader_peak_rss_kb": peak_kb,
    }


if __name__ == "__main__":
    try:
        result = load(Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception as e:  # the agent shows this line as the reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    print(json.dumps(result))
