"""Integration fixtures: real network namespaces, CNI plugins and processes (root only).

Every testbed a test brings up is torn down in a finalizer, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.testbed.state import OWNER_ENV, RUN_DIR, TestbedState
from tests.integration.helpers import nodeagent

# Testbeds this test run brings up carry its mark; another run's testbeds are not ours to remove.
OWNER = os.environ.setdefault(OWNER_ENV, f"pytest-{os.getpid()}")


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests build network namespaces: run them as root (make test)")


@pytest.fixture(autouse=True)
def _no_leftover_testbeds() -> Iterator[None]:
    """Whatever testbed a test leaves up, also when it fails midway, is taken down after it."""
    before = set(_testbeds())
    yield
    for name in sorted(set(_testbeds()) - before):
        nodeagent("testbed", "down", "--name", name)


def _testbeds() -> list[str]:
    """Testbeds this test run brought up (their state file carries its mark)."""
    if not RUN_DIR.is_dir():
        return []
    ours = []
    for folder in RUN_DIR.iterdir():
        state = TestbedState.load(folder.name)
        if state is not None and state.owner == OWNER:
            ours.append(folder.name)
    return sorted(ours)


ANSWER_END = "--- end of answer ---"


@dataclass
class Cluster:
    name: str

    def exec(self, pod: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return nodeagent("testbed", "exec", "--name", self.name, pod, "--", *argv, timeout=timeout)

    def curl(self, pod: str, url: str) -> dict[str, object]:
        proc = self.exec(pod, "curl", "-sS", "--fail", "--max-time", "10", url)
        assert proc.returncode == 0, f"curl {url} from {pod}: {proc.stderr}"
        answer: dict[str, object] = json.loads(proc.stdout)
        return answer

    def curls(self, pod: str, url: str, count: int) -> list[dict[str, object]]:
        """COUNT calls of URL from POD, each its own curl (a new connection), in one exec."""
        call = f"curl -sS --fail --max-time 10 '{url}' && echo '{ANSWER_END}'"
        proc = self.exec(pod, "sh", "-c", f"for i in $(seq {count}); do {call} || exit 1; done")
        assert proc.returncode == 0, f"curl {url} from {pod}: {proc.stderr}"
        bodies = proc.stdout.split(ANSWER_END)[:-1]  # each answer is a (multi-line) JSON object
        answers: list[dict[str, object]] = [json.loads(body) for body in bodies]
        assert len(answers) == count, proc.stdout
        return answers

    def status(self) -> dict[str, object]:
        proc = nodeagent("testbed", "status", "--name", self.name, "-o", "json")
        assert proc.returncode == 0, proc.stderr
        status: dict[str, object] = json.loads(proc.stdout)
        return status


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[object]:
    """Factory: make_cluster(name, topology_yaml) -> Cluster, always torn down afterwards."""
    made: list[str] = []

    def make(name: str, topology: str) -> Cluster:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(topology))
        made.append(name)
        proc = nodeagent("testbed", "up", str(path), "--name", name)
        assert proc.returncode == 0, f"testbed up failed: {proc.stdout}\n{proc.stderr}"
        return Cluster(name)

    yield make
    for name in made:
        nodeagent("testbed", "down", "--name", name)
