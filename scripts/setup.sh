#!/usr/bin/env bash
# One-command set-up, idempotent and quick when already done (`make setup`).
#   1. Debian packages the project needs (only the missing ones are installed).
#   2. Kernel headers where bcc looks for them (/lib/modules/$(uname -r)/build) when the running
#      kernel ships none of its own.
#   3. A cgroup v2 hierarchy (the eBPF cgroup hooks attach to it) when none is mounted.
#   4. .venv with the project installed editable, plus Debian's bcc and nftables bindings exposed
#      one module at a time (never the whole system site-packages).
#   5. The self-contained nodeagent-cni bundle (build/cni/), rebuilt when its sources change.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    nftables python3-nftables python3-bpfcc bpfcc-tools linux-headers-amd64 bpftool
    containernetworking-plugins iproute2 wrk hey nginx-light curl procps
)
# Tools only the unit tests run (shellcheck, and ruby for `ruby -c vagrant/Vagrantfile`), installed
# by `make test-tools` (`setup.sh --test-tools`). Kept out of PACKAGES, which is exactly what the
# image installs (tests/unit/test_daemonset.py).
TEST_TOOLS=(shellcheck ruby)
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
}

if [ "${1:-}" = --test-tools ]; then
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
    install_missing "${PACKAGES[@]}"

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

# The CNI plugin ships as a self-contained bundle (no host Python needed on a node).
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
