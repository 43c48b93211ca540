#!/usr/bin/env bash
# `make demo`: the istioinaction workshop shop (SCENARIOS.md S1, step 1) through the mesh on a
# two-node testbed: each node runs the node agent and one shared Envoy; every pod of the
# istioinaction namespace is captured. Calls web-api from the sleep pod, prints the answer (the
# chain of three services) and each node's proxy-status, then tears down, also on failure.
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
request_id="demo-$(date +%s)"
echo "\$ nodeagent testbed exec istioinaction/sleep -- curl -s -H 'x-request-id: $request_id' http://web-api:8080/"
$nodeagent testbed exec --name $name istioinaction/sleep -- \
    curl -sS --max-time 10 -H "x-request-id: $request_id" http://web-api:8080/
for node in node1 node2; do
    echo
    echo "\$ nodeagent proxy-status    # on $node"
    $nodeagent testbed node-exec --name $name $node -- $nodeagent proxy-status
done
sleep 1  # Envoy flushes access logs every second
echo
echo "Every hop of that request in the two node Envoys' access logs (direction, pod, status):"
for node in node1 node2; do
    grep -h "$request_id" /run/nodeagent/testbed/$name/logs/$node.envoy.log | awk -v n=$node '{print "  " n ": " $2, $3, $7}'
done
