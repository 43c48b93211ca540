"""nodeagent-cni: the chained CNI plugin (standard library only; it runs on the host).

Not implemented yet (issue #3): ADD and CHECK fail with a CNI error naming that, so a pod can never
be started believing it is in the mesh. VERSION answers per the spec; DEL succeeds because no ADD
ever made anything to undo.
"""

from __future__ import annotations

import json
import os
import sys

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def _error(code: int, msg: str, details: str = "") -> int:
    # CNI spec: errors go to stdout as JSON with cniVersion, code, msg and details.
    json.dump({"cniVersion": "1.0.0", "code": code, "msg": msg, "details": details}, sys.stdout)
    return 1


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        json.dump({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}, sys.stdout)
        return 0
    if command == "DEL":
        return 0
    if command in ("ADD", "CHECK"):
        return _error(100, f"nodeagent-cni: {command} is not implemented yet", "see issue #3")
    return _error(
        4, f"nodeagent-cni: invalid CNI_COMMAND {command!r}", "expected ADD, DEL, CHECK or VERSION"
    )


if __name__ == "__main__":
    sys.exit(main())
