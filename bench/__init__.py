"""nodeagent's benchmark suite: per-node Envoy against no mesh and against sidecars (make bench)."""
