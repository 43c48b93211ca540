#!/usr/bin/env bash
# Deploys onto the Vagrant cluster, once every node has joined (the control plane's "deploy"
# provisioner, run by up.sh): Istio's CRDs, nodeagent (the vagrant/nodeagent overlay of
# daemonset/: the CA service, then the node agents), then the S1 workshop apps (vagrant/apps). Waits, bounded, for each to be ready.
# Re-running it re-applies everything and restarts the pods if the image was rebuilt since.
# Environment (from the Vagrantfile): EXPECTED_NODES.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
require_env EXPECTED_NODES

CRDS=$REPO/nodeagent/mesh/crds/crd-all.gen.yaml
DEPLOYED_IMAGE=$STATE/deployed-image-id
APPS_SELECTOR=app.kubernetes.io/part-of=istioinaction-shop

ready_nodes() {
    kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
        | grep -c '^True$' || true
}

enough_ready_nodes() { [ "$(ready_nodes)" -ge "$EXPECTED_NODES" ]; }

# The image was rebuilt since the last deploy: pods of the same tag must be restarted to run it.
image_changed() {
    [ -f "$DEPLOYED_IMAGE" ] && [ "$(podman image inspect --format '{{.Id}}' "$IMAGE")" != "$(cat "$DEPLOYED_IMAGE")" ]
}

apply_istio_crds() {
    log "applying Istio's CRDs ($CRDS)"
    # Server-side: some of these CRDs are larger than client-side apply's annotation limit.
    kubectl apply --server-side -f "$CRDS" >/dev/null
    kubectl wait --for=condition=Established --timeout=120s -f "$CRDS" >/dev/null
}

deploy_nodeagent() {
    local restart=$1
    log "applying nodeagent (vagrant/nodeagent: daemonset/ with k3s's CNI paths, and the CA service)"
    kubectl apply -k "$REPO/vagrant/nodeagent"
    if [ "$restart" = 1 ]; then
        kubectl -n nodeagent-system rollout restart deployment/nodeagent-ca
        kubectl -n nodeagent-system rollout restart daemonset/nodeagent
    fi
    # The CA first: the DaemonSet's pods mount the root ConfigMap (nodeagent-ca-root) that the CA
    # publishes once it has its signing key, and the kubelet holds them until it exists.
    kubectl -n nodeagent-system rollout status deployment/nodeagent-ca --timeout=300s \
        || die "the CA service (deployment nodeagent-ca) is not ready; see: kubectl -n nodeagent-system logs deployment/nodeagent-ca"
    kubectl -n nodeagent-system get configmap nodeagent-ca-root >/dev/null \
        || die "the CA is ready but published no root ConfigMap nodeagent-ca-root"
    kubectl -n nodeagent-system rollout status daemonset/nodeagent --timeout=600s \
        || die "the nodeagent DaemonSet is not ready; see: kubectl -n nodeagent-system describe pods"
}

deploy_apps() {
    local restart=$1 deployment
    log "applying the S1 workshop apps (vagrant/apps)"
    kubectl apply -k "$REPO/vagrant/apps"
    for deployment in $(kubectl get deployments --all-namespaces -l "$APPS_SELECTOR" \
        -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{" "}{end}'); do
        if [ "$restart" = 1 ]; then
            kubectl -n "${deployment%/*}" rollout restart "deployment/${deployment#*/}"
        fi
        kubectl -n "${deployment%/*}" rollout status "deployment/${deployment#*/}" --timeout=300s \
            || die "deployment $deployment is not ready; see: kubectl -n ${deployment%/*} describe pods"
    done
}

main() {
    local restart=0
    [ -e "$CONTROL_PLANE_MARKER" ] || die "run this on the provisioned control plane (vagrant provision control-plane --provision-with deploy)"
    wait_until 1800 "$EXPECTED_NODES Ready nodes" enough_ready_nodes \
        || die "only $(ready_nodes) of $EXPECTED_NODES nodes are Ready: is every worker up?"
    if image_changed; then
        restart=1
        log "$IMAGE was rebuilt since the last deploy: its pods will be restarted"
    fi
    apply_istio_crds
    deploy_nodeagent "$restart"
    deploy_apps "$restart"
    podman image inspect --format '{{.Id}}' "$IMAGE" > "$DEPLOYED_IMAGE"
    kubectl get pods --all-namespaces -l "$APPS_SELECTOR" -o wide
    log "deployed: run ./smoke.sh (on the host, in vagrant/) for SCENARIOS.md S1 steps 1-5"
}

main "$@"
