"""Waiting on a condition with a deadline, for unit and integration tests alike.

A test waits for what it means ("Envoy reconnected", "the file holds the entry"), not for a
guessed number of seconds: it goes on as soon as the condition holds, and fails naming the
condition when it does not hold within the deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pytest

# What the test waits for; a function is called at the deadline, to tell the state then.
What = str | Callable[[], str]


def _fail(what: What, timeout: float) -> NoReturn:
    pytest.fail(f"{what() if callable(what) else what}: not within {timeout}s")


def wait_for(
    condition: Callable[[], object], timeout: float, what: What, step: float = 0.05
) -> float:
    """Seconds until CONDITION() held; fails the test naming WHAT after TIMEOUT seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            _fail(what, timeout)
        time.sleep(step)
    return time.monotonic() - start


async def wait_for_async(
    condition: Callable[[], object | Awaitable[object]],
    timeout: float,
    what: What,
    step: float = 0.01,
) -> float:
    """Like ``wait_for`` inside an event loop: other tasks run while it waits.

    CONDITION may be a plain function or return an awaitable (a coroutine function).
    """
    start = time.monotonic()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            _fail(what, timeout)
        await asyncio.sleep(step)
