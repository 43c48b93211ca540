"""The node's one scrape endpoint (:15020/stats/prometheus, #19): the agent's metrics merged with
the node Envoy's, Istio's standard metrics under Istio's names (Envoy prints the stats logger's
``istiocustom`` scope as ``envoy_istiocustom_<name>``), one ``# TYPE`` per family, and the
agent's part served when Envoy does not answer. The Envoy text is Envoy 1.40's own output
(tests/data/envoy/stats-prometheus-istiocustom.txt)."""

from __future__ import annotations

import gzip
import re
import socketserver
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest
from local_http import free_port, get
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.envoy.admin import EnvoyAdmin, EnvoyAdminError
from nodeagent.metrics import CONTENT_TYPE, AgentMetrics, istio_names, merge
from nodeagent.redirect.registry import STATES
from nodeagent.xds.metrics import XdsMetrics

ENVOY_TEXT = (
    Path(__file__).parents[1] / "data" / "envoy" / "stats-prometheus-istiocustom.txt"
).read_text()


def type_lines(text: str) -> list[str]:
    return re.findall(r"^# TYPE (\S+)", text, re.M)


def test_istio_families_get_istios_names_and_nothing_else_changes() -> None:
    renamed = istio_names(ENVOY_TEXT)
    assert "envoy_istiocustom_" not in renamed
    assert "# TYPE istio_requests_total counter" in renamed
    assert "# TYPE istio_request_duration_milliseconds histogram" in renamed
    assert "# TYPE istio_tcp_sent_bytes_total counter" in renamed
    samples = [line for line in renamed.splitlines() if line.startswith("istio_requests_total{")]
    assert [s.split(",")[0] for s in samples] == [
        'istio_requests_total{reporter="destination"',
        'istio_requests_total{reporter="source"',
    ]
    for suffix in ("_bucket{", "_sum{", "_count{"):
        assert f"\nistio_request_duration_milliseconds{suffix}" in renamed
    # Envoy's own families keep their names; only the prefix at a name's start is removed.
    assert "envoy_server_live{} 1" in renamed and "envoy_cluster_upstream_rq_total{" in renamed
    assert renamed.count("\n") == ENVOY_TEXT.count("\n")
    value = 'envoy_cluster_upstream_rq_total{envoy_cluster_name="envoy_istiocustom_x"} 1\n'
    assert istio_names(value) == value


def test_a_side_the_reporter_does_not_know_is_unknown_as_at_istio() -> None:
    """Istio's reference (istio.io/latest/docs/reference/config/metrics/) reports what a proxy
    cannot tell as ``unknown``; the stats logger leaves it empty (translate/istio_stats.py)."""
    envoy = (
        'envoy_istiocustom_istio_requests_total{reporter="source",source_workload="sleep",'
        'destination_workload="",destination_service_name="",request_protocol="http",'
        'response_code="503",grpc_response_status="",response_flags="UH"} 1\n'
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="",destination_x=""} 1\n'
    )
    first, other = istio_names(envoy).splitlines()
    assert 'destination_workload="unknown",destination_service_name="unknown"' in first
    assert 'source_workload="sleep"' in first and 'grpc_response_status=""' in first
    assert other == 'envoy_cluster_upstream_rq_total{envoy_cluster_name="",destination_x=""} 1'


def test_merged_text_parses_with_one_type_line_per_family() -> None:
    agent = AgentMetrics()
    agent.set_pod_state("shop", "web-1", "captured")
    merged = merge(generate_latest(agent.registry).decode(), ENVOY_TEXT)
    names = type_lines(merged)
    assert len(names) == len(set(names))
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    # prometheus_client's parser names a counter family without its _total
    assert families["istio_requests"].type == "counter"
    assert families["istio_request_duration_milliseconds"].type == "histogram"
    assert families["envoy_server_live"].samples[0].value == 1
    pods = {s.labels["state"]: s.value for s in families["nodeagent_pods"].samples}
    assert pods["captured"] == 1
    # The agent's families first, then Envoy's, as pilot-agent writes them.
    assert merged.index("# TYPE nodeagent_pods") < merged.index("# TYPE envoy_server_live")


def test_an_envoy_family_the_agent_already_declares_is_left_out() -> None:
    agent = "# HELP envoy_server_live The agent's view.\n# TYPE envoy_server_live gauge\n"
    agent += "envoy_server_live 0.0\n"
    merged = merge(agent, ENVOY_TEXT)
    assert type_lines(merged).count("envoy_server_live") == 1
    assert "envoy_server_live 0.0" in merged and "envoy_server_live{} 1" not in merged
    # The families around it are whole.
    assert "envoy_server_uptime{} 10" in merged and "istio_tcp_sent_bytes_total{" in merged
    list(text_string_to_metric_families(merged))


