"""Ingress and egress gateways (``nodeagent gateway``): one Envoy per gateway pod, as Istio's.

A gateway is a Deployment, not part of the node agent: its pod is not captured (it is outside
the mesh's capture, as Istio's gateway pods run no istio-init), and its own process serves its
Envoy xDS and SDS over a UNIX socket in the pod (``proxy.py``), translated from the Gateways
that select its labels (translate/gateway.py) and, for the upstream side, the same clusters,
endpoints and mTLS a sidecar of its identity would have (translate's sidecar form). Its
certificate comes from the mesh's CA under its own service account (identity/), and the
credentialName Secrets of its TLS servers from its own namespace only (``process.py``).
"""
