"""DestinationRule traffic policy -> the Envoy cluster a sidecar would get (istio.io reference
page networking/destination-rule, and istio/istio pilot/pkg/networking/core/
cluster_traffic_policy.go, pilot/pkg/networking/util/util.go MergeSubsetTrafficPolicy,
route/route.go, networkfilter.go, which the module follows).

Every cluster below is built as the agent will build it: the policy's fields merged over the
service port's real EDS cluster (clusters._eds_cluster) and parsed into envoy.Cluster; the
assertions read the parsed cluster back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from istio_data import istio_data

from nodeagent import mesh
from nodeagent.mesh.model import Service, ServicePort
from nodeagent.translate import clusters, filters
from nodeagent.translate import destination_rule as dr
from nodeagent.translate.envoy import Cluster, RouteConfiguration, message
from nodeagent.translate.protocol import HTTP, HTTP2, TCP
from nodeagent.translate.services import ServiceTarget
from tests.unit.envoy_validate import assert_envoy_accepts

HOST = "ratings.prod.svc.cluster.local"
UNLIMITED = 4294967295
H2 = {"explicit_http_config": {"http2_protocol_options": {}}}


def cluster(policy: dict[str, Any], protocol: str = HTTP, port: int = 9080) -> dict[str, Any]:
    """The parsed Envoy cluster for POLICY on a PROTOCOL service port."""
    name = {HTTP: "http", HTTP2: "grpc", TCP: "tcp"}[protocol]
    svc = Service("prod", "ratings", "10.96.0.20", (ServicePort(port, name),), {"app": "r"})
    target = ServiceTarget(svc, svc.ports[0], HOST, protocol)
    fields = clusters._eds_cluster(target) | dr.cluster_fields(policy, protocol)
    parsed = json_format.MessageToDict(message(Cluster, fields), preserving_proto_field_name=True)
    return {"lb_policy": "ROUND_ROBIN"} | parsed  # proto3 JSON omits enum value 0


def thresholds(c: dict[str, Any]) -> dict[str, Any]:
    (only,) = c["circuit_breakers"]["thresholds"]
    return dict(only)


def http_options(c: dict[str, Any]) -> dict[str, Any]:
    options = dict(c["typed_extension_protocol_options"][dr.HTTP_OPTIONS])
    options.pop("@type")
    return options


def route_with(hash_policy: list[dict[str, Any]]) -> RouteConfiguration:
    """A route table holding one route with HASH_POLICY: proves it parses as Envoy's."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "c", "hash_policy": hash_policy}}
    return message(
        RouteConfiguration,
        {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
    )


# -- Istio's defaults ----------------------------------------------------------------------------


def test_no_policy_is_istios_default_outbound_cluster() -> None:
    """Without a DestinationRule istiod still applies a default traffic policy: connect timeout
    10s (MeshConfig default), LEAST_REQUEST (defaultLBAlgorithm), every circuit breaker
    threshold at 2^32-1 with track_remaining, no outlier detection, HTTP/1 upstream."""
    c = cluster({})
    assert c["connect_timeout"] == "10s"
    assert c["lb_policy"] == "LEAST_REQUEST"
    assert thresholds(c) == {
        "max_connections": UNLIMITED,
        "max_pending_requests": UNLIMITED,
        "max_requests": UNLIMITED,
        "max_retries": UNLIMITED,
        "track_remaining": True,
    }
    assert "outlier_detection" not in c and "common_lb_config" not in c
    assert "typed_extension_protocol_options" not in c
    assert "upstream_connection_options" not in c
    # The cluster is still the service port's EDS cluster.
    assert c["type"] == "EDS" and c["eds_cluster_config"]["service_name"].startswith("outbound|")


def test_no_policy_keeps_http2_upstream_for_grpc_ports() -> None:
    c = cluster({}, HTTP2)
    assert http_options(c) == H2
    assert cluster({}, TCP)["lb_policy"] == "LEAST_REQUEST"


# -- which policy applies: subsets and port-level settings -------------------------------------


def test_bookinfo_subsets_select_by_version_label() -> None:
    rules = {
        d["metadata"]["name"]: d["spec"]
        for d in yaml.safe_load_all(
            istio_data("bookinfo/networking/destination-rule-all.yaml").read_text()
        )
        if d
    }
    reviews = rules["reviews"]
    assert [dr.subset_labels(reviews, s) for s in ("v1", "v2", "v3")] == [
        {"version": "v1"},
        {"version": "v2"},
        {"version": "v3"},
    ]
    assert dr.subset_labels(reviews, "v4") is None  # no cluster: a route to it is 503 NC
    assert dr.subset_labels(rules["ratings"], "v2-mysql-vm") == {"version": "v2-mysql-vm"}
    for spec in rules.values():
        dr.check(spec)
        for subset in spec["subsets"]:
            # None of Bookinfo's rules sets a traffic policy: every subset is a default cluster.
            assert cluster(dr.traffic_policy(spec, 9080, subset["name"])) == cluster({})


def test_subset_without_labels_selects_every_endpoint() -> None:
    assert dr.subset_labels({"subsets": [{"name": "all"}]}, "all") == {}


def test_subset_policy_overrides_the_rules_docs_example() -> None:
    """The reference page's first example: LEAST_REQUEST for the service, ROUND_ROBIN for the
    subset testversion."""
    spec = {
        "host": HOST,
        "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
        "subsets": [
            {
                "name": "testversion",
                "labels": {"version": "v3"},
                "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
            }
        ],
    }
    assert cluster(dr.traffic_policy(spec, 9080))["lb_policy"] == "LEAST_REQUEST"
    assert cluster(dr.traffic_policy(spec, 9080, "testversion"))["lb_policy"] == "ROUND_ROBIN"


def test_port_level_settings_docs_example() -> None:
    """The reference page's port example: LEAST_REQUEST on port 80, ROUND_ROBIN on 9080."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "portLevelSettings": [
                {"port": {"number": 80}, "loadBalancer": {"simple": "LEAST_REQUEST"}},
                {"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}},
            ]
        },
    }
    assert cluster(dr.traffic_policy(spec, 80), port=80)["lb_policy"] == "LEAST_REQUEST"
    assert cluster(dr.traffic_policy(spec, 9080))["lb_policy"] == "ROUND_ROBIN"
    assert "portLevelSettings" not in dr.traffic_policy(spec, 9080)


def test_port_level_settings_do_not_inherit_the_rules_parts() -> None:
    """ "Traffic settings specified at the destination-level will not be inherited when
    overridden by port-level settings": a port entry that sets only the load balancer gets the
    default connection pool and no outlier detection."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 100}},
            "outlierDetection": {"consecutive5xxErrors": 7},
            "portLevelSettings": [
                {"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}},
            ],
        },
    }
    on_port = cluster(dr.traffic_policy(spec, 9080))
    assert on_port["lb_policy"] == "RANDOM"
    assert thresholds(on_port)["max_connections"] == UNLIMITED
    assert "outlier_detection" not in on_port
    other = cluster(dr.traffic_policy(spec, 8080), port=8080)
    assert thresholds(other)["max_connections"] == 100
    assert other["outlier_detection"]["consecutive_5xx"] == 7
    assert other["lb_policy"] == "LEAST_REQUEST"


