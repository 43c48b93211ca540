"""Prometheus metrics of the node agent, served on the node (Istio's agent port, :15020).

:15020 answers anyone who reaches the node's address, so the agent's own families name no
identity (no SPIFFE ID, no service account) and say nothing of a pod's capture beyond counts by
state (each pod's own state
is `nodeagent pods`, over the root-only socket, and on the pod itself as an annotation). Pod
names do appear in one family, the denials each pod's AuthorizationPolicies made: a pod's name is
no secret (Prometheus's Kubernetes discovery labels every scraped pod with it, and Istio's own
sidecars export their denials per pod, each from its own Envoy), and a per-pod count is what
tells which workload is refusing traffic (issue #17). Istio's standard metrics, from the node
Envoy, name workloads and their principals (SPIFFE IDs) by design, as every Istio sidecar's
:15020 does (issue #19).

``/stats/prometheus`` (and ``/metrics``) is the node's one scrape endpoint, as Istio's pilot-agent
merges its own metrics with its Envoy's on :15020 (pilot/cmd/pilot-agent/status/server.go,
handleStats): the agent's families, then the node Envoy's ``/stats/prometheus`` read over its
root-only admin socket. Envoy's stats access logger emits Istio's standard metrics under the stat
prefix ``istiocustom``, which Envoy prints as ``envoy_istiocustom_<name>``; they are served under
Istio's own names (``istio_requests_total``, ...) so Istio's dashboards and alerts work unchanged.
When Envoy does not answer the agent's families are still served, and
``nodeagent_scrape_failures_total{type="envoy"}`` counts it (Istio's
``istio_agent_scrape_failures_total``).
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

from nodeagent.envoy.admin import EnvoyAdminError
from nodeagent.redirect.registry import STATES
from nodeagent.translate import denials

log = logging.getLogger(__name__)

DENIALS = "nodeagent_authz_denials"
_DENIAL_LABELS = ["namespace", "pod", "path", "protocol", "action"]

# Both paths serve the merged text, as pilot-agent's do (/metrics is Prometheus's default path).
SCRAPE_PATHS = ("/stats/prometheus", "/metrics")
# The text exposition format, whatever the scraper prefers: Envoy's output is in it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ISTIO_STATS_PREFIX = "envoy_istiocustom_"  # Envoy's name for the stats logger's istiocustom scope
ENVOY_SCRAPE_TIMEOUT = 5.0  # seconds, unless the scraper says how long it waits
ENVOY, AGENT = "envoy", "agent"  # nodeagent_scrape_failures_total{type}
# A family's first line, where the rename applies too: "# TYPE name type", "# HELP name text".
_ISTIO_NAME = re.compile(r"^(# (?:TYPE|HELP) )?" + ISTIO_STATS_PREFIX, re.M)
_TYPE_LINE = re.compile(r"^# TYPE (\S+)", re.M)
_ISTIO_SAMPLE = re.compile(r"^istio_\w*\{.*$", re.M)  # after the rename
_EMPTY_SIDE = re.compile(r'([{,](?:source|destination)_\w+)=""')

# Envoy's /stats/prometheus for a query string (Envoy's own: usedonly, filter, ...) within a
# timeout in seconds; raises EnvoyAdminError when Envoy does not answer.
EnvoyScrape = Callable[[str, float], str]


class DenialCollector:
    """``nodeagent_authz_denials_total{namespace,pod,path,protocol,action}``: the requests (HTTP
    403) and connections (TCP, closed) the authorization filters of each local pod's inbound
    chains denied, read from the node Envoy's own counters at each scrape (nothing is polled
    when nobody scrapes). Keys in the stat names tell pod and path (translate/denials.py):
    ``path`` is ``mtls`` (from another node), ``fast`` (a pod of this node) or ``plaintext``
    (no mesh mTLS); ``action`` is ``deny`` (a DENY policy matched), ``allow`` (no ALLOW policy
    matched) or ``custom`` (the CUSTOM provider denied the check, or its provider is in error
    and the CUSTOM rules deny what they match). Dry-run policies deny
    nothing and are not counted. Only pods the agent holds now are reported: a deleted pod's
    series is gone at the next scrape, whatever Envoy still holds.

    STATS: the node Envoy's counters matching ``denials.STATS_FILTER``, by name (EnvoyAdmin.stats
    with that filter); when it raises EnvoyAdminError (Envoy down, restarting) the family is
    empty. PODS: the (namespace, name) of the pods this node serves."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, int]],
        pods: Callable[[], Iterable[tuple[str, str]]],
    ) -> None:
        self.stats = stats
        self.pods = pods

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Registering must not ask Envoy (it may not run yet): the family's name is enough.
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        try:
            counters = self.stats()
        except EnvoyAdminError as e:  # Envoy down or restarting: the scrape still answers
            log.debug("denial counters not read: %s", e)
            yield family
            return
        by_digest = {denials.digest(ns, name): (ns, name) for ns, name in self.pods()}
        totals: dict[tuple[str, ...], int] = defaultdict(int)
        for name, value in counters.items():
            stat = denials.parse(name)
            if stat is None or stat.digest not in by_digest:
                continue
            namespace, pod = by_digest[stat.digest]
            totals[(namespace, pod, stat.path, stat.protocol, stat.action)] += value
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            DENIALS,
            "Requests (HTTP 403) and connections (TCP) denied by a local pod's"
            " AuthorizationPolicies, by pod, the path the caller came by (mtls: another node;"
            " fast: this node; plaintext: no mesh mTLS), protocol and the action that denied"
            " (deny: a DENY policy matched; allow: no ALLOW policy matched; custom: the CUSTOM"
            " provider denied, or its provider is in error). Dry-run not counted.",
            labels=_DENIAL_LABELS,
        )


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pods = Gauge(
            "nodeagent_pods",
            "Pods known to this node's agent, by capture state.",
            ["state"],
            registry=self.registry,
        )
        self.cni_requests = Counter(
            "nodeagent_cni_requests",
            "CNI plugin requests served, by command and result.",
            ["command", "result"],
            registry=self.registry,
        )
        self.capture_repairs = Counter(
            "nodeagent_capture_repairs",
            "Pods whose capture was found missing or altered and re-applied by reconcile.",
            registry=self.registry,
        )
        self.membership_changes = Counter(
            "nodeagent_membership_changes",
            "Running pods taken into the mesh (adopted) or out of it (released) because their"
            " labels, their namespace's or the agent's view of them changed.",
            ["change"],
            registry=self.registry,
        )
        self.capture_mode = Gauge(
            "nodeagent_capture_mode",
            "1 for the way this node's agent captures pods' traffic (--capture-mode, auto"
            " resolved): nftables or ebpf.",
            ["mode"],
            registry=self.registry,
        )
        self.scrapes = Counter(
            "nodeagent_scrapes",
            "Scrapes of the merged metrics endpoint (:15020/stats/prometheus).",
            registry=self.registry,
        )
        self.scrape_failures = Counter(
            "nodeagent_scrape_failures",
            "Scrapes of the merged endpoint that left a part out, by part (envoy: the node"
            " Envoy's stats did not answer; agent: the agent's own could not be collected).",
            ["type"],
            registry=self.registry,
        )
        for part in (ENVOY, AGENT):
            self.scrape_failures.labels(part)
        self._pod_states: dict[tuple[str, str], str] = {}
        self._count()  # every state has a series from the start, 0 on a node without pods

    def set_pod_state(self, namespace: str, pod: str, state: str) -> None:
        self._pod_states[(namespace, pod)] = state
        self._count()

    def forget_pod(self, namespace: str, pod: str) -> None:
        self._pod_states.pop((namespace, pod), None)
        self._count()

    def _count(self) -> None:
        for state in STATES:
            self.pods.labels(state).set(sum(1 for s in self._pod_states.values() if s == state))

    def serve(self, host: str, port: int, envoy: EnvoyScrape | None = None) -> ThreadingHTTPServer:
        """:PORT on HOST: the merged scrape (ENVOY: the node Envoy's stats; None: the agent's
        alone, e.g. --no-proxy or the sidecar model, whose Envoys are each scraped on their own)."""
        return serve_merged(host, port, self.registry, envoy, self.scrapes, self.scrape_failures)


