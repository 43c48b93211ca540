"""Why a certificate request is refused: a gRPC status, a reason (the metric's label) and what
the caller is told."""

from __future__ import annotations

import grpc

UNAUTHENTICATED = "unauthenticated"
NOT_AUTHORIZED = "not_authorized"
BAD_CSR = "bad_csr"
SAN_MISMATCH = "san_mismatch"
BAD_IDENTITY = "bad_identity"
REASONS = (UNAUTHENTICATED, NOT_AUTHORIZED, BAD_CSR, SAN_MISMATCH, BAD_IDENTITY)

CODES = {
    UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    NOT_AUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,
    BAD_CSR: grpc.StatusCode.INVALID_ARGUMENT,
    SAN_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    BAD_IDENTITY: grpc.StatusCode.INVALID_ARGUMENT,
}


class Refused(Exception):
    """A request the CA will not sign; ``str()`` is the detail sent back (never a token)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = CODES[reason]
        self.detail = detail


class Unavailable(Exception):
    """The CA cannot decide now (the API server failed): the caller retries."""
