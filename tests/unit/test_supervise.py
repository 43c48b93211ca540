"""Background work never dies silently (#12 defect 8).

A crash of a long-lived task is logged with its traceback, counted in
``nodeagent_task_restarts_total{task}``, restarted with backoff, and the agent's readiness
(:15021/healthz/ready) answers 503 naming the task while a critical one is down.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from nodeagent.logs import JsonFormatter
from nodeagent.supervise import TaskSupervisor
from tests.waiting import wait_for_async


def test_a_crashing_task_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_crash_restart(caplog))


async def _crash_restart(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    tasks = TaskSupervisor(registry, backoff=(0.2, 0.2))
    stop = asyncio.Event()
    runs = 0
    back = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("the watch broke")
        back.set()
        await stop.wait()

    with caplog.at_level(logging.ERROR, logger="nodeagent.supervise"):
        tasks.spawn("watcher", flaky, stop=stop)
        # Down for its 0.2 s backoff.
        down = "task watcher down (RuntimeError, see the agent's log)"
        await wait_for_async(lambda: down in tasks.problem(), 1, "the crash shown")
        await asyncio.wait_for(back.wait(), 2)
    assert tasks.problem() == ""
    assert registry.get_sample_value("nodeagent_task_restarts_total", {"task": "watcher"}) == 1
    (record,) = [r for r in caplog.records if "watcher" in r.getMessage()]
    error = json.loads(JsonFormatter().format(record))["error"]
    assert error.startswith("Traceback") and 'raise RuntimeError("the watch broke")' in error
    stop.set()
    await tasks.cancel_all()


def test_a_loop_that_returns_early_is_restarted_and_stop_ends_it() -> None:
    asyncio.run(_returns_early())


async def _returns_early() -> None:
    tasks = TaskSupervisor(backoff=(0.05, 0.05))
    stop = asyncio.Event()
    runs = 0

    async def returns() -> None:
        nonlocal runs
        runs += 1

    task = tasks.spawn("early", returns, stop=stop)
    await wait_for_async(
        lambda: runs >= 3 and tasks.restarts["early"] >= 2, 2, "two restarts after 0.05 s each"
    )
    stop.set()
    await asyncio.wait_for(task, 1)
    assert tasks.problem() == ""
