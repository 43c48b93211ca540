#!/usr/bin/env bash
# SCENARIOS.md S1, steps 1-5, on the Vagrant cluster (after ./up.sh): real traffic from the sleep
# pods (kubectl exec ... curl) through the node agents' Envoys. Prints PASS or FAIL per step and
# a summary; exits 1 if any step failed. Every wait and every call is bounded.
#   1. mesh on, nothing configured: sleep -> web-api -> recommendation -> purchase-history,
#      which alternates between v1 and v2
#   2. mesh-wide STRICT PeerAuthentication: sleep in default (outside the mesh) is refused, sleep
#      in istioinaction gets 200 and web-api sees its SPIFFE identity
#   3. DestinationRule + VirtualService, all to v1: 100 calls -> 100 v1
#   4. header `user: Tom` -> v2, else v1
#   5. canary 80/20: 1000 calls -> v1 share within 80% +- 4%
# The Istio config each step applies (vagrant/s1/) is removed after it, and on exit.
#
# Run from vagrant/ on the host: it runs itself inside the control-plane VM (vagrant ssh), after
# syncing the repository there. Or run it as root on the control plane.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=provision/lib.sh
source "$here/provision/lib.sh"

if [ ! -e "$CONTROL_PLANE_MARKER" ]; then
    command -v vagrant >/dev/null \
        || { echo "smoke: run this in vagrant/ on the host (needs vagrant), or on the control plane" >&2; exit 2; }
    cd "$here"
    vagrant rsync control-plane >/dev/null
    exec vagrant ssh control-plane -c "sudo bash $REPO/vagrant/smoke.sh"
fi
[ "$(id -u)" = 0 ] || { echo "smoke: run as root on the control plane (sudo)" >&2; exit 2; }

S1=$here/s1
MESH=istioinaction
WEB_API=http://web-api:8080/
WEB_API_FROM_DEFAULT=http://web-api.istioinaction:8080/
SLEEP_IDENTITY=spiffe://cluster.local/ns/istioinaction/sa/sleep
# purchase-history's version, in web-api's answer (each service embeds its upstream's answer).
PH_VERSION='.upstream_calls["http://recommendation:8080"].upstream_calls["http://purchase-history:8080"].version // "none"'
RESULTS=()
FAILED=0
WORK=$(mktemp -d)

pass() { RESULTS+=("PASS  step $1: $2"); log "PASS step $1: $2"; }
fail() { RESULTS+=("FAIL  step $1: $2"); FAILED=1; log "FAIL step $1: $2"; }

# sleep_curl NAMESPACE SECONDS CURL-ARGS...: curl, run by NAMESPACE's sleep pod, bounded.
sleep_curl() {
    local namespace=$1 seconds=$2
    shift 2
    timeout "$seconds" k3s kubectl exec -n "$namespace" deploy/sleep -c sleep -- curl "$@"
}

# status_code NAMESPACE URL: the HTTP status NAMESPACE's sleep gets; 000 if the call failed.
status_code() {
    local code
    code=$(sleep_curl "$1" 30 -s -o /dev/null -w '%{http_code}' --max-time 5 "$2") || true
    echo "${code:-000}"
}

# versions N [CURL-ARGS...]: N calls from the meshed sleep to web-api (one curl, one connection),
# printing "V1 V2 FAILED": how many answers purchase-history v1 and v2 gave, and how many calls
# did not answer 2xx with the whole chain. Curl's errors go to $WORK/curl.err.
versions() {
    local n=$1 answers counted v1 v2
    shift
    # curl's URL globbing makes N requests; -f drops the body of any non-2xx answer.
    answers=$(sleep_curl "$MESH" 900 -sS -f --max-time 10 "$@" "${WEB_API}?call=[1-$n]" \
        2>"$WORK/curl.err") || true
    counted=$(jq -r "$PH_VERSION" <<<"$answers" 2>/dev/null) || true
    v1=$(grep -cx v1 <<<"$counted") || true
    v2=$(grep -cx v2 <<<"$counted") || true
    echo "$v1 $v2 $((n - v1 - v2))"
}

# curl_errors: the first lines curl complained with during the last versions call, if any.
curl_errors() {
    [ -s "$WORK/curl.err" ] && printf ' (curl: %s)' "$(sort "$WORK/curl.err" | uniq -c | head -n 3 | tr -s ' \n' ' ')"
    return 0
}

