"""May this caller have a certificate for that identity? Istio's node authorization.

As istiod's NodeAuthorizer for ztunnel (istio security/pkg/server/ca/node_auth.go,
``authenticateImpersonation``): a caller may always have its own identity; another identity
only when the caller is a trusted node account (Istio's CA_TRUSTED_NODE_ACCOUNTS), its token is
bound to a pod that still exists with that uid and service account, and a pod of the identity's
service account is scheduled on that pod's node. Istio answers UNAUTHENTICATED with an opaque
message; here, as the issue asks, PERMISSION_DENIED saying why (the caller is authenticated, and
nothing secret is revealed: the caller may list pods of its node anyway). Istio reads pods from
an informer; this asks the API server (GET the caller's pod, LIST by node and service account).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from nodeagent.caservice.authn import Caller
from nodeagent.caservice.kubeapi import APIError, ClusterAPI, NotFound
from nodeagent.caservice.refusal import BAD_IDENTITY, NOT_AUTHORIZED, Refused, Unavailable


@dataclass(frozen=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def parse_identity(spiffe_id: str, trust_domain: str) -> Identity:
    """An Istio workload identity (spiffe://TD/ns/NS/sa/SA) of this CA's trust domain."""
    rest = spiffe_id.removeprefix("spiffe://")
    parts = rest.split("/")
    if (
        rest == spiffe_id
        or len(parts) != 5
        or parts[1] != "ns"
        or parts[3] != "sa"
        or not all(parts)
    ):
        raise Refused(
            BAD_IDENTITY, f"{spiffe_id!r} is not an identity spiffe://<trust domain>/ns/NS/sa/SA"
        )
    identity = Identity(parts[0], parts[2], parts[4])
    if identity.trust_domain != trust_domain:
        raise Refused(
            BAD_IDENTITY,
            f"{spiffe_id} is in trust domain {identity.trust_domain!r}, not this CA's "
            f"{trust_domain!r}",
        )
    return identity


class NodeAuthorizer:
    def __init__(self, api: ClusterAPI, trusted_node_accounts: Set[tuple[str, str]]) -> None:
        self.api = api
        self.trusted = trusted_node_accounts

    async def authorize(self, caller: Caller, identity: Identity) -> str | None:
        """None when CALLER asks for its own identity, else the node that allows it; Refused
        (PERMISSION_DENIED) saying why not."""
        if (identity.namespace, identity.service_account) == (
            caller.namespace,
            caller.service_account,
        ):
            return None
        if (caller.namespace, caller.service_account) not in self.trusted:
            raise Refused(
                NOT_AUTHORIZED,
                f"{caller.namespace}/{caller.service_account} is not a trusted node account: "
                f"it may not ask for another identity ({identity})",
            )
        if not caller.pod_name or not caller.pod_uid:
            raise Refused(
                NOT_AUTHORIZED, "the token is not bound to a pod: no node to authorize against"
            )
        node = await self._caller_node(caller)
        selector = f"spec.nodeName={node},spec.serviceAccountName={identity.service_account}"
        try:
            pods = await self.api.list_pods(identity.namespace, selector)
        except APIError as e:
            raise Unavailable(f"listing pods failed: {e}") from None
        if not pods:
            raise Refused(
                NOT_AUTHORIZED,
                f"no pod of {identity.namespace}/{identity.service_account} on node {node}",
            )
        return node

    async def _caller_node(self, caller: Caller) -> str:
        where = f"{caller.namespace}/{caller.pod_name}"
        try:
            pod = await self.api.read("pods", caller.namespace, str(caller.pod_name))
        except NotFound:
            raise Refused(NOT_AUTHORIZED, f"the caller's pod {where} does not exist") from None
        except APIError as e:
            raise Unavailable(f"reading the caller's pod failed: {e}") from None
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        # A pod re-created with the same name is another pod: its predecessor's token is stale.
        if meta.get("uid") != caller.pod_uid:
            raise Refused(
                NOT_AUTHORIZED,
                f"the caller's pod {where} has uid {meta.get('uid')!r}, the token "
                f"{caller.pod_uid!r}",
            )
        if (spec.get("serviceAccountName") or "default") != caller.service_account:
            raise Refused(
                NOT_AUTHORIZED, f"the caller's pod {where} runs as another service account"
            )
        node = spec.get("nodeName")
        if not node:
            raise Refused(NOT_AUTHORIZED, f"the caller's pod {where} is on no node")
        return str(node)
