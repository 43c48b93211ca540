#!/usr/bin/env bash
# A worker VM: downloads the nodeagent image the control plane built (and checks its sha256),
# stages it where k3s imports it before the kubelet starts, then joins the cluster as a k3s
# agent. Idempotent. With libvirt, `vagrant up` starts the VMs in parallel: this waits (bounded)
# for the control plane's image and API server.
# Environment (from the Vagrantfile): NODE_IP, SERVER_IP, K3S_VERSION, K3S_TOKEN, IMAGE_WAIT.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
require_env NODE_IP NODE_ZONE SERVER_IP K3S_VERSION K3S_TOKEN IMAGE_WAIT

# fetch_image: the control plane's tarball into K3S_IMAGES_DIR, unless the one there is current.
fetch_image() {
    local url=http://$SERVER_IP:$SHARE_PORT incoming=$STATE/incoming attempt
    mkdir -p "$incoming" "$K3S_IMAGES_DIR"
    wait_until "$IMAGE_WAIT" "the nodeagent image at $url (the control plane builds it first)" \
        curl -fsS -o "$incoming/$IMAGE_TAR.sha256" "$url/$IMAGE_TAR.sha256" \
        || die "the control plane served no image within ${IMAGE_WAIT}s; see its provisioning output"
    if (cd "$K3S_IMAGES_DIR" && sha256sum --check --status "$incoming/$IMAGE_TAR.sha256" 2>/dev/null); then
        log "$IMAGE is up to date"
        return 0
    fi
    for attempt in 1 2 3; do
        log "downloading $IMAGE from $url (attempt $attempt)"
        # The control plane may be replacing the tarball: take its checksum again with it.
        curl -fsS -o "$incoming/$IMAGE_TAR.sha256" "$url/$IMAGE_TAR.sha256" || true
        if curl -fsS -o "$incoming/$IMAGE_TAR" "$url/$IMAGE_TAR" \
            && (cd "$incoming" && sha256sum --check --status "$IMAGE_TAR.sha256"); then
            # Same filesystem: k3s never sees a half-written tarball.
            mv -f "$incoming/$IMAGE_TAR" "$K3S_IMAGES_DIR/$IMAGE_TAR"
            return 0
        fi
        sleep 5
    done
    die "could not download an intact $IMAGE_TAR from $url"
}

configure_k3s_agent() {
    local iface changed=0
    iface=$(interface_with "$NODE_IP")
    if write_if_changed 0600 "$K3S_CONFIG" <<EOF; then changed=1; fi
# Written by vagrant/provision/worker.sh
server: https://$SERVER_IP:6443
token: "$K3S_TOKEN"
node-ip: $NODE_IP
flannel-iface: $iface
node-label:
  - "topology.kubernetes.io/region=vagrant"
  - "topology.kubernetes.io/zone=$NODE_ZONE"
EOF
    echo "$changed"
}

main() {
    local config_changed
    [[ $K3S_TOKEN =~ ^[A-Za-z0-9]+$ ]] || die "K3S_TOKEN must be letters and digits only"
    apt_install ca-certificates curl
    mkdir -p "$STATE"
    fetch_image
    config_changed=$(configure_k3s_agent)
    # k3s serves its CA unauthenticated: once it answers, the agent can join.
    wait_until 900 "the k3s server at https://$SERVER_IP:6443" \
        curl -ksf -o /dev/null "https://$SERVER_IP:6443/cacerts" \
        || die "the k3s server at $SERVER_IP does not answer"
    install_k3s agent "$config_changed"
    check_cni_paths
    import_image
    log "worker $(hostname) joined https://$SERVER_IP:6443 with $IMAGE imported"
}

main "$@"
