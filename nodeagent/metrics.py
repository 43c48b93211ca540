"""Prometheus metrics of the node agent, served on the node (Istio's agent port, :15020).

:15020 answers anyone who reaches the node's address, so it names no pod and no identity: pods
are counted by capture state (each pod's own state is `nodeagent pods`, over the root-only
socket, and on the pod itself as an annotation).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from nodeagent.redirect.registry import STATES


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
