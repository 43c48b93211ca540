"""The agent's JWKS resolver: fetches the keys RequestAuthentication rules name by URI, caches
and refreshes them, and puts them into the store (``MeshStore.jwks``), whence translation
inlines them into Envoy's jwt_authn config (translate/jwt.py).

Istio's istiod does the same (istio/istio pilot/pkg/model/jwks_resolver.go, the default
PILOT_JWT_ENABLE_REMOTE_JWKS=istiod): a rule's ``jwksUri`` (or, without one, the ``jwks_uri`` of
its issuer's OpenID discovery document ``<issuer>/.well-known/openid-configuration``) is
fetched, refreshed every ``REFRESH`` (20 min; the agent's environment variable
PILOT_JWT_PUB_KEY_REFRESH_INTERVAL, as istiod's, sets another), and on a
failed refresh the cached keys stay in use (retried sooner, with backoff). Keys never fetched
are left out of the store: translation then inlines a key that rejects every token (logged
here, once per failure streak). Sources no policy names any more are forgotten.

A rule's ``timeout`` (JWTRule.timeout, istio.io/latest/docs/reference/config/security/
request_authentication/: "The maximum amount of time that the resolver ... will spend waiting
for the JWKS to be fetched. Default is 5s.") bounds the whole fetch of its keys, the discovery
document included. istiod keeps the timeout of the policy it saw last for a key
(jwks_resolver.go, GetPublicKey); rules naming one source with different timeouts here get the
longest, so the answer does not depend on the order policies are read in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh.cel import go_duration_nanos
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.mesh.jwks")

REQUEST_AUTHENTICATION = "RequestAuthentication"
OIDC_PREFIX = "oidc:"  # source of an issuer's discovered keys (a rule without jwks or jwksUri)
DISCOVERY_PATH = "/.well-known/openid-configuration"
REFRESH = 20 * 60.0  # seconds between refreshes of keys fetched once
# istiod's setting of the same (a Go duration, e.g. "20m"), read by the agent from its environment.
REFRESH_ENV = "PILOT_JWT_PUB_KEY_REFRESH_INTERVAL"
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff after a failed fetch
TIMEOUT = 5.0  # seconds a fetch may take (Istio's JWTRule.timeout default)
MAX_BYTES = 1 << 20  # a JWKS larger than this is not one


def keys_source(rule: Mapping[str, Any]) -> str:
    """Where a rule's keys are fetched from: its jwksUri, else ``oidc:<issuer>`` (discovery);
    "" when it has them inline."""
    if rule.get("jwks"):
        return ""
    uri = rule.get("jwksUri")
    if isinstance(uri, str) and uri:
        return uri
    return OIDC_PREFIX + str(rule.get("issuer", ""))


def valid_jwks(text: str) -> bool:
    """TEXT is a JSON Web Key Set with at least one key (Envoy refuses a config whose
    local_jwks is anything else)."""
    try:
        keys = json.loads(text).get("keys")
    except (ValueError, AttributeError):
        return False
    return isinstance(keys, list) and bool(keys) and all(isinstance(k, dict) for k in keys)


def rule_timeout(rule: Mapping[str, Any]) -> float:
    """Seconds RULE's ``timeout`` (a Go duration) allows the fetch of its keys; TIMEOUT when
    unset. Istio's schema refuses a timeout under 1ms (validated before a rule gets here); one
    that slipped through anyway counts as unset rather than stopping every fetch."""
    raw = rule.get("timeout")
    if not isinstance(raw, str) or not raw:
        return TIMEOUT
    try:
        nanos = go_duration_nanos(raw)
    except ValueError:
        log.warning("RequestAuthentication jwtRules[].timeout %r is no duration: 5s used", raw)
        return TIMEOUT
    return nanos / 1e9 if nanos >= 1_000_000 else TIMEOUT


def wanted_sources(store: MeshStore) -> dict[str, float]:
    """Every source a RequestAuthentication names (all of them, not only those of local pods:
    a selected pod may arrive any time), with the time its fetch may take: the longest
    ``timeout`` of the rules naming it (module docstring)."""
    wanted: dict[str, float] = {}
    for policy in store.istio_of_kind(REQUEST_AUTHENTICATION):
        for rule in policy.spec.get("jwtRules") or []:
            if isinstance(rule, Mapping) and (source := keys_source(rule)):
                wanted[source] = max(wanted.get(source, 0.0), rule_timeout(rule))
    return wanted


# How a body is fetched: (url, timeout in seconds) -> body; raises OSError or ValueError.
Getter = Callable[[str, float], str]


def http_get(url: str, timeout: float = TIMEOUT) -> str:
    """URL's body (HTTP or HTTPS with the system's CAs) within TIMEOUT seconds; raises OSError
    (a timeout too) or ValueError."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body: bytes = answer.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise ValueError(f"{url}: more than {MAX_BYTES} bytes")
    return body.decode()