def test_subset_parts_replace_the_rules_parts_whole() -> None:
    """A part the subset sets replaces the rule's part (no merge inside connectionPool); parts
    it does not set are the rule's."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 100}},
            "outlierDetection": {"consecutive5xxErrors": 3},
        },
        "subsets": [
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {"connectionPool": {"http": {"maxRetries": 2}}},
            }
        ],
    }
    c = cluster(dr.traffic_policy(spec, 9080, "v2"))
    assert thresholds(c)["max_connections"] == UNLIMITED  # the rule's tcp part is gone
    assert thresholds(c)["max_retries"] == 2
    assert c["outlier_detection"]["consecutive_5xx"] == 3  # inherited


def test_subset_over_the_rules_port_level_settings() -> None:
    """The rule's port entry replaces its top level first; the subset's parts then override
    the port entry's, part by part."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "loadBalancer": {"simple": "RANDOM"},
            "portLevelSettings": [
                {
                    "port": {"number": 9080},
                    "loadBalancer": {"simple": "ROUND_ROBIN"},
                    "connectionPool": {"tcp": {"maxConnections": 5}},
                }
            ],
        },
        "subsets": [
            {
                "name": "v1",
                "labels": {"version": "v1"},
                "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
            }
        ],
    }
    c = cluster(dr.traffic_policy(spec, 9080, "v1"))
    assert c["lb_policy"] == "LEAST_REQUEST"
    assert thresholds(c)["max_connections"] == 5
    assert cluster(dr.traffic_policy(spec, 9080))["lb_policy"] == "ROUND_ROBIN"
    assert cluster(dr.traffic_policy(spec, 80, "v1"), port=80)["lb_policy"] == "LEAST_REQUEST"


