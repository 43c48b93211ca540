"""The venv's Envoy checking a static config (``envoy --mode validate``): no listener is opened
and no privilege is needed, so unit tests can ask Envoy itself whether it accepts what they
built."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from nodeagent.envoy.bootstrap import INTERNAL_LISTENERS, STATIC_RUNTIME

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


def assert_envoy_accepts_resources(
    tmp_path: Path,
    *,
    clusters: Iterable[Message | dict[str, Any]] = (),
    listeners: Iterable[Message | dict[str, Any]] = (),
    secrets: Iterable[Message | dict[str, Any]] = (),
    node_runtime: bool = False,
) -> None:
    """Envoy validates a static bootstrap holding these resources (messages or proto3 JSON),
    with internal listeners enabled as in the node's bootstrap. The clusters' SDS names mean
    the static SECRETS (``static_sds``); NODE_RUNTIME adds the node's static runtime layer."""

    def plain(resource: Message | dict[str, Any]) -> dict[str, Any]:
        if isinstance(resource, Message):
            return json_format.MessageToDict(resource, preserving_proto_field_name=True)
        return resource

    config: dict[str, Any] = {
        "bootstrap_extensions": [INTERNAL_LISTENERS],
        "static_resources": {
            "clusters": [static_sds(plain(c)) for c in clusters],
            "listeners": [plain(x) for x in listeners],
            "secrets": [plain(x) for x in secrets],
        },
    }
    if node_runtime:
        config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": STATIC_RUNTIME}]}
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert_envoy_accepts(path)
