"""The node Envoy under the supervisor: a real Envoy, its admin API and its :15090-style stats.

ADS points at a socket in tmp_path where nothing listens, as when the agent is briefly away: the
bootstrap's short initial fetch timeout lets Envoy leave init and go LIVE regardless.
Every Envoy a test starts is killed in a finalizer, found by its bootstrap path.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.envoy import EnvoyAdmin, EnvoyAdminError, EnvoySupervisor, write_bootstrap
from nodeagent.envoy import bootstrap as make_bootstrap
from nodeagent.envoy.supervisor import process_cmdline, process_stat
from tests.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.integration

ENVOY = Path(sys.executable).parent / "envoy"
READY = 15.0  # bound on every wait for LIVE (about 2 s here: two 0.5 s fetch timeouts)


@dataclass
class Node:
    """One Envoy's files and ports; ``supervisor()`` makes a supervisor as the agent would."""

    dir: Path
    bootstrap: Path
    admin: EnvoyAdmin
    stats_port: int

    def supervisor(self) -> EnvoySupervisor:
        return EnvoySupervisor(
            ENVOY,
            self.bootstrap,
            self.dir / "run",
            self.dir / "envoy.log",
            self.admin,
            backoff=(0.1, 1.0),
        )

    def envoy_pids(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-f", str(self.bootstrap)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in found.stdout.split()]

    def log(self) -> str:
        path = self.dir / "envoy.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _kill_all(node: Node) -> None:
    """Kills what a failed test left running, and reaps it if this process is its parent."""
    pids = node.envoy_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        wait_for(lambda: not node.envoy_pids(), 5, "the killed Envoys to be gone")
    finally:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    bootstrap = tmp_path / "envoy.json"
    stats_port = _free_port()
    admin_socket = tmp_path / "envoy-admin.sock"
    write_bootstrap(
        bootstrap,
        make_bootstrap(
            "node-test",
            "nodeagent",
            tmp_path / "ads.sock",  # nothing listens: the agent is away
            admin_socket=admin_socket,
            stats_port=stats_port,
            initial_fetch_timeout=0.5,
        ),
    )
    made = Node(tmp_path, bootstrap, EnvoyAdmin(admin_socket), stats_port)
    yield made
    _kill_all(made)
    assert made.envoy_pids() == [], "an Envoy outlived its test"


def test_envoy_starts_goes_live_and_serves_stats(node: Node) -> None:
    async def scenario() -> None:
        supervisor = node.supervisor()
        await supervisor.start()
        try:
            assert await supervisor.wait_ready(READY), node.log()
            assert supervisor.pid in node.envoy_pids()
            assert supervisor.pid is not None
            assert process_cmdline(supervisor.pid) == supervisor.argv()
            assert supervisor.problem() == ""
            # Admin is a root-only UNIX socket (#12): no TCP port a host-network pod could reach.
            sock = node.admin.socket_path
            assert sock is not None and stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600

            status, body = await asyncio.to_thread(_get, node.stats_port, "/stats/prometheus")
            assert status == 200 and re.search(r"^envoy_server_live(\{\})? 1$", body, re.M)
            # Envoy's readiness too (the envoy container's probe), and nothing else of the admin.
            status, body = await asyncio.to_thread(_get, node.stats_port, "/ready")
            assert (status, body.strip()) == (200, "LIVE")
            # Only the stats are exposed on the node's addresses, never the admin API.
            status, _ = await asyncio.to_thread(_get, node.stats_port, "/config_dump")
            assert status == 404

            admin = node.admin
            assert (await asyncio.to_thread(admin.server_info))["state"] == "LIVE"
            stats = await asyncio.to_thread(admin.stats, r"^server\.live$")
            assert stats == {"server.live": 1}
            dump = await asyncio.to_thread(admin.config_dump, "static_clusters")
            names = {c["cluster"]["name"] for c in dump["configs"]}
            assert names == {"xds-grpc", "prometheus_stats"}
            dump = await asyncio.to_thread(admin.config_dump, None, True)
            assert any(c["@type"].endswith("EndpointsConfigDump") for c in dump["configs"])
            assert "envoy_server_live" in await asyncio.to_thread(admin.prometheus)
            assert "OK" in await asyncio.to_thread(admin.post, "/healthcheck/fail")
        finally:
            await supervisor.stop(kill_envoy=True)
        assert node.envoy_pids() == []
        assert not (node.dir / "run" / "envoy.pid").exists()

    asyncio.run(scenario())


def test_killed_envoy_is_restarted(node: Node) -> None:
    restarted: list[int] = []

    async def scenario() -> None:
        supervisor = node.supervisor()
        supervisor.on_restart = lambda: restarted.append(supervisor.restarts)
        await supervisor.start()
        try:
            assert await supervisor.wait_ready(READY), node.log()
            first = supervisor.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)

            await wait_for_async(
                lambda: supervisor.pid not in (None, first), 10, lambda: f"restart: {node.log()}"
            )
            assert await supervisor.wait_ready(READY), node.log()
            assert node.envoy_pids() == [supervisor.pid]
            assert (supervisor.restarts, supervisor.last_exit) == (1, str(-signal.SIGKILL))
            assert restarted == [1]
            assert process_stat(first) is None  # reaped, not left as a zombie
        finally:
            await supervisor.stop(kill_envoy=True)

    asyncio.run(scenario())


