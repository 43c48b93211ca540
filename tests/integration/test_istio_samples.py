"""Every Istio networking sample (tests/data/istio/bookinfo/networking, unchanged) through the real
node Envoy (issue #15, "Must show"), and the Gateway samples through a real gateway Envoy (#16).

Each sample is applied as a user would: a directory holding Bookinfo's platform and the sample,
read by the DirectorySource (so the real validation runs), translated by the TranslationCache for
a node holding three Bookinfo pods, and pushed over the project's xDS server (delta ADS on a UNIX
socket, the agent's bootstrap) to one Envoy shared by all samples. Envoy must ACK every type, and
what the sample asks for must be in its config dump: every subset as a cluster, every route
destination (and weight) of a VirtualService bound to the mesh in the service's route table, and
the faults of the fault-injection samples.

A ServiceEntry's hosts must be clusters Envoy holds (egress-rule-google-apis: resolution DNS,
in a netns where nothing resolves). The Gateway samples (bookinfo-gateway, certmanager-gateway,
issue #16) give the node Envoy nothing but must be ACKed by it; and they are pushed as the
ingress gateway they select (``istio: ingressgateway``, a pod in istio-system) gets them, from
``nodeagent gateway``'s GatewayProxy, over the same xDS server to a second Envoy with the
gateway's bootstrap: every type ACKed, a listener on each server's port, the bound
VirtualService's routes in its route table to Bookinfo's clusters, mTLS into the mesh under the
gateway's own identity. Neither sample has a TLS server (certmanager-gateway serves the ACME
HTTP-01 challenge on port 80), so no credentialName is exercised here (test_ingress_gateway.py).
VirtualService samples are also applied on top of Bookinfo's default destination rules
(destination-rule-all.yaml), as Istio's tasks apply them first
(istio.io/latest/docs/examples/bookinfo/#define-the-service-versions): then every cluster their
routes name must be a cluster Envoy holds.

Istio's semantics: istio.io/latest/docs/reference/config/networking/virtual-service/ and
.../destination-rule/; cluster names as Istio builds them, ``outbound|port|subset|host``
(istio/istio pilot/pkg/model/service.go BuildSubsetKey).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client import CollectorRegistry

from nodeagent.envoy.admin import EnvoyAdmin
from nodeagent.envoy.bootstrap import bootstrap, write_bootstrap
from nodeagent.envoy.launch import NODE_ENVOY_ARGS, envoy_argv
from nodeagent.gateway.proxy import GatewayProxy, GatewaySettings
from nodeagent.identity.ca import BuiltinCA
from nodeagent.identity.certs import issue, spiffe_id
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.secrets import root_secret, workload_secret
from nodeagent.identity.tls_files import FileSecrets
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource
from nodeagent.testbed import hosts, netlink
from nodeagent.testbed.netns import in_netns, netns_path
from nodeagent.translate import LocalPod, TranslationCache
from nodeagent.xds import types
from nodeagent.xds.cache import Snapshot, SnapshotCache
from nodeagent.xds.server import XdsServer
from nodeagent.xds.state import Nack
from tests.unit.istio_data import istio_data, istio_files
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENVOY = Path(sys.executable).parent / "envoy"
NODE = "n1"
NODE_ID = f"nodeagent~{NODE}"
TRUST_DOMAIN = "cluster.local"
SUFFIX = "default.svc.cluster.local"
# Bookinfo's Deployments as pods: these three run on this node (distinct identities), the others
# on n2. A netns of this test's own stands for each local pod's.
LOCAL = ("productpage-v1", "reviews-v1", "ratings-v1")
# Envoy runs in a netns of its own whose resolver is its loopback, where nothing answers: a
# ServiceEntry's DNS cluster (egress-rule-google-apis) resolves nothing, and asks no real DNS.
ENVOY_NETNS = "samples-envoy"
SAMPLES = istio_files("bookinfo/networking/*.yaml")
DEFAULT_RULES = "destination-rule-all.yaml"
T = TypeVar("T")


def bookinfo_cluster() -> list[dict[str, Any]]:
    """Bookinfo's platform as the API server would show it once deployed: the namespace
    labelled for the mesh, each Service with a cluster IP, one Pod per Deployment (its template's
    labels and service account) and each Service's Endpoints."""
    docs = [
        d for d in yaml.safe_load_all(istio_data("bookinfo/platform/bookinfo.yaml").read_text())
    ]
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "labels": {"istio-injection": "enabled"}},
        }
    ]
    addresses: dict[str, list[dict[str, Any]]] = {}
    for i, doc in enumerate(d for d in docs if d):
        if doc["kind"] == "Service":
            doc["spec"]["clusterIP"] = f"10.96.0.{10 + i}"
            out.append(doc)
        elif doc["kind"] == "Deployment":
            name, template = doc["metadata"]["name"], doc["spec"]["template"]
            node = NODE if name in LOCAL else "n2"
            ip = f"10.244.{1 if node == NODE else 2}.{10 + i}"
            labels = template["metadata"]["labels"]
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": "default", "labels": labels},
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": template["spec"]["serviceAccountName"],
                    },
                    "status": {"podIP": ip},
                }
            )
            ref = {"kind": "Pod", "namespace": "default", "name": name}
            addresses.setdefault(labels["app"], []).append(
                {"ip": ip, "nodeName": node, "targetRef": ref}
            )
        else:
            out.append(doc)
    for app, found in addresses.items():
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": app, "namespace": "default"},
                "subsets": [{"addresses": found, "ports": [{"name": "http", "port": 9080}]}],
            }
        )
    return out