@pytest.fixture
def served() -> Iterator[tuple[AgentMetrics, str, list[tuple[str, float]]]]:
    """The agent's endpoint on loopback with a stand-in for Envoy's admin that records what it
    was asked (query, timeout) and answers ENVOY_TEXT."""
    asked: list[tuple[str, float]] = []

    def envoy(query: str, timeout: float) -> str:
        asked.append((query, timeout))
        return ENVOY_TEXT

    metrics = AgentMetrics()
    port = free_port()
    server = metrics.serve("127.0.0.1", port, envoy)
    try:
        yield metrics, f"http://127.0.0.1:{port}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_both_scrape_paths_serve_the_merged_text(
    served: tuple[AgentMetrics, str, list[tuple[str, float]]],
) -> None:
    _, url, asked = served
    for path in ("/stats/prometheus", "/metrics"):
        with urllib.request.urlopen(url + path, timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"] == CONTENT_TYPE
            text = answer.read().decode()
        assert "nodeagent_pods{" in text and "envoy_server_live{} 1" in text
        assert "\nistio_requests_total{" in text and "envoy_istiocustom_" not in text
    assert len(asked) == 2
    assert get(url + "/")[0] == 404
    assert get(url + "/stats")[0] == 404
    text = get(url + "/metrics")[1]
    assert "nodeagent_scrapes_total 3.0" in text  # this scrape counts itself


def test_envoys_query_and_the_scrapers_timeout_are_passed_on_gzip_on_request(
    served: tuple[AgentMetrics, str, list[tuple[str, float]]],
) -> None:
    _, url, asked = served
    request = urllib.request.Request(
        url + "/stats/prometheus?usedonly&filter=%5Ecluster%5C.",
        headers={"X-Prometheus-Scrape-Timeout-Seconds": "2", "Accept-Encoding": "gzip"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(answer.read()).decode()
    assert "istio_requests_total{" in text
    ((query, timeout),) = asked
    assert query == "usedonly=&filter=%5Ecluster%5C."
    assert timeout == pytest.approx(1.8)  # a little less than Prometheus waits


def test_envoy_down_still_serves_the_agents_metrics_and_counts_the_failure() -> None:
    def envoy(query: str, timeout: float) -> str:
        raise EnvoyAdminError("Envoy admin unix:/run/x: GET failed: connection refused")

    metrics = AgentMetrics()
    port = free_port()
    server = metrics.serve("127.0.0.1", port, envoy)
    try:
        status, text = get(f"http://127.0.0.1:{port}/stats/prometheus")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert "envoy_" not in text.replace("nodeagent_envoy", "")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    failures = {s.labels["type"]: s.value for s in families["nodeagent_scrape_failures"].samples}
    assert failures == {"envoy": 1.0, "agent": 0.0}


class _AdminHandler(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = ENVOY_TEXT.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_the_node_envoys_stats_are_read_over_its_admin_socket(tmp_path: Path) -> None:
    """The agent's wiring (agent.py): EnvoyAdmin.prometheus over the admin's UNIX socket, where
    Envoy's /stats/prometheus is, with the scraper's query; no socket: the failure is counted."""
    sock = tmp_path / "envoy-admin.sock"
    metrics = AgentMetrics()
    port = free_port()
    server = metrics.serve("127.0.0.1", port, EnvoyAdmin(sock).prometheus)
    try:
        url = f"http://127.0.0.1:{port}/stats/prometheus"
        status, text = get(url)
        assert status == 200 and 'nodeagent_scrape_failures_total{type="envoy"} 1.0' in text
        _AdminHandler.paths = []
        admin = _UnixHTTPServer(str(sock), _AdminHandler)
        threading.Thread(target=admin.serve_forever, daemon=True).start()
        try:
            status, text = get(url + "?usedonly")
        finally:
            admin.shutdown()
            admin.server_close()
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and "\nistio_requests_total{" in text
    assert 'nodeagent_scrape_failures_total{type="envoy"} 1.0' in text  # no second failure
    assert _AdminHandler.paths == ["/stats/prometheus?usedonly="]


def test_dashboard_series_exist_before_anything_happened() -> None:
    """The node dashboard's panels show 0, not "no data", on a node with no pod and no NACK."""
    metrics = AgentMetrics()
    text = generate_latest(metrics.registry).decode()
    for state in STATES:
        assert f'nodeagent_pods{{state="{state}"}} 0.0' in text
    registry = CollectorRegistry()
    XdsMetrics(registry)
    text = generate_latest(registry).decode()
    for kind in ("CDS", "EDS", "LDS", "RDS", "SDS"):
        assert f'nodeagent_xds_nacks_total{{type="{kind}"}} 0.0' in text
