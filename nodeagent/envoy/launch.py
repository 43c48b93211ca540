"""The node Envoy's command line, and Envoy in a container of its own (``nodeagent envoy``).

One function builds Envoy's argv for whoever starts it: the agent's supervisor (managed mode) or
the DaemonSet's ``envoy`` container (external mode). The container waits for the agent to write
the bootstrap into the shared run directory, then *becomes* Envoy (exec): same pid, Envoy's own
signal handling, nothing of Python left running next to it. From then on Envoy depends on the
agent only through the xDS socket, so an agent restart leaves it serving its last config.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("nodeagent.envoy")

# Access logs reach their file within a second (Envoy's default is 10 s). Removed listeners drain
# 5 s, not 600: a departed pod's identity must not linger in Envoy. Draining HTTP connections
# are told to close at their next response (Connection: close, GOAWAY), not with a probability
# growing over the drain time, as Istio starts its proxies (istio/istio pkg/envoy/proxy.go,
# "--drain-strategy immediate"): a changed filter chain (a RequestAuthentication, say) is in
# force for every pooled connection after at most one more response on it.
NODE_ENVOY_ARGS = (
    "--file-flush-interval-msec",
    "1000",
    "--drain-time-s",
    "5",
    "--drain-strategy",
    "immediate",
)

CHECK_INTERVAL = 0.5  # how often the bootstrap is looked for
WAIT_LOG_INTERVAL = 10.0  # a "still waiting" line this often
MAX_BOOTSTRAP_BYTES = 4 << 20  # a bootstrap is a few kB: anything this big is not ours


def envoy_argv(
    binary: Path, bootstrap: Path, extra_args: Sequence[str] = NODE_ENVOY_ARGS
) -> list[str]:
    """The node Envoy's command line, the same whether the agent or a container starts it."""
    return [
        str(binary),
        "-c",
        str(bootstrap),
        "--disable-hot-restart",  # shared memory would clash between Envoys on one machine
        "--log-level",
        "info",
        *extra_args,
    ]


def bootstrap_problem(path: Path) -> str:
    """ "" when PATH holds an Envoy bootstrap the agent wrote, else what is wrong with it.

    The agent replaces the file atomically, so a half-written one is never seen; the checks only
    guard against something else at that path. One bounded read per call.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BOOTSTRAP_BYTES + 1)
    except FileNotFoundError:
        return "not written yet"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if len(raw) > MAX_BOOTSTRAP_BYTES:
        return f"larger than {MAX_BOOTSTRAP_BYTES} bytes: not a bootstrap the agent wrote"
    try:
        config = json.loads(raw)
    except ValueError as e:
        return f"not JSON: {e}"
    if not isinstance(config, dict) or not {"node", "dynamic_resources", "admin"} <= config.keys():
        return "not an Envoy bootstrap (no node, dynamic_resources and admin)"
    return ""


def wait_for_bootstrap(
    path: Path,
    stop: threading.Event,
    check_interval: float = CHECK_INTERVAL,
    log_interval: float = WAIT_LOG_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Until PATH holds a bootstrap: True; False as soon as STOP is set. No overall limit (a
    container waits for as long as its agent takes), a log line every LOG_INTERVAL seconds."""
    started = clock()
    next_log = started
    while True:
        problem = bootstrap_problem(path)
        if not problem:
            return True
        now = clock()
        if now >= next_log:
            log.info(
                "waiting for the node agent to write Envoy's bootstrap %s (%s; %.0fs so far)",
                path,
                problem,
                now - started,
            )
            next_log = now + log_interval
        if stop.wait(check_interval):
            return False


def exec_envoy(binary: Path, bootstrap: Path) -> NoReturn:
    """Replace this process with Envoy. Signals Python ignores (SIGPIPE, SIGXFSZ) would stay
    ignored across exec: give Envoy the defaults, as a freshly started process has them."""
    argv = envoy_argv(binary, bootstrap)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    log.info("starting Envoy: %s", " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(argv[0], argv)


def redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (and so Envoy's, after exec) to PATH, appending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
