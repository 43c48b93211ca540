"""Prometheus metrics of the xDS server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nodeagent.xds.types import SHORT_NAMES


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "nodeagent_xds_pushes",
            "xDS responses sent to Envoy, by type (CDS, EDS, LDS, RDS, SDS).",
            ["type"],
            registry=registry,
        )
        # What each push cost on the wire: a state-of-the-world response carries every resource
        # of its type, a delta response only the changed ones (bench/convergence reads this).
        self.sent_bytes = Counter(
            "nodeagent_xds_sent_bytes",
            "Bytes of serialized xDS responses sent to Envoy, by type.",
            ["type"],
            registry=registry,
        )
        self.nacks = Counter(
            "nodeagent_xds_nacks",
            "xDS responses Envoy rejected (NACK), by type.",
            ["type"],
            registry=registry,
        )
        # A series per type from the start: "no NACK yet" is 0, not an empty dashboard panel.
        for name in SHORT_NAMES.values():
            self.nacks.labels(name)
        self.push_seconds = Histogram(
            "nodeagent_xds_push_seconds",
            "Seconds from a snapshot being set (or the stream opening) to Envoy's ACK, by type.",
            ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.connected = Gauge(
            "nodeagent_xds_connected_proxies",
            "Envoy node ids with at least one open ADS stream.",
            registry=registry,
        )
