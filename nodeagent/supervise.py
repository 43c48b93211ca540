"""Long-lived background tasks that never die silently.

Every loop the agent runs for its whole life (sources, the push loop, capture reconcile,
certificate rotation, the Envoy supervisor's watch, pod annotations, ...) runs under a
``TaskSupervisor``: an exception is logged with its traceback, counted in
``nodeagent_task_restarts_total{task}`` and the loop is started again after a backoff (doubling,
reset once a run lasted ``HEALTHY_RUN``). A loop that returns while the agent is not stopping is
treated the same way. While a *critical* task is down (between its crash and its restart),
``problem()`` names it and the error's kind (the message and traceback are in the log), and the
agent's readiness (:15021) answers 503 with that text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("nodeagent.supervise")

BACKOFF = (0.5, 30.0)  # seconds before the first restart, and the most it grows to
HEALTHY_RUN = 60.0  # a run this long resets the backoff


class TaskSupervisor:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        backoff: tuple[float, float] = BACKOFF,
        healthy_run: float = HEALTHY_RUN,
    ) -> None:
        self.backoff = backoff
        self.healthy_run = healthy_run
        # Without a registry (a supervisor of its own, e.g. a sidecar's) restarts are still
        # logged and counted here, just not exported.
        self.restarts_total = (
            Counter(
                "nodeagent_task_restarts",
                "Background tasks of the agent that crashed (or ended unexpectedly) and were"
                " restarted, by task.",
                ["task"],
                registry=registry,
            )
            if registry is not None
            else None
        )
        self.restarts: dict[str, int] = {}
        self.down: dict[str, str] = {}  # critical task -> why it is down
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        *,
        stop: asyncio.Event | None = None,
        critical: bool = True,
    ) -> asyncio.Task[None]:
        """Run ``body()`` until STOP is set (or the task is cancelled), restarting it whenever it
        raises or returns early. Without STOP, a normal return ends the task."""
        if self.restarts_total is not None:
            self.restarts_total.labels(name)  # exported as 0 from the start
        task = asyncio.create_task(self._keep(name, body, stop, critical), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def problem(self) -> str:
        """Empty while every critical task runs; otherwise which are down and why."""
        return "; ".join(self.down[name] for name in sorted(self.down))

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None,
        critical: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff[0]
        try:
            while True:
                started = loop.time()
                try:
                    await body()
                except Exception as exc:
                    why, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
                    failure: BaseException | None = exc
                else:
                    if stop is None or stop.is_set():
                        return
                    why = kind = "it returned while the agent is running"
                    failure = None
                if stop is not None and stop.is_set():
                    return  # failing on the way out: nothing to restart
                if loop.time() - started >= self.healthy_run:
                    delay = self.backoff[0]
                self.restarts[name] = self.restarts.get(name, 0) + 1
                if self.restarts_total is not None:
                    self.restarts_total.labels(name).inc()
                if critical:
                    # Readiness answers anyone on the node's network: the error's kind only (its
                    # message may name a pod); the message and traceback are in the log.
                    self.down[name] = (
                        f"task {name} down ({kind}, see the agent's log);"
                        f" restarting in {delay:.1f}s"
                    )
                log.error(
                    "task %s failed (%s); restarting it in %.1fs (restart %d)",
                    name,
                    why,
                    delay,
                    self.restarts[name],
                    exc_info=failure,
                )
                if await _stopped(stop, delay):
                    return
                delay = min(delay * 2, self.backoff[1])
                self.down.pop(name, None)
                log.info("task %s restarted", name)
        finally:
            self.down.pop(name, None)


async def _stopped(stop: asyncio.Event | None, delay: float) -> bool:
    """Sleep DELAY seconds; True as soon as STOP is set."""
    if stop is None:
        await asyncio.sleep(delay)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