def istio_names(text: str) -> str:
    """Envoy's Prometheus TEXT with the families of the stats logger's ``istiocustom`` scope
    under Istio's names: ``envoy_istiocustom_istio_requests_total{...}`` (and its ``# TYPE``
    line) becomes ``istio_requests_total{...}``; in them, a ``source_*`` or ``destination_*``
    label without a value becomes Istio's ``unknown`` (translate/istio_stats.py leaves what a
    formatter does not find empty; ``grpc_response_status`` stays empty for non-gRPC, as at
    Istio). No other label value is touched."""
    text = _ISTIO_NAME.sub(r"\1", text)
    return _ISTIO_SAMPLE.sub(lambda m: _EMPTY_SIDE.sub(r'\1="unknown"', m.group(0)), text)


def merge(agent: str, envoy: str) -> str:
    """The agent's exposition, then Envoy's (Istio's names restored). An Envoy family whose name
    the agent already declares is left out: a second ``# TYPE`` for one name fails the whole
    scrape in Prometheus, and the agent's is the one its dashboards mean."""
    envoy = istio_names(envoy)
    taken = set(_TYPE_LINE.findall(agent)) & set(_TYPE_LINE.findall(envoy))
    if taken:
        log.warning("Envoy families also named by the agent, left out: %s", sorted(taken))
        envoy = _without_families(envoy, taken)
    if agent and not agent.endswith("\n"):
        agent += "\n"
    return agent + envoy


