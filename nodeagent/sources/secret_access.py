"""SubjectAccessReviews of the service accounts whose TLS depends on a credentialName's
certificate (mesh/secret_access.py says which and why), answers kept in the MeshStore.

As istiod's CredentialsController.Authorize (istio/istio pilot/pkg/credentials/kube/secrets.go):
one review per (namespace, service account), asked of the API server
(``POST /apis/authorization.k8s.io/v1/subjectaccessreviews``: may
``system:serviceaccount:<ns>:<sa>`` ``list`` ``secrets`` in ``<ns>``), its answer kept a minute
when denied and five when allowed, then asked again. So a RoleBinding granted or removed takes
effect within that time, as at istiod; watching Roles and RoleBindings instead would need the
agent to read the cluster's whole RBAC and evaluate it itself, where the API server's own
authorizer (webhooks, aggregated ClusterRoles included) is the one that counts.

Only service accounts with a pod on this node that a selector rule presenting a certificate
selects are reviewed; an answer nobody needs any more is dropped. Not yet answered counts as
denied (fail closed). Where istiod caches an error as a denial, a failed review here keeps the
last answer (a blip of the API server does not cut an allowed workload's TLS) and is retried
sooner; with no answer yet the account stays denied. A 403 means the agent's ClusterRole lacks
``create`` on ``subjectaccessreviews`` (daemonset/), logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nodeagent.mesh import secret_access
from nodeagent.mesh.secret_access import ALLOWED_TTL, DENIED_TTL
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.sources.secret_access")

RETRY = 10.0  # seconds before a failed review is asked again
# Seconds between looks at which service accounts need a review (a look is skipped when the
# store did not change and no answer is due). Short: until its first answer, a new account's
# pods are refused.
INTERVAL = 0.2

Create = Callable[[dict[str, Any]], Awaitable[Mapping[str, Any]]]


class ReviewFailed(Exception):
    """The API server gave no answer to a review (STATUS: its HTTP status, 0 for none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class SecretAccessReviews:
    """Keeps ``store.secret_access`` answered for this node's service accounts that need it.
    CREATE posts one SubjectAccessReview and returns the API server's answer (ReviewFailed
    when there is none); CLOCK: monotonic seconds."""

    def __init__(
        self,
        store: MeshStore,
        node_name: str,
        create: Create,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.node_name, self.create, self.clock = store, node_name, create, clock
        self.due: dict[tuple[str, str], float] = {}  # (namespace, account) -> ask again at
        self._looked_at = -1  # the store generation of the last look
        store.secret_access_enforced = True  # an API server has RBAC: its answers count

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.review_due()
            except Exception:  # a bug must not stop the reviews for good
                log.exception("secret access reviews: unexpected error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL)

    async def review_due(self) -> None:
        """Review the accounts that need it and whose answer is missing or old; forget the
        answers of those that no longer need one."""
        now = self.clock()
        if self.store.generation == self._looked_at and all(t > now for t in self.due.values()):
            return
        self._looked_at = self.store.generation
        pods = self.store.pods_on_node(self.node_name)
        needed = secret_access.to_review(self.store, pods)
        for key in sorted(self.due.keys() - needed):
            del self.due[key]
            self.store.delete_secret_access("/".join(key))
        for key in sorted(needed):
            if self.due.get(key, 0.0) <= now:
                await self._review(*key)

    async def _review(self, namespace: str, account: str) -> None:
        request = secret_access.review_request(namespace, account)
        who = secret_access.username(namespace, account)
        try:
            allowed, reason = secret_access.review_answer(await self.create(request))
        except ReviewFailed as e:
            hint = (
                "; grant the agent create on subjectaccessreviews.authorization.k8s.io "
                "(daemonset/rbac.yaml)"
                if e.status == 403
                else ""
            )
            log.error(
                "SubjectAccessReview of %s (list secrets in %s) failed: %s%s; retrying in %.0fs",
                who,
                namespace,
                e,
                hint,
                RETRY,
            )
            if f"{namespace}/{account}" not in self.store.secret_access:
                self.store.put_secret_access(namespace, account, False)
            self.due[(namespace, account)] = self.clock() + RETRY
            return
        before = self.store.secret_access.get(f"{namespace}/{account}")
        if before is not allowed:
            because = f" ({reason})" if reason else ""
            if allowed:
                log.info(
                    "%s may list secrets in %s%s: its pods present the certificates of "
                    "DestinationRule credentialName",
                    who,
                    namespace,
                    because,
                )
            else:
                log.warning(
                    "%s may not list secrets in %s%s: its pods get no certificate of "
                    "DestinationRule credentialName (their TLS through it fails, as at Istio)",
                    who,
                    namespace,
                    because,
                )
        self.store.put_secret_access(namespace, account, allowed)
        self.due[(namespace, account)] = self.clock() + (ALLOWED_TTL if allowed else DENIED_TTL)
