"""A real Prometheus (Debian's ``/usr/bin/prometheus``, installed by ``make setup``) scraping a
testbed's nodes, and PromQL against it, for integration tests.

Where it runs: inside the testbed's resolver host (``tb-<name>.resolver``), a netns on the
underlay bridge outside every node, as a cluster's Prometheus runs off the nodes it scrapes. It
scrapes each node's merged endpoint, ``<node underlay IP>:15020/stats/prometheus`` (the agent
binds 0.0.0.0 in its node's netns), every second, and listens on 127.0.0.1 of that netns only:
no packet leaves the testbed's namespaces.

What it scrapes with is the README's scrape job (its "Metrics" section) verbatim, relabelling
and all, but for discovery: Debian's Prometheus is built without Kubernetes discovery, so a
file_sd file stands in for it, holding for each node the ``__meta_kubernetes_*`` labels the
Kubernetes discovery gives the DaemonSet's pod there (its annotations and labels read from
daemonset/daemonset.yaml; pod IP = node IP, as for a host-network pod). The relabelling turns
them into ``<ip>:15020/stats/prometheus`` with labels ``node``, ``namespace``, ``pod``.

Its config and TSDB live in a temporary directory inside the testbed's own directory. It is
stopped and its files removed when the ``prometheus`` context ends, also on failure; should the
test process die first, ``testbed down`` kills every process in the testbed's namespaces and
removes the directory.

The lead's tests ask PromQL through ``Prometheus.query`` (the HTTP API's ``/api/v1/query``,
called from inside that netns), e.g.::

    with prometheus(tb) as prom:
        prom.wait_scraped()
        rates = prom.query('sum(rate(istio_requests_total{reporter="destination"}[1m]))'
                           " by (destination_workload, response_code)")
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.ports import AGENT_METRICS_PORT
from nodeagent.testbed import layout, netns
from nodeagent.testbed.cluster import Testbed
from nodeagent.testbed.state import TestbedState
from tests.waiting import wait_for

PROMETHEUS = Path("/usr/bin/prometheus")
API_PORT = 9090  # on 127.0.0.1 inside the netns it runs in
ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DAEMONSET = ROOT / "daemonset" / "daemonset.yaml"
START_TIMEOUT = 20.0  # TSDB set-up and the first rule/scrape loop; ~1 s here
STOP_GRACE = 5.0
# Grafana's variables in Istio's dashboards that are not label values: their stand-ins.
GRAFANA_DEFAULTS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
ISTIO_QUERIES = ROOT / "tests" / "data" / "istio-dashboard-queries.yaml"
NODE_DASHBOARD = ROOT / "dashboards" / "nodeagent-node.json"


class PromQLError(AssertionError):
    """Prometheus refused a query (it does not parse, or failed): its own message."""


@dataclass
class Prometheus:
    """A running Prometheus: its netns, its files and the process (``ip netns exec`` execs it,
    so this pid is Prometheus's own)."""

    testbed: str
    netns: str
    directory: Path
    process: subprocess.Popen[bytes]
    targets: dict[str, str]  # node -> host:port scraped

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET PATH of the HTTP API (``/api/v1/...``) from inside the netns: its ``data``;
        raises PromQLError with Prometheus's message when it answers an error."""
        argv = ["curl", "-sS", "--max-time", "10", "--get"]
        for key, value in (params or {}).items():
            argv += ["--data-urlencode", f"{key}={value}"]
        argv.append(f"http://127.0.0.1:{API_PORT}{path}")
        proc = subprocess.run(
            netns.in_netns(self.netns, argv), capture_output=True, text=True, timeout=15
        )
        if proc.returncode != 0:
            raise PromQLError(f"Prometheus {path}: curl failed: {proc.stderr.strip()}")
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            raise PromQLError(f"Prometheus {path}: not JSON: {proc.stdout[:300]!r}") from None
        if answer.get("status") != "success":
            raise PromQLError(
                f"Prometheus {path} {dict(params or {})}: {answer.get('errorType')}:"
                f" {answer.get('error')}"
            )
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query at now: the result's series, each ``{"metric": {labels},
        "value": [time, "value"]}`` (a scalar or string result comes as one entry without
        labels). Raises PromQLError when the expression does not parse or fails."""
        data = self.api("/api/v1/query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        if data["resultType"] == "matrix":  # a range selector alone: its last sample
            return [{"metric": s["metric"], "value": s["values"][-1]} for s in result]
        return result

    def values(self, promql: str, by: str) -> dict[str, float]:
        """QUERY's values by the label BY (e.g. ``{"n1": 1.0, "n2": 1.0}`` for up by node)."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(promql)}

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("/api/v1/targets")["activeTargets"]
        return targets

    def wait_scraped(self, timeout: float = 20.0) -> None:
        """Until every node's target was scraped successfully (``up == 1`` for each node)."""

        def all_up() -> bool:
            return self.values(f'up{{job="{JOB}"}}', "node") == {n: 1.0 for n in self.targets}

        def state() -> str:
            return "every node scraped: " + "; ".join(
                f"{t['labels'].get('node')} {t['health']} {t['lastError']}"
                for t in self.active_targets()
            )

        wait_for(all_up, timeout, state, step=0.2)

    def wait_until(self, promql: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Until PROMQL returns at least one series (e.g. once a rate has two samples)."""
        found: list[dict[str, Any]] = []

        def returns_data() -> bool:
            nonlocal found
            found = self.query(promql)
            return bool(found)

        wait_for(returns_data, timeout, f"data for {promql}", step=0.2)
        return found

    def log_tail(self, lines: int = 20) -> str:
        text = (self.directory / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def readme_scrape_job() -> dict[str, Any]:
    """The scrape job of the README's "Metrics" section, as a user copies it."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (job,) = yaml.safe_load(block)["scrape_configs"]
    assert isinstance(job, dict)
    return job


JOB: str = readme_scrape_job()["job_name"]


def daemonset_pod_meta(node: str, ip: str) -> dict[str, str]:
    """The labels Prometheus's Kubernetes pod discovery gives the DaemonSet's pod on NODE
    (host network: its pod IP is the node's IP): annotations and labels from the manifest,
    names sanitized as the discovery does (``app.kubernetes.io/name`` ->
    ``__meta_kubernetes_pod_label_app_kubernetes_io_name``)."""
    (daemonset,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    template = daemonset["spec"]["template"]["metadata"]
    meta = {
        "__meta_kubernetes_namespace": daemonset["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": f"{daemonset['metadata']['name']}-{node}",
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_phase": "Running",
    }
    for kind, values in (("annotation", template["annotations"]), ("label", template["labels"])):
        for key, value in values.items():
            meta[f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"] = value
    return meta


def discovery_file(ips: Mapping[str, str]) -> list[dict[str, Any]]:
    """file_sd's target groups: one per node (IPS: node -> IP), labelled as the Kubernetes
    discovery labels the DaemonSet's pod there."""
    return [{"targets": [ip], "labels": daemonset_pod_meta(node, ip)} for node, ip in ips.items()]


def scrape_config(interval: float, discovered: Path) -> dict[str, Any]:
    """Prometheus's config: the README's job scraping every INTERVAL seconds, its Kubernetes
    discovery swapped for the file DISCOVERED (``discovery_file``)."""
    seconds = f"{interval:g}s"
    job = readme_scrape_job()
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(discovered)]}]
    return {
        "global": {
            "scrape_interval": seconds,
            "scrape_timeout": seconds,
            "evaluation_interval": seconds,
        },
        "scrape_configs": [job],
    }


@contextmanager
def prometheus(testbed: Testbed, interval: float = 1.0) -> Iterator[Prometheus]:
    """Prometheus scraping every node of TESTBED each INTERVAL seconds, running until the
    context ends (stopped, its files removed, also when the body fails)."""
    if not PROMETHEUS.exists():
        raise AssertionError(f"{PROMETHEUS} is missing: run `make setup` as root")
    ns = layout.resolver_netns(testbed.name)
    ips = {n.name: str(n.underlay_ip) for n in testbed.topology.nodes}
    directory = Path(
        tempfile.mkdtemp(prefix="prometheus-", dir=TestbedState.directory(testbed.name))
    )
    discovered = directory / "pods.json"
    discovered.write_text(json.dumps(discovery_file(ips)))
    config = scrape_config(interval, discovered)
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    targets = {node: f"{ip}:{AGENT_METRICS_PORT}" for node, ip in ips.items()}
    argv = [
        str(PROMETHEUS),
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{API_PORT}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            netns.in_netns(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    prom = Prometheus(testbed.name, ns, directory, process, targets)
    try:
        _wait_ready(prom)
        yield prom
    finally:
        _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_ready(prom: Prometheus) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    probe = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1"]
    probe.append(f"http://127.0.0.1:{API_PORT}/-/ready")
    while time.monotonic() < deadline:
        if prom.process.poll() is not None:
            code = prom.process.returncode
            raise AssertionError(f"Prometheus exited ({code}):\n{prom.log_tail()}")
        answer = subprocess.run(
            netns.in_netns(prom.netns, probe), capture_output=True, text=True, timeout=5
        )
        if answer.stdout == "200":
            return
        time.sleep(0.1)
    raise AssertionError(f"Prometheus not ready after {START_TIMEOUT:.0f}s:\n{prom.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Prometheus shuts its TSDB down cleanly), SIGKILL after STOP_GRACE seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_GRACE)


def grafana_expr(expr: str, variables: Mapping[str, str]) -> str:
    """A Grafana panel's PromQL with its template variables replaced as Grafana would (``$name``
    and ``${name}``; the longest names first, so ``$srcns`` is never read as ``$src...``):
    VARIABLES, then GRAFANA_DEFAULTS for the built-in ones (``$__rate_interval``...)."""
    values = {**GRAFANA_DEFAULTS, **variables}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    left = re.findall(r"\$\{?\w+", expr)
    if left:
        raise ValueError(f"variables {left} not given for {expr!r}")
    return expr


def istio_dashboard_queries() -> list[dict[str, str]]:
    """The PromQL of Istio's service and workload dashboards (tests/data/istio-dashboard-
    queries.yaml): each entry's ``dashboard``, ``panel`` or ``variable``, ``expr``."""
    data = yaml.safe_load(ISTIO_QUERIES.read_text())
    queries: list[dict[str, str]] = data["queries"]
    return queries
