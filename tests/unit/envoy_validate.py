"""The venv's Envoy checking a static config (``envoy --mode validate``): no listener is opened
and no privilege is needed, so unit tests can ask Envoy itself whether it accepts what they
built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ENVOY = Path(sys.executable).parent / "envoy"


def assert_envoy_accepts(path: Path) -> None:
    """Envoy validates the bootstrap at PATH (its own verdict, with its output on failure)."""
    proc = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"configuration '{path}' OK" in proc.stdout + proc.stderr