def test_subset_port_level_settings_replace_every_part() -> None:
    """A subset's port entry for the port replaces all four parts, including the ones it does
    not set (which fall back to the defaults)."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 100}},
            "outlierDetection": {"consecutive5xxErrors": 3},
        },
        "subsets": [
            {
                "name": "v1",
                "labels": {"version": "v1"},
                "trafficPolicy": {
                    "loadBalancer": {"simple": "RANDOM"},
                    "portLevelSettings": [
                        {"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}
                    ],
                },
            }
        ],
    }
    on_port = cluster(dr.traffic_policy(spec, 9080, "v1"))
    assert on_port["lb_policy"] == "ROUND_ROBIN"
    assert thresholds(on_port)["max_connections"] == UNLIMITED
    assert "outlier_detection" not in on_port
    other = cluster(dr.traffic_policy(spec, 80, "v1"), port=80)
    assert other["lb_policy"] == "RANDOM"
    assert thresholds(other)["max_connections"] == 100
    assert other["outlier_detection"]["consecutive_5xx"] == 3


def test_subset_policy_alone_and_unknown_subset() -> None:
    spec = {
        "host": HOST,
        "subsets": [
            {"name": "v1", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
            {"name": "v2"},
        ],
    }
    assert cluster(dr.traffic_policy(spec, 9080, "v1"))["lb_policy"] == "RANDOM"
    assert dr.traffic_policy(spec, 9080, "v2") == {}
    with pytest.raises(ValueError, match=r"subsets: no subset named 'v9'"):
        dr.traffic_policy(spec, 9080, "v9")


# -- connectionPool ------------------------------------------------------------------------------


def test_tcp_settings_docs_example() -> None:
    """The reference page's TCP example: 100 connections, 30ms connect timeout, keepalive."""
    c = cluster(
        {
            "connectionPool": {
                "tcp": {
                    "maxConnections": 100,
                    "connectTimeout": "30ms",
                    "tcpKeepalive": {"time": "7200s", "interval": "75s"},
                }
            }
        }
    )
    assert thresholds(c)["max_connections"] == 100
    assert thresholds(c)["max_pending_requests"] == UNLIMITED
    assert c["connect_timeout"] == "0.030s"
    assert c["upstream_connection_options"] == {
        "tcp_keepalive": {"keepalive_time": 7200, "keepalive_interval": 75}
    }


def test_tcp_keepalive_probes_and_whole_seconds() -> None:
    """Istio sets SO_KEEPALIVE even for an empty tcpKeepalive, and passes whole seconds."""
    c = cluster({"connectionPool": {"tcp": {"tcpKeepalive": {}}}})
    assert c["upstream_connection_options"] == {"tcp_keepalive": {}}
    c = cluster({"connectionPool": {"tcp": {"tcpKeepalive": {"probes": 3, "time": "1m30.9s"}}}})
    assert c["upstream_connection_options"]["tcp_keepalive"] == {
        "keepalive_probes": 3,
        "keepalive_time": 90,
    }


def test_http_settings_docs_example() -> None:
    c = cluster(
        {"connectionPool": {"http": {"http2MaxRequests": 1000, "maxRequestsPerConnection": 10}}}
    )
    assert thresholds(c)["max_requests"] == 1000
    assert http_options(c) == {
        "common_http_protocol_options": {"max_requests_per_connection": 10},
        "explicit_http_config": {"http_protocol_options": {}},
    }


def test_http_limits_pending_retries_idle_and_lifetime() -> None:
    c = cluster(
        {
            "connectionPool": {
                "http": {"http1MaxPendingRequests": 7, "maxRetries": 4, "idleTimeout": "1.5s"},
                "tcp": {"maxConnectionDuration": "1h", "idleTimeout": "9s"},
            }
        },
        HTTP2,
    )
    assert thresholds(c)["max_pending_requests"] == 7 and thresholds(c)["max_retries"] == 4
    assert http_options(c) == {
        "common_http_protocol_options": {
            "idle_timeout": "1.500s",
            "max_connection_duration": "3600s",
        },
        **H2,
    }
    # Without an HTTP idle timeout the TCP one applies.
    c = cluster({"connectionPool": {"tcp": {"idleTimeout": "9s"}}})
    assert http_options(c)["common_http_protocol_options"] == {"idle_timeout": "9s"}


def test_zero_counts_mean_unset() -> None:
    """Istio cannot tell 0 from unset: a 0 limit leaves the threshold unlimited."""
    c = cluster({"connectionPool": {"tcp": {"maxConnections": 0}, "http": {"maxRetries": 0}}})
    assert thresholds(c)["max_connections"] == UNLIMITED
    assert thresholds(c)["max_retries"] == UNLIMITED


