"""Renders a kustomization as `kubectl apply -k` would, with the pinned official kubectl that
`make test-tools` installs into the venv (scripts/setup.sh, KUBECTL_VERSION). The manifest tests
read what a user applies, not the files one by one."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# scripts/setup.sh --test-tools puts it here ($VENV/test-tools/kubectl).
KUBECTL = Path(sys.prefix) / "test-tools" / "kubectl"
MIN_VERSION = (1, 27)  # older kubectl cannot render a kustomization's `labels:`


def kubectl() -> Path:
    if not KUBECTL.is_file():
        pytest.fail(f"no kubectl at {KUBECTL}: run `make test-tools` (installs the pinned one)")
    return KUBECTL


def client_version() -> tuple[int, int]:
    out = subprocess.run(
        [str(kubectl()), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    info = json.loads(out)["clientVersion"]
    return int(info["major"]), int(str(info["minor"]).rstrip("+"))


@functools.cache
def _render(directory: str) -> str:
    result = subprocess.run(
        [str(kubectl()), "kustomize", directory],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return result.stdout


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k DIRECTORY` would send (a fresh copy on every call)."""
    return [doc for doc in yaml.safe_load_all(_render(str(directory))) if doc is not None]
