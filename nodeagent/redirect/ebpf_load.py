"""Compile bpf/*.c with bcc and pin the programs (and, the first time, the maps): run as a
short-lived process (``python -m nodeagent.redirect.ebpf_load BPF_DIR PIN_DIR``) so that LLVM,
which bcc keeps mapped for the life of a process, never stays in the agent (ebpf.py).

Maps already pinned under PIN_DIR/maps are reused (BPF_TABLE_PINNED), each by itself, so pods
captured before an agent restart keep their entries and a map a newer bpf/ adds is created beside
them; programs are pinned anew under PIN_DIR/progs. Prints one JSON line: the programs' ids, the
maps created, and this process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

# hook file -> (function, program type, expected attach type): bcc's numbers are the kernel's
HOOKS = {
    "connect4.c": ("connect4", 18, 10),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, INET4_CONNECT
    "connect6.c": ("connect6", 18, 11),  # ..., INET6_CONNECT
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
    else a fresh one (a map this bpf/ adds to an older node's set)."""
    lines = ["#define BPF_TABLE_MAYBE_PINNED(t, k, v, n, m, f) BPF_MAYBE_##n(t, k, v, n, m, f)"]
    for name in MAP_NAMES:
        if name in pinned:
            body = f'BPF_TABLE_PINNED(t, k, v, n, m, "{maps}/{name}")'
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


def load(bpf_dir: Path, pin_dir: Path) -> dict[str, object]:
    from bcc import BPF  # type: ignore[import-untyped]  # only in this process: LLVM
    from bcc.libbcc import lib  # type: ignore[import-untyped]

    from nodeagent.redirect import bpf_sys

    maps, progs = pin_dir / "maps", pin_dir / "progs"
    pinned = {name for name in MAP_NAMES if (maps / name).exists()}
    bpf = BPF(text=prelude(maps, pinned) + source(bpf_dir))
    maps.mkdir(parents=True, exist_ok=True)
    progs.mkdir(parents=True, exist_ok=True)
    created = [name for name in MAP_NAMES if name not in pinned]
    for name in created:
        # by fd: bcc's Python tables know no sockhash (bcc 0.26: "Unknown table type 18")
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise RuntimeError(f"bcc has no map {name}")
        bpf_sys.obj_pin(fd, str(maps / name))
    ids = {}
    for _file, (func, prog_type, attach_type) in HOOKS.items():
        fn = bpf.load_func(func, prog_type, attach_type=attach_type)
        # bpffs refuses rename (EPERM): unpin, pin. Links hold their programs, not these pins.
        (progs / func).unlink(missing_ok=True)
        bpf_sys.obj_pin(fn.fd, str(progs / func))
        ids[func] = bpf_sys.prog_info(fn.fd).id
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"programs": ids, "maps_created": created, "loader_peak_rss_kb": peak_kb}


if __name__ == "__main__":
    try:
        result = load(Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception as e:  # the agent shows this line as the reason
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    print(json.dumps(result))
