"""The tests' wait helpers: they return once the condition holds and fail naming it otherwise."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.waiting import wait_for, wait_for_async


def test_wait_for_returns_once_the_condition_holds() -> None:
    ready_at = time.monotonic() + 0.1
    took = wait_for(lambda: time.monotonic() >= ready_at, 5, "the clock to pass ready_at")
    assert 0.1 <= took < 2


def test_wait_for_fails_naming_the_condition() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"the queue to drain: not within 0.1s"):
        wait_for(lambda: False, 0.1, "the queue to drain")


def test_a_message_function_tells_the_state_at_the_deadline() -> None:
    seen = [0]

    def count() -> bool:
        seen[0] += 1
        return False

    with pytest.raises(pytest.fail.Exception, match=r"asked (\d+) times: not within") as failed:
        wait_for(count, 0.1, lambda: f"asked {seen[0]} times", step=0.01)
    assert int(failed.value.msg.split()[1]) == seen[0] > 1


def test_wait_for_async_lets_other_tasks_make_the_condition_true() -> None:
    async def main() -> float:
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, done.set)
        return await wait_for_async(done.is_set, 5, "the timer to fire")

    assert asyncio.run(main()) >= 0.05


def test_wait_for_async_awaits_a_coroutine_condition_and_fails_naming_it() -> None:
    async def never() -> bool:
        await asyncio.sleep(0)
        return False

    with pytest.raises(pytest.fail.Exception, match=r"the reply: not within 0.1s"):
        asyncio.run(wait_for_async(never, 0.1, "the reply"))