def test_h2_upgrade_policy() -> None:
    upgrade = {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}
    assert http_options(cluster(upgrade)) == H2
    assert http_options(cluster(upgrade, TCP)) == H2  # the user says the port speaks HTTP
    for policy in ("DEFAULT", "DO_NOT_UPGRADE"):
        c = cluster({"connectionPool": {"http": {"h2UpgradePolicy": policy}}})
        assert "typed_extension_protocol_options" not in c
    # An HTTP2 port stays HTTP/2 whatever the policy says.
    dont = {"connectionPool": {"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE"}}}
    assert http_options(cluster(dont, HTTP2)) == H2


def test_max_concurrent_streams_applies_to_http2_clusters_only() -> None:
    streams = {"http": {"maxConcurrentStreams": 50}}
    c = cluster({"connectionPool": streams}, HTTP2)
    assert http_options(c) == {
        "common_http_protocol_options": {},
        "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 50}},
    }
    upgraded = {"http": {**streams["http"], "h2UpgradePolicy": "UPGRADE"}}
    c = cluster({"connectionPool": upgraded})
    assert http_options(c)["explicit_http_config"]["http2_protocol_options"] == {
        "max_concurrent_streams": 50
    }
    c = cluster({"connectionPool": streams})
    assert http_options(c)["explicit_http_config"] == {"http_protocol_options": {}}


def test_http2_keepalive_pings_http2_connections_only() -> None:
    """connectionPool.http.http2KeepAlive: HTTP/2 PING frames on upstream connections
    (istio.io/latest/docs/reference/config/networking/destination-rule/#ConnectionPoolSettings-HTTPSettings),
    Envoy's Http2ProtocolOptions.connection_keepalive; an HTTP/1 cluster has no PING to send."""
    ping = {"http": {"http2KeepAlive": {"interval": "30s", "timeout": "0.5s"}}}
    expected = {"interval": "30s", "timeout": "0.500s"}
    c = cluster({"connectionPool": ping}, HTTP2)
    assert http_options(c)["explicit_http_config"]["http2_protocol_options"] == {
        "connection_keepalive": expected
    }
    upgraded = {"http": {**ping["http"], "h2UpgradePolicy": "UPGRADE"}}
    c = cluster({"connectionPool": upgraded})
    assert http_options(c)["explicit_http_config"]["http2_protocol_options"] == {
        "connection_keepalive": expected
    }
    assert "typed_extension_protocol_options" not in cluster({"connectionPool": ping})
    client = {"http": {**ping["http"], "useClientProtocol": True}}
    c = cluster({"connectionPool": client}, HTTP2)
    assert http_options(c)["use_downstream_protocol_config"]["http2_protocol_options"] == {
        "connection_keepalive": expected
    }


def test_http2_keepalive_without_timeout_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"http2KeepAlive\.timeout"):
        cluster({"connectionPool": {"http": {"http2KeepAlive": {"interval": "1s"}}}}, HTTP2)


def test_use_client_protocol() -> None:
    c = cluster(
        {"connectionPool": {"http": {"useClientProtocol": True, "h2UpgradePolicy": "UPGRADE"}}},
        HTTP2,
    )
    assert http_options(c) == {
        "use_downstream_protocol_config": {
            "http_protocol_options": {},
            "http2_protocol_options": {},
        }
    }


# -- loadBalancer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("simple", "lb_policy"),
    [
        ("ROUND_ROBIN", "ROUND_ROBIN"),
        ("LEAST_REQUEST", "LEAST_REQUEST"),
        ("LEAST_CONN", "LEAST_REQUEST"),
        ("RANDOM", "RANDOM"),
        ("UNSPECIFIED", "LEAST_REQUEST"),
    ],
)
def test_simple_load_balancers(simple: str, lb_policy: str) -> None:
    c = cluster({"loadBalancer": {"simple": simple}})
    assert c["lb_policy"] == lb_policy and c["type"] == "EDS"


def test_passthrough_is_an_original_destination_cluster() -> None:
    """PASSTHROUGH: Istio makes the cluster ORIGINAL_DST / CLUSTER_PROVIDED, without EDS."""
    c = cluster({"loadBalancer": {"simple": "PASSTHROUGH"}})
    assert c["type"] == "ORIGINAL_DST" and c["lb_policy"] == "CLUSTER_PROVIDED"
    assert "eds_cluster_config" not in c


