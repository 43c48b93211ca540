"""Envoy's command line, and ``nodeagent envoy`` (the DaemonSet's envoy container): it waits for
the agent's bootstrap, then becomes Envoy with the very arguments the agent's supervisor uses.

No privileges: a stand-in "envoy" (a shell script recording its pid and arguments) shows what
would have run and that it replaced the waiting process (same pid).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from nodeagent.cli import cli
from nodeagent.envoy import EnvoyAdmin, EnvoySupervisor, bootstrap, write_bootstrap
from nodeagent.envoy.bootstrap import bootstrap_path
from nodeagent.envoy.launch import (
    NODE_ENVOY_ARGS,
    bootstrap_problem,
    envoy_argv,
    wait_for_bootstrap,
)
from nodeagent.identity.ca import BuiltinCA
from nodeagent.identity.manager import IdentityManager
from nodeagent.mesh.store import MeshStore
from nodeagent.proxy import NodeProxy, ProxySettings
from nodeagent.redirect.registry import PodRegistry
from tests.waiting import wait_for

NODEAGENT: list[str | Path] = [sys.executable, "-m", "nodeagent"]
BOUND = 10.0  # seconds: a bound on every wait below (each takes well under a second)


def _write_bootstrap(run_dir: Path) -> Path:
    path = bootstrap_path(run_dir)
    write_bootstrap(path, bootstrap("nodeagent~n1", "n1", run_dir / "xds.sock"))
    return path


def _proxy(tmp_path: Path, mode: str) -> NodeProxy:
    ca = BuiltinCA.load_or_create(tmp_path / "state", "cluster.local")
    settings = ProxySettings(
        "n1", tmp_path / "run", Path("/opt/envoy/bin/envoy"), tmp_path / "e.log", envoy_mode=mode
    )
    registry = CollectorRegistry()
    return NodeProxy(
        settings,
        MeshStore(),
        PodRegistry(tmp_path / "pods"),
        registry,
        IdentityManager(ca, "cluster.local", registry=registry),
    )


# -- one command line ------------------------------------------------------------------------


def test_envoy_argv() -> None:
    argv = envoy_argv(Path("/opt/envoy"), Path("/run/nodeagent/envoy-bootstrap.json"))

    assert argv == [
        "/opt/envoy",
        "-c",
        "/run/nodeagent/envoy-bootstrap.json",
        "--disable-hot-restart",
        "--log-level",
        "info",
        "--file-flush-interval-msec",
        "1000",
        "--drain-time-s",
        "5",
        "--drain-strategy",
        "immediate",
    ]
    assert envoy_argv(Path("/e"), Path("/b"), ())[-1] == "info"


@pytest.mark.parametrize("mode", ["managed", "external"])
def test_the_agents_supervisor_uses_the_one_argv(tmp_path: Path, mode: str) -> None:
    proxy = _proxy(tmp_path, mode)

    assert proxy.supervisor.mode == mode
    assert proxy.supervisor.extra_args == NODE_ENVOY_ARGS
    assert proxy.supervisor.argv() == envoy_argv(
        Path("/opt/envoy/bin/envoy"), bootstrap_path(tmp_path / "run")
    )


def test_bad_supervisor_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'managed' or 'external'"):
        EnvoySupervisor(Path("/e"), tmp_path / "b", tmp_path, tmp_path / "l", EnvoyAdmin(), mode="")


# -- waiting for the bootstrap ---------------------------------------------------------------


def test_bootstrap_problems_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "envoy-bootstrap.json"
    assert bootstrap_problem(path) == "not written yet"
    path.write_text("{")
    assert bootstrap_problem(path).startswith("not JSON")
    path.write_text('{"node": {}}')
    assert bootstrap_problem(path).startswith("not an Envoy bootstrap")
    path.unlink()
    path.mkdir()
    assert bootstrap_problem(path).startswith("cannot read it")
    path.rmdir()
    assert bootstrap_problem(_write_bootstrap(tmp_path)) == ""


def test_waits_with_a_periodic_log_line_until_the_bootstrap_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.envoy")
    path = bootstrap_path(tmp_path)
    writer = threading.Timer(0.5, _write_bootstrap, (tmp_path,))
    writer.start()
    started = time.monotonic()
    try:
        found = wait_for_bootstrap(path, threading.Event(), check_interval=0.01, log_interval=0.1)
    finally:
        writer.cancel()
    took = time.monotonic() - started

    assert found is True
    assert 0.5 <= took < BOUND
    waiting = [m for m in caplog.messages if m.startswith("waiting for the node agent")]
    # One line at once, then one every log_interval: never one per check (50 checks here).
    assert 3 <= len(waiting) <= 7, waiting
    assert str(path) in waiting[0] and "not written yet" in waiting[0]


def test_a_present_bootstrap_is_taken_at_once(tmp_path: Path) -> None:
    path = _write_bootstrap(tmp_path)
    stop = threading.Event()
    stop.set()  # even a pending stop does not matter: there is nothing to wait for

    assert wait_for_bootstrap(path, stop) is True


def test_stop_ends_the_wait_promptly(tmp_path: Path) -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()

    assert wait_for_bootstrap(bootstrap_path(tmp_path), stop, check_interval=5.0) is False
    assert time.monotonic() - started < 2.0


# -- the command -----------------------------------------------------------------------------


def _fake_envoy(tmp_path: Path) -> tuple[Path, Path]:
    """An "envoy" that records its pid and arguments, prints a line, then exits."""
    record = tmp_path / "ran.txt"
    script = tmp_path / "bin" / "envoy"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$$" "$@" > {record}\necho fake envoy running\n')
    script.chmod(0o755)
    return script, record


def test_the_command_waits_then_becomes_envoy_with_the_supervisors_argv(tmp_path: Path) -> None:
    binary, record = _fake_envoy(tmp_path)
    run_dir, log = tmp_path / "run", tmp_path / "logs" / "envoy.log"
    proc = subprocess.Popen(
        [*NODEAGENT, "envoy", *("--run-dir", run_dir, "--envoy-binary", binary, "--log", log)],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "waiting for the node agent" in log.read_text(),
            BOUND,
            "the command to say it waits for the node agent",
        )
        assert proc.poll() is None and not record.exists()

        _write_bootstrap(run_dir)
        assert proc.wait(timeout=BOUND) == 0
    finally:
        proc.kill()
        proc.wait()

    pid, *argv = record.read_text().split()
    assert int(pid) == proc.pid  # exec: Envoy replaced the waiting process
    assert [str(binary), *argv] == envoy_argv(binary, bootstrap_path(run_dir))
    text = log.read_text()
    assert "starting Envoy" in text and "fake envoy running" in text  # --log holds both


def test_sigterm_while_waiting_exits_cleanly(tmp_path: Path) -> None:
    binary, record = _fake_envoy(tmp_path)
    log = tmp_path / "envoy.log"
    proc = subprocess.Popen(
        [
            *NODEAGENT,
            "envoy",
            *("--run-dir", tmp_path / "run", "--envoy-binary", binary, "--log", log),
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "waiting for the node agent" in log.read_text(),
            BOUND,
            "the command to say it waits for the node agent",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "stopped before Envoy started" in log.read_text()
    assert not record.exists()


def test_a_missing_envoy_binary_is_reported_at_once(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["envoy", "--run-dir", str(tmp_path), "--envoy-binary", str(tmp_path / "nope")]
    )

    assert result.exit_code == 1
    assert f"no Envoy executable at {tmp_path / 'nope'}" in result.output


def test_external_mode_needs_the_proxy() -> None:
    result = CliRunner().invoke(
        cli,
        ["run", "--node", "n", "--source-dir", "/x", "--no-proxy", "--envoy-mode", "external"],
    )

    assert result.exit_code == 2
    assert "drop --no-proxy" in result.output
