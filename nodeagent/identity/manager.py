"""IdentityManager: the one owner of the node's workload certificates.

A service account has a certificate exactly while one of its pods runs on this node: issued when
the first pod arrives, forgotten (key dropped) when the last one leaves. Certificates are renewed
at half their lifetime, a little earlier at random so that identities issued together do not all
renew together (Istio's grace ratio with jitter). A failing CA is retried with backoff; the old
certificate keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeagent.identity.ca import CertificateAuthority
from nodeagent.identity.certs import KeyType, WorkloadCert, issue, spiffe_id
from nodeagent.identity.secrets import root_secret, workload_secret

log = logging.getLogger("nodeagent.identity")

DEFAULT_TTL = timedelta(hours=24)
ROTATE_AT = 0.5  # of the lifetime
ROTATE_JITTER = 0.1  # up to this share of the lifetime earlier
RETRY_INITIAL = 1.0  # seconds
RETRY_MAX = 60.0
# The longest the loop sleeps without looking again (bounds the effect of clock jumps).
MAX_SLEEP = 30.0


@dataclass
class _Identity:
    spiffe_id: str
    cert: WorkloadCert | None = None
    due_at: float = 0.0  # clock time of the next renewal, or of the next retry after a failure
    failures: int = 0


class _EarliestExpiry(Collector):
    """nodeagent_cert_earliest_expiry_timestamp_seconds: absent while no identity has a cert."""

    def __init__(self) -> None:
        self.expiries: dict[str, float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.expiries:
            yield GaugeMetricFamily(
                "nodeagent_cert_earliest_expiry_timestamp_seconds",
                "When the first of the local identities' current certificates expires (Unix"
                " time); absent while none holds one.",
                value=min(self.expiries.values()),
            )


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # One figure for all identities: :15020 is unauthenticated and must not list SPIFFE IDs.
        self.expiry = _EarliestExpiry()
        registry.register(self.expiry)
        self.rotations = Counter(
            "nodeagent_cert_rotations",
            "Workload certificates renewed before expiry.",
            registry=registry,
        )
        self.failures = Counter(
            "nodeagent_cert_issuance_failures",
            "Workload certificate requests the CA could not serve (retried with backoff).",
            registry=registry,
        )
        self.identities = Gauge(
            "nodeagent_identities",
            "Local identities (service accounts with a pod on this node) holding a certificate.",
            registry=registry,
        )


class IdentityManager:
    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str,
        ttl: timedelta = DEFAULT_TTL,
        key_type: KeyType = "EC",
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.key_type: KeyType = key_type
        self.on_change = on_change
        self._clock = clock
        self.metrics = IdentityMetrics(registry if registry is not None else CollectorRegistry())
        self._identities: dict[str, _Identity] = {}
        self._wakeup = asyncio.Event()

    @property
    def root_pem(self) -> bytes:
        return self.ca.root_pem

    def certs(self) -> dict[str, WorkloadCert]:
        """The current certificate of each local identity that has one, by SPIFFE ID."""
        return {sid: i.cert for sid, i in self._identities.items() if i.cert is not None}

    def sds_secrets(self, identities: Iterable[tuple[str, str]]) -> list[secret_pb2.Secret]:
        """The SDS secrets for exactly IDENTITIES (issued when new) and the root certificate."""
        self.set_local_identities(identities)
        return [*(workload_secret(c) for c in self.certs().values()), root_secret(self.root_pem)]

    def set_local_identities(self, identities: Iterable[tuple[str, str]]) -> None:
        """Make the certificates match the (namespace, service account) of this node's pods."""
        wanted = {spiffe_id(self.trust_domain, ns, sa) for ns, sa in identities}
        changed = False
        for sid in sorted(self._identities.keys() - wanted):
            gone = self._identities.pop(sid)
            if gone.cert is not None:
                self.metrics.expiry.expiries.pop(sid, None)
                changed = True
            log.info("identity %s forgotten: its last pod left this node", sid)
        for sid in sorted(wanted - self._identities.keys()):
            new = self._identities[sid] = _Identity(sid)
            try:
                cert = issue(self.ca, sid, self.ttl, self.key_type)
            except Exception as exc:
                self._failed(new, exc)
                continue
            self._installed(new, cert)
            changed = True
        if changed:
            self._changed()
        self._wakeup.set()  # the loop may have new retries to schedule

    async def renew_due(self) -> int:
        """Renew (or retry) every identity whose time has come; return how many got a cert.

        Keys are made and signed off the event loop: RSA keys take a while.
        """
        now = self._clock()
        due = [i for i in self._identities.values() if i.due_at <= now]
        renewed = 0
        for entry in due:
            try:
                cert = await asyncio.to_thread(
                    issue, self.ca, entry.spiffe_id, self.ttl, self.key_type
                )
            except Exception as exc:
                if self._identities.get(entry.spiffe_id) is entry:
                    self._failed(entry, exc)
                continue
            if self._identities.get(entry.spiffe_id) is not entry:
                continue  # the last pod left meanwhile: drop the new key as well
            if entry.cert is not None:
                self.metrics.rotations.inc()
            self._installed(entry, cert)
            renewed += 1
        if renewed:
            self._changed()
        return renewed

    async def run(self, stop: asyncio.Event) -> None:
        """Renew certificates on time until STOP is set; never ends on an error."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wakeup.clear()  # before renewing: a change made meanwhile is not missed
                try:
                    await self.renew_due()
                except Exception:
                    log.exception("certificate renewal pass failed; trying again")
                woken = asyncio.create_task(self._wakeup.wait())
                await asyncio.wait(
                    {stopping, woken}, timeout=self._sleep(), return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping

    def _sleep(self) -> float:
        if not self._identities:
            return MAX_SLEEP
        next_due = min(i.due_at for i in self._identities.values())
        return min(max(next_due - self._clock(), 0.0), MAX_SLEEP)

    def _installed(self, entry: _Identity, cert: WorkloadCert) -> None:
        # Lifetime from now, not from notBefore (backdated); shorter than the TTL only if the CA
        # cut it (X.509 times drop fractions of a second: allow for that).
        remaining = cert.not_after - datetime.now(UTC) + timedelta(seconds=1)
        lifetime = min(self.ttl, remaining).total_seconds()
        early = random.uniform(0.0, ROTATE_JITTER) * lifetime
        entry.cert = cert
        entry.failures = 0
        entry.due_at = self._clock() + ROTATE_AT * lifetime - early
        self.metrics.expiry.expiries[entry.spiffe_id] = cert.not_after.timestamp()
        log.info(
            "certificate for %s issued: serial %x, expires %s",
            entry.spiffe_id,
            cert.serial,
            cert.not_after.isoformat(),
        )

    def _failed(self, entry: _Identity, exc: Exception) -> None:
        entry.failures += 1
        delay = min(RETRY_INITIAL * 2 ** (entry.failures - 1), RETRY_MAX)
        delay *= random.uniform(0.8, 1.2)  # spread the retries of many identities
        entry.due_at = self._clock() + delay
        self.metrics.failures.inc()
        kept = "; its current certificate keeps serving" if entry.cert is not None else ""
        log.warning(
            "certificate for %s not issued (attempt %d): %s: %s; retrying in %.1fs%s",
            entry.spiffe_id,
            entry.failures,
            type(exc).__name__,
            exc,
            delay,
            kept,
        )

    def _changed(self) -> None:
        self.metrics.identities.set(len(self.certs()))
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            log.exception("on_change callback failed after a certificate change")