def test_warmup() -> None:
    c = cluster({"loadBalancer": {"simple": "ROUND_ROBIN", "warmupDurationSecs": "60s"}})
    assert c["round_robin_lb_config"] == {"slow_start_config": {"slow_start_window": "60s"}}
    c = cluster({"loadBalancer": {"warmup": {"duration": "30s"}}})  # default LEAST_REQUEST
    assert c["least_request_lb_config"] == {
        "slow_start_config": {
            "slow_start_window": "30s",
            "aggression": {"default_value": 1.0, "runtime_key": "("},
            "min_weight_percent": {"value": 10.0},
        }
    }
    c = cluster(
        {
            "loadBalancer": {
                "simple": "ROUND_ROBIN",
                "warmup": {"duration": "1m", "aggression": 2.5, "minimumPercent": 25},
            }
        }
    )
    slow = c["round_robin_lb_config"]["slow_start_config"]
    assert slow["slow_start_window"] == "60s"
    assert slow["aggression"]["default_value"] == 2.5
    assert slow["min_weight_percent"] == {"value": 25.0}
    assert "round_robin_lb_config" not in cluster({"loadBalancer": {"simple": "RANDOM"}})


def test_consistent_hash_cluster_policies() -> None:
    ring = cluster({"loadBalancer": {"consistentHash": {"ringHash": {"minimumRingSize": 4096}}}})
    assert ring["lb_policy"] == "RING_HASH"
    assert ring["ring_hash_lb_config"] == {"minimum_ring_size": "4096"}
    ring = cluster({"loadBalancer": {"consistentHash": {"ringHash": {}}}})
    assert ring["lb_policy"] == "RING_HASH" and "ring_hash_lb_config" not in ring
    maglev = cluster({"loadBalancer": {"consistentHash": {"maglev": {"tableSize": 65537}}}})
    assert maglev["lb_policy"] == "MAGLEV"
    assert maglev["maglev_lb_config"] == {"table_size": "65537"}
    # Neither: a ring hash with the legacy minimumRingSize, else Envoy's 1024.
    legacy = cluster({"loadBalancer": {"consistentHash": {"minimumRingSize": 2048}}})
    assert legacy["ring_hash_lb_config"] == {"minimum_ring_size": "2048"}
    header = cluster({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}})
    assert header["lb_policy"] == "RING_HASH"
    assert header["ring_hash_lb_config"] == {"minimum_ring_size": "1024"}


def test_maglev_table_size_must_be_prime() -> None:
    """Envoy rejects a non-prime Maglev table: the error names the field instead."""
    policy = {"loadBalancer": {"consistentHash": {"maglev": {"tableSize": 1000}}}}
    with pytest.raises(ValueError, match=r"trafficPolicy.loadBalancer.consistentHash.maglev"):
        dr.cluster_fields(policy, HTTP)


# -- outlierDetection ----------------------------------------------------------------------------


def test_outlier_detection_docs_example() -> None:
    c = cluster(
        {
            "outlierDetection": {
                "consecutive5xxErrors": 7,
                "interval": "5m",
                "baseEjectionTime": "15m",
            }
        }
    )
    assert c["outlier_detection"] == {
        "consecutive_5xx": 7,
        "enforcing_consecutive_5xx": 100,
        "enforcing_success_rate": 0,
        "interval": "300s",
        "base_ejection_time": "900s",
    }
    # Istio disables the panic threshold (Envoy's default is 50%) when minHealthPercent is unset.
    assert c["common_lb_config"] == {"healthy_panic_threshold": {}}


def test_outlier_detection_every_field() -> None:
    c = cluster(
        {
            "outlierDetection": {
                "consecutive5xxErrors": 0,
                "consecutiveGatewayErrors": 2,
                "consecutiveLocalOriginFailures": 4,
                "splitExternalLocalOriginErrors": True,
                "maxEjectionPercent": 100,
                "minHealthPercent": 30,
            }
        }
    )
    assert c["outlier_detection"] == {
        "consecutive_5xx": 0,
        "enforcing_consecutive_5xx": 0,  # 0 turns 5xx ejection off
        "consecutive_gateway_failure": 2,
        "enforcing_consecutive_gateway_failure": 100,
        "enforcing_success_rate": 0,
        "max_ejection_percent": 100,
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 4,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_local_origin_success_rate": 0,
    }
    assert c["common_lb_config"] == {"healthy_panic_threshold": {"value": 30.0}}


