"""The venv's Envoy checking a static config (``envoy --mode validate``): no listener is opened
and no privilege is needed, so unit tests can ask Envoy itself whether it accepts what they
built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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


def static_sds(value: Any) -> Any:
    """VALUE with every SdsSecretConfig's ``sds_config`` dropped: the name then means a static
    secret of the bootstrap. (Envoy's validate mode crashes on an ADS-fetched secret, as it has
    no ADS; ``{"ads": {}}`` is the same sds_config translate/tls.py gives every mesh socket.)"""
    if isinstance(value, dict):
        return {k: static_sds(v) for k, v in value.items() if k != "sds_config"}
    if isinstance(value, list):
        return [static_sds(v) for v in value]
    return value
