"""Istio's own sample resources, kept in the repository (tests/data/istio, Apache-2.0): the tests
that read them need nothing outside the checkout, and missing data fails them loudly."""

from __future__ import annotations

from pathlib import Path

ISTIO_DATA = Path(__file__).resolve().parents[1] / "data" / "istio"


def istio_data(relative: str) -> Path:
    """A file or directory of the Istio data; FileNotFoundError naming it when it is missing."""
    path = ISTIO_DATA / relative
    if not path.exists():
        raise FileNotFoundError(f"Istio test data {path} is missing (see {ISTIO_DATA}/README.md)")
    return path


def istio_files(*patterns: str) -> list[Path]:
    """The data files matching PATTERNS (globs under tests/data/istio); never an empty list, which
    would silently turn a parametrized test into zero cases."""
    files = sorted({f for pattern in patterns for f in ISTIO_DATA.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no Istio test data matches {patterns} in {ISTIO_DATA}")
    return files
