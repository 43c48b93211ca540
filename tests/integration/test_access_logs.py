"""Access logs per MeshConfig and the Telemetry API, written by the real node Envoy (issue #19).

One node, two client pods (default/curl app=curl, default/sleep app=sleep) and a server
(default/ph, fake-service). The node Envoy's stdout is the testbed's logs/n1.envoy.log; its
access log lines are read from there, as ``kubectl logs`` of Istio's sidecars would show them.

Istio's references: MeshConfig accessLogFile / accessLogEncoding
(istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/), the Telemetry API
(istio.io/latest/docs/reference/config/telemetry/) and its access log task
(istio.io/latest/docs/tasks/observability/logs/telemetry-api/: disable for a workload, filter
with a CEL expression such as ``response.code >= 400``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    apply_docs,
    pod,
    running_testbed,
    service,
    topology_text,
    wait_for,
)

pytestmark = pytest.mark.integration

NAME = "tbalog"
PH = "http://ph:8080"


def _topology() -> str:
    pods = [
        pod("curl", "n1", {"app": "curl"}),
        pod("sleep", "n1", {"app": "sleep"}),
        pod("ph", "n1", {"app": "ph"}, workload={"type": "fake-service", "port": 8080}),
    ]
    return topology_text(NAME, pods, [service("ph", 8080, 8080)], nodes=({"name": "n1"},))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_access_logs") as bed:
        yield bed


@pytest.fixture
def clean(tb: Testbed) -> Iterator[Testbed]:
    yield tb
    apply_docs(tb)
    tb.set_mesh_config({})


def telemetry(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


class EnvoyLog:
    """The lines the node Envoy writes to its stdout from now on."""

    def __init__(self, tb: Testbed) -> None:
        self.path = layout.logs_dir(tb.name) / "n1.envoy.log"
        self.start = self.path.stat().st_size

    def lines(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace").splitlines()


def curl(tb: Testbed, pod_name: str, path: str) -> str:
    proc = tb.exec(
        f"default/{pod_name}", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", PH + path]
    )
    return proc.stdout


def within(condition: Any, seconds: float) -> bool:
    """Whether CONDITION() holds within SECONDS (polled)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON access log lines among Envoy's output (its own log lines are text)."""
    out = []
    for line in lines:
        if line.startswith("{"):
            out.append(json.loads(line))  # every such line parses: a broken one fails the test
    return out


def test_json_via_mesh_config_and_one_workload_turned_off_by_telemetry(clean: Testbed) -> None:
    tb = clean
    tb.set_mesh_config({"accessLogEncoding": "JSON"})  # accessLogFile: the testbed's /dev/stdout
    apply_docs(
        tb,
        telemetry(
            "sleep-quiet",
            {"selector": {"matchLabels": {"app": "sleep"}}, "accessLogging": [{"disabled": True}]},
        ),
    )

    def logged(log: EnvoyLog, wanted: set[tuple[str, str, str]]) -> list[dict[str, Any]] | None:
        """The JSON lines once WANTED (direction, pod, path) are among them (None: not within
        5 s), and Envoy's flush interval (1 s) later, so that a line that should not be there
        had its chance."""

        def seen() -> set[tuple[str, str, str]]:
            return {(e["direction"], e["pod"], str(e.get("path"))) for e in json_lines(log.lines())}

        if not within(lambda: wanted <= seen(), 5):
            return None
        time.sleep(1.5)
        return json_lines(log.lines())

    def settled() -> bool:
        log = EnvoyLog(tb)
        assert curl(tb, "curl", "/json-probe") == "200"
        assert curl(tb, "sleep", "/sleep-probe") == "200"
        probes = {
            ("outbound", "default/curl", "/json-probe"),
            ("inbound", "default/ph", "/sleep-probe"),
        }
        entries = logged(log, probes)
        return entries is not None and not [e for e in entries if e["pod"] == "default/sleep"]

    wait_for(settled, 40, "JSON lines for curl, none for sleep's outbound", step=0.5)
    log = EnvoyLog(tb)
    for _ in range(3):
        assert curl(tb, "curl", "/from-curl") == "200"
        assert curl(tb, "sleep", "/from-sleep") == "200"
    # curl's outbound request, and ph's inbound side of both callers' requests (no Telemetry
    # selects ph: the mesh config's JSON); nothing for sleep's outbound side.
    entries = logged(
        log,
        {
            ("outbound", "default/curl", "/from-curl"),
            ("inbound", "default/ph", "/from-curl"),
            ("inbound", "default/ph", "/from-sleep"),
        },
    )
    assert entries is not None, "the three requests' lines"
    assert not [e for e in entries if e["pod"] == "default/sleep"]
    curl_line = next(e for e in entries if e["pod"] == "default/curl" and e["path"] == "/from-curl")
    assert curl_line["response_code"] == 200 and curl_line["method"] == "GET"
    assert curl_line["upstream_cluster"].startswith("outbound|8080||ph.default")
    inbound = next(e for e in entries if e["direction"] == "inbound" and e["path"] == "/from-curl")
    assert {"dry_run_deny", "dry_run_allow"} <= inbound.keys()


def test_a_telemetry_filter_keeps_only_matching_lines(clean: Testbed) -> None:
    tb = clean
    apply_docs(
        tb,
        telemetry(
            "errors-only",
            {
                "accessLogging": [
                    {
                        "providers": [{"name": "envoy"}],
                        "filter": {"expression": "response.code >= 400"},
                    }
                ]
            },
        ),
    )

    def settled() -> bool:
        log = EnvoyLog(tb)
        assert curl(tb, "curl", "/status/200") == "200"
        assert curl(tb, "curl", "/status/418") == "418"
        if not within(lambda: "/status/418" in "\n".join(log.lines()), 5):
            return False
        time.sleep(1.5)  # Envoy's flush interval: a 200 line would be there by now
        return "/status/200" not in "\n".join(log.lines())

    wait_for(settled, 40, "only the 418 logged", step=0.5)
    log = EnvoyLog(tb)
    for _ in range(3):
        assert curl(tb, "curl", "/status/201") == "201"
        assert curl(tb, "curl", "/status/404") == "404"

    def lines() -> list[str]:
        """This test's lines (a line of the previous test may still be flushed after ``log``
        was opened: Envoy writes its buffer once a second). Not JSON ones: a connection the
        node Envoy pooled towards ph's inbound side under the previous test's mesh config
        (JSON) keeps that chain until it drains, as any listener update does."""
        return [
            line
            for line in log.lines()
            if ("/status/404" in line or "/status/201" in line) and not line.startswith("{")
        ]

    def sides() -> tuple[list[str], list[str]]:
        # Istio's default text format, naming the direction and the pod after the start time.
        outbound = [line for line in lines() if " outbound default/curl " in line]
        inbound = [line for line in lines() if " inbound default/ph " in line]
        return outbound, inbound

    def stale() -> int:
        """ph's inbound lines of this test's 404s written on such a drained chain (JSON)."""
        return sum(
            1
            for line in log.lines()
            if line.startswith("{") and "/status/404" in line and '"direction":"inbound"' in line
        )

    wait_for(
        lambda: [len(sides()[0]), len(sides()[1]) + stale()] == [3, 3],
        5,
        lambda: "\n".join(lines()),
        step=0.2,
    )
    time.sleep(1.5)
    assert not [line for line in lines() if "/status/201" in line]
    outbound, inbound = sides()
    assert len(outbound) == 3 and len(inbound) + stale() == 3, lines()
    assert all('"GET /status/404 HTTP/1.1" 404' in line for line in outbound + inbound)