def fetch(
    source: str,
    get: Getter = http_get,
    timeout: float = TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """The JWKS of SOURCE (a jwksUri or ``oidc:<issuer>``), both requests of a discovery within
    TIMEOUT seconds together; raises OSError (TimeoutError when none is left) or ValueError."""
    deadline = clock() + timeout

    def left(url: str) -> float:
        remaining = deadline - clock()
        if remaining <= 0:
            raise TimeoutError(f"{url}: the rule's timeout of {timeout:g}s is spent")
        return remaining

    url = source
    if source.startswith(OIDC_PREFIX):
        issuer = source.removeprefix(OIDC_PREFIX).rstrip("/")
        discovery = json.loads(get(issuer + DISCOVERY_PATH, left(issuer + DISCOVERY_PATH)))
        named = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
        if not isinstance(named, str) or not named:
            raise ValueError(f"{issuer}{DISCOVERY_PATH} names no jwks_uri")
        url = named
    text = get(url, left(url))
    if not valid_jwks(text):
        raise ValueError(f"{url}: not a JSON Web Key Set")
    return text


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def refresh_interval(env: Mapping[str, str]) -> float:
    """Seconds between refreshes: ENV's ``REFRESH_ENV``, else ``REFRESH``; ValueError naming
    the variable when it is not a positive Go duration."""
    raw = env.get(REFRESH_ENV, "")
    if not raw:
        return REFRESH
    parts = _GO_DURATION.findall(raw)
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)
    if "".join(n + u for n, u in parts) != raw or seconds <= 0:
        raise ValueError(f"{REFRESH_ENV}: {raw!r} is not a positive duration")
    return seconds


@dataclass
class _Entry:
    due: float = 0.0  # monotonic time of the next fetch
    failures: int = 0


class JwksResolver:
    """Keeps ``store.jwks`` holding the keys of every source RequestAuthentications name."""

    def __init__(
        self,
        store: MeshStore,
        get: Getter = http_get,
        refresh: float = REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.get = get
        self.refresh = refresh
        self.clock = clock
        self.entries: dict[str, _Entry] = {}

    async def sync_once(self) -> None:
        """Fetch every wanted source that is due; forget those no policy names."""
        wanted = wanted_sources(self.store)
        for source in set(self.entries) - set(wanted):
            del self.entries[source]
            self.store.delete_jwks(source)
        now = self.clock()
        for source, timeout in sorted(wanted.items()):
            entry = self.entries.setdefault(source, _Entry())
            if entry.due > now:
                continue
            try:
                text = await asyncio.to_thread(fetch, source, self.get, timeout)
            except (OSError, ValueError) as error:
                entry.failures += 1
                entry.due = now + min(RETRY_MAX, RETRY_FIRST * 2 ** (entry.failures - 1))
                if entry.failures == 1:
                    cached = source in self.store.jwks
                    log.warning(
                        "RequestAuthentication keys %s: fetch failed (%s); %s",
                        source,
                        error,
                        "the cached keys stay in use"
                        if cached
                        else "every token for it is rejected until it succeeds",
                    )
                continue
            if entry.failures:
                log.info("RequestAuthentication keys %s: fetched again", source)
            entry.failures = 0
            entry.due = now + self.refresh
            self.store.put_jwks(source, text)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Until STOP: sync every INTERVAL seconds (new policies are seen within it)."""
        while not stop.is_set():
            await self.sync_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
