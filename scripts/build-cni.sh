#!/usr/bin/env bash
# Builds the self-contained nodeagent-cni bundle (PyInstaller onedir: the plugin, its stdlib
# modules and a private Python runtime) into build/cni/nodeagent-cni/. The CNI plugin runs on the
# host, outside any container, so it must not need a host Python or host packages.
# Rebuilt only when the plugin's sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/cni/nodeagent-cni
sources=(nodeagent/__init__.py nodeagent/cni/__init__.py nodeagent/cni/plugin.py nodeagent/cni/wire.py scripts/build-cni.sh)
if [ -x "$out/nodeagent-cni" ] && [ -z "$(find "${sources[@]}" -newer "$out/nodeagent-cni" 2>/dev/null)" ]; then
    exit 0
fi
echo "setup: building the nodeagent-cni bundle into $out"
rm -rf build/pyinstaller "$out"
.venv/bin/pyinstaller --log-level WARN --noconfirm --onedir --strip --name nodeagent-cni \
    --distpath build/cni --workpath build/pyinstaller --specpath build/pyinstaller \
    nodeagent/cni/plugin.py >/dev/null
touch "$out/nodeagent-cni"
