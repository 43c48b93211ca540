"""The command line, as a user without root meets it."""

import os
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
