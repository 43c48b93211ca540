"""Helpers for integration tests: the CLI as a user runs it, and the root namespace's state."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.waiting import wait_for as wait_for  # re-exported: tests import their helpers here

if TYPE_CHECKING:
    from nodeagent.testbed.cluster import Testbed

NODEAGENT = [sys.executable, "-m", "nodeagent"]


def nodeagent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODEAGENT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def root_netns_snapshot() -> dict[str, str]:
    """What a testbed must never change in the root network namespace."""

    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "links": out("ip", "-o", "link", "show"),
        "addresses": out("ip", "-o", "addr", "show"),
        "routes": out("ip", "route", "show", "table", "all"),
        "rules": out("ip", "rule", "show"),
        "nftables": out("nft", "list", "ruleset"),
    }


def node_get(testbed: str, node: str, url: str) -> str:
    """GET URL from inside the node's network namespace (curl; fails on a transport error)."""
    from nodeagent.testbed import layout

    return subprocess.run(
        ["ip", "netns", "exec", layout.node_netns(testbed, node), "curl", "-sS", "-m", "5", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def node_metrics(testbed: str, node: str) -> str:
    """The node agent's Prometheus text, fetched inside the node's network namespace."""
    return node_get(testbed, node, "http://127.0.0.1:15020/metrics")


def envoy_stats(testbed: str, node: str, host: str = "127.0.0.1") -> str:
    """The node Envoy's Prometheus text (its stats port, :15090), from the node's netns."""
    return node_get(testbed, node, f"http://{host}:15090/stats/prometheus")


def envoy_admin(testbed: str, node: str, path: str) -> str:
    """GET PATH from the node Envoy's admin, over its root-only UNIX socket."""
    from nodeagent.testbed import daemons

    return subprocess.run(
        daemons.admin_curl(testbed, node, path, 5), capture_output=True, text=True, check=True
    ).stdout


def node_cli(testbed: str, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``nodeagent ARGS`` on a testbed node: in its netns, talking to that node's agent."""
    import os

    from nodeagent.testbed import layout

    env = {
        **os.environ,
        "NODEAGENT_CNI_SOCKET": str(layout.agent_socket(testbed, node)),
        "NODEAGENT_ENVOY_ADMIN": str(layout.envoy_admin_socket(testbed, node)),
    }
    return subprocess.run(
        ["ip", "netns", "exec", layout.node_netns(testbed, node), *NODEAGENT, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def http_status(run: Callable[..., subprocess.CompletedProcess[str]], pod: str, url: str) -> str:
    """The HTTP status a pod gets for URL ("000": no HTTP answer, e.g. connection refused/reset).

    RUN is the testbed's ``exec``."""
    proc = run(
        pod,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url],
    )
    return proc.stdout.strip() or "000"


def ruleset(netns: str) -> list[dict[str, Any]]:
    """The nftables tables of a network namespace (a captured pod holds exactly ours)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [e["table"] for e in json.loads(out)["nftables"] if "table" in e]


def agent_pods(testbed: str, node: str) -> dict[str, dict[str, Any]]:
    """The node agent's pod records (``nodeagent pods``), by namespace/name."""
    from nodeagent.testbed import layout

    proc = nodeagent(
        "pods", "-o", "json", "--cni-socket", str(layout.agent_socket(testbed, node)), timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return {f"{p['namespace']}/{p['name']}": p for p in json.loads(proc.stdout)}


def first_answer(client: subprocess.Popen[str], timeout: float = 10) -> None:
    """Until the keep-alive client (keepalive_client.py, its stderr piped) got its first answer."""
    assert client.stderr is not None
    wait_for(
        lambda: select.select([client.stderr], [], [], 0)[0],
        timeout,
        "the keep-alive client's first answer",
    )
    said = client.stderr.readline()
    # Else it ended (or broke) before any answer: its summary says why.
    assert said == "answered\n", f"no keep-alive answer: {said!r} {client.communicate(timeout=30)}"


def call(tb: Testbed, pod: str, url: str, *headers: str) -> dict[str, Any]:
    """POD's curl of URL, answered with JSON (the fake service's answer)."""
    argv = ["curl", "-sS", "--max-time", "10", url]
    for header in headers:
        argv += ["-H", header]
    proc = tb.exec(pod, argv)
    assert proc.returncode == 0, f"{pod} -> {url}: {proc.stderr}"
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def proxy_status(tb: Testbed, node: str) -> dict[str, Any]:
    """The node's Envoy as its agent sees it (``nodeagent proxy-status``)."""
    proc = node_cli(tb.name, node, "proxy-status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    status: dict[str, Any] = json.loads(proc.stdout)["proxy"]
    return status


def presented_chain(tb: Testbed, client: str, ip: str, port: int) -> list[Any]:
    """The certificates a mesh server at IP:PORT presents on the wire (x509.Certificate, leaf
    first), read with openssl from pod CLIENT (one outside the mesh, so that its own node does
    not wrap the connection). openssl offers Istio's ALPN: without it, TLS on a PERMISSIVE
    port is the app's own and passes through to the app (#12 defect 7)."""
    import re

    from cryptography import x509

    openssl = f"openssl s_client -alpn istio-peer-exchange,istio -showcerts -connect {ip}:{port}"
    proc = tb.exec(client, ["sh", "-c", f"{openssl} </dev/null 2>/dev/null"], timeout=20)
    pems = re.findall(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", proc.stdout, re.DOTALL
    )
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def put_config(tb: Testbed, filename: str, docs: list[dict[str, Any]]) -> None:
    """DOCS as the testbed's file FILENAME of cluster objects, as ``kubectl apply`` would (none:
    the file removed, as ``kubectl delete``). Written aside and renamed, so the API server
    stand-in and the directory source never read a half-written file."""
    import yaml

    from nodeagent.testbed import layout

    path = layout.cluster_dir(tb.name) / filename
    if not docs:
        path.unlink(missing_ok=True)
        return
    aside = path.with_suffix(".tmp")
    aside.write_text(yaml.safe_dump_all(docs))
    aside.replace(path)


def apply_docs(tb: Testbed, *docs: dict[str, Any]) -> None:
    """Replace the test's Istio config (traffic.yaml) with DOCS, as ``kubectl apply`` would
    (none: remove it)."""
    put_config(tb, "traffic.yaml", list(docs))


def put_yaml(tb: Testbed, filename: str, *texts: str, namespace: str = "default") -> None:
    """TEXTS (YAML) as the testbed's file FILENAME, with put_config; objects without a namespace
    go to NAMESPACE, as ``kubectl apply -n`` does. No object: the file removed."""
    import yaml

    docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        doc["metadata"].setdefault("namespace", namespace)
    put_config(tb, filename, docs)


# -- a module's Kubernetes-source testbed ---------------------------------------------------------

TWO_NODES: tuple[dict[str, Any], ...] = ({"name": "n1"}, {"name": "n2"})
# Istio's sample external authorizer (ext_authz_server.py: HTTP 8000, gRPC 9000) as a pod's
# workload, for AuthorizationPolicy CUSTOM.
EXT_AUTHZ_APP: dict[str, Any] = {
    "type": "command",
    "port": 8000,
    "command": [sys.executable, str(Path(__file__).with_name("ext_authz_server.py"))],
}


def pod(
    name: str,
    node: str,
    labels: dict[str, str],
    *,
    namespace: str = "default",
    account: str = "",
    workload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A topology pod; its service account is its app label unless ACCOUNT names one."""
    spec: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "node": node,
        "serviceAccount": account or labels["app"],
        "labels": labels,
    }
    if workload is not None:
        spec["workload"] = workload
    return spec


def service(name: str, port: int, target: int, namespace: str = "default") -> dict[str, Any]:
    """A topology service selecting app=NAME, one port named http."""
    return {
        "name": name,
        "namespace": namespace,
        "selector": {"app": name},
        "ports": [{"name": "http", "port": port, "targetPort": target}],
    }


def topology_text(
    name: str,
    pods: Iterable[dict[str, Any]],
    services: Iterable[dict[str, Any]],
    *,
    nodes: Sequence[dict[str, Any]] = TWO_NODES,
    mesh: Sequence[str] = ("default",),
    outside: Sequence[str] = (),
) -> str:
    """A testbed topology whose agents read the Kubernetes API stand-in (as the DaemonSet's do):
    namespaces MESH in the mesh, OUTSIDE not; one JSON flow line per node, pod and service."""
    namespaces = [
        *({"name": ns, "labels": {"nodeagent.io/mesh": "enabled"}} for ns in mesh),
        *({"name": ns} for ns in outside),
    ]
    sections = {"nodes": nodes, "namespaces": namespaces, "pods": pods, "services": services}
    lines = [f"name: {name}", "source: kubernetes"]
    for section, items in sections.items():
        lines += [f"{section}:", *(f"  - {json.dumps(item)}" for item in items)]
    return "\n".join(lines) + "\n"


@contextmanager
def running_testbed(text: str, source: str) -> Iterator[Testbed]:
    """The testbed of topology TEXT (SOURCE names it in errors), up from a clean slate and
    down again on leaving, also on failure (a module's ``tb`` fixture)."""
    from nodeagent.testbed.cluster import Testbed, down
    from nodeagent.testbed.topology import loads_topology

    topology = loads_topology(text, source)
    down(topology.name)
    try:
        yield Testbed.up(topology, text, source)
    finally:
        down(topology.name)