def test_outlier_detection_defaults_are_envoys() -> None:
    """Unset counts are left to Envoy (5 consecutive 5xx enforced, gateway errors counted
    but not enforced); local-origin failures count only with splitExternalLocalOriginErrors."""
    c = cluster({"outlierDetection": {"consecutiveLocalOriginFailures": 4}})
    assert c["outlier_detection"] == {"enforcing_success_rate": 0}


def test_s3_circuit_breaking_and_outlier_detection() -> None:
    """SCENARIOS S3 on httpbin: one connection, one pending request, one request per
    connection; eject a host after one 5xx for 3 minutes, every host may be ejected."""
    c = cluster(
        {
            "connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1},
            },
            "outlierDetection": {
                "consecutive5xxErrors": 1,
                "interval": "1s",
                "baseEjectionTime": "3m",
                "maxEjectionPercent": 100,
            },
        },
        port=8000,
    )
    assert thresholds(c) == {
        "max_connections": 1,
        "max_pending_requests": 1,
        "max_requests": UNLIMITED,
        "max_retries": UNLIMITED,
        "track_remaining": True,
    }
    assert http_options(c)["common_http_protocol_options"] == {"max_requests_per_connection": 1}
    assert c["outlier_detection"] == {
        "consecutive_5xx": 1,
        "enforcing_consecutive_5xx": 100,
        "enforcing_success_rate": 0,
        "interval": "1s",
        "base_ejection_time": "180s",
        "max_ejection_percent": 100,
    }


# -- consistent hash on routes, tcp_proxy --------------------------------------------------------


