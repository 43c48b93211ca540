"""Where the self-contained nodeagent-cni bundle is (built by scripts/build-cni.sh)."""

from __future__ import annotations

import os
from pathlib import Path

# In a container image the bundle is placed here; in a checkout, under build/.
IMAGE_BUNDLE = Path("/opt/nodeagent/cni/nodeagent-cni")
CHECKOUT_BUNDLE = Path(__file__).resolve().parents[2] / "build" / "cni" / "nodeagent-cni"


def locate_bundle() -> Path:
    """The plugin bundle directory (holding the ``nodeagent-cni`` executable)."""
    candidates = [Path(p) for p in [os.environ.get("NODEAGENT_CNI_BUNDLE", "")] if p]
    candidates += [CHECKOUT_BUNDLE, IMAGE_BUNDLE]
    for candidate in candidates:
        if (candidate / "nodeagent-cni").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"nodeagent-cni bundle not found (tried {tried}); run `make setup`")
