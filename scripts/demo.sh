#!/usr/bin/env bash
# `make demo`: the istioinaction workshop shop (SCENARIOS.md S1, step 1) through the mesh on a
# two-node testbed: each node runs the node agent and one shared Envoy; every pod of the
# istioinaction namespace is captured. Calls web-api from the sleep pod, prints the answer (the
# chain of three services) and each node's proxy-status; then S1.3: applies a DestinationRule and
# a VirtualService sending all of purchase-history's traffic to v1 and shows the answers move
# (exit 1 if they do not). Tears down, also on failure.
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

# S1.3, all traffic to v1: subsets by the `version` label and a VirtualService routing 100% to v1,
# applied as `kubectl apply` would (a file in the cluster directory the agents watch).
versions() {  # purchase-history's version in each of 10 answers to istioinaction/sleep
    # A failed call just has no version (the comparison below fails): never exit from here.
    { $nodeagent testbed exec --name $name istioinaction/sleep -- sh -c \
        'for i in 1 2 3 4 5 6 7 8 9 10; do curl -sS --max-time 5 http://purchase-history:8080/; echo; done' \
        2>/dev/null || true; } | { grep -o '"version": *"[^"]*"' || true; } | cut -d'"' -f4 | xargs
}
echo
echo "S1.3: all traffic to purchase-history v1"
before=$(versions)
manifest=/run/nodeagent/testbed/$name/cluster/s1-3-purchase-history.yaml
draft=/run/nodeagent/testbed/$name/s1-3-purchase-history.yaml.draft  # beside, not in, cluster/
cat >"$draft" <<'YAML'
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: purchase-history, namespace: istioinaction}
spec:
  host: purchase-history
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: purchase-history, namespace: istioinaction}
spec:
  hosts: [purchase-history]
  http:
  - route:
    - destination: {host: purchase-history, subset: v1}
      weight: 100
YAML
mv "$draft" "$manifest"  # whole, never half-written, when the agents' source reads it
echo "\$ kubectl apply -f - <<EOF   # written to $manifest"
cat "$manifest"
echo EOF
all_v1="v1 v1 v1 v1 v1 v1 v1 v1 v1 v1"
deadline=$((SECONDS + 30))  # the agents push within a second or two; allow a loaded machine
after=$(versions)
while [ "$after" != "$all_v1" ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.5
    after=$(versions)
done
echo "purchase-history versions, 10 calls from istioinaction/sleep:"
echo "  before: $before"
echo "  after:  $after"
if [ "$after" != "$all_v1" ]; then
    echo "demo: S1.3 failed: after the VirtualService, not every answer came from v1" >&2
    exit 1
fi
