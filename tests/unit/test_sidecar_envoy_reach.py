"""Sidecar Envoys run as uid 1337: the Envoy they exec must be reachable by that uid wherever the
project is checked out (issue #12, defect 11: a clone under root's 0700 home failed every
sidecar-model test with "Envoy ... exited (2)")."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.ports import PROXY_UID
from nodeagent.testbed.sidecar import packaged_envoy, proxy_envoy

LAUNCHER = Path(sys.executable).parent / "envoy"  # the agent's default --envoy-binary


def _blocked_for_others(path: Path) -> list[str]:
    """Every directory above PATH that a uid other than root and 1337's group cannot search,
    and PATH itself if such a uid cannot execute it (computed here, independently of the
    agent's own check)."""

    def allows(st: os.stat_result, other: int, group: int) -> bool:
        return bool(st.st_mode & other or (st.st_gid == PROXY_UID and st.st_mode & group))

    blocked = [str(d) for d in path.parents if not allows(d.stat(), stat.S_IXOTH, stat.S_IXGRP)]
    if not allows(path.stat(), stat.S_IXOTH, stat.S_IXGRP):
        blocked.append(str(path))
    return blocked


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid can enter (/tmp is 1777; pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nodeagent-sidecar-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_agents_default_envoy_is_given_to_uid_1337_as_a_reachable_executable(
    open_dir: Path,
) -> None:
    """Wherever this checkout is (a 0700 home included): the Envoy handed to the sidecars is an
    executable every parent of which uid 1337 may search, not the venv's Python launcher; as
    root, uid 1337 really runs it."""
    envoy = proxy_envoy(LAUNCHER, open_dir / "sidecars")
    assert _blocked_for_others(envoy) == []
    assert envoy.read_bytes()[:4] == b"\x7fELF"  # the Envoy itself: no Python for 1337 to reach
    if os.geteuid() == 0:
        as_proxy = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]
        out = subprocess.run(
            [*as_proxy, str(envoy), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "envoy" in out.stdout.lower()


def test_an_envoy_out_of_reach_is_copied_once_into_the_sidecar_dir(
    tmp_path: Path, open_dir: Path
) -> None:
    private = tmp_path / "home"  # as root's home on Debian
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    binary = private / "envoy"
    binary.write_bytes(b"\x7fELF not really envoy")
    binary.chmod(0o700)
    sidecars = open_dir / "sidecars"
    sidecars.mkdir()

    copy = proxy_envoy(binary, sidecars)
    assert copy == sidecars / "bin" / "envoy"
    assert copy.read_bytes() == binary.read_bytes()
    assert _blocked_for_others(copy) == []
    st = copy.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o755)

    assert proxy_envoy(binary, sidecars).stat().st_ino == st.st_ino  # unchanged: not copied again
    binary.write_bytes(b"\x7fELF a newer envoy")
    assert proxy_envoy(binary, sidecars).read_bytes() == b"\x7fELF a newer envoy"


def test_an_envoy_within_reach_is_used_where_it_is(open_dir: Path) -> None:
    binary = open_dir / "envoy"
    binary.write_bytes(b"\x7fELF")
    binary.chmod(0o755)
    assert proxy_envoy(binary, open_dir / "sidecars") == binary
    assert not (open_dir / "sidecars" / "bin").exists()


def test_envoy_servers_launcher_resolves_to_its_packaged_envoy() -> None:
    assert LAUNCHER.read_bytes()[:2] == b"#!"  # a Python script: 1337 would need the venv
    real = packaged_envoy(LAUNCHER)
    assert real != LAUNCHER and real.read_bytes()[:4] == b"\x7fELF"
    other = Path("/usr/local/bin/envoy")
    assert packaged_envoy(other) == other  # a binary the user chose is taken as it is
