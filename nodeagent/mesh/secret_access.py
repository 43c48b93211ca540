"""Which local callers may have the client certificate a DestinationRule ``credentialName``
names: Istio's authorization of a proxy for a Secret (pure).

istiod serves a ``kubernetes://`` Secret over SDS to a proxy (sidecars included: nothing in
the path is gateway-only) only when (istio/istio pilot/pkg/xds/sds.go Generate ->
filterAuthorizedResources; pilot/pkg/credentials/kube/secrets.go Authorize):

- the Secret is in the proxy's namespace (here always so: a sidecar reads credentialName only
  in a selector rule, whose Secret is of the rule's namespace, mesh/credentials.py), and
- for a certificate (not a ``-cacert`` CA bundle: "CA Certs are public information") the
  proxy's service account ``system:serviceaccount:<ns>:<sa>`` may ``list`` ``secrets`` in its
  namespace, as a SubjectAccessReview answers. istiod caches the answer for a minute when
  denied and five when allowed (cacheTTL), and an error counts as denied.

So only MUTUAL (which presents the Secret's certificate) needs the review; SIMPLE reads the CA
bundle alone. A proxy refused the certificate never gets its SDS secret and its TLS to the
destination fails; the node agent gives the pods of such a service account a transport socket
that fails the handshake (translate/client_tls.py), per client class (service_views.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodeagent.mesh import policy
from nodeagent.mesh.credentials import credential_name, tls_blocks
from nodeagent.mesh.model import IstioResource, Pod
from nodeagent.mesh.store import MeshStore

VERB, RESOURCE = "list", "secrets"  # what Authorize asks of the proxy's service account
DENIED_TTL = 60.0  # seconds an answer is kept (cacheTTL); an allowed one five times longer
ALLOWED_TTL = 5 * DENIED_TTL
SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def username(namespace: str, service_account: str) -> str:
    """The API server's user name of a service account (apiserver serviceaccount.MakeUsername)."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def review_request(namespace: str, service_account: str) -> dict[str, Any]:
    """The SubjectAccessReview Authorize creates for SERVICE_ACCOUNT of NAMESPACE."""
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "metadata": {},
        "spec": {
            "resourceAttributes": {"namespace": namespace, "verb": VERB, "resource": RESOURCE},
            "user": username(namespace, service_account),
        },
    }


def review_answer(review: Mapping[str, Any]) -> tuple[bool, str]:
    """(allowed, reason) of a SubjectAccessReview the API server returned."""
    status = review.get("status")
    status = status if isinstance(status, Mapping) else {}
    return status.get("allowed") is True, str(status.get("reason") or "")


def presents_credential(rule: IstioResource | None) -> bool:
    """RULE (a selector rule, merged) presents a credentialName's certificate somewhere: a
    MUTUAL tls block with one."""
    if rule is None or not rule.spec.get("workloadSelector"):  # as service_views.port_clusters
        return False
    return any(b.get("mode") == "MUTUAL" and credential_name(b) for b in tls_blocks(rule.spec))


def needs_review(store: MeshStore, pod: Pod) -> bool:
    """A selector rule of POD's namespace that selects it presents a credentialName's
    certificate: its service account's access to Secrets decides its TLS."""
    for rule in policy.selector_rules(store, pod.namespace):
        labels = (rule.spec.get("workloadSelector") or {}).get("matchLabels") or {}
        if all(pod.labels.get(k) == v for k, v in labels.items()) and presents_credential(rule):
            return True
    return False


def to_review(store: MeshStore, pods: Iterable[Pod]) -> set[tuple[str, str]]:
    """(namespace, service account) of every pod of PODS whose access decides its TLS."""
    return {(p.namespace, p.service_account) for p in pods if needs_review(store, p)}


def unauthorized(store: MeshStore, pod: Pod) -> str:
    """POD's service account when it may not have the certificate a selector rule of its
    namespace presents for it ("" when it may, or when no rule asks)."""
    if store.may_read_secrets(pod.namespace, pod.service_account):
        return ""
    return pod.service_account if needs_review(store, pod) else ""