# all_v1 N [CURL-ARGS...], all_v2 ...: every one of N calls answered by that version.
all_v1() { local v1 v2 failed; read -r v1 v2 failed < <(versions "$@"); [ "$v1" = "$1" ]; }
all_v2() { local v1 v2 failed; read -r v1 v2 failed < <(versions "$@"); [ "$v2" = "$1" ]; }
# both_versions: the default round robin reaches both versions, and every call answers.
both_versions() {
    local v1 v2 failed
    read -r v1 v2 failed < <(versions 20)
    [ "$v1" -gt 0 ] && [ "$v2" -gt 0 ] && [ "$failed" = 0 ]
}
mostly_v1() { local v1 v2 failed; read -r v1 v2 failed < <(versions 100); [ "$v1" -ge 70 ]; }
default_refused() { [ "$(status_code default "$WEB_API_FROM_DEFAULT")" != 200 ]; }
default_accepted() { [ "$(status_code default "$WEB_API_FROM_DEFAULT")" = 200 ]; }

# apply FILE...: the named vagrant/s1 manifests.
apply() {
    local file
    for file in "$@"; do
        kubectl apply -f "$S1/$file" >/dev/null
    done
}

# remove_config: deletes every S1 manifest this script applies.
remove_config() {
    kubectl delete --ignore-not-found --wait=false -f "$S1/peer-authentication-strict.yaml" \
        -f "$S1/virtual-service-all-v1.yaml" -f "$S1/virtual-service-user-tom-v2.yaml" \
        -f "$S1/virtual-service-canary-80-20.yaml" -f "$S1/destination-rule.yaml" >/dev/null 2>&1 || true
}

# clean_up: removes the S1 config, then waits (bounded) for the mesh to be back to its defaults,
# so that each step starts from nothing configured.
clean_up() {
    remove_config
    wait_until 60 "round robin over v1 and v2 again" both_versions \
        || log "WARNING: after removing S1's config, calls do not reach both versions"
}

step1() {
    local body chain
    body=$(sleep_curl "$MESH" 30 -sS -f --max-time 10 "$WEB_API" 2>"$WORK/curl.err") \
        || { fail 1 "sleep -> web-api failed$(curl_errors)"; return; }
    chain=$(jq -r '[., .upstream_calls["http://recommendation:8080"],
                    .upstream_calls["http://recommendation:8080"].upstream_calls["http://purchase-history:8080"]]
                   | map("\(.name // "?") \(.version // "?") (\(.code // "?"))") | join(" -> ")' <<<"$body" 2>/dev/null) \
        || chain="an answer that is not the fake service's JSON"
    if [[ $chain != "web-api v1 (200) -> recommendation v1 (200) -> purchase-history v"[12]" (200)" ]]; then
        fail 1 "sleep -> web-api answered: $chain"
        return
    fi
    read -r v1 v2 failed < <(versions 20)
    if [ "$failed" = 0 ] && [ "$v1" -ge 5 ] && [ "$v2" -ge 5 ]; then
        pass 1 "$chain; 20 calls: $v1 v1, $v2 v2 (round robin)"
    else
        fail 1 "20 calls: $v1 v1, $v2 v2, $failed failed: expected both versions, about half each$(curl_errors)"
    fi
}

step2() {
    local code body xfcc problem=""
    code=$(status_code default "$WEB_API_FROM_DEFAULT")
    if [ "$code" != 200 ]; then
        fail 2 "before any policy (PERMISSIVE), sleep in default -> web-api answered $code, not 200"
        return
    fi
    apply peer-authentication-strict.yaml
    if ! wait_until 60 "STRICT mTLS to refuse sleep in default" default_refused; then
        problem="sleep in default (plaintext) still gets 200 from web-api under STRICT; "
    fi
    code=$(status_code "$MESH" "$WEB_API")
    body=$(sleep_curl "$MESH" 30 -sS --max-time 10 "$WEB_API" 2>/dev/null) || true
    xfcc=$(jq -r '.headers["x-forwarded-client-cert"] // ""' <<<"$body" 2>/dev/null) || true
    [ "$code" = 200 ] || problem+="sleep in istioinaction got $code, not 200; "
    [[ $xfcc == *"URI=$SLEEP_IDENTITY"* ]] \
        || problem+="web-api saw x-forwarded-client-cert '${xfcc}', not URI=$SLEEP_IDENTITY; "
    kubectl delete --ignore-not-found -f "$S1/peer-authentication-strict.yaml" >/dev/null
    wait_until 60 "PERMISSIVE again: sleep in default accepted" default_accepted \
        || problem+="after removing the policy, sleep in default is still refused; "
    if [ -z "$problem" ]; then
        pass 2 "STRICT: default/sleep refused, istioinaction/sleep 200 as $SLEEP_IDENTITY"
    else
        fail 2 "${problem%; }"
    fi
}

