"""The supervisor in external mode: it watches an Envoy someone else runs through its admin API.

A stand-in admin on loopback answers ``/ready`` as Envoy does (200 "LIVE", 503 and the state
otherwise). The supervisor's binary does not exist: starting any process would fail loudly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nodeagent.envoy import EnvoyAdmin, EnvoySupervisor
from nodeagent.envoy import supervisor as supervisor_module
from nodeagent.envoy.supervisor import EXTERNAL
from tests.waiting import wait_for_async


class FakeAdmin:
    """Envoy's admin /ready on 127.0.0.1:PORT; ``stop()`` and ``start()`` make it go and come."""

    def __init__(self, port: int = 0) -> None:
        self.state = "LIVE"
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (fake.state + "\n").encode()
                self.send_response(200 if fake.state == "LIVE" else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    fake = FakeAdmin()
    yield fake
    if fake._server is not None:
        fake.stop()


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "ADMIN_POLL_INTERVAL", 0.02)


def _watcher(tmp_path: Path, port: int, hook: Callable[[], None] | None = None) -> EnvoySupervisor:
    return EnvoySupervisor(
        tmp_path / "no-such-envoy",
        tmp_path / "run" / "envoy-bootstrap.json",
        tmp_path / "run",
        tmp_path / "envoy.log",
        EnvoyAdmin(port=port, timeout=0.5),
        on_restart=hook,
        mode=EXTERNAL,
    )


def test_watches_without_ever_running_envoy(tmp_path: Path, admin: FakeAdmin) -> None:
    restarts: list[int] = []
    watcher = _watcher(tmp_path, admin.port, lambda: restarts.append(1))

    async def scenario() -> None:
        await watcher.start()
        try:
            # Right after start: the first look is done, readiness is right at once.
            assert (watcher.state, watcher.problem(), watcher.pid) == ("LIVE", "", None)

            admin.state = "INITIALIZING"
            await wait_for_async(
                lambda: "INITIALIZING" in watcher.problem(), 5, "the state to be seen"
            )
            assert watcher.problem().startswith("Envoy not ready: it is INITIALIZING")

            admin.stop()  # Envoy's container died
            await wait_for_async(lambda: watcher.state == "", 5, "Envoy to be seen gone")
            problem = watcher.problem()
            assert problem.startswith("Envoy not ready: its admin 127.0.0.1:")
            assert "stopped answering" in problem and "nodeagent envoy" in problem
            await asyncio.sleep(0.2)  # ten watch rounds in which nobody may start an Envoy
            assert watcher.pid is None and not (tmp_path / "run").exists()

            admin.state = "LIVE"
            admin.start()  # kubelet restarted the container
            await wait_for_async(lambda: watcher.problem() == "", 5, "Envoy to be seen back")
            assert (watcher.restarts, restarts) == (1, [1])
        finally:
            await watcher.stop(kill_envoy=True)  # never applies to an Envoy it does not run
        assert admin._server is not None  # untouched

    asyncio.run(scenario())


def test_an_envoy_not_there_yet_is_named(tmp_path: Path, admin: FakeAdmin) -> None:
    admin.stop()
    watcher = _watcher(tmp_path, admin.port)

    async def scenario() -> None:
        await watcher.start()
        try:
            problem = watcher.problem()
            assert problem.startswith(
                f"Envoy not ready: no Envoy answers on its admin 127.0.0.1:{admin.port} yet"
            )
            admin.start()
            await wait_for_async(lambda: watcher.problem() == "", 5, "Envoy to be found")
            assert watcher.restarts == 0  # the first Envoy seen is no restart
        finally:
            await watcher.stop()

    asyncio.run(scenario())
