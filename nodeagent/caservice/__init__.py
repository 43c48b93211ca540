"""``nodeagent ca``: the mesh's certificate authority, the only holder of the signing key.

Istio's istiod CA for a node proxy (ztunnel), here for the node agents: Istio's certificate API
(``IstioCertificateService/CreateCertificate``, istio security/pkg/server/ca/server.go) over TLS;
the caller authenticated by TokenReview of its service account token (authn), allowed an identity
of a pod on its own node only (authz, istio security/pkg/server/ca/node_auth.go); signing
material from Istio's plug-in ``cacerts`` Secret or a self-signed root kept in a Secret (keystore;
https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/), its root bundle
published in a ConfigMap (rootcert, Istio's ``istio-ca-root-cert``).
"""
