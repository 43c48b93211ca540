"""The mesh's port, mark, uid and address numbers: the one place capture (redirect/) and the
Envoy config (translate/, envoy/) both read them, so neither imports the other.

Istio's defaults, as its sidecar and ambient data planes use them: "Ports used by Istio",
https://istio.io/latest/docs/ops/deployment/requirements/#ports-used-by-istio (and UID 1337,
reserved for the proxy, on the same page).
"""

from __future__ import annotations

# Envoy's capture listeners inside each pod; capture redirects to them.
OUTBOUND_PORT = 15001  # outbound capture listener, 127.0.0.1 in the pod
INBOUND_PORT = 15006  # inbound capture listener, 0.0.0.0 in the pod
HBONE_PORT = 15008  # never redirected inbound (Istio's tunnel port)
DNS_PORT = 15053  # the agent's DNS proxy, 127.0.0.1 in the pod (DNS capture redirects to it)
DNS_CAPTURED_PORT = 53  # what DNS capture redirects: UDP and TCP to this port

# Istio's agent and Envoy ports.
ENVOY_ADMIN_PORT = 15000  # Envoy's admin, 127.0.0.1 in the pod (sidecar model; node: a socket)
AGENT_METRICS_PORT = 15020  # the agent's merged Prometheus metrics
AGENT_READINESS_PORT = 15021  # the agent's /healthz/ready
ENVOY_STATS_PORT = 15090  # Envoy's Prometheus stats and /ready

MESH_MARK = 0x539  # SO_MARK on Envoy's own sockets: capture skips them
PROBE_SOURCE = "169.254.7.127"  # node-originated traffic (kubelet probes) is SNATed to this

# The sidecar model (Istio's sidecar, for comparison): Envoy runs in the pod as this uid/gid and
# istio-init's rules skip its traffic by owner; sidecar inbound never captures Envoy's stats and
# the agent's health/metrics ports; Envoy reaches the local app from this loopback source.
PROXY_UID = 1337
SIDECAR_INBOUND_EXCLUDED = (ENVOY_STATS_PORT, AGENT_READINESS_PORT, AGENT_METRICS_PORT)
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"

# The largest RE2 program Envoy accepts in a safe_regex (runtime re2.max_program_size.error_level;
# Envoy's default, 100, rejects ordinary VirtualService regexes). Istio's bootstrap sets 32768
# (tools/packaging/common/envoy_bootstrap.json); translate/virtual_service.py checks regexes
# against it, so a too-large one is an error naming the VirtualService, not a NACK.
RE2_MAX_PROGRAM_SIZE = 32768
