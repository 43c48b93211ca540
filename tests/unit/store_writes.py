"""Counting a MeshStore's writes: a source must write only what changed (each write bumps the
store's generation and wakes translation)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.mesh.store import MeshStore


class Writes:
    """The store's put_*/delete_* calls, in order, by method name (put_service, ...)."""

    def __init__(self, store: MeshStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in dir(store):
            if name.startswith(("put_", "delete_")):
                monkeypatch.setattr(store, name, self._counting(name, getattr(store, name)))

    def _counting(self, name: str, method: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return method(*args)

        return call
