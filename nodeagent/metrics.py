"""Prometheus metrics of the node agent, served on the node (Istio's agent port, :15020).

:15020 answers anyone who reaches the node's address, so it names no identity (no SPIFFE ID, no
service account) and says nothing of a pod's capture beyond counts by state (each pod's own state
is `nodeagent pods`, over the root-only socket, and on the pod itself as an annotation). Pod
names do appear in one family, the denials each pod's AuthorizationPolicies made: a pod's name is
no secret (Prometheus's Kubernetes discovery labels every scraped pod with it, and Istio's own
sidecars export their denials per pod, each from its own Envoy), and a per-pod count is what
tells which workload is refusing traffic (issue #17).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily

from nodeagent.envoy.admin import EnvoyAdminError
from nodeagent.redirect.registry import STATES
from nodeagent.translate import denials

log = logging.getLogger(__name__)

DENIALS = "nodeagent_authz_denials"
_DENIAL_LABELS = ["namespace", "pod", "path", "protocol", "action"]


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
        self._pod_states: dict[tuple[str, str], str] = {}

    def set_pod_state(self, namespace: str, pod: str, state: str) -> None:
        self._pod_states[(namespace, pod)] = state
        self._count()

    def forget_pod(self, namespace: str, pod: str) -> None:
        self._pod_states.pop((namespace, pod), None)
        self._count()

    def _count(self) -> None:
        for state in STATES:
            self.pods.labels(state).set(sum(1 for s in self._pod_states.values() if s == state))

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
