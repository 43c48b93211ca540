"""python -m bench [--smoke] [--out DIR] [SCENARIO ...]: run scenarios (all by default)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, Run

# Scenario name -> module under bench/ with run(Run) -> None.
SCENARIOS = {
    "latency": "bench.latency",  # 1 and 2: added latency, proxy CPU and memory per 1000 rps
    "telemetry": "bench.telemetry",  # 2b: Envoy CPU and memory of Istio metrics and access logs
    "memory": "bench.memory",  # 3: node memory by pod count
    "podstart": "bench.podstart",  # 4: CNI ADD wall time
    "fill": "bench.fill",  # 4b: pods of distinct identities up to 110: ADD time, memory per pod
    "scope": "bench.scope",  # 4d: memory per pod at 1000 services, with/without a Sidecar scope
    "churn": "bench.churn",  # 4c: 100 pods created and deleted at 5000 services, over time
    "convergence": "bench.convergence",  # 5: change -> Envoy ACK -> traffic
    "translation": "bench.translation",  # 5b: agent CPU per endpoint change, in process
    "identity": "bench.identity",  # 6: certificates per second, SDS push on rotation
    "ca": "bench.ca",  # 7: CA service: CSR round trip, certificates per second, CPU per cert
    "reconcile": "bench.reconcile",  # agent restart: re-verifying N captured pods
    "validation": "bench.validation",  # 8: CPU to validate one Istio object (CEL rules), in process
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--smoke", action="store_true", help="tiny variant (the test suite's)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS}")
    args = parser.parse_args()
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    if os.geteuid() != 0:
        print("benchmarks build testbeds (network namespaces): run them as root", file=sys.stderr)
        return 2
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    run = Run(smoke=args.smoke, out=out)
    failed = []
    for name in args.scenarios or list(SCENARIOS):
        started = time.monotonic()
        print(f"== {name}", flush=True)
        module = importlib.import_module(SCENARIOS[name])
        try:
            module.run(run)
        except Exception as e:  # report and go on: one broken scenario must not hide the others
            traceback.print_exc()
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
        print(f"== {name}: {time.monotonic() - started:.0f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