def test_restarted_agent_adopts_the_running_envoy(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.envoy")

    async def scenario() -> None:
        first = node.supervisor()
        await first.start()
        try:
            assert await first.wait_ready(READY), node.log()
            pid = first.pid
            await first.stop()  # the agent exits: Envoy keeps serving
            assert node.envoy_pids() == [pid]
            assert node.admin.ready()

            second = node.supervisor()
            await second.start()
            assert (second.pid, second.adopted) == (pid, True)
            assert await second.wait_ready(READY)
            await asyncio.sleep(0.5)  # a few watch rounds: nothing restarts an adopted Envoy
            assert (node.envoy_pids(), second.restarts) == ([pid], 0)
            assert f"adopted Envoy pid {pid}" in caplog.messages

            await second.stop(kill_envoy=True)
            assert node.envoy_pids() == []
            assert not (node.dir / "run" / "envoy.pid").exists()
        finally:
            await first.stop(kill_envoy=True)

    asyncio.run(scenario())


def test_stale_pidfile_is_not_adopted(node: Node) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = node.dir / "run"
    run_dir.mkdir()
    (run_dir / "envoy.pid").write_text(json.dumps({"pid": dead.pid, "start_time": 1}))

    async def scenario() -> None:
        supervisor = node.supervisor()
        await supervisor.start()
        try:
            assert supervisor.pid not in (None, dead.pid)
            assert not supervisor.adopted
            assert await supervisor.wait_ready(READY), node.log()
            record = json.loads((run_dir / "envoy.pid").read_text())
            assert record["pid"] == supervisor.pid
        finally:
            await supervisor.stop(kill_envoy=True)

    asyncio.run(scenario())


def test_live_pid_of_another_program_is_not_adopted(node: Node) -> None:
    """A recycled pid: alive, right start time, but not our Envoy (here: the test itself)."""
    me = process_stat(os.getpid())
    assert me is not None
    run_dir = node.dir / "run"
    run_dir.mkdir()
    (run_dir / "envoy.pid").write_text(
        json.dumps({"pid": os.getpid(), "start_time": me.start_time})
    )

    async def scenario() -> None:
        supervisor = node.supervisor()
        await supervisor.start()
        try:
            assert supervisor.pid not in (None, os.getpid())
            assert not supervisor.adopted
        finally:
            await supervisor.stop(kill_envoy=True)
        assert node.envoy_pids() == []

    asyncio.run(scenario())


def test_admin_errors_name_the_endpoint(tmp_path: Path) -> None:
    sock = tmp_path / "envoy-admin.sock"  # nothing listens there
    admin = EnvoyAdmin(sock, timeout=0.5)

    assert admin.ready() is False
    with pytest.raises(EnvoyAdminError, match=rf"unix:{sock}/server_info"):
        admin.server_info()


def _get(port: int, path: str) -> tuple[int, str]:
    """A scraper's GET (no proxy settings apply: the address is this host's loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()