def _without_families(text: str, names: set[str]) -> str:
    """TEXT without the families NAMES: from each one's ``# TYPE``/``# HELP`` line up to the
    next family's (Envoy writes every family as one block headed by its ``# TYPE``)."""
    kept = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if line.startswith(("# TYPE ", "# HELP ")):
            skipping = line.split(None, 3)[2] in names
        if not skipping:
            kept.append(line)
    return "".join(kept)


def serve_merged(
    host: str,
    port: int,
    registry: CollectorRegistry,
    envoy: EnvoyScrape | None,
    scrapes: Counter,
    failures: Counter,
) -> ThreadingHTTPServer:
    """The node's scrape endpoint on HOST:PORT (SCRAPE_PATHS; anything else is 404), served
    from a thread of its own. A scrape reads Envoy first, so this scrape's own failure is
    already counted in the agent's families it returns."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path not in SCRAPE_PATHS:
                self.send_error(404)
                return
            scrapes.inc()
            waits = self.headers.get("X-Prometheus-Scrape-Timeout-Seconds", "")
            body = scrape(registry, envoy, failures, url.query, _timeout(waits))
            data = body.encode()
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            if gzipped:  # what Prometheus asks for: Envoy's part is large and compresses well
                data = gzip.compress(data, compresslevel=1)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds would drown the agent's log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def scrape(
    registry: CollectorRegistry,
    envoy: EnvoyScrape | None,
    failures: Counter,
    query: str = "",
    timeout: float = ENVOY_SCRAPE_TIMEOUT,
) -> str:
    """One merged exposition. QUERY goes on to Envoy (re-encoded: it can only ever be a query
    of /stats/prometheus); a part that fails is left out, logged and counted, never the whole."""
    envoy_text = ""
    if envoy is not None:
        try:
            envoy_text = envoy(urlencode(parse_qsl(query, keep_blank_values=True)), timeout)
        except EnvoyAdminError as e:
            log.debug("merged scrape without Envoy's stats: %s", e)
            failures.labels(ENVOY).inc()
    try:
        agent_text = generate_latest(registry).decode()
    except Exception:  # a collector's bug must not cost the scrape Envoy's part
        log.exception("merged scrape without the agent's metrics")
        failures.labels(AGENT).inc()
        agent_text = ""
    return merge(agent_text, envoy_text)


def _timeout(scraper_waits: str) -> float:
    """How long Envoy may take: a little less than the scraper waits (SCRAPER_WAITS: the
    X-Prometheus-Scrape-Timeout-Seconds header Prometheus sends), else ENVOY_SCRAPE_TIMEOUT."""
    try:
        waits = float(scraper_waits)
    except ValueError:
        return ENVOY_SCRAPE_TIMEOUT
    if not math.isfinite(waits):
        return ENVOY_SCRAPE_TIMEOUT
    return min(max(waits * 0.9, 0.1), 60.0)