@pytest.mark.parametrize(
    ("consistent_hash", "expected"),
    [
        ({"httpHeaderName": "x-user"}, [{"header": {"header_name": "x-user"}}]),
        (
            {"httpCookie": {"name": "user", "ttl": "0s"}},
            [{"cookie": {"name": "user", "ttl": "0s"}}],
        ),
        (
            {
                "httpCookie": {
                    "name": "s",
                    "path": "/a",
                    "ttl": "1h",
                    "attributes": [{"name": "SameSite", "value": "Strict"}, {"name": "Secure"}],
                }
            },
            [
                {
                    "cookie": {
                        "name": "s",
                        "path": "/a",
                        "ttl": "3600s",
                        "attributes": [{"name": "SameSite", "value": "Strict"}, {"name": "Secure"}],
                    }
                }
            ],
        ),
        ({"useSourceIp": True}, [{"connection_properties": {"source_ip": True}}]),
        ({"httpQueryParameterName": "u"}, [{"query_parameter": {"name": "u"}}]),
        ({"ringHash": {"minimumRingSize": 8}}, []),
    ],
)
def test_hash_policy(consistent_hash: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    policy = {"loadBalancer": {"consistentHash": consistent_hash}}
    got = dr.hash_policy(policy)
    assert got == expected
    parsed = json_format.MessageToDict(route_with(got), preserving_proto_field_name=True)[
        "virtual_hosts"
    ][0]["routes"][0]["route"]
    assert parsed.get("hash_policy", []) == expected


def test_no_hash_policy_without_consistent_hash() -> None:
    assert dr.hash_policy({}) == []
    assert dr.hash_policy({"loadBalancer": {"simple": "ROUND_ROBIN"}}) == []


def test_route_hash_policy_follows_istios_route_lookup() -> None:
    """hashForHTTPDestination: subset port entry, subset, rule port entry, then the rule."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"httpHeaderName": "rule"}},
            "portLevelSettings": [
                {
                    "port": {"number": 9080},
                    "loadBalancer": {"consistentHash": {"httpHeaderName": "rule-port"}},
                }
            ],
        },
        "subsets": [
            {
                "name": "v1",
                "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"httpHeaderName": "subset"}},
                    "portLevelSettings": [
                        {
                            "port": {"number": 9080},
                            "loadBalancer": {"consistentHash": {"httpHeaderName": "subset-port"}},
                        }
                    ],
                },
            },
            {"name": "v2"},
        ],
    }

    def header(port: int | None, subset: str = "") -> str:
        (only,) = dr.route_hash_policy(spec, port, subset)
        return str(only["header"]["header_name"])

    assert header(9080, "v1") == "subset-port"
    assert header(80, "v1") == "subset"
    assert header(9080, "v2") == "rule-port"
    assert header(9080) == "rule-port"
    assert header(None) == "rule"  # port-level settings need a destination port
    assert header(80) == "rule"
    assert dr.route_hash_policy({"host": HOST}, 80) == []


def test_tcp_proxy_fields() -> None:
    """networkfilter.go: idle timeout and connection lifetime from the rule's top-level tcp
    settings only; a source IP hash unless the subset's own load balancer says otherwise."""
    spec = {
        "host": HOST,
        "trafficPolicy": {
            "connectionPool": {"tcp": {"idleTimeout": "30s", "maxConnectionDuration": "10m"}},
            "loadBalancer": {"consistentHash": {"useSourceIp": True}},
            "portLevelSettings": [
                {"port": {"number": 5432}, "connectionPool": {"tcp": {"idleTimeout": "1s"}}}
            ],
        },
        "subsets": [
            {"name": "v1", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
            {"name": "v2", "trafficPolicy": {"connectionPool": {"tcp": {"idleTimeout": "2s"}}}},
        ],
    }
    assert dr.tcp_proxy_fields(spec) == {
        "idle_timeout": "30s",
        "max_downstream_connection_duration": "600s",
        "hash_policy": [{"source_ip": {}}],
    }
    assert "hash_policy" not in dr.tcp_proxy_fields(spec, "v1")
    assert dr.tcp_proxy_fields(spec, "v2")["hash_policy"] == [{"source_ip": {}}]
    assert dr.tcp_proxy_fields({"host": HOST}) == {}


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (
            {"trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "soon"}}}},
            "trafficPolicy.connectionPool.tcp.connectTimeout",
        ),
        (
            {"trafficPolicy": {"outlierDetection": {"interval": "-1s"}}},
            "trafficPolicy.outlierDetection.interval",
        ),
        (
            {"trafficPolicy": {"outlierDetection": {"maxEjectionPercent": 101}}},
            "trafficPolicy.outlierDetection.maxEjectionPercent",
        ),
        (
            {
                "trafficPolicy": {
                    "portLevelSettings": [
                        {"port": {"number": 80}},
                        {
                            "port": {"number": 81},
                            "connectionPool": {"http": {"http1MaxPendingRequests": -1}},
                        },
                    ]
                }
            },
            r"trafficPolicy.portLevelSettings\[1\].connectionPool.http.http1MaxPendingRequests",
        ),
        (
            {
                "subsets": [
                    {"name": "v1"},
                    {"name": "v2", "trafficPolicy": {"loadBalancer": {"warmupDurationSecs": "1x"}}},
                ]
            },
            r"subsets\[1\].trafficPolicy.loadBalancer.warmupDurationSecs",
        ),
        (
            {
                "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"httpCookie": {"name": "c", "ttl": "1d"}}}
                }
            },
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        ),
    ],
)
def test_untranslatable_input_names_the_field(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(ValueError, match=path):
        dr.check({"host": HOST, **spec})


@pytest.mark.parametrize(
    ("text", "proto"),
    [
        ("10s", "10s"),
        ("0.5s", "0.500s"),
        ("1m30s", "90s"),
        ("100ms", "0.100s"),
        ("1h", "3600s"),
        ("1.5h", "5400s"),
        ("250us", "0.000250s"),
        ("0", "0s"),
        ("3ns", "0.000000003s"),
    ],
)
def test_durations_in_go_syntax(text: str, proto: str) -> None:
    """Istio's CRDs take Go durations; Envoy gets proto3 JSON seconds (equal after parsing)."""
    c = cluster({"connectionPool": {"tcp": {"connectTimeout": text}}})
    assert c["connect_timeout"] == proto


# -- Envoy accepts it ----------------------------------------------------------------------------

EVERYTHING = {
    "connectionPool": {
        "tcp": {
            "maxConnections": 3,
            "connectTimeout": "250ms",
            "tcpKeepalive": {"probes": 2, "time": "30s", "interval": "5s"},
            "maxConnectionDuration": "1h",
            "idleTimeout": "20s",
        },
        "http": {
            "http1MaxPendingRequests": 4,
            "http2MaxRequests": 5,
            "maxRequestsPerConnection": 6,
            "maxRetries": 7,
            "idleTimeout": "10s",
            "h2UpgradePolicy": "UPGRADE",
            "maxConcurrentStreams": 8,
        },
    },
    "outlierDetection": {
        "consecutive5xxErrors": 1,
        "consecutiveGatewayErrors": 2,
        "consecutiveLocalOriginFailures": 3,
        "splitExternalLocalOriginErrors": True,
        "interval": "1s",
        "baseEjectionTime": "3m",
        "maxEjectionPercent": 100,
        "minHealthPercent": 20,
    },
    "loadBalancer": {"simple": "ROUND_ROBIN", "warmup": {"duration": "10s", "aggression": 2}},
}
BALANCERS = [
    {"simple": "LEAST_REQUEST", "warmupDurationSecs": "5s"},
    {"simple": "RANDOM"},
    {"simple": "PASSTHROUGH"},
    {"consistentHash": {"httpHeaderName": "x", "ringHash": {"minimumRingSize": 64}}},
    {"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 65537}}},
    {"consistentHash": {"httpQueryParameterName": "q", "minimumRingSize": 128}},
    {
        "consistentHash": {
            "httpCookie": {"name": "c", "path": "/", "ttl": "1h", "attributes": [{"name": "a"}]}
        }
    },
]


def test_real_envoy_accepts_every_translated_field(tmp_path: Path) -> None:
    """The clusters, route hash policies and tcp_proxy fields, in a static bootstrap that the
    venv's Envoy checks in validate mode (EDS swapped for a static endpoint: validate mode
    has no ADS server)."""
    policies = [
        (EVERYTHING, HTTP),
        (EVERYTHING, HTTP2),
        ({"connectionPool": {"http": {"useClientProtocol": True}}}, HTTP),
        *(({"loadBalancer": lb}, HTTP) for lb in BALANCERS),
    ]
    static_clusters = []
    for i, (policy, protocol) in enumerate(policies):
        fields = cluster(policy, protocol, port=8000 + i)
        fields["name"] = f"c{i}"
        if fields["type"] == "EDS":
            del fields["eds_cluster_config"]
            fields["type"] = "STATIC"
            address = {"socket_address": {"address": "127.0.0.1", "port_value": 9}}
            fields["load_assignment"] = {
                "cluster_name": f"c{i}",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            }
        static_clusters.append(fields)
    routes = [
        {
            "match": {"prefix": f"/{i}"},
            "route": {"cluster": "c0", "hash_policy": dr.hash_policy({"loadBalancer": lb})},
        }
        for i, lb in enumerate(BALANCERS)
    ]
    http = filters.http_connection_manager("h", "r", "outbound", "p")
    del http["typed_config"]["rds"]
    http["typed_config"]["route_config"] = {
        "name": "r",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}],
    }
    tcp = filters.tcp_proxy("t", "c0", "outbound", "p")
    tcp["typed_config"] |= dr.tcp_proxy_fields(
        {"trafficPolicy": EVERYTHING | {"loadBalancer": BALANCERS[4]}}
    )
    listeners = [
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [chain]}],
        }
        for name, chain in (("http", http), ("tcp", tcp))
    ]
    path = tmp_path / "envoy.json"
    bootstrap = {"static_resources": {"clusters": static_clusters, "listeners": listeners}}
    path.write_text(json.dumps(bootstrap))
    assert tcp["typed_config"]["hash_policy"] == [{"source_ip": {}}]

    assert_envoy_accepts(path)


