# Shared by the provisioning scripts and smoke.sh: where things are, and small helpers.
# Sourced, never run. Every VM runs these as root.
# shellcheck shell=bash
# The constants are used by the scripts that source this file:
# shellcheck disable=SC2034

# The repository, rsynced into every VM by the Vagrantfile.
REPO=/nodeagent
# What provisioning keeps between runs (image build stamp, downloads, the k3s installer).
STATE=/var/lib/nodeagent-vagrant
# Present only on the control plane once it is provisioned: smoke.sh looks for it.
CONTROL_PLANE_MARKER=$STATE/control-plane

# The nodeagent image: built once on the control plane from daemonset/Containerfile, served to
# the workers, imported into every node's containerd and never pulled. The same name is in
# vagrant/nodeagent/kustomization.yaml (images) and vagrant/apps/ (tests/unit/test_vagrant.py).
IMAGE=localhost/nodeagent:vagrant
IMAGE_TAR=nodeagent-image.tar
# The control plane serves the image tarball (and its sha256) to the workers over the private
# network: the Debian box syncs the repository one way only (rsync), so VMs share no folder.
SHARE_DIR=$STATE/share
SHARE_PORT=8099

# k3s keeps its own copies of what kubeadm clusters keep in /etc and /opt. These two are where
# k3s's containerd looks for CNI configuration and plugins (check_cni_paths verifies it on every
# node); vagrant/nodeagent/daemonset-k3s.yaml points install-cni's hostPath volumes at them.
CNI_BIN_DIR=/var/lib/rancher/k3s/data/cni
CNI_CONF_DIR=/var/lib/rancher/k3s/agent/etc/cni/net.d
CONTAINERD_CONFIG=/var/lib/rancher/k3s/agent/etc/containerd/config.toml
# Tarballs here are imported into containerd when k3s starts, before the kubelet runs any pod.
K3S_IMAGES_DIR=/var/lib/rancher/k3s/agent/images
K3S_CONFIG=/etc/rancher/k3s/config.yaml
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

log() { printf 'nodeagent-vagrant: %s\n' "$*"; }
die() { printf 'nodeagent-vagrant: ERROR: %s\n' "$*" >&2; exit 1; }

# kubectl is k3s's own (the control plane has it; workers have no admin credentials).
kubectl() { k3s kubectl "$@"; }

# require_env NAME...: every NAME is set and non-empty (the Vagrantfile passes them).
require_env() {
    local name
    for name in "$@"; do
        [ -n "${!name:-}" ] || die "$name is not set (the Vagrantfile's provisioner passes it)"
    done
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 2 seconds until it succeeds. Returns 1
# after SECONDS (the caller decides whether that is fatal), logging WHAT every minute meanwhile.
wait_until() {
    local seconds=$1 what=$2 start=$SECONDS next_log=$((SECONDS + 60))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - start)) -ge "$seconds" ]; then
            log "gave up waiting for $what after ${seconds}s"
            return 1
        fi
        if [ "$SECONDS" -ge "$next_log" ]; then
            log "still waiting for $what ($((SECONDS - start))s)"
            next_log=$((SECONDS + 60))
        fi
        sleep 2
    done
}

# apt_install PACKAGE...: installs the missing ones (apt-get update once, only if needed), with
# their recommended packages (podman's network and runtime helpers are among them).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# interface_with IP: the name of the interface that holds IP (the private network's). k3s must
# use it, not the NAT interface, which has the same address on every VirtualBox VM.
interface_with() {
    local name
    name=$(ip -o -4 addr show | awk -v ip="$1" '{ split($4, a, "/"); if (a[1] == ip) print $2 }' | head -n 1)
    [ -n "$name" ] || die "no interface has $1: is the private network up?"
    echo "$name"
}

# write_if_changed MODE PATH < CONTENT: replaces PATH when CONTENT differs; true if it did.
write_if_changed() {
    local mode=$1 path=$2 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    install -D -m "$mode" "$tmp" "$path"
    rm -f "$tmp"
}

# install_k3s server|agent CONFIG_CHANGED: installs k3s $K3S_VERSION with the official installer
# (which verifies the binary's checksum), or restarts it when only its config changed.
install_k3s() {
    local role=$1 config_changed=$2 service=k3s
    [ "$role" = server ] || service=k3s-agent
    if command -v k3s >/dev/null && [[ "$(k3s --version)" == *"$K3S_VERSION"* ]] \
        && systemctl is-active --quiet "$service"; then
        if [ "$config_changed" = 1 ]; then
            log "restarting $service: $K3S_CONFIG changed"
            systemctl restart "$service"
        fi
        return 0
    fi
    mkdir -p "$STATE"
    curl -sfL --retry 3 -o "$STATE/k3s-install.sh" https://get.k3s.io
    log "installing k3s $K3S_VERSION ($role)"
    # The service is Type=notify: the installer returns once k3s reports itself ready.
    INSTALL_K3S_VERSION=$K3S_VERSION timeout 900 sh "$STATE/k3s-install.sh" "$role" \
        || die "k3s ($role) did not install and start within 15 minutes; see: journalctl -u $service"
}

# check_cni_paths: k3s's containerd really uses CNI_BIN_DIR and CNI_CONF_DIR. If a k3s release
# moves them, this fails loudly instead of install-cni writing where nothing looks.
check_cni_paths() {
    wait_until 120 "$CONTAINERD_CONFIG" test -s "$CONTAINERD_CONFIG" \
        || die "k3s wrote no containerd config at $CONTAINERD_CONFIG"
    # containerd 1.x configs say bin_dir = "...", containerd 2.x configs bin_dirs = ["..."].
    grep -Eq "^[[:space:]]*bin_dirs?[[:space:]]*=[[:space:]]*\[?\"$CNI_BIN_DIR\"" "$CONTAINERD_CONFIG" \
        || die "k3s's containerd does not run CNI plugins from $CNI_BIN_DIR (see $CONTAINERD_CONFIG): update CNI_BIN_DIR here and vagrant/nodeagent/daemonset-k3s.yaml"
    grep -Eq "^[[:space:]]*conf_dir[[:space:]]*=[[:space:]]*\"$CNI_CONF_DIR\"" "$CONTAINERD_CONFIG" \
        || die "k3s's containerd does not read CNI configuration from $CNI_CONF_DIR (see $CONTAINERD_CONFIG): update CNI_CONF_DIR here and vagrant/nodeagent/daemonset-k3s.yaml"
}

# import_image: imports the staged tarball into k3s's containerd now (k3s imports it on its own
# only when it starts) and checks the image is there under the name the manifests use.
import_image() {
    log "importing $IMAGE into k3s's containerd"
    k3s ctr --namespace k8s.io images import "$K3S_IMAGES_DIR/$IMAGE_TAR" >/dev/null
    # (grep without -q reads all of ctr's output: no SIGPIPE failing the pipeline)
    k3s ctr --namespace k8s.io images ls -q | grep -Fx "$IMAGE" >/dev/null \
        || die "$IMAGE is not in containerd after importing $K3S_IMAGES_DIR/$IMAGE_TAR"
}
