"""IdentityManager: the one owner of the node's workload certificates.

A service account has a certificate exactly while one of its pods runs on this node: issued when
the first pod arrives, forgotten (key dropped) when the last one leaves. Certificates are renewed
at half their lifetime, a little earlier at random so that identities issued together do not all
renew together (Istio's grace ratio with jitter). A failing CA is retried with backoff; the old
certificate keeps serving meanwhile, until it expires: then it is dropped (fail closed, Envoy
has no valid certificate for that identity and its mTLS fails). An identity without a valid
certificate is retried at most RETRY_MAX_WITHOUT_CERT apart, so it recovers within seconds of
the CA's return however long the outage was.

Issuance never runs in the caller: ``set_local_identities``/``sds_secrets`` (called from the
proxy's push) only schedule new identities and wake the renewal loop (``run``), which asks the
issuer (a few at a time) and calls ``on_change`` so that the proxy pushes again.
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
from nodeagent.identity.certs import KeyType, WorkloadCert, spiffe_id
from nodeagent.identity.issuer import ERROR, OK, RESULTS, IssueError, Issuer, as_issuer
from nodeagent.identity.secrets import root_secret, workload_secret

log = logging.getLogger("nodeagent.identity")

DEFAULT_TTL = timedelta(hours=24)
ROTATE_AT = 0.5  # of the lifetime
ROTATE_JITTER = 0.1  # up to this share of the lifetime earlier
RETRY_INITIAL = 1.0  # seconds
RETRY_MAX = 60.0
# The backoff's cap while an identity has no valid certificate (never issued, or dropped at
# expiry): its workloads' mTLS fails until the CA answers, so it is asked every few seconds.
# Istio's agent does the same: it asks the CA on every SDS request Envoy retries while it has
# no certificate (security/pkg/nodeagent/sds/sdsservice.go generate: "we rely on the client to
# retry (with backoff)"), each ask retried up to 5 times, 100 ms to 1.6 s apart
# (security/pkg/nodeagent/caclient CARetryOptions).
RETRY_MAX_WITHOUT_CERT = 5.0
# The longest the loop sleeps without looking again (bounds the effect of clock jumps).
MAX_SLEEP = 30.0
CONCURRENCY = 4  # requests to the CA at once


@dataclass
class _Identity:
    spiffe_id: str
    cert: WorkloadCert | None = None
    due_at: float = 0.0  # clock time of the next renewal, or of the next retry after a failure
    failures: int = 0
    last_error: str = ""  # why the latest request failed ("" after a success)
    in_flight: bool = False


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
        self.requests = Counter(
            "nodeagent_cert_requests",
            "Certificate requests to the CA, by result (ok, refused, unavailable, bad_answer:"
            " an answer not installed, error).",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self.requests.labels(result)
        self.expired = Counter(
            "nodeagent_cert_expired",
            "Workload certificates dropped because they expired before a renewal (fail closed:"
            " that identity's mTLS fails until the CA issues again).",
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
        issuer: Issuer | CertificateAuthority,
        trust_domain: str,
        ttl: timedelta = DEFAULT_TTL,
        key_type: KeyType = "EC",
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.issuer = as_issuer(issuer)
        self.issuer.on_bundle_change = self._bundle_changed
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.key_type: KeyType = key_type
        self.on_change = on_change
        self._clock = clock
        self.metrics = IdentityMetrics(registry if registry is not None else CollectorRegistry())
        self._identities: dict[str, _Identity] = {}
        self._wakeup = asyncio.Event()
        self._concurrency = concurrency
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._requests: set[asyncio.Task[bool]] = set()  # to the issuer, in flight
        self._dirty = False  # certificates installed that on_change has not told of yet
        self._next_refresh = 0.0

    @property
    def root_pem(self) -> bytes:
        return self.issuer.root_pem

    def certs(self) -> dict[str, WorkloadCert]:
        """The current, unexpired certificate of each local identity that has one."""
        self._drop_expired(notify=False)
        return {sid: i.cert for sid, i in self._identities.items() if i.cert is not None}

    def sds_secrets(self, identities: Iterable[tuple[str, str]]) -> list[secret_pb2.Secret]:
        """The SDS secrets of IDENTITIES that hold a valid certificate, and the trust bundle.

        New identities are only scheduled here (the renewal loop issues them, then on_change
        asks for another push): a push never waits for the CA.
        """
        self.set_local_identities(identities)
        return [*(workload_secret(c) for c in self.certs().values()), root_secret(self.root_pem)]

    def set_local_identities(self, identities: Iterable[tuple[str, str]]) -> None:
        """Make the certificates follow the (namespace, service account) of this node's pods."""
        wanted = {spiffe_id(self.trust_domain, ns, sa) for ns, sa in identities}
        changed = False
        for sid in sorted(self._identities.keys() - wanted):
            gone = self._identities.pop(sid)
            if gone.cert is not None:
                self.metrics.expiry.expiries.pop(sid, None)
                changed = True
            log.info("identity %s forgotten: its last pod left this node", sid)
        new = sorted(wanted - self._identities.keys())
        for sid in new:
            self._identities[sid] = _Identity(sid, due_at=self._clock())
        if changed:
            self._changed()
        if new:
            self._wakeup.set()

    def identity_problem(self, sid: str) -> str:
        """Why identity SID has no certificate to serve, or "" when it has one."""
        entry = self._identities.get(sid)
        if entry is not None and entry.cert is not None and not self._expired(entry.cert):
            return ""
        if entry is None or not entry.last_error:
            return f"no certificate for {sid} yet: being issued by {self.issuer.name}"
        return f"{self.issuer.name} could not issue a certificate for {sid}: {entry.last_error}"

    def problem(self) -> str:
        """Readiness text: "" while every local identity's latest request worked. Names no
        SPIFFE ID (readiness is unauthenticated)."""
        # Asked from the readiness server's thread: copy before looking (list() holds the GIL).
        failing = [i for i in list(self._identities.values()) if i.last_error]
        if not failing:
            return ""
        without = sum(1 for i in failing if i.cert is None)
        return (
            f"{self.issuer.name} failed for {len(failing)} identities ({without} without a"
            f" certificate): {failing[0].last_error}"
        )

    def status(self) -> dict[str, object]:
        """For proxy-status (root only): the issuer and each identity's state."""
        return {
            "issuer": self.issuer.name,
            "problem": self.problem(),
            "identities": {
                sid: {
                    "not_after": i.cert.not_after.isoformat() if i.cert else "",
                    "error": i.last_error,
                    "failures": i.failures,
                }
                for sid, i in sorted(self._identities.items())
            },
        }

    async def renew_due(self) -> int:
        """Issue, renew or retry every identity whose time has come, a few at a time; drop
        expired certificates; return how many got a certificate (one on_change for them all)."""
        results = await asyncio.gather(*self._start_due())
        self._notify()
        return sum(results)

    def _start_due(self) -> list[asyncio.Task[bool]]:
        """Start a request for each due identity not already asked for; the requests run on
        their own (bounded by the semaphore) so a slow CA never holds up new identities."""
        self._drop_expired(notify=True)
        now = self._clock()
        started = []
        for entry in self._identities.values():
            if entry.due_at <= now and not entry.in_flight:
                entry.in_flight = True
                task = asyncio.get_running_loop().create_task(self._renew(entry))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)
                started.append(task)
        return started

    async def _renew(self, entry: _Identity) -> bool:
        try:
            async with self._semaphore():
                if self._identities.get(entry.spiffe_id) is not entry:
                    return False  # its last pod left while it waited
                cert = await self.issuer.issue(entry.spiffe_id, self.ttl, self.key_type)
        except Exception as exc:
            if self._identities.get(entry.spiffe_id) is entry:
                self._failed(entry, exc)
            else:
                self._count(exc)
            return False
        finally:
            entry.in_flight = False
            self._wakeup.set()  # the loop schedules what comes next (renewal or retry)
        self.metrics.requests.labels(OK).inc()
        if self._identities.get(entry.spiffe_id) is not entry:
            return False  # the last pod left meanwhile: drop the new key as well
        if entry.cert is not None:
            self.metrics.rotations.inc()
        self._installed(entry, cert)
        self._dirty = True
        return True

    def _notify(self) -> None:
        if self._dirty:
            self._dirty = False
            self._changed()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # one per loop: tests run passes in several loops
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._concurrency))
        return self._slots[1]

    async def run(self, stop: asyncio.Event) -> None:
        """Renew certificates on time until STOP is set; never ends on an error."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wakeup.clear()  # before renewing: a change made meanwhile is not missed
                try:
                    await self._refresh_due()
                    self._notify()  # certificates installed since the last pass: one push
                    self._start_due()
                except Exception:
                    log.exception("certificate renewal pass failed; trying again")
                woken = asyncio.create_task(self._wakeup.wait())
                await asyncio.wait(
                    {stopping, woken}, timeout=self._sleep(), return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
        finally:
            stopping.cancel()
            for task in list(self._requests):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(stopping, *self._requests, return_exceptions=True)
            for entry in self._identities.values():
                entry.in_flight = False
            await self.issuer.close()

    async def _refresh_due(self) -> None:
        interval = self.issuer.refresh_interval
        if interval is None or time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + interval
        await self.issuer.refresh()

    def _sleep(self) -> float:
        now = self._clock()
        wake = [now + MAX_SLEEP]
        wake += [i.due_at for i in self._identities.values() if not i.in_flight]
        # Wake at expiry to drop the certificate (fail closed) even while the CA is down.
        wall = time.time()
        wake += [
            now + (i.cert.not_after.timestamp() - wall)
            for i in self._identities.values()
            if i.cert is not None
        ]
        sleep = min(max(min(wake) - now, 0.0), MAX_SLEEP)
        if self.issuer.refresh_interval is not None:
            sleep = min(sleep, max(self._next_refresh - time.monotonic(), 0.0))
        return sleep

    def _bundle_changed(self) -> None:
        """The trust bundle changed: push the new ROOTCA, re-issue every identity soon (so that
        workloads move to the new signer), from the renewal loop."""
        now = self._clock()
        for entry in self._identities.values():
            entry.due_at = now
        self._changed()
        self._wakeup.set()

    @staticmethod
    def _expired(cert: WorkloadCert) -> bool:
        return cert.not_after <= datetime.now(UTC)

    def _drop_expired(self, notify: bool) -> None:
        dropped = False
        for entry in self._identities.values():
            if entry.cert is not None and self._expired(entry.cert):
                log.error(
                    "certificate for %s expired at %s before %s renewed it: dropped, its mTLS"
                    " fails until a new one is issued (last error: %s)",
                    entry.spiffe_id,
                    entry.cert.not_after.isoformat(),
                    self.issuer.name,
                    entry.last_error or "none",
                )
                entry.cert = None
                entry.due_at = min(entry.due_at, self._clock())
                self.metrics.expired.inc()
                self.metrics.expiry.expiries.pop(entry.spiffe_id, None)
                dropped = True
        if dropped:
            self.metrics.identities.set(
                sum(1 for i in self._identities.values() if i.cert is not None)
            )
            if notify:
                self._changed()

    def _installed(self, entry: _Identity, cert: WorkloadCert) -> None:
        # Lifetime from now, not from notBefore (backdated); shorter than the TTL only if the CA
        # cut it (X.509 times drop fractions of a second: allow for that).
        remaining = cert.not_after - datetime.now(UTC) + timedelta(seconds=1)
        lifetime = min(self.ttl, remaining).total_seconds()
        early = random.uniform(0.0, ROTATE_JITTER) * lifetime
        entry.cert = cert
        entry.failures = 0
        entry.last_error = ""
        entry.due_at = self._clock() + ROTATE_AT * lifetime - early
        self.metrics.expiry.expiries[entry.spiffe_id] = cert.not_after.timestamp()
        log.info(
            "certificate for %s issued by %s: serial %x, expires %s",
            entry.spiffe_id,
            self.issuer.name,
            cert.serial,
            cert.not_after.isoformat(),
        )

    def _count(self, exc: Exception) -> str:
        result = exc.result if isinstance(exc, IssueError) else ERROR
        self.metrics.requests.labels(result).inc()
        return result

    def _failed(self, entry: _Identity, exc: Exception) -> None:
        result = self._count(exc)
        entry.failures += 1
        entry.last_error = f"{result}: {exc}" if isinstance(exc, IssueError) else f"{exc}"
        valid = entry.cert is not None and not self._expired(entry.cert)
        cap = RETRY_MAX if valid else RETRY_MAX_WITHOUT_CERT
        delay = min(RETRY_INITIAL * 2 ** (entry.failures - 1), cap)
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
        self.metrics.identities.set(sum(1 for i in self._identities.values() if i.cert is not None))
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            log.exception("on_change callback failed after a certificate change")
