#!/usr/bin/env bash
# Builds the nodeagent-cni plugin (nodeagent/cni/plugin.c, libc only) into
# build/cni/nodeagent-cni/, the bundle directory install-cni copies onto the host. The plugin runs
# on the host, outside any container, so it is linked statically: it needs nothing installed there.
# Rebuilt only when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/cni/nodeagent-cni
sources=(nodeagent/cni/plugin.c scripts/build-cni.sh)
if [ -x "$out/nodeagent-cni" ] && [ -z "$(find "${sources[@]}" -newer "$out/nodeagent-cni" 2>/dev/null)" ]; then
    exit 0
fi
echo "setup: building the nodeagent-cni plugin into $out"
rm -rf "$out"
mkdir -p "$out"
"${CC:-gcc}" -std=c11 -O2 -Wall -Wextra -Wconversion -Wshadow -Werror \
    -D_FORTIFY_SOURCE=2 -fstack-protector-strong -static-pie -s \
    -o "$out/nodeagent-cni.tmp" nodeagent/cni/plugin.c
mv "$out/nodeagent-cni.tmp" "$out/nodeagent-cni"
