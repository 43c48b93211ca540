"""The command line, as a user without root meets it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeagent.cli import cli

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for sub in ("testbed", "workload"):
        assert sub in result.output
    tb = CliRunner().invoke(cli, ["testbed", "--help"])
    for sub in ("up", "down", "status", "exec"):
        assert sub in tb.output


def test_bad_topology_is_reported_before_anything_is_created(tmp_path: Path) -> None:
    topo = tmp_path / "cluster.yaml"
    topo.write_text("name: t\nnodes: [{name: a}]\npods: [{name: p, node: a, image: nginx}]\n")
    result = CliRunner().invoke(cli, ["testbed", "up", str(topo)])
    assert result.exit_code == 1
    assert f"{topo}: pods[0].image: unknown field" in result.output


def test_missing_topology_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["testbed", "up", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read topology" in result.output


def test_invalid_name_override() -> None:
    result = CliRunner().invoke(cli, ["testbed", "up", "workshop", "--name", "Bad.Name"])
    assert result.exit_code == 1
    assert "--name: 'Bad.Name' is not a valid testbed name" in result.output


def test_testbed_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, ["testbed", "up", "workshop"])
    assert result.exit_code == 1
    assert "run it as root" in result.output


def run_cni_plugin(command: str, stdin: str = "{}") -> subprocess.CompletedProcess[str]:
    # -I -S: no site-packages at all, as on a host without our venv: the plugin is stdlib-only.
    return subprocess.run(
        [sys.executable, "-I", "-S", str(REPO / "nodeagent" / "cni" / "plugin.py")],
        input=stdin,
        env={"CNI_COMMAND": command, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_cni_plugin_answers_version_with_the_standard_library_only() -> None:
    proc = run_cni_plugin("VERSION")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert {"1.0.0", "1.1.0", "0.4.0"} <= set(answer["supportedVersions"])


def test_cni_plugin_fails_add_until_it_is_implemented() -> None:
    proc = run_cni_plugin("ADD")
    assert proc.returncode != 0
    err = json.loads(proc.stdout)
    assert err["code"] == 100 and "not implemented" in err["msg"]
    assert run_cni_plugin("DEL").returncode == 0
    bad = run_cni_plugin("FROB")
    assert json.loads(bad.stdout)["code"] == 4
