#!/usr/bin/env bash
# Brings the Vagrant cluster up: `vagrant up` (every VM: k3s, the nodeagent image in each node's
# containerd), then, once every node has joined, the control plane's "deploy" provisioner
# (Istio's CRDs, nodeagent, the S1 apps). Arguments go to `vagrant up`, e.g. --provider=libvirt.
set -euo pipefail
cd "$(dirname "$0")"
vagrant up "$@"
vagrant provision control-plane --provision-with deploy
