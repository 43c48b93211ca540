"""The testbed topology: nodes, namespaces, pods and services, read from a YAML file.

Parsing is strict: an unknown field, a wrong type or a dangling reference is an error naming the
file and the field path (``pods[2].workload.type``), so a typo never silently changes the cluster.
Addresses are planned here too (pure functions): each node gets a /24 of the cluster CIDR (or
``network.nodeCIDRMaskSize``) and an underlay address, each service a virtual IP from the service
CIDR.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from nodeagent import kubeyaml
from nodeagent.mesh.model import REGION_LABEL, ZONE_LABEL

WORKLOAD_TYPES = ("fake-service", "sleep", "command", "gateway")
# A gateway pod (``nodeagent gateway`` with the pod's labels as its selector) is ready once its
# Envoy's stats listener (Istio's :15090) listens in the pod.
GATEWAY_READY_PORT = 15090
# The "outside world" client's link to its node (RFC 2544's benchmarking range: never a real
# network); the node's end .1, the client .2. It lives only inside the testbed's namespaces.
OUTSIDE_CIDR = ipaddress.IPv4Network("198.18.0.0/30")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
TESTBED_NAME = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
# Addresses only ever exist inside the testbed's own network namespaces.
DEFAULT_CLUSTER_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
DEFAULT_SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
DEFAULT_UNDERLAY_CIDR = ipaddress.IPv4Network("172.31.0.0/24")
# Where the node agents read the cluster from: "kubernetes" (the testbed's stand-in API server,
# list/watch as the DaemonSet's agents do on a real cluster) or "directory" (--source-dir).
SOURCES = ("kubernetes", "directory")
CAPTURE_MODES = ("nftables", "ebpf", "auto")
DEFAULT_SOURCE = "kubernetes"
APISERVER_PORT = 6443
# Who signs the workload certificates: "service" (the CA service, `nodeagent ca`, run by the
# testbed as the control plane's Deployment; the node agents are its clients, as the DaemonSet
# runs them) or "plugin" (every node agent signs locally with the testbed's shared plug-in
# cacerts, --ca-dir: the standalone mode).
CA_MODES = ("service", "plugin")
DEFAULT_CA = "service"
# The underlay's top hosts: API server, control plane, resolver (externals below them).
RESERVED_UNDERLAY_HOSTS = 3
DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT = 80, 443
# A DNS name an external server answers to (lower case, at least two labels).
DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
)
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


class TopologyError(ValueError):
    """A topology file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Network:
    cluster_cidr: ipaddress.IPv4Network = DEFAULT_CLUSTER_CIDR
    service_cidr: ipaddress.IPv4Network = DEFAULT_SERVICE_CIDR
    underlay_cidr: ipaddress.IPv4Network = DEFAULT_UNDERLAY_CIDR
    cluster_domain: str = "cluster.local"
    # Each node's pod CIDR prefix length (kube-controller-manager's --node-cidr-mask-size):
    # /24 gives a node 253 pods; /22 the 1000 of the reconcile benchmark.
    node_mask_size: int = 24

    @property
    def apiserver_ip(self) -> ipaddress.IPv4Address:
        """The stand-in API server's address in the underlay (its last host; never a node's)."""
        return self.underlay_cidr.broadcast_address - 1

    @property
    def control_plane_ip(self) -> ipaddress.IPv4Address:
        """The control-plane host's address in the underlay (where the CA service runs with
        ``ca: service``): the host before the API server's, never a node's."""
        return self.underlay_cidr.broadcast_address - 2

    @property
    def resolver_ip(self) -> ipaddress.IPv4Address:
        """The testbed resolver's address in the underlay (the cluster DNS every pod's
        resolv.conf names): the host before the control plane's, never a node's."""
        return self.underlay_cidr.broadcast_address - RESERVED_UNDERLAY_HOSTS

    def external_ip(self, index: int) -> ipaddress.IPv4Address:
        """External server INDEX's address in the underlay: below the resolver's, counting down
        (nodes count up from the bottom; the parser checks they never meet)."""
        return self.resolver_ip - 1 - index


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    pod_cidr: ipaddress.IPv4Network
    underlay_ip: ipaddress.IPv4Address
    # The Node object's labels: its locality (topology.kubernetes.io/region, /zone,
    # topology.istio.io/subzone) for locality load balancing. Default: region r1, zone z<i+1>
    # (every node its own zone, as a cluster spread over zones has).
    labels: Mapping[str, str] = field(default_factory=dict)
    # This node's agent's --capture-mode; "" = the topology's captureMode.
    capture_mode: str = ""

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The node's address on its pod bridge (the bridge CNI plugin's gateway)."""
        return self.pod_cidr.network_address + 1


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    type: str
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str
    service_account: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    workload: Workload
    # The Deployment it stands for: its object then names a ReplicaSet of it as its controller,
    # as kube's does (resources.pod_object), which the agents derive its workload from.
    deployment: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Outside:
    """A client outside the mesh and the nodes (a netns of its own, wired to one node): it
    reaches only PODS (namespace/name, all on NODE), as a load balancer in front of a
    gateway would be reached from the internet."""

    pods: tuple[str, ...]
    node: str

    @property
    def node_ip(self) -> ipaddress.IPv4Address:
        return OUTSIDE_CIDR.network_address + 1

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return OUTSIDE_CIDR.network_address + 2


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: ipaddress.IPv4Address

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, pod: Pod) -> bool:
        """Kubernetes semantics: same namespace and every selector label; no selector, no pods."""
        return (
            pod.namespace == self.namespace
            and bool(self.selector)
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True)
class External:
    """A server outside the mesh and outside every node (the "internet" of S1.7): a netns of its
    own on the underlay, answering plain HTTP on HTTP_PORT and HTTPS on HTTPS_PORT with a
    certificate from its own CA (not the mesh's) whose SANs are its NAMES; the testbed resolver
    answers its NAMES with its address."""

    name: str
    names: tuple[str, ...]
    ip: ipaddress.IPv4Address
    http_port: int = DEFAULT_HTTP_PORT
    https_port: int = DEFAULT_HTTPS_PORT


@dataclass(frozen=True)
class Topology:
    name: str
    network: Network
    nodes: tuple[Node, ...]
    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    services: tuple[Service, ...]
    # Whether each node runs the node agent with nodeagent-cni chained after bridge (the
    # DaemonSet is installed); off, pods get the primary CNI only (the no-mesh baseline).
    nodeagent: bool = True
    # With nodeagent: whether each node also runs its Envoy (false: capture only, for tests).
    proxy: bool = True
    cert_ttl: int = 24 * 3600  # workload certificate lifetime, seconds (Istio's default 24 h)
    # With proxy: run each node's Envoy as a node daemon of its own (`nodeagent envoy`, the
    # DaemonSet's envoy container) and the agent in --envoy-mode external; false: the agent
    # starts and supervises Envoy itself.
    envoy_container: bool = False
    # With proxy: "node" (one shared Envoy per node) or "sidecar" (one Envoy inside each
    # captured pod with istio-init's rules: Istio's sidecar model, the benchmarks' baseline).
    proxy_model: str = "node"
    # With nodeagent: where the agents read the cluster from (SOURCES).
    source: str = DEFAULT_SOURCE
    # With nodeagent: who signs workload certificates (CA_MODES).
    ca: str = DEFAULT_CA
    externals: tuple[External, ...] = ()
    # A client netns outside the mesh (topology key ``outside``), or None.
    outside: Outside | None = None
    # With nodeagent: each agent's --capture-mode (CAPTURE_MODES), unless its node names one.
    capture_mode: str = "nftables"

    def capture_mode_of(self, node: str) -> str:
        return self.node(node).capture_mode or self.capture_mode

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def external(self, name: str) -> External:
        for ext in self.externals:
            if ext.name == name:
                return ext
        known = ", ".join(e.name for e in self.externals) or "none"
        raise KeyError(f"no external {name!r} in testbed {self.name!r} (externals: {known})")

    def find_pod(self, ref: str) -> Pod:
        """A pod by ``namespace/name``, or by bare name when exactly one pod has it."""
        if "/" in ref:
            matches = [p for p in self.pods if p.key == ref]
        else:
            matches = [p for p in self.pods if p.name == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(p.key for p in self.pods)
            raise KeyError(f"no pod {ref!r} in testbed {self.name!r} (pods: {known})")
        both = ", ".join(p.key for p in matches)
        raise KeyError(f"pod name {ref!r} is ambiguous ({both}); use namespace/name")


class _Reader:
    """Walks the YAML tree, checking types and fields, with errors that name the path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")

    def mapping(
        self, value: Any, path: str, allowed: set[str], required: Iterable[str] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{path}.{key}" if path else str(key),
                    f"unknown field (allowed: {', '.join(sorted(allowed))})",
                )
        for key in sorted(set(required) - value.keys()):
            raise self.fail(f"{path}.{key}" if path else key, "required field is missing")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(path, f"{value!r} is not a valid name (pattern {pattern.pattern})")
        return value

    def port(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(path, f"expected a port number 1-65535, got {value!r}")
        return int(value)

    def labels(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping of strings, got {type(value).__name__}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not LABEL_KEY.match(k):
                raise self.fail(f"{path}.{k}", "invalid key")
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise self.fail(f"{path}.{k}", f"expected a string value, got {v!r}")
            out[k] = str(v)
        return out

    def network(self, value: Any, path: str) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(self.string(value, path))
        except ValueError as e:
            raise self.fail(path, f"invalid IPv4 CIDR: {e}") from None


def parse_topology(data: Any, source: str = "<topology>") -> Topology:
    r = _Reader(source)
    top = r.mapping(
        data,
        "",
        {
            "name",
            "network",
            "nodes",
            "namespaces",
            "pods",
            "services",
            "nodeagent",
            "proxy",
            "certTTL",
            "envoyContainer",
            "proxyModel",
            "captureMode",
            "source",
            "ca",
            "externals",
            "outside",
        },
        {"name", "nodes"},
    )
    name = r.string(top["name"], "name", TESTBED_NAME)

    net_raw = r.mapping(
        top.get("network") or {},
        "network",
        {"clusterCIDR", "serviceCIDR", "underlayCIDR", "clusterDomain", "nodeCIDRMaskSize"},
    )
    default = Network()
    network = Network(
        cluster_cidr=r.network(net_raw["clusterCIDR"], "network.clusterCIDR")
        if "clusterCIDR" in net_raw
        else default.cluster_cidr,
        service_cidr=r.network(net_raw["serviceCIDR"], "network.serviceCIDR")
        if "serviceCIDR" in net_raw
        else default.service_cidr,
        underlay_cidr=r.network(net_raw["underlayCIDR"], "network.underlayCIDR")
        if "underlayCIDR" in net_raw
        else default.underlay_cidr,
        cluster_domain=r.string(
            net_raw.get("clusterDomain", default.cluster_domain), "network.clusterDomain"
        ),
        node_mask_size=net_raw.get("nodeCIDRMaskSize", default.node_mask_size),
    )
    mask = network.node_mask_size
    if isinstance(mask, bool) or not isinstance(mask, int) or not 16 <= mask <= 28:
        raise r.fail("network.nodeCIDRMaskSize", f"expected a prefix length 16-28, got {mask!r}")
    if network.cluster_cidr.prefixlen >= mask:
        raise r.fail(
            "network.clusterCIDR",
            f"must be /{mask - 1} or larger: each node takes a /{mask} (nodeCIDRMaskSize)",
        )
    if network.cluster_cidr.overlaps(network.service_cidr):
        raise r.fail("network.serviceCIDR", f"overlaps clusterCIDR {network.cluster_cidr}")

    node_cidrs = list(network.cluster_cidr.subnets(new_prefix=mask))
    underlay_hosts = list(network.underlay_cidr.hosts())
    nodes: list[Node] = []
    for i, raw in enumerate(r.sequence(top["nodes"], "nodes")):
        path = f"nodes[{i}]"
        node_raw = r.mapping(raw, path, {"name", "labels", "captureMode"}, {"name"})
        node_mode = node_raw.get("captureMode", "")
        if node_mode and node_mode not in CAPTURE_MODES:
            raise r.fail(
                f"{path}.captureMode",
                f"expected one of {', '.join(CAPTURE_MODES)}, got {node_mode!r}",
            )
        node_name = r.string(node_raw["name"], f"{path}.name", DNS_LABEL)
        if any(n.name == node_name for n in nodes):
            raise r.fail(f"{path}.name", f"duplicate node {node_name!r}")
        # The underlay's top hosts are the API server's, the control plane's and the resolver's.
        if i + 1 >= len(node_cidrs) or i >= len(underlay_hosts) - RESERVED_UNDERLAY_HOSTS:
            raise r.fail(path, "more nodes than the cluster or underlay CIDR can address")
        labels = (
            r.labels(node_raw["labels"], f"{path}.labels")
            if "labels" in node_raw
            else {REGION_LABEL: "r1", ZONE_LABEL: f"z{i + 1}"}
        )
        nodes.append(Node(node_name, i, node_cidrs[i + 1], underlay_hosts[i], labels, node_mode))
    if not nodes:
        raise r.fail("nodes", "at least one node is required")

    namespaces: dict[str, Namespace] = {}
    for i, raw in enumerate(r.sequence(top.get("namespaces"), "namespaces")):
        path = f"namespaces[{i}]"
        ns_raw = r.mapping(raw, path, {"name", "labels"}, {"name"})
        ns_name = r.string(ns_raw["name"], f"{path}.name", DNS_LABEL)
        if ns_name in namespaces:
            raise r.fail(f"{path}.name", f"duplicate namespace {ns_name!r}")
        namespaces[ns_name] = Namespace(ns_name, r.labels(ns_raw.get("labels"), f"{path}.labels"))

    pods: list[Pod] = []
    for i, raw in enumerate(r.sequence(top.get("pods"), "pods")):
        pods.append(_parse_pod(r, raw, f"pods[{i}]", nodes, pods))
    for pod in pods:
        namespaces.setdefault(pod.namespace, Namespace(pod.namespace))

    services: list[Service] = []
    vips = _vip_pool(network.service_cidr)
    for i, raw in enumerate(r.sequence(top.get("services"), "services")):
        services.append(_parse_service(r, raw, f"services[{i}]", network, services, vips))
        namespaces.setdefault(services[-1].namespace, Namespace(services[-1].namespace))

    externals = _parse_externals(r, top.get("externals"), network, len(nodes))

    nodeagent = top.get("nodeagent", True)
    if not isinstance(nodeagent, bool):
        raise r.fail("nodeagent", f"expected true or false, got {nodeagent!r}")
    proxy = top.get("proxy", True)
    if not isinstance(proxy, bool):
        raise r.fail("proxy", f"expected true or false, got {proxy!r}")
    envoy_container = top.get("envoyContainer", False)
    if not isinstance(envoy_container, bool):
        raise r.fail("envoyContainer", f"expected true or false, got {envoy_container!r}")
    if envoy_container and not (nodeagent and proxy):
        raise r.fail("envoyContainer", "needs nodeagent: true and proxy: true (it runs the Envoy)")
    proxy_model = top.get("proxyModel", "node")
    if proxy_model not in ("node", "sidecar"):
        raise r.fail("proxyModel", f"expected node or sidecar, got {proxy_model!r}")
    if proxy_model == "sidecar" and (not (nodeagent and proxy) or envoy_container):
        raise r.fail(
            "proxyModel",
            "sidecar needs nodeagent: true and proxy: true, and no envoyContainer (each pod"
            " runs its own Envoy)",
        )
    capture_mode = top.get("captureMode", "nftables")
    if capture_mode not in CAPTURE_MODES:
        raise r.fail(
            "captureMode", f"expected one of {', '.join(CAPTURE_MODES)}, got {capture_mode!r}"
        )
    modes = {capture_mode, *(n.capture_mode for n in nodes if n.capture_mode)}
    if modes != {"nftables"} and proxy_model == "sidecar":
        raise r.fail("captureMode", "the sidecar model captures with nftables only")
    cert_ttl = top.get("certTTL", 24 * 3600)
    if isinstance(cert_ttl, bool) or not isinstance(cert_ttl, int) or cert_ttl < 10:
        raise r.fail("certTTL", f"expected whole seconds, at least 10, got {cert_ttl!r}")
    source = top.get("source", DEFAULT_SOURCE)
    if source not in SOURCES:
        raise r.fail("source", f"expected one of {', '.join(SOURCES)}, got {source!r}")
    ca = top.get("ca", DEFAULT_CA)
    if ca not in CA_MODES:
        raise r.fail("ca", f"expected one of {', '.join(CA_MODES)}, got {ca!r}")
    outside = _parse_outside(r, top["outside"], pods) if "outside" in top else None
    # ca: service with source: directory is allowed: the CA needs an API server (TokenReview,
    # its Secrets, the pods of each node) whatever the agents read the mesh from, so the testbed
    # starts its stand-in for the CA anyway (the agents keep reading the directory).
    return Topology(
        name,
        network,
        tuple(nodes),
        tuple(namespaces.values()),
        tuple(pods),
        tuple(services),
        nodeagent,
        proxy,
        cert_ttl,
        envoy_container,
        proxy_model,
        source,
        ca,
        externals,
        outside,
        capture_mode,
    )


def _parse_externals(
    r: _Reader, raw: Any, network: Network, node_count: int
) -> tuple[External, ...]:
    externals: list[External] = []
    taken: dict[str, str] = {}  # DNS name -> the external that has it
    for i, item in enumerate(r.sequence(raw, "externals")):
        path = f"externals[{i}]"
        ext_raw = r.mapping(item, path, {"name", "names", "httpPort", "httpsPort"}, {"name"})
        name = r.string(ext_raw["name"], f"{path}.name", DNS_LABEL)
        if any(e.name == name for e in externals):
            raise r.fail(f"{path}.name", f"duplicate external {name!r}")
        names_raw = r.sequence(ext_raw.get("names"), f"{path}.names")
        if not names_raw:
            raise r.fail(f"{path}.names", "at least one DNS name is required")
        names: list[str] = []
        for j, dns_name in enumerate(names_raw):
            npath = f"{path}.names[{j}]"
            dns_name = r.string(dns_name, npath, DNS_NAME)
            if dns_name.endswith(f".{network.cluster_domain}"):
                raise r.fail(npath, f"{dns_name!r} is inside the cluster domain")
            if dns_name in taken:
                raise r.fail(
                    npath, f"{dns_name!r} is already a name of external {taken[dns_name]!r}"
                )
            taken[dns_name] = name
            names.append(dns_name)
        http = r.port(ext_raw.get("httpPort", DEFAULT_HTTP_PORT), f"{path}.httpPort")
        https = r.port(ext_raw.get("httpsPort", DEFAULT_HTTPS_PORT), f"{path}.httpsPort")
        if http == https:
            raise r.fail(f"{path}.httpsPort", f"{https} is also the httpPort")
        ip = network.external_ip(i)
        if int(ip) - int(network.underlay_cidr.network_address) <= node_count:
            raise r.fail(path, "more nodes and externals than the underlay CIDR can address")
        externals.append(External(name, tuple(names), ip, http, https))
    return tuple(externals)


def _parse_outside(r: _Reader, raw: Any, pods: list[Pod]) -> Outside:
    """``outside: {pods: [namespace/name, ...]}``: the pods (on one node) it may reach."""
    fields = r.mapping(raw, "outside", {"pods"}, {"pods"})
    refs = r.sequence(fields["pods"], "outside.pods")
    if not refs:
        raise r.fail("outside.pods", "expected at least one pod (namespace/name)")
    found: list[Pod] = []
    for i, ref in enumerate(refs):
        pod = next((p for p in pods if isinstance(ref, str) and p.key == ref), None)
        if pod is None:
            raise r.fail(f"outside.pods[{i}]", f"no pod {ref!r} (write namespace/name)")
        found.append(pod)
    nodes = sorted({p.node for p in found})
    if len(nodes) > 1:
        raise r.fail("outside.pods", f"its pods must be on one node, not on {', '.join(nodes)}")
    return Outside(tuple(p.key for p in found), nodes[0])


def _parse_pod(r: _Reader, raw: Any, path: str, nodes: list[Node], seen: list[Pod]) -> Pod:
    pod_raw = r.mapping(
        raw,
        path,
        {
            "name",
            "namespace",
            "node",
            "serviceAccount",
            "labels",
            "annotations",
            "workload",
            "deployment",
        },
        {"name", "node"},
    )
    name = r.string(pod_raw["name"], f"{path}.name", DNS_LABEL)
    deployment = ""
    if "deployment" in pod_raw:
        deployment = r.string(pod_raw["deployment"], f"{path}.deployment", DNS_LABEL)
    namespace = r.string(pod_raw.get("namespace", "default"), f"{path}.namespace", DNS_LABEL)
    node = r.string(pod_raw["node"], f"{path}.node")
    if not any(n.name == node for n in nodes):
        raise r.fail(f"{path}.node", f"no node named {node!r}")
    if any(p.namespace == namespace and p.name == name for p in seen):
        raise r.fail(f"{path}.name", f"duplicate pod {namespace}/{name}")
    sa = r.string(pod_raw.get("serviceAccount", "default"), f"{path}.serviceAccount", DNS_LABEL)

    wl_raw = r.mapping(
        pod_raw.get("workload") or {"type": "sleep"},
        f"{path}.workload",
        {"type", "port", "env", "command"},
        {"type"},
    )
    wl_type = r.string(wl_raw["type"], f"{path}.workload.type")
    if wl_type not in WORKLOAD_TYPES:
        raise r.fail(
            f"{path}.workload.type",
            f"unknown workload type {wl_type!r} (expected one of {', '.join(WORKLOAD_TYPES)})",
        )
    port = r.port(wl_raw["port"], f"{path}.workload.port") if "port" in wl_raw else None
    if wl_type == "fake-service" and port is None:
        port = 8080
    if wl_type == "gateway":
        if port is not None:
            raise r.fail(f"{path}.workload.port", "a gateway's ports come from its Gateways")
        if not pod_raw.get("labels"):
            raise r.fail(f"{path}.labels", "a gateway pod needs labels: its Gateways select them")
        port = GATEWAY_READY_PORT
    command: tuple[str, ...] = ()
    if wl_type == "command":
        cmd_raw = r.sequence(wl_raw.get("command"), f"{path}.workload.command")
        if not cmd_raw or not all(isinstance(c, str) for c in cmd_raw):
            raise r.fail(f"{path}.workload.command", "expected a non-empty list of strings")
        command = tuple(cmd_raw)
    elif "command" in wl_raw:
        raise r.fail(f"{path}.workload.command", f"only valid for type 'command', not {wl_type!r}")
    env = r.labels(wl_raw.get("env"), f"{path}.workload.env") if wl_raw.get("env") else {}

    return Pod(
        namespace=namespace,
        name=name,
        node=node,
        service_account=sa,
        labels=r.labels(pod_raw.get("labels"), f"{path}.labels"),
        annotations=r.labels(pod_raw.get("annotations"), f"{path}.annotations"),
        workload=Workload(wl_type, port, env, command),
        deployment=deployment,
    )


def _vip_pool(cidr: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    # Kubernetes hands out .1 to the API server service; start well clear of it.
    return [ip for ip in cidr.hosts() if int(ip) - int(cidr.network_address) >= 10][:4096]


def _parse_service(
    r: _Reader,
    raw: Any,
    path: str,
    network: Network,
    seen: list[Service],
    pool: list[ipaddress.IPv4Address],
) -> Service:
    svc_raw = r.mapping(
        raw, path, {"name", "namespace", "selector", "ports", "clusterIP"}, {"name", "ports"}
    )
    name = r.string(svc_raw["name"], f"{path}.name", DNS_LABEL)
    namespace = r.string(svc_raw.get("namespace", "default"), f"{path}.namespace", DNS_LABEL)
    if any(s.namespace == namespace and s.name == name for s in seen):
        raise r.fail(f"{path}.name", f"duplicate service {namespace}/{name}")

    ports: list[ServicePort] = []
    for j, praw in enumerate(r.sequence(svc_raw["ports"], f"{path}.ports")):
        ppath = f"{path}.ports[{j}]"
        p = r.mapping(
            praw, ppath, {"name", "port", "targetPort", "protocol", "appProtocol"}, {"port"}
        )
        port = r.port(p["port"], f"{ppath}.port")
        protocol = p.get("protocol", "TCP")
        if protocol != "TCP":
            raise r.fail(f"{ppath}.protocol", f"only TCP is supported, got {protocol!r}")
        ports.append(
            ServicePort(
                name=r.string(p.get("name", f"tcp-{port}"), f"{ppath}.name"),
                port=port,
                target_port=r.port(p.get("targetPort", port), f"{ppath}.targetPort"),
                app_protocol=r.string(p["appProtocol"], f"{ppath}.appProtocol")
                if "appProtocol" in p
                else None,
            )
        )
    if not ports:
        raise r.fail(f"{path}.ports", "at least one port is required")

    taken = {s.cluster_ip for s in seen}
    if "clusterIP" in svc_raw:
        try:
            vip = ipaddress.IPv4Address(r.string(svc_raw["clusterIP"], f"{path}.clusterIP"))
        except ValueError as e:
            raise r.fail(f"{path}.clusterIP", str(e)) from None
        if vip not in network.service_cidr:
            raise r.fail(
                f"{path}.clusterIP", f"{vip} is outside serviceCIDR {network.service_cidr}"
            )
        if vip in taken:
            raise r.fail(f"{path}.clusterIP", f"{vip} is already used by another service")
    else:
        free = [ip for ip in pool if ip not in taken]
        if not free:
            raise r.fail(path, "serviceCIDR has no free address left")
        vip = free[0]

    return Service(
        namespace=namespace,
        name=name,
        selector=r.labels(svc_raw.get("selector"), f"{path}.selector"),
        ports=tuple(ports),
        cluster_ip=vip,
    )


def load_topology(path: Path) -> Topology:
    try:
        text = path.read_text()
    except OSError as e:
        raise TopologyError(f"{path}: cannot read topology: {e.strerror}") from None
    return loads_topology(text, str(path))


def loads_topology(text: str, source: str) -> Topology:
    try:
        data = kubeyaml.load(text)
    except kubeyaml.YAMLError as e:
        raise TopologyError(f"{source}: invalid YAML: {e}") from None
    return parse_topology(data, source)


def builtin_topology_path(name: str) -> Path:
    """Path of a topology shipped with the package (``workshop`` is the demo's)."""
    ref = resources.files("nodeagent.testbed").joinpath("topologies", f"{name}.yaml")
    return Path(str(ref))


def builtin_topologies() -> list[str]:
    folder = resources.files("nodeagent.testbed").joinpath("topologies")
    return sorted(Path(str(f)).stem for f in folder.iterdir() if str(f).endswith(".yaml"))
