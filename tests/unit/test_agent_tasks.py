"""The agent's background tasks run supervised (#12 defect 8): its periodic capture reconcile
crashing makes readiness (:15021) 503 naming it, is logged with its traceback, counted in
``nodeagent_task_restarts_total{task}`` on :15020, and the loop is restarted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from local_http import free_port, get

from nodeagent import agent
from nodeagent.logs import JsonFormatter
from nodeagent.redirect.manager import CaptureManager
from tests.waiting import wait_for_async


def test_agent_reconcile_crash_makes_readiness_503_counted_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's wiring: its periodic capture reconcile raises (a test double of
    CaptureManager.reconcile); the agent keeps running, readiness is 503 naming the task while
    it is down, the crash is in the log with its traceback and in the metrics, and the loop
    runs again (readiness 200) once it stops failing."""
    source = tmp_path / "cluster"
    source.mkdir()
    proc = tmp_path / "proc"
    proc.mkdir()
    metrics_port, ready_port = free_port(), free_port()
    config = agent.AgentConfig(
        node_name="node1",
        source_dir=source,
        cni_socket=tmp_path / "run" / "cni.sock",
        state_dir=tmp_path / "state",
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
        readiness_port=ready_port,
        reconcile_interval=0.05,
        probe_snat=False,
        proxy=False,
        host_proc=proc,
    )
    failing = False
    calls = 0
    real = CaptureManager.reconcile

    async def reconcile(self: CaptureManager) -> dict[str, int]:
        nonlocal calls
        calls += 1
        if failing:
            raise OSError("netlink went away")
        return await real(self)

    monkeypatch.setattr(CaptureManager, "reconcile", reconcile)
    caplog.set_level(logging.ERROR, logger="nodeagent")

    def set_failing(value: bool) -> int:
        nonlocal failing
        failing = value
        return calls

    asyncio.run(_agent_readiness(config, set_failing, caplog))


async def _agent_readiness(
    config: agent.AgentConfig,
    set_failing: Callable[[bool], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(config, stop))
    ready_url = f"http://127.0.0.1:{config.readiness_port}/healthz/ready"
    metrics_url = f"http://127.0.0.1:{config.metrics_port}/metrics"
    seen: tuple[int, str] = (0, "")

    async def readiness(code: int) -> bool:
        nonlocal seen
        if not Path(config.cni_socket).exists():
            return running.done()
        seen = await asyncio.to_thread(get, ready_url)
        return running.done() or seen[0] == code

    try:
        await wait_for_async(lambda: readiness(200), 5, "the agent to be up and ready")
        assert not running.done(), running
        assert (await asyncio.to_thread(get, ready_url))[0] == 200

        set_failing(True)
        # The first crash: at the next reconcile, 0.05 s on.
        await wait_for_async(lambda: readiness(503), 2, "the failing task to turn it not ready")
        assert seen[0] == 503, seen
        assert "task reconcile down (OSError, see the agent's log)" in seen[1], seen
        _, text = await asyncio.to_thread(get, metrics_url)
        assert 'nodeagent_task_restarts_total{task="reconcile"} 1.0' in text, text
        crash = [r for r in caplog.records if "task reconcile failed" in r.getMessage()]
        assert crash, [r.getMessage() for r in caplog.records]
        logged = json.loads(JsonFormatter().format(crash[0]))
        assert "Traceback" in logged["error"] and "netlink went away" in logged["error"]

        before = set_failing(False)
        # Restarted after its backoff (0.5 s, then 1 s).
        await wait_for_async(
            lambda: readiness(200) if set_failing(False) > before else False,
            4,
            "the task to be restarted and the agent ready again",
        )
        assert seen[0] == 200 and set_failing(False) > before, (seen, before)
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
