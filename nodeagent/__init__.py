"""nodeagent: a sidecar-free service mesh data plane, one agent and one Envoy per node."""

__version__ = "0.1.0"