def sample_docs(*files: Path) -> list[dict[str, Any]]:
    """The objects of FILES applied in order: a later object of the same kind and name replaces
    an earlier one, as ``kubectl apply`` does."""
    objects: dict[tuple[str, str, str], dict[str, Any]] = {}
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                meta = doc["metadata"]
                objects[(doc["kind"], meta.get("namespace", "default"), meta["name"])] = doc
    return list(objects.values())


def mesh_virtual_services(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The VirtualServices bound to the mesh (no ``gateways``, or ``mesh`` among them) whose
    hosts are Bookinfo's services (a ServiceEntry's host is #16)."""
    bookinfo = {"productpage", "reviews", "ratings", "details"}
    return [
        d
        for d in docs
        if d["kind"] == "VirtualService"
        and "mesh" in d["spec"].get("gateways", ["mesh"])
        and set(d["spec"]["hosts"]) <= bookinfo
    ]


def cluster_name(destination: dict[str, Any]) -> str:
    port = destination.get("port", {}).get("number", 9080)
    return f"outbound|{port}|{destination.get('subset', '')}|{destination['host']}.{SUFFIX}"


def route_table(host: str) -> str:
    return f"outbound|9080||{host}.{SUFFIX}"


def scan(root: Path) -> MeshStore:
    """The cluster in ROOT as the agent's DirectorySource reads it (the real validation)."""
    store = MeshStore(NODE)
    source = DirectorySource(root, store)
    source.scan()
    assert source.errors == {}, source.errors
    return store


@dataclass
class EnvoyOverXds:
    """The project's xDS server on an event loop of its own (a thread), and a real Envoy
    connected to it as NODE_ID: the node Envoy (the agent's bootstrap), shared by every sample of
    this module, or the ingress gateway's (its bootstrap as ``nodeagent gateway`` writes it)."""

    node_id: str
    loop: asyncio.AbstractEventLoop
    cache: SnapshotCache
    server: XdsServer
    admin: EnvoyAdmin
    log: Path
    local: list[LocalPod] = field(default_factory=list)
    secrets: list[Any] = field(default_factory=list)
    nacks: list[Nack] = field(default_factory=list)
    pushes: int = 0

    def call(self, fn: Callable[[], T]) -> T:
        """FN run on the server's loop: the server and cache are only touched from there."""

        async def run() -> T:
            return fn()

        return self.wait(run())

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """CORO run to its end on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def push(self, root: Path) -> Snapshot:
        """Read the cluster in ROOT, translate it for this node and apply it."""
        store = scan(root)
        local = [
            LocalPod(pod, self.netns(pod.name))
            for pod in store.pods.values()
            if pod.node_name == NODE
        ]
        assert sorted(lp.pod.name for lp in local) == sorted(LOCAL)
        # The agent's secrets: the workloads', and the files DestinationRules name (its
        # tls_files watcher's).
        secrets = [*self.secrets, *FileSecrets().sds_secrets(store)]
        translation = TranslationCache().build(store, local, secrets)
        assert translation.problems == {}, translation.problems
        return self.apply(translation.resources)

    def apply(self, resources: dict[str, dict[str, Any]]) -> Snapshot:
        """Hand RESOURCES to Envoy and wait until it has ACKed every one of them; a NACK fails
        at once with Envoy's reason."""
        self.pushes += 1
        snapshot = Snapshot(f"sample-{self.pushes}", resources)
        nacks_before = len(self.call(lambda: list(self.nacks)))
        self.call(lambda: self.cache.set_snapshot(self.node_id, snapshot))

        def applied() -> bool:
            nacks = self.call(lambda: list(self.nacks))
            assert len(nacks) == nacks_before, f"Envoy NACKed: {nacks[nacks_before:]}"
            acked = self.call(
                lambda: {t: self.server.acked(self.node_id, t) for t in snapshot.resources}
            )
            return all(acked[t] == dict(snapshot.versions(t)) for t in snapshot.resources)

        wait_for(applied, 20, lambda: f"Envoy to ACK {snapshot.version}: {self.status()}")
        return snapshot

    def status(self) -> dict[str, str]:
        statuses = self.call(lambda: self.server.status(self.node_id))
        return {types.short_name(t): s.state for t, s in statuses.items()}

    def netns(self, pod: str) -> str:
        return str(netns_path(f"samples-{pod}"))

    def dump(self, resource: str) -> list[dict[str, Any]]:
        configs: list[dict[str, Any]] = self.admin.config_dump(resource)["configs"]
        return configs


@contextlib.contextmanager
def envoy_over_xds(
    run: Path, node_id: str, cluster: str, netns: str, **options: Any
) -> Iterator[EnvoyOverXds]:
    """An Envoy as NODE_ID (bootstrap ``bootstrap(node_id, cluster, ..., **options)``) in a netns
    of its own, NETNS, whose resolver is its loopback where nothing answers (a DNS cluster
    resolves nothing and asks no real DNS), served by the xDS server on a UNIX socket in RUN."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="xds", daemon=True)
    thread.start()
    proc: subprocess.Popen[bytes] | None = None
    cache = SnapshotCache()
    envoy = EnvoyOverXds(
        node_id,
        loop,
        cache,
        XdsServer(cache, CollectorRegistry()),
        EnvoyAdmin(run / "admin.sock"),
        run / "envoy.log",
    )
    envoy.server.on_nack = lambda _node, nack: envoy.nacks.append(nack)
    made = False
    try:
        with contextlib.suppress(Exception):
            netlink.remove_netns(netns)  # left over by an earlier run killed midway
        netlink.create_netns(netns)
        made = True
        hosts.write_resolv_conf(netns, "nameserver 127.0.0.1\n")
        envoy.wait(envoy.server.start(run / "xds.sock"))
        config = run / "bootstrap.json"
        write_bootstrap(
            config,
            bootstrap(
                node_id,
                cluster,
                run / "xds.sock",
                admin_socket=run / "admin.sock",
                stats_host="127.0.0.1",
                stats_port=0,
                **options,
            ),
        )
        with envoy.log.open("wb") as log:
            argv = envoy_argv(ENVOY, config, (*NODE_ENVOY_ARGS, "--concurrency", "1"))
            proc = subprocess.Popen(in_netns(netns, argv), stdout=log, stderr=subprocess.STDOUT)
        # Connected is enough: the first push is waited for until ACKed (LIVE would wait out
        # the initial fetch timeouts of CDS then LDS, nothing being pushed yet).
        wait_for(
            lambda: node_id in envoy.call(envoy.server.connected_nodes),
            20,
            f"the Envoy of {node_id} to connect",
        )
        yield envoy
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            envoy.wait(envoy.server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        if made:
            netlink.remove_netns(netns)
        shutil.rmtree(hosts.ETC_NETNS / netns, ignore_errors=True)


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyOverXds]:
    run = tmp_path_factory.mktemp("node")
    made: list[str] = []
    try:
        for pod in LOCAL:
            name = f"samples-{pod}"
            with contextlib.suppress(Exception):
                netlink.remove_netns(name)  # left over by an earlier run killed midway
            netlink.create_netns(name)
            made.append(name)
        with envoy_over_xds(run, NODE_ID, NODE, ENVOY_NETNS) as node:
            ca = BuiltinCA.load_or_create(run / "state", TRUST_DOMAIN)
            for sa in ("bookinfo-productpage", "bookinfo-reviews", "bookinfo-ratings"):
                sid = spiffe_id(TRUST_DOMAIN, "default", sa)
                node.secrets.append(workload_secret(issue(ca, sid, timedelta(hours=1))))
            node.secrets.append(root_secret(ca.root_pem))
            yield node
    finally:
        for name in made:
            netlink.remove_netns(name)


def cluster_dir(tmp_path: Path, *files: Path) -> Path:
    """A directory as a user keeps one: the platform, then the sample files (unchanged; the
    sample's own file sorts after the defaults, so its objects win on a name clash)."""
    root = tmp_path / "cluster"
    root.mkdir(parents=True)
    (root / "0-bookinfo.yaml").write_text(yaml.safe_dump_all(bookinfo_cluster()))
    for i, f in enumerate(files, start=1):
        shutil.copy(f, root / f"{i}-{f.name}")
    return root


def active_clusters(node: EnvoyOverXds) -> dict[str, dict[str, Any]]:
    return {c["cluster"]["name"]: c["cluster"] for c in node.dump("dynamic_active_clusters")}


def routes_of(node: EnvoyOverXds, table: str) -> list[dict[str, Any]]:
    for config in node.dump("dynamic_route_configs"):
        if config["route_config"]["name"] == table:
            (vhost,) = config["route_config"]["virtual_hosts"]
            found: list[dict[str, Any]] = vhost["routes"]
            return found
    raise AssertionError(f"Envoy has no route table {table}")


def destinations(route: dict[str, Any]) -> list[tuple[str, int]]:
    action = route["route"]
    if "cluster" in action:
        return [(action["cluster"], 100)]
    return [(c["name"], c["weight"]) for c in action["weighted_clusters"]["clusters"]]


def sample_destinations(rule: dict[str, Any]) -> list[tuple[str, int]]:
    dests = rule["route"]
    return [(cluster_name(d["destination"]), d.get("weight", 100)) for d in dests]


def fault_of(route: dict[str, Any]) -> dict[str, Any]:
    fault: dict[str, Any] = route.get("typed_per_filter_config", {}).get(
        "envoy.filters.http.fault", {}
    )
    return fault


def reachable(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule of each route Istio builds: one per ``match`` entry, none after a rule without
    a match (a catch-all; istio/istio pilot/pkg/networking/core/route/route.go,
    BuildHTTPRoutesForVirtualService)."""
    out = []
    for rule in rules:
        out += [rule] * max(1, len(rule.get("match", [])))
        if not rule.get("match"):
            break
    return out


def check_sample_in_envoy(node: EnvoyOverXds, docs: list[dict[str, Any]]) -> None:
    """What the sample's objects ask for is what Envoy holds: each subset a cluster, each mesh
    VirtualService's rules (in order) the routes of its host's table, to the same destinations
    with the same weights, with the same faults."""
    clusters = active_clusters(node)
    for rule in (d for d in docs if d["kind"] == "DestinationRule"):
        host = rule["spec"]["host"]
        for subset in rule["spec"].get("subsets", []):
            name = cluster_name({"host": host, "subset": subset["name"]})
            assert name in clusters, f"{rule['metadata']['name']}: no cluster {name}"
    for entry in (d for d in docs if d["kind"] == "ServiceEntry"):
        # Each host and port a cluster, as istiod names it (outbound|<port>||<host>).
        for host in entry["spec"]["hosts"]:
            for port in entry["spec"]["ports"]:
                name = f"outbound|{port['number']}||{host}"
                assert name in clusters, f"{entry['metadata']['name']}: no cluster {name}"
    for vs in mesh_virtual_services(docs):
        (host,) = vs["spec"]["hosts"]
        routes = routes_of(node, route_table(host))
        rules = reachable(vs["spec"]["http"])
        assert len(routes) == len(rules), (host, routes)
        for route, rule in zip(routes, rules, strict=True):
            assert sorted(destinations(route)) == sorted(sample_destinations(rule)), route
            if "fault" not in rule:
                assert fault_of(route) == {}, route
            if "abort" in rule.get("fault", {}):
                abort = fault_of(route)["abort"]
                assert abort["http_status"] == rule["fault"]["abort"]["httpStatus"], route
                assert abort["percentage"]["numerator"] > 0, route
            if "delay" in rule.get("fault", {}):
                delay = fault_of(route)["delay"]
                assert delay["fixed_delay"] == rule["fault"]["delay"]["fixedDelay"], route


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_sample_is_acked_by_the_node_envoy(
    envoy: EnvoyOverXds, tmp_path: Path, sample: Path
) -> None:
    """The sample alone on Bookinfo: ACKed, and its subsets, routes and faults in Envoy."""
    try:
        envoy.push(cluster_dir(tmp_path / "alone", sample))
        check_sample_in_envoy(envoy, sample_docs(sample))
        if not mesh_virtual_services(sample_docs(sample)):
            return
        defaults = istio_data(f"bookinfo/networking/{DEFAULT_RULES}")
        envoy.push(cluster_dir(tmp_path / "with-defaults", defaults, sample))
        docs = sample_docs(defaults, sample)
        check_sample_in_envoy(envoy, docs)
        clusters = active_clusters(envoy)
        for vs in mesh_virtual_services(docs):
            for rule in vs["spec"]["http"]:
                for name, _ in sample_destinations(rule):
                    assert name in clusters, f"{vs['metadata']['name']} routes to {name}"
    except AssertionError as e:
        tail = envoy.log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}\n--- envoy log (tail) ---\n{tail}") from e


def test_the_80_20_split_the_faults_and_the_load_balancer_are_as_istio_documents(
    envoy: EnvoyOverXds, tmp_path: Path
) -> None:
    """Spelled out for four samples, beyond the generic check: reviews 80% v1 / 20% v2
    (istio.io/latest/docs/tasks/traffic-management/traffic-shifting/), jason's ratings delayed
    7 s and aborted with 500 (.../fault-injection/), reviews' subsets balanced at random
    (destination-rule-reviews.yaml; Istio's default is LEAST_REQUEST)."""
    networking = istio_data("bookinfo/networking")
    defaults = networking / DEFAULT_RULES
    envoy.push(cluster_dir(tmp_path / "lb", networking / "destination-rule-reviews.yaml"))
    clusters = active_clusters(envoy)
    for subset in ("v1", "v2", "v3"):
        assert clusters[f"outbound|9080|{subset}|reviews.{SUFFIX}"]["lb_policy"] == "RANDOM"
    assert clusters[f"outbound|9080||ratings.{SUFFIX}"]["lb_policy"] == "LEAST_REQUEST"
    envoy.push(
        cluster_dir(tmp_path / "split", defaults, networking / "virtual-service-reviews-80-20.yaml")
    )
    (split,) = routes_of(envoy, route_table("reviews"))
    assert sorted(destinations(split)) == [
        (f"outbound|9080|v1|reviews.{SUFFIX}", 80),
        (f"outbound|9080|v2|reviews.{SUFFIX}", 20),
    ]
    for file, kind, want in (
        ("virtual-service-ratings-test-delay.yaml", "delay", ("fixed_delay", "7s")),
        ("virtual-service-ratings-test-abort.yaml", "abort", ("http_status", 500)),
    ):
        envoy.push(cluster_dir(tmp_path / kind, defaults, networking / file))
        jason, everyone = routes_of(envoy, route_table("ratings"))
        assert jason["match"]["headers"][0]["name"] == "end-user"
        fault = fault_of(jason)[kind]
        assert fault[want[0]] == want[1]
        assert fault["percentage"] == {"numerator": 1000000, "denominator": "MILLION"}
        assert fault_of(everyone) == {}


# The ingress gateway the Gateway samples select (``istio: ingressgateway``), a Deployment's pod
# in istio-system as Istio installs it; not captured, its own identity.
INGRESS = {"istio": "ingressgateway"}
GATEWAY_NETNS = "samples-gateway"
GATEWAY_SAMPLES = [s for s in SAMPLES if any(d["kind"] == "Gateway" for d in sample_docs(s))]


@dataclass
class GatewayEnvoy:
    """The gateway's Envoy over the project's xDS server, and what ``nodeagent gateway`` (its
    GatewayProxy) would hand it for a cluster: the Gateways' listeners and route tables, the
    sidecar form's clusters, its own certificate from the CA."""

    envoy: EnvoyOverXds
    settings: GatewaySettings
    identities: IdentityManager

    def push(self, root: Path) -> Snapshot:
        proxy = GatewayProxy(self.settings, scan(root), self.identities, CollectorRegistry())
        self.envoy.call(proxy.resources)  # names its identity: issued by the renewal loop
        self.envoy.wait(self.identities.renew_due())
        resources = self.envoy.call(proxy.resources)
        assert proxy.problems == {}, proxy.problems
        return self.envoy.apply(resources)


@pytest.fixture(scope="module")
def gateway_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayEnvoy]:
    run = tmp_path_factory.mktemp("gateway")
    settings = GatewaySettings(
        namespace="istio-system",
        pod_name="istio-ingressgateway-0",
        labels=INGRESS,
        service_account="istio-ingressgateway-service-account",
        run_dir=run,
        envoy_binary=ENVOY,
        envoy_log=run / "envoy.log",
    )
    ca = BuiltinCA.load_or_create(run / "state", TRUST_DOMAIN)
    cluster = f"{settings.pod_name}.{settings.namespace}"
    # As GatewayProxy.start writes it: not captured, so its sockets are not marked.
    with envoy_over_xds(run, settings.node_id, cluster, GATEWAY_NETNS, socket_mark=None) as gw:
        yield GatewayEnvoy(gw, settings, IdentityManager(ca, TRUST_DOMAIN))


def uri_match(match: dict[str, Any]) -> tuple[str, str]:
    """An Envoy route match as the VirtualService's ``uri`` spells it."""
    for envoy_key, istio_key in (("path", "exact"), ("prefix", "prefix")):
        if envoy_key in match:
            return istio_key, match[envoy_key]
    raise AssertionError(f"not an exact or prefix path match: {match}")


def check_gateway_in_envoy(gw: EnvoyOverXds, docs: list[dict[str, Any]]) -> None:
    """What the sample's Gateways and their VirtualServices ask for is what the gateway Envoy
    holds: a listener on each server's port (no Service of the gateway translates it here), its
    route table ``http.<port>`` (Istio's pilot/pkg/model/gateway.go gatewayRDSRouteName) with a
    route per ``match`` of each VirtualService bound to the Gateway, in order, to the cluster
    ``outbound|<port>||<host>`` (the short host in the VirtualService's namespace). A cluster
    is there when the host is a Service; a host that is none (cert-manager-resolver: no
    Service in Bookinfo) is routed to all the same, as istiod does, and Envoy answers 503
    (istio.io/latest/docs/ops/common-problems/network-issues/, "Requests are rejected")."""
    listeners = {li["name"] for li in gw.dump("dynamic_listeners") if "active_state" in li}
    clusters = active_clusters(gw)
    services = {
        f"{d['metadata']['name']}.{d['metadata'].get('namespace', 'default')}.svc.cluster.local"
        for d in bookinfo_cluster()
        if d["kind"] == "Service"
    }
    for gateway in (d for d in docs if d["kind"] == "Gateway"):
        gw_ns = gateway["metadata"].get("namespace", "default")
        names = {f"{gw_ns}/{gateway['metadata']['name']}"}
        for server in gateway["spec"]["servers"]:
            port = server["port"]["number"]
            assert server["port"]["protocol"] == "HTTP", f"{server}: only HTTP is checked here"
            assert f"0.0.0.0_{port}" in listeners, (port, listeners)
            routes = routes_of(gw, f"http.{port}")
            rules = []
            for vs in (d for d in docs if d["kind"] == "VirtualService"):
                ns = vs["metadata"].get("namespace", "default")
                bound = {g if "/" in g else f"{ns}/{g}" for g in vs["spec"]["gateways"]}
                if bound & names:
                    rules += [(ns, rule) for rule in vs["spec"]["http"]]
            want = [
                (next(iter(m["uri"].items())), ns, rule["route"])
                for ns, rule in rules
                for m in rule["match"]
            ]
            assert len(routes) == len(want), routes
            for route, (uri, ns, dests) in zip(routes, want, strict=True):
                assert uri_match(route["match"]) == uri, route
                (dest,) = (d["destination"] for d in dests)
                host = f"{dest['host']}.{ns}.svc.cluster.local"
                cluster = f"outbound|{dest['port']['number']}||{host}"
                assert destinations(route) == [(cluster, 100)], route
                assert (cluster in clusters) == (host in services), (cluster, sorted(clusters))


@pytest.mark.parametrize("sample", GATEWAY_SAMPLES, ids=[s.name for s in GATEWAY_SAMPLES])
def test_gateway_sample_is_acked_by_the_gateway_envoy(
    gateway_envoy: GatewayEnvoy, tmp_path: Path, sample: Path
) -> None:
    """The Gateway sample on Bookinfo, as the ingress gateway gets it: every type ACKed, its
    listeners and routes in the gateway Envoy."""
    gw = gateway_envoy.envoy
    try:
        gateway_envoy.push(cluster_dir(tmp_path, sample))
        check_gateway_in_envoy(gw, sample_docs(sample))
    except AssertionError as e:
        tail = gw.log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}\n--- gateway envoy log (tail) ---\n{tail}") from e


def test_bookinfo_gateway_routes_its_five_paths_to_productpage_over_mtls(
    gateway_envoy: GatewayEnvoy, tmp_path: Path
) -> None:
    """Spelled out for bookinfo-gateway.yaml (istio.io/latest/docs/examples/bookinfo/
    #determine-the-ingress-ip-and-port): port 8080 serves /productpage, /static*, /login,
    /logout and /api/v1/products* from productpage:9080, whose cluster presents the gateway's
    own identity to the mesh (ISTIO_MUTUAL, its service account's SPIFFE ID)."""
    gw = gateway_envoy.envoy
    gateway_envoy.push(
        cluster_dir(tmp_path, istio_data("bookinfo/networking/bookinfo-gateway.yaml"))
    )
    productpage = f"outbound|9080||productpage.{SUFFIX}"
    routes = routes_of(gw, "http.8080")
    assert [(uri_match(r["match"]), destinations(r)) for r in routes] == [
        (("exact", "/productpage"), [(productpage, 100)]),
        (("prefix", "/static"), [(productpage, 100)]),
        (("exact", "/login"), [(productpage, 100)]),
        (("exact", "/logout"), [(productpage, 100)]),
        (("prefix", "/api/v1/products"), [(productpage, 100)]),
    ]
    s = gateway_envoy.settings
    identity = spiffe_id(TRUST_DOMAIN, s.namespace, s.service_account)
    assert identity in json.dumps(active_clusters(gw)[productpage]["transport_socket_matches"])
    secrets = {sec["name"] for sec in gw.dump("dynamic_active_secrets")}
    assert {identity, "ROOTCA"} <= secrets
