"""``IstioCertificateService/CreateCertificate``: authenticate, authorize, check the CSR, sign.

As istiod's CA server (istio security/pkg/server/ca/server.go ``CreateCertificate``): the
identity is the caller's own unless the ``ImpersonatedIdentity`` metadata names another (node
authorization decides); the TTL is the request's ``validity_duration``, else the default; the
answer is ``[leaf, intermediates..., root bundle]``. Differences, as the issue asks: a TTL above
the maximum is cut to it (istiod refuses it), the CSR must ask for exactly the identity, and a
refusal says why (istiod's impersonation refusals are opaque). Every refusal is logged (who asked
for what, why; never the token) and counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc

from nodeagent.caservice import authn
from nodeagent.caservice.authz import NodeAuthorizer, parse_identity
from nodeagent.caservice.config import CAConfig
from nodeagent.caservice.csr import check_csr
from nodeagent.caservice.keystore import Signer
from nodeagent.caservice.kubeapi import ClusterAPI
from nodeagent.caservice.metrics import CAMetrics
from nodeagent.caservice.refusal import Refused, Unavailable
from nodeagent.identity.protocol import (
    IMPERSONATED_IDENTITY,
    SERVICE,
    IstioCertificateRequest,
    IstioCertificateResponse,
)

log = logging.getLogger("nodeagent.caservice")


class CertificateService:
    def __init__(
        self,
        config: CAConfig,
        api: ClusterAPI,
        signer: Callable[[], Signer | None],
        metrics: CAMetrics,
    ) -> None:
        self.config = config
        self.api = api
        self.signer = signer
        self.metrics = metrics
        self.authorizer = NodeAuthorizer(api, config.trusted_node_accounts)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self.create_certificate,
                    request_deserializer=IstioCertificateRequest.FromString,
                    response_serializer=IstioCertificateResponse.SerializeToString,
                )
            },
        )

    async def create_certificate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        outcome = ["unavailable"]  # set by _create once it knows
        try:
            return await self._create(request, context, outcome)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.request_seconds.labels(outcome[0]).observe(elapsed)

    async def _create(
        self, request: Any, context: grpc.aio.ServicerContext, outcome: list[str]
    ) -> Any:
        who = f"a client at {context.peer()}"
        wanted = _impersonated(request) or "its own identity"
        try:
            token = authn.bearer_token(context.invocation_metadata() or ())
            caller = await authn.authenticate(self.api, token, self.config.token_audience)
            who = f"{caller} at {context.peer()}"
            wanted = _impersonated(request) or caller.spiffe_id(self.config.trust_domain)
            identity = parse_identity(wanted, self.config.trust_domain)
            node = await self.authorizer.authorize(caller, identity)
            public_key = check_csr(request.csr, wanted)
        except Refused as refused:
            outcome[0] = "refused"
            self.metrics.refusals.labels(refused.reason).inc()
            log.warning(
                "refused a certificate for %s to %s (%s): %s", wanted, who, refused.reason, refused
            )
            await context.abort(refused.code, refused.detail)
            raise AssertionError("unreachable: abort raises") from None
        except Unavailable as e:
            self.metrics.errors.inc()
            log.warning("cannot decide on a certificate for %s to %s: %s", wanted, who, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise AssertionError("unreachable: abort raises") from None
        signer = self.signer()
        if signer is None:
            self.metrics.errors.inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the CA has no signing key yet")
        assert signer is not None
        ttl = self._ttl(int(request.validity_duration), wanted, who)
        chain = signer.ca.sign(public_key, wanted, ttl)
        self.metrics.issued.inc()
        outcome[0] = "issued"
        log.info(
            "issued a certificate for %s to %s%s, valid %ds, from %s",
            wanted,
            who,
            f" (a pod of it runs on node {node})" if node else "",
            int(ttl.total_seconds()),
            signer.source,
        )
        return IstioCertificateResponse(
            cert_chain=[pem.decode() for pem in chain] + [signer.root_pem.decode()]
        )

    def _ttl(self, requested: int, identity: str, who: str) -> timedelta:
        if requested <= 0:
            return timedelta(seconds=self.config.default_cert_ttl)
        if requested > self.config.max_cert_ttl:
            log.info(
                "%s asked for a %ds certificate for %s: capped to %ds (--max-cert-ttl)",
                who,
                requested,
                identity,
                int(self.config.max_cert_ttl),
            )
            return timedelta(seconds=self.config.max_cert_ttl)
        return timedelta(seconds=requested)


def _impersonated(request: Any) -> str:
    fields = request.metadata.fields
    if IMPERSONATED_IDENTITY not in fields:
        return ""
    return str(fields[IMPERSONATED_IDENTITY].string_value)
