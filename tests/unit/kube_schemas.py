"""Offline, strict validation of Kubernetes manifests against the API's OpenAPI schemas, shared
by the manifest tests (test_daemonset.py, test_vagrant.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest

# The oldest Kubernetes we claim to support, and the newest kubernetes-validate bundles.
K8S_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]


def assert_valid(name: str, doc: Mapping[str, Any], version: str) -> None:
    """Fails the test, naming the file, the kind and the field, unless DOC is valid in VERSION
    (strictly: unknown fields are errors)."""
    try:
        kubernetes_validate.validate(dict(doc), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{name} ({doc['kind']}) at {path}: {e.message}")
