#!/usr/bin/env bash
# `make demo`: the istioinaction workshop shop (SCENARIOS.md S1) on a two-node testbed.
# Brings the testbed up, calls web-api from the sleep pod, prints the answer, and tears down,
# also when something fails on the way.
set -euo pipefail
cd "$(dirname "$0")/.."
nodeagent=.venv/bin/nodeagent
name=demo

if [ "$(id -u)" != 0 ]; then
    echo "demo: the testbed creates network namespaces; run as root" >&2
    exit 1
fi

trap '$nodeagent testbed down --name $name >/dev/null' EXIT
$nodeagent testbed up workshop --name $name
echo
echo "\$ nodeagent testbed exec istioinaction/sleep -- curl -s http://web-api:8080/"
$nodeagent testbed exec --name $name istioinaction/sleep -- curl -sS --max-time 10 http://web-api:8080/
echo
