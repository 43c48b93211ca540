"""Helpers for integration tests: the CLI as a user runs it, and the root namespace's state."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

NODEAGENT = [sys.executable, "-m", "nodeagent"]


def nodeagent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODEAGENT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def root_netns_snapshot() -> dict[str, str]:
    """What a testbed must never change in the root network namespace."""

    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "links": out("ip", "-o", "link", "show"),
        "addresses": out("ip", "-o", "addr", "show"),
        "routes": out("ip", "route", "show", "table", "all"),
        "rules": out("ip", "rule", "show"),
        "nftables": out("nft", "list", "ruleset"),
    }


def node_metrics(testbed: str, node: str) -> str:
    """The node agent's Prometheus text, fetched inside the node's network namespace."""
    from nodeagent.testbed import layout

    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            layout.node_netns(testbed, node),
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15020/metrics",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def node_cli(testbed: str, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``nodeagent ARGS`` on a testbed node: in its netns, talking to that node's agent."""
    import os

    from nodeagent.testbed import layout

    env = {**os.environ, "NODEAGENT_CNI_SOCKET": str(layout.agent_socket(testbed, node))}
    return subprocess.run(
        ["ip", "netns", "exec", layout.node_netns(testbed, node), *NODEAGENT, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def http_status(run: Callable[..., subprocess.CompletedProcess[str]], pod: str, url: str) -> str:
    """The HTTP status a pod gets for URL ("000": no HTTP answer, e.g. connection refused/reset).

    RUN is the testbed's ``exec``."""
    proc = run(
        pod,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url],
    )
    return proc.stdout.strip() or "000"
