"""python -m chaos [--smoke] [--out DIR] [CASE ...]: faults under load (all cases by default).

Each case writes ``<out>/<case>.json``; the run writes ``<out>/summary.json`` and, for a full run
into chaos/results, the table in chaos/README.md. Exit 1 when a case failed its checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import machine, versions
from chaos.cases import CASES, NOT_YET, Outcome, Scale
from chaos.load import apply_strict, topology
from chaos.report import write_table
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
# chx-: this suite's testbeds (leftovers recognisable); one per Envoy mode
TESTBEDS = {False: "chx-node", True: "chx-ext"}


def bring_up(external: bool) -> Testbed:
    name = TESTBEDS[external]
    down(name)  # a crashed earlier run's leftovers
    text = topology(name, envoy_container=external)
    tb = Testbed.up(loads_topology(text, "chaos"), text, "chaos")
    apply_strict(tb)
    return tb


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=", ".join(CASES))
    parser.add_argument("--smoke", action="store_true", help="short variant (the test suite's)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS}")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)} (known: {', '.join(CASES)})")
    if os.geteuid() != 0:
        print("chaos cases build testbeds (network namespaces): run them as root", file=sys.stderr)
        return 2
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    scale = Scale(args.smoke)
    wanted = args.cases or list(CASES)
    started = time.time()
    outcomes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        for external in (False, True):
            names = [c for c in wanted if CASES[c][1] == external]
            if not names:
                continue
            tb = bring_up(external)
            try:
                for name in names:
                    print(f"== {name}", flush=True)
                    t0 = time.monotonic()
                    try:
                        outcome: Outcome = CASES[name][0](tb, Path(scratch), scale)
                        doc = outcome.as_json()
                    except Exception as e:  # report and go on: one case must not hide others
                        traceback.print_exc()
                        doc = {"case": name, "ok": False, "problems": [f"{type(e).__name__}: {e}"]}
                    doc["wall_seconds"] = round(time.monotonic() - t0, 1)
                    doc["testbed"] = tb.name
                    outcomes[name] = doc
                    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
                    print(_line(doc), flush=True)
            finally:
                if any(not outcomes[n]["ok"] for n in names if n in outcomes):
                    # what the nodes logged, for reading a failed case (down removes it)
                    shutil.copytree(
                        layout.logs_dir(tb.name), out / f"logs-{tb.name}", dirs_exist_ok=True
                    )
                with contextlib.suppress(Exception):
                    down(tb.name)
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "smoke": args.smoke,
        "machine": machine(),
        "versions": versions(),
        "cases": outcomes,
        "not_yet": NOT_YET,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.smoke and out == RESULTS and not args.cases:
        write_table(ROOT / "README.md", summary)
    failed = [n for n, d in outcomes.items() if not d["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _line(doc: dict[str, Any]) -> str:
    if "figures" not in doc:
        return f"   {doc['case']}: ERROR {doc['problems']}"
    f = doc["figures"]
    verdict = "ok" if doc["ok"] else f"FAILED {doc['problems']}"
    return (
        f"   {doc['case']}: sent {f['sent']} failed {f['failed']} reached {f['reached_server']}"
        f" bypassed {f['bypassed']} plaintext {f['plaintext_frames']}"
        f" (wire frames {f['wire_frames']}, control {f['control_frames']}): {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
