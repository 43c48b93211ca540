"""Who is asking: the bearer token of the request, reviewed by the API server (TokenReview).

As istiod's Kubernetes JWT authenticator (istio pkg/kube/tokenreview.go): the review must say
authenticated, for the CA's audience, a service account (group ``system:serviceaccounts``,
username ``system:serviceaccount:NS:SA``); a pod-bound projected token also names its pod in
``user.extra`` (``authentication.kubernetes.io/pod-name``/``pod-uid``), which node authorization
needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.caservice.kubeapi import APIError, ClusterAPI
from nodeagent.caservice.refusal import UNAUTHENTICATED, Refused, Unavailable
from nodeagent.identity.protocol import AUTHORIZATION

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"


@dataclass(frozen=True)
class Caller:
    namespace: str
    service_account: str
    pod_name: str | None = None  # set for pod-bound tokens
    pod_uid: str | None = None

    def spiffe_id(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        pod = f" (pod {self.namespace}/{self.pod_name})" if self.pod_name else ""
        return f"{self.namespace}/{self.service_account}{pod}"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of ``authorization: Bearer <token>``; Refused without one."""
    for key, value in metadata:
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Refused(UNAUTHENTICATED, "the authorization metadata is not 'Bearer <token>'")
    raise Refused(UNAUTHENTICATED, "no authorization metadata (Bearer token) in the request")


async def authenticate(api: ClusterAPI, token: str, audience: str) -> Caller:
    try:
        status = await api.review_token(token, [audience])
    except APIError as e:
        raise Unavailable(f"TokenReview failed: {e}") from None
    if status.get("error") or not status.get("authenticated"):
        why = status.get("error") or "not authenticated"
        raise Refused(UNAUTHENTICATED, f"token rejected by TokenReview: {why}")
    audiences = status.get("audiences")
    if audiences and audience not in audiences:
        raise Refused(UNAUTHENTICATED, f"token is not for audience {audience!r}")
    user = status.get("user") or {}
    if SERVICE_ACCOUNTS_GROUP not in (user.get("groups") or []):
        raise Refused(UNAUTHENTICATED, "token is not a service account's")
    parts = str(user.get("username") or "").split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not all(parts[2:]):
        raise Refused(UNAUTHENTICATED, "TokenReview's username is not a service account")
    extra = user.get("extra") or {}
    return Caller(parts[2], parts[3], _one(extra.get(POD_NAME)), _one(extra.get(POD_UID)))


def _one(values: object) -> str | None:
    if isinstance(values, list) and len(values) == 1 and values[0]:
        return str(values[0])
    return None