def _trafficpolicy_schema() -> dict[str, Any]:
    crds = Path(mesh.__file__).parent / "crds" / "crd-all.gen.yaml"
    for doc in yaml.safe_load_all(crds.read_text()):
        if doc and doc.get("spec", {}).get("names", {}).get("kind") == "DestinationRule":
            spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            return dict(spec["properties"]["trafficPolicy"])
    raise AssertionError("no DestinationRule CRD")


def test_untranslated_fields_exist_and_leave_the_cluster_alone() -> None:
    """NOT_TRANSLATED names real fields of Istio's CRD (so the README list stays honest), and
    setting one changes nothing in the cluster."""
    schema = _trafficpolicy_schema()
    samples: dict[str, Any] = {
        "loadBalancer.zoneAwareLbSetting": {"enabled": True},
        "loadBalancer.backendUtilization": {},
        "outlierDetection.outlierDetectionHttpErrorCodes": [500],
        "outlierDetection.consecutiveErrors": 3,
        "proxyProtocol": {"version": "V2"},
        "tunnel": {"protocol": "CONNECT", "targetHost": "h", "targetPort": 80},
        "retryBudget": {"percent": 10},
    }
    assert sorted(samples) == sorted(dr.NOT_TRANSLATED)
    for path, value in samples.items():
        node = schema
        for key in path.split("."):
            node = node["properties"][key]
        policy: dict[str, Any] = {}
        *parents, last = path.split(".")
        at = policy
        for key in parents:
            at = at.setdefault(key, {})
        at[last] = value
        # An outlierDetection block turns outlier detection on by itself: compare with an empty one.
        base = {"outlierDetection": {}} if parents == ["outlierDetection"] else {}
        assert cluster(policy) == cluster(base), path
