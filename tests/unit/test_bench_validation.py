"""The validation benchmark's smoke variant (in process: it needs no testbed), so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

from bench import validation
from bench.common import Run


def test_validation_smoke(tmp_path: Path) -> None:
    validation.run(Run(smoke=True, out=tmp_path))
    result = json.loads((tmp_path / "validation.json").read_text())
    objects = [r["object"] for r in result["results"]["objects"]]
    assert objects[0].endswith("Istio samples (per object)")
    assert "ServiceEntry, 16 ports" in objects
    assert all(r["cpu_s"]["median"] > 0 for r in result["results"]["objects"])
