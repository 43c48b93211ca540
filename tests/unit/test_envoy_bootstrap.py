"""The node Envoy's bootstrap: what it configures, and that the real Envoy accepts it."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from nodeagent.envoy import bootstrap, write_bootstrap
from tests.unit.envoy_validate import assert_envoy_accepts


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        c for c in config["static_resources"]["clusters"] if c["name"] == name
    )
    return found


def test_node_identity_and_ads_over_the_agent_socket(tmp_path: Path) -> None:
    config = bootstrap(
        "node-a~10.0.0.1", "nodeagent", tmp_path / "ads.sock", node_metadata={"z": "1"}
    )

    assert config["node"] == {
        "id": "node-a~10.0.0.1",
        "cluster": "nodeagent",
        "metadata": {"z": "1"},
    }
    ads = config["dynamic_resources"]["ads_config"]
    # Delta xDS by default: a change sends only what it touched.
    assert (ads["api_type"], ads["transport_api_version"]) == ("DELTA_GRPC", "V3")
    assert ads["set_node_on_first_message_only"] is True
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "xds-grpc"
    for kind in ("cds_config", "lds_config"):
        source = config["dynamic_resources"][kind]
        assert source["ads"] == {} and source["resource_api_version"] == "V3"
        # Envoy must leave init (and serve stats) even while the agent is away.
        assert source["initial_fetch_timeout"] == "5s"

    xds = _cluster(config, "xds-grpc")
    assert xds["type"] == "STATIC"
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": str(tmp_path / "ads.sock")}}
    options = xds["typed_extension_protocol_options"]
    (http,) = options.values()
    assert "http2_protocol_options" in http["explicit_http_config"]


def test_admin_on_a_private_unix_socket_and_prometheus_where_configured(tmp_path: Path) -> None:
    """Nothing on the node's network reaches Envoy's admin (it can POST /quitquitquit): it is a
    UNIX socket, mode 0600; :15090 binds the address given (the DaemonSet: the node IP)."""
    sock = tmp_path / "envoy-admin.sock"
    config = bootstrap(
        "n", "c", Path("/run/ads.sock"), admin_socket=sock, stats_host="10.1.2.3", stats_port=16090
    )

    assert config["admin"]["address"] == {"pipe": {"path": str(sock), "mode": 0o600}}
    (listener,) = config["static_resources"]["listeners"]
    assert listener["name"] == "prometheus"
    assert listener["address"]["socket_address"] == {"address": "10.1.2.3", "port_value": 16090}
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    # Only the metrics and Envoy's readiness (a probe of the envoy container) reach the admin.
    route, ready = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"] == {"prefix": "/stats/prometheus"}
    assert ready["match"] == {"path": "/ready"}
    assert ready["route"] == route["route"]
    stats = _cluster(config, route["route"]["cluster"])
    target = stats["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert target == {"pipe": {"path": str(sock), "mode": 0o600}}


def test_sidecar_form_keeps_istios_in_pod_tcp_admin() -> None:
    config = bootstrap("n", "c", Path("/run/ads.sock"), admin_port=16000)

    admin = config["admin"]["address"]["socket_address"]
    assert (admin["address"], admin["port_value"]) == ("127.0.0.1", 16000)


def test_stats_naming_identities_are_never_created_but_istios_own() -> None:
    """:15090 is unauthenticated: no stat of Envoy's own named after a calling identity
    (``~<ns>~<sa>``) or a SPIFFE ID (SDS secrets) exists. Istio's standard metrics are the
    exception, as at Istio: their principal labels are SPIFFE IDs (flat names below, as
    Envoy's matcher sees them: tag values included)."""
    config = bootstrap("n", "c", Path("/run/ads.sock"))

    patterns = config["stats_config"]["stats_matcher"]["exclusion_list"]["patterns"]
    assert {"contains": "~"} in patterns
    (regex,) = [re.compile(p["safe_regex"]["regex"]) for p in patterns if "safe_regex" in p]
    for private in (
        "sds.spiffe://cluster.local/ns/a/sa/b.update_success",
        "cluster.originate-mtls.transport_socket_match.spiffe://cluster.local/ns/a/sa/b.x",
        "istiocustomer.spiffe://x",
    ):
        assert regex.fullmatch(private), private  # Envoy's matchers match whole
    istio = "istiocustom.istio_requests_total.source_principal.spiffe://cluster.local/ns/a/sa/b"
    assert not regex.fullmatch(istio)


def test_envoy_sockets_carry_the_mesh_mark_and_connections_are_bounded() -> None:
    config = bootstrap("n", "c", Path("/run/ads.sock"))

    (option,) = config["cluster_manager"]["upstream_bind_config"]["socket_options"]
    assert option == {"level": 1, "name": 36, "int_value": 0x539}
    (monitor,) = config["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] >= 100_000
    assert "cluster_manager" not in bootstrap("n", "c", Path("/a"), socket_mark=None)


def test_write_bootstrap_is_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "envoy.json"
    path.parent.mkdir()
    path.write_text("old")

    written = write_bootstrap(path, bootstrap("n", "c", tmp_path / "ads.sock"))

    assert json.loads(path.read_text()) == written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["envoy.json"]  # no temp left


@pytest.mark.parametrize("fetch_timeout", [5.0, 0.25])
def test_real_envoy_validates_the_bootstrap(tmp_path: Path, fetch_timeout: float) -> None:
    path = tmp_path / "envoy.json"
    write_bootstrap(
        path,
        bootstrap(
            "node-a",
            "nodeagent",
            tmp_path / "ads.sock",
            admin_socket=tmp_path / "admin.sock",
            node_metadata={"NODE_NAME": "node-a"},
            initial_fetch_timeout=fetch_timeout,
        ),
    )

    assert_envoy_accepts(path)


def test_state_of_the_world_ads_on_request_and_nothing_else(tmp_path: Path) -> None:
    sotw = bootstrap("n", "c", tmp_path / "ads.sock", api_type="GRPC")
    assert sotw["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    with pytest.raises(ValueError, match="REST"):
        bootstrap("n", "c", tmp_path / "ads.sock", api_type="REST")