step3() {
    apply destination-rule.yaml virtual-service-all-v1.yaml
    wait_until 60 "all calls to reach v1" all_v1 10 || true
    read -r v1 v2 failed < <(versions 100)
    if [ "$v1" = 100 ]; then
        pass 3 "100 calls: 100 v1"
    else
        fail 3 "100 calls: $v1 v1, $v2 v2, $failed failed: expected 100 v1$(curl_errors)"
    fi
    clean_up
}

step4() {
    local tom_v1 tom_v2 tom_failed
    apply destination-rule.yaml virtual-service-user-tom-v2.yaml
    wait_until 60 "user: Tom to reach v2" all_v2 10 -H "user: Tom" || true
    read -r tom_v1 tom_v2 tom_failed < <(versions 50 -H "user: Tom")
    read -r v1 v2 failed < <(versions 50)
    if [ "$tom_v2" = 50 ] && [ "$v1" = 50 ]; then
        pass 4 "50 calls with user: Tom: 50 v2; 50 without: 50 v1"
    else
        fail 4 "with user: Tom: $tom_v1 v1, $tom_v2 v2, $tom_failed failed (expected 50 v2); without: $v1 v1, $v2 v2, $failed failed (expected 50 v1)$(curl_errors)"
    fi
    clean_up
}

step5() {
    local share
    apply destination-rule.yaml virtual-service-canary-80-20.yaml
    # Round robin gives about 50% v1: a sample of 100 with 70 or more says the weights are in force.
    wait_until 90 "the 80/20 split to take effect" mostly_v1 || true
    read -r v1 v2 failed < <(versions 1000)
    share=$(( (v1 + v2) > 0 ? v1 * 1000 / (v1 + v2) : 0 ))
    local percent="$((share / 10)).$((share % 10))%"
    if [ "$failed" = 0 ] && [ "$share" -ge 760 ] && [ "$share" -le 840 ]; then
        pass 5 "1000 calls: $v1 v1, $v2 v2 (v1 $percent, expected 80% +- 4%)"
    else
        fail 5 "1000 calls: $v1 v1, $v2 v2, $failed failed (v1 $percent, expected 80% +- 4%, no failures)$(curl_errors)"
    fi
    clean_up
}

# When a step failed: what each node's agent says about its pods and its Envoy.
show_agents() {
    local pod
    for pod in $(kubectl -n nodeagent-system get pods -l app.kubernetes.io/name=nodeagent -o name); do
        echo "--- $pod ($(kubectl -n nodeagent-system get "$pod" -o jsonpath='{.spec.nodeName}'))"
        timeout 30 k3s kubectl -n nodeagent-system exec "$pod" -c agent -- \
            nodeagent proxy-status --cni-socket /var/run/nodeagent/cni.sock || true
    done
}

preflight() {
    local deployment
    for deployment in istioinaction/web-api istioinaction/recommendation \
        istioinaction/purchase-history-v1 istioinaction/purchase-history-v2 istioinaction/sleep default/sleep; do
        timeout 60 k3s kubectl -n "${deployment%/*}" rollout status "deployment/${deployment#*/}" --timeout=30s >/dev/null \
            || { echo "smoke: deployment $deployment is not ready: run ./up.sh first" >&2; exit 2; }
    done
    kubectl get pods --all-namespaces -l app.kubernetes.io/part-of=istioinaction-shop \
        -o custom-columns=NAMESPACE:.metadata.namespace,POD:.metadata.name,NODE:.spec.nodeName
    echo
}

finish() {
    remove_config
    rm -rf "$WORK"
}

main() {
    trap finish EXIT
    preflight
    clean_up
    step1
    step2
    step3
    step4
    step5
    echo
    echo "SCENARIOS.md S1 on the Vagrant cluster:"
    printf '  %s\n' "${RESULTS[@]}"
    if [ "$FAILED" = 1 ]; then
        echo
        show_agents
        exit 1
    fi
}

main "$@"
