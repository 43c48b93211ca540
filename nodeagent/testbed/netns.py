"""Network namespaces by name, and the processes that run in them.

Programs are started in a namespace with ``ip netns exec NS`` (it execs the program in place, and
binds /etc/netns/NS/* over /etc, see hosts.py); the namespaces themselves, their links, addresses
and routes are made over netlink (netlink.py). Nothing here changes the root network namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class CommandError(RuntimeError):
    """A system command failed; the message carries the command and what it printed."""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found (run `make setup`)") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise CommandError(f"{' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs a program inside NETNS (with /etc/netns/NETNS/* bound over /etc)."""
    return ["ip", "netns", "exec", netns, *argv]


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def exists(name: str) -> bool:
    return netns_path(name).exists()


def pids_in(netns: str) -> list[int]:
    """Every process whose network namespace is NETNS (``ip netns pids``, read from /proc)."""
    try:
        st = os.stat(netns_path(netns))
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_id(Path("/proc", entry, "ns/net")) == (st.st_dev, st.st_ino):
            found.append(int(entry))
    return sorted(found)


def _ns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # the process is gone, or it is a kernel thread
        return None
    return st.st_dev, st.st_ino


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after its closing parenthesis are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def process_start_time(pid: int) -> int | None:
    """Start time of PID, to tell a process from a later one that reuses its pid."""
    stat = _stat(pid)
    return stat[1] if stat else None


def alive(pid: int, start_time: int | None) -> bool:
    """True while PID runs and is the process that had START_TIME (zombies count as gone)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (start_time is None or stat[1] == start_time)


def terminate(processes: Iterable[tuple[int, int | None]], grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after GRACE seconds; returns the pids that are still alive."""
    targets = [(pid, st) for pid, st in processes if alive(pid, st)]
    for pid, _ in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p, st) for p, st in targets):
        time.sleep(0.05)
    for pid, st in targets:
        if alive(pid, st):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(p, st) for p, st in targets):
        time.sleep(0.05)
    return [pid for pid, st in targets if alive(pid, st)]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def listening(pid: int, port: int) -> bool:
    """True when a TCP socket listens on PORT in the network namespace of process PID.

    Reads the kernel's socket table through /proc/PID/net, so no packet is sent anywhere.
    """
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False
