#!/usr/bin/env bash
# The control plane VM: builds the nodeagent image from daemonset/Containerfile (once per change
# of its sources), serves it to the workers, then runs the k3s server with the image already in
# its containerd. Idempotent: `vagrant provision control-plane` redoes only what changed.
# Environment (from the Vagrantfile): NODE_IP, K3S_VERSION, K3S_TOKEN.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
require_env NODE_IP NODE_ZONE K3S_VERSION K3S_TOKEN

# A checksum of everything the image is built from (what the Containerfile copies).
image_sources_checksum() {
    (
        cd "$REPO"
        find daemonset/Containerfile pyproject.toml README.md scripts nodeagent -type f \
            ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -d' ' -f1
}

# The Containerfile says FROM debian:bookworm-slim; Debian's podman resolves short names only
# through a search list, so name Docker Hub as the one place to look.
configure_podman() {
    write_if_changed 0644 /etc/containers/registries.conf.d/50-nodeagent-vagrant.conf <<'EOF' || true
# nodeagent's Vagrant provisioning: resolve short image names (debian:bookworm-slim) on Docker Hub.
unqualified-search-registries = ["docker.io"]
EOF
}

# build_image: podman build + save into SHARE_DIR, skipped when the sources did not change.
build_image() {
    local checksum stamp=$STATE/image-sources.sha256
    checksum=$(image_sources_checksum)
    if [ -s "$SHARE_DIR/$IMAGE_TAR" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$checksum" ]; then
        log "$IMAGE is up to date with its sources"
        return 0
    fi
    configure_podman
    log "building $IMAGE from daemonset/Containerfile (the first build downloads Debian packages and wheels: minutes)"
    # Host networking: RUN steps reach the mirrors without podman setting up NAT next to k3s's.
    podman build --network host -f "$REPO/daemonset/Containerfile" -t "$IMAGE" "$REPO"
    mkdir -p "$SHARE_DIR"
    rm -f "$SHARE_DIR/$IMAGE_TAR.tmp"
    # docker-archive keeps the full name (localhost/nodeagent:vagrant) for containerd's import.
    podman save --format docker-archive -o "$SHARE_DIR/$IMAGE_TAR.tmp" "$IMAGE"
    # Readable by the share's unprivileged server.
    chmod 0644 "$SHARE_DIR/$IMAGE_TAR.tmp"
    mv -f "$SHARE_DIR/$IMAGE_TAR.tmp" "$SHARE_DIR/$IMAGE_TAR"
    (cd "$SHARE_DIR" && sha256sum "$IMAGE_TAR" > "$IMAGE_TAR.sha256")
    echo "$checksum" > "$stamp"
    log "saved $IMAGE to $SHARE_DIR/$IMAGE_TAR ($(du -h "$SHARE_DIR/$IMAGE_TAR" | cut -f1))"
}

# share_image: a tiny HTTP server, bound to the private network only, from which the workers
# download the tarball (no secrets in it: the k3s token never goes through it).
share_image() {
    local unit=/etc/systemd/system/nodeagent-image-share.service
    if write_if_changed 0644 "$unit" <<EOF; then
[Unit]
Description=nodeagent image tarball for the Vagrant workers (private network only)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/python3 -m http.server $SHARE_PORT --bind $NODE_IP --directory $SHARE_DIR
DynamicUser=yes
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
        systemctl daemon-reload
    fi
    systemctl enable --quiet nodeagent-image-share.service
    systemctl restart nodeagent-image-share.service
    wait_until 30 "the image share on $NODE_IP:$SHARE_PORT" \
        curl -fsS -o /dev/null "http://$NODE_IP:$SHARE_PORT/$IMAGE_TAR.sha256" \
        || die "nodeagent-image-share.service does not serve; see: journalctl -u nodeagent-image-share"
}

# stage_image: the tarball where k3s imports it at start (a hard link: no second copy on disk).
stage_image() {
    mkdir -p "$K3S_IMAGES_DIR"
    ln -f "$SHARE_DIR/$IMAGE_TAR" "$K3S_IMAGES_DIR/$IMAGE_TAR"
}

configure_k3s_server() {
    local iface changed=0
    iface=$(interface_with "$NODE_IP")
    # Traefik, the service load balancer, metrics-server and the local-path provisioner are not
    # needed for S1: fewer pods, less memory.
    if write_if_changed 0600 "$K3S_CONFIG" <<EOF; then changed=1; fi
# Written by vagrant/provision/control-plane.sh
node-ip: $NODE_IP
advertise-address: $NODE_IP
tls-san:
  - $NODE_IP
flannel-iface: $iface
node-label:
  - "topology.kubernetes.io/region=vagrant"
  - "topology.kubernetes.io/zone=$NODE_ZONE"
token: "$K3S_TOKEN"
disable:
  - traefik
  - servicelb
  - metrics-server
  - local-storage
EOF
    echo "$changed"
}

node_ready() {
    [ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

main() {
    local config_changed
    [[ $K3S_TOKEN =~ ^[A-Za-z0-9]+$ ]] || die "K3S_TOKEN must be letters and digits only"
    apt_install ca-certificates curl jq podman python3
    mkdir -p "$STATE"
    build_image
    share_image
    stage_image
    # Assigned on its own line so that a failure inside stops the script (set -e).
    config_changed=$(configure_k3s_server)
    install_k3s server "$config_changed"
    wait_until 300 "the API server" kubectl get --raw /readyz || die "the k3s API server is not ready; see: journalctl -u k3s"
    wait_until 300 "node $(hostname) Ready" node_ready "$(hostname)" || die "node $(hostname) is not Ready"
    check_cni_paths
    import_image
    touch "$CONTROL_PLANE_MARKER"
    log "control plane ready: k3s $K3S_VERSION on $NODE_IP, $IMAGE imported"
}

main "$@"
