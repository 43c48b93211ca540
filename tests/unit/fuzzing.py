"""The fuzz targets' budget (tests/unit/test_fuzz_*.py, run by `make test`'s unit stage).

In `make test` each target runs a fixed number of examples, derandomized: every run (and CI)
tries the same inputs, so a failure reproduces and the stage's time stays within its budget
(about 40 s together on two cores with `-n auto`). A defect found once is kept as a plain test or
an ``@example``, so it is checked on every run whatever Hypothesis draws.

A longer campaign: ``NODEAGENT_FUZZ_SCALE=50 .venv/bin/pytest -n auto tests/unit/test_fuzz_*.py``
runs 50 times the examples with fresh random inputs, and keeps what fails in Hypothesis's example
database (.hypothesis/, replayed first by the next campaign).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

SCALE = max(1, int(os.environ.get("NODEAGENT_FUZZ_SCALE", "1") or "1"))
CAMPAIGN = SCALE > 1


def budget(examples: int) -> settings:
    """EXAMPLES inputs for one target in `make test` (times SCALE in a campaign)."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,  # a subprocess or a gRPC round trip: its time varies with the load
        derandomize=not CAMPAIGN,
        # No "explain" phase: it reruns a failing example hundreds of times (a minute per
        # failure for a subprocess target); the shrunk example is what a fix needs.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        database=settings.default.database if CAMPAIGN else None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # each example makes its own files and sockets
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


def json_values(max_leaves: int) -> st.SearchStrategy[object]:
    """Any JSON value (huge integers and non-finite floats too), nested up to MAX_LEAVES."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.floats()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=max_leaves,
    )
