"""Bring a simulated cluster up and down: nodes and pods as network namespaces.

Layout (every address lives inside namespaces made here; the root namespace is never touched):

    tb-<name>.underlay            bridge br0 wiring the nodes together
      ul-<i> <-veth-> ul0         node i's underlay address; routes to the other nodes' pods
    tb-<name>.node-<node>         cni0 bridge (made by the bridge CNI plugin), service proxy table,
                                  the node agent and install-cni (when the topology runs nodeagent)
      veth <-> eth0               in each pod netns tb-<name>.pod-<ns>.<pod>, made by the CNI chain

Pods are created the way kubelet and the container runtime create them: the pod object is published
(in the cluster directory, which the testbed's stand-in API server serves, or which the node agents
read themselves with ``source: directory``), then the runtime shim runs the node's CNI
configuration list, which install-cni extended with nodeagent-cni, then the workload starts inside
the pod.

    tb-<name>.underlay  br0 also holds the API server's address (the underlay's last host)
    tb-<name>.control-plane       ca: service: the CA service, on the underlay's host before it
    tb-<name>.resolver            the testbed resolver (cluster DNS + the externals' names), on
                                  the host before that; every pod's resolv.conf names it
    tb-<name>.ext-<external>      each external server (topology ``externals``), below it

The resolver's and externals' hosts sit on the underlay bridge like a node and route the pod
CIDRs through the nodes, so pods (and the node Envoys) reach them; nothing routes them in the root
namespace.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nodeagent
from nodeagent.cni import wire
from nodeagent.identity.ca import create_plugin_cacerts
from nodeagent.proxyconfig import host_address
from nodeagent.testbed import (
    cgroups,
    control_plane,
    daemons,
    externals,
    hosts,
    layout,
    netlink,
    netns,
    node_credentials,
    resolver,
    resources,
    services,
)
from nodeagent.testbed.cni_runtime import (
    DEFAULT_PLUGIN_DIRS,
    LOOPBACK_CONFLIST,
    CNIError,
    Runtime,
    Sandbox,
    load_conflist,
    pod_ipv4,
)
from nodeagent.testbed.layout import netns_prefix, node_netns, pod_netns, underlay_netns
from nodeagent.testbed.state import (
    RUN_DIR,
    DaemonRecord,
    PodRecord,
    TestbedState,
    known_testbeds,
)
from nodeagent.testbed.topology import (
    APISERVER_PORT,
    OUTSIDE_CIDR,
    External,
    Node,
    Outside,
    Pod,
    Service,
    ServicePort,
    Topology,
    Workload,
    loads_topology,
)

READY_TIMEOUT = 20.0
# The testbed's mesh config under whatever a test sets: access logs to Envoy's stdout (the
# node's logs/<node>.envoy.log), as Istio's demo profile turns them on; Istio's default, and
# the agent's, is none. Tests and the demo read requests' hops from those lines.
MESH_DEFAULTS: Mapping[str, Any] = {"accessLogFile": "/dev/stdout"}
# A workload without a port is ready once it has stayed up this long (it did not crash on start).
SETTLE_TIME = 0.5


class TestbedError(RuntimeError):
    """The testbed cannot do what was asked; the message says why and what to do."""

    __test__ = False  # not a pytest test class, despite the name


def node_runtime(name: str, node: str) -> Runtime:
    """The container runtime of NODE: plugins from the node's CNI bin dir, then Debian's."""
    ns = node_netns(name, node)
    return Runtime(
        (layout.cni_bin_dir(name, node), *DEFAULT_PLUGIN_DIRS),
        cache_dir=layout.node_dir(name, node) / "cni-cache",
        wrap=lambda argv: netns.in_netns(ns, argv),
    )


def bridge_conflist(name: str, node: Node) -> dict[str, Any]:
    """The node's primary CNI network: Kubernetes' classic bridge + host-local IPAM."""
    return {
        "cniVersion": "1.0.0",
        "name": "testbed",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(node.pod_cidr), "gateway": str(node.gateway)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.node_dir(name, node.name) / "ipam"),
                },
            }
        ],
    }


@dataclass(frozen=True)
class ControlPlaneStatus:
    component: str  # "apiserver", "ca", "resolver"
    pid: int | None  # None: not running
    address: str
    ready: str  # "" when ready, else why not


@dataclass(frozen=True)
class PodStatus:
    pod: Pod
    netns: str
    ip: str
    netns_present: bool
    running: bool


class Testbed:
    """A testbed that is up (or was being brought up): its topology and its state file.

    Pods may be added and removed from several threads at once (``add_pod``/``remove_pod``).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, topology: Topology, state: TestbedState) -> None:
        self.topology = topology
        self.state = state
        self._lock = threading.RLock()  # guards state and its file
        self._publish_lock = threading.Lock()  # one publisher at a time: files and node tables
        self._started: dict[str, float] = {}  # pod key -> monotonic time its workload started

    @property
    def name(self) -> str:
        return self.topology.name

    # -- lookup -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, name: str | None = None) -> Testbed:
        """The testbed called NAME, or the only one that is up."""
        if name is None:
            names = known_testbeds()
            if not names:
                raise TestbedError("no testbed is up (start one with `nodeagent testbed up`)")
            if len(names) > 1:
                raise TestbedError(f"several testbeds are up ({', '.join(names)}); pass --name")
            name = names[0]
        state = TestbedState.load(name)
        if state is None:
            raise TestbedError(
                f"testbed {name!r} is not up (no state in {TestbedState.directory(name)})"
            )
        topology = _topology_of(state)
        if state.installed_later:
            topology = replace(topology, nodeagent=True)
        return cls(topology, state)

    def pod_ip(self, ref: str) -> str:
        return self.state.pods[self.topology.find_pod(ref).key].ip

    def pod_netns(self, ref: str) -> str:
        return pod_netns(self.name, self.topology.find_pod(ref))

    def exec_argv(self, ref: str, argv: list[str]) -> list[str]:
        """argv running a command inside a pod as ``kubectl exec`` does: its netns and its
        /etc/hosts, and its container's cgroup (where eBPF capture's hooks see it)."""
        pod = self.topology.find_pod(ref)
        inner = netns.in_netns(pod_netns(self.name, pod), argv)
        record = self.state.pods.get(pod.key)
        if record is None or not self.state.cgroup:
            return inner
        folder = cgroups.pod_dir(Path(self.state.cgroup), record.uid, record.container_id)
        return cgroups.in_cgroup(folder, inner) if folder.is_dir() else inner

    def exec(
        self, ref: str, argv: list[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.exec_argv(ref, argv), capture_output=True, text=True, timeout=timeout
        )

    def status(self) -> list[PodStatus]:
        out = []
        for pod in self.topology.pods:
            rec = self.state.pods.get(pod.key)
            ns = pod_netns(self.name, pod)
            running = bool(rec and rec.pid and netns.alive(rec.pid, rec.start_time))
            out.append(PodStatus(pod, ns, rec.ip if rec else "", netns.exists(ns), running))
        return out

    def control_plane_status(self) -> list[ControlPlaneStatus]:
        """The stand-in API server and the CA service, when the topology runs them, and the
        testbed resolver."""
        out = []
        with self._lock:
            records = {r.name: r for r in self.state.daemons if not r.node}
        wanted = []
        if self.topology.source == "kubernetes" or self.topology.ca == "service":
            wanted.append((daemons.APISERVER, self.apiserver_address))
        if self.topology.nodeagent and self.topology.ca == "service":
            wanted.append((daemons.CA, self.ca_address))
        wanted.append((daemons.RESOLVER, f"{self.resolver_ip}:{resolver.PORT}"))
        for component, address in wanted:
            record = records.get(component)
            alive = record is not None and netns.alive(record.pid, record.start_time)
            if not alive or record is None:
                out.append(ControlPlaneStatus(component, None, address, "not running"))
                continue
            if component == daemons.CA:
                why = self.ca_ready()
            elif component == daemons.RESOLVER:
                listening = netns.listening(record.pid, resolver.PORT)
                why = "" if listening else "not listening yet"
            else:
                kubeconfig = layout.apiserver_kubeconfig(self.name)
                why = "" if kubeconfig.is_file() else "not listening yet"
            out.append(ControlPlaneStatus(component, record.pid, address, why))
        return out

    # -- up ---------------------------------------------------------------------------------------

    @classmethod
    def up(cls, topology: Topology, topology_text: str, source: str) -> Testbed:
        """Create every node and pod; on any failure remove what was made and re-raise."""
        name = topology.name
        if TestbedState.load(name) is not None:
            raise TestbedError(
                f"testbed {name!r} is already up (state {TestbedState.directory(name)}); "
                f"run `nodeagent testbed down --name {name}` first"
            )
        leftovers = [n for n in netns.list_netns() if n.startswith(netns_prefix(name))]
        if leftovers:
            raise TestbedError(
                f"network namespaces of testbed {name!r} exist without a state file "
                f"({', '.join(leftovers)}); remove them with `nodeagent testbed down --name {name}`"
            )
        state = TestbedState(name=name, topology_source=source, topology_text=topology_text)
        state.save()
        testbed = cls(topology, state)
        try:
            testbed._build()
        except BaseException as e:
            problems = down(name)
            if not isinstance(e, Exception):
                raise
            left = f"; cleanup left: {'; '.join(problems)}" if problems else ""
            raise TestbedError(f"{e} (everything made so far was removed{left})") from e
        return testbed

    def _build(self) -> None:
        with self._lock:
            self.state.cgroup = str(cgroups.testbed_dir(self.name))
            self.state.save()
        self._build_underlay()
        for node in self.topology.nodes:
            self._build_node(node)
        edge = self._start_edge()
        self._publish_namespaces()
        self._publish_nodes()
        if self.topology.source == "kubernetes":
            # A cluster's API server runs before any mesh is installed on it (nodeagent: false,
            # then `testbed install`): start its stand-in with the cluster, not with the agents.
            self._start_apiserver()
        if self.topology.nodeagent:
            self._start_daemons()
        for pod in self.topology.pods:
            self._create_sandbox(pod)
        if self.topology.outside is not None:
            self._build_outside(self.topology.outside)
        self._publish()
        for pod in self.topology.pods:
            self._start_workload(pod)
        for record in edge:
            try:
                daemons.wait_ready(self.name, record)
            except daemons.DaemonError as e:
                raise TestbedError(str(e)) from None
        self._wait_ready(self.topology.pods)
        self._publish()  # now with every ready pod as an endpoint
        if self.topology.nodeagent and self.topology.proxy:
            self.wait_converged()
        with self._lock:
            self.state.phase = "up"
            self.state.save()

    def _publish_namespaces(self) -> None:
        resources.write(
            layout.cluster_dir(self.name) / "namespaces.yaml",
            [resources.namespace_object(ns) for ns in self.topology.namespaces],
        )

    def _publish_nodes(self) -> None:
        resources.write(
            layout.cluster_dir(self.name) / "nodes.yaml",
            [resources.node_object(node) for node in self.topology.nodes],
        )

    def set_node_labels(self, name: str, labels: dict[str, str]) -> None:
        """Relabel node NAME (its labels replace the old ones), as ``kubectl label node``
        would: a new locality for its pods' endpoints and for its agent."""
        if name not in {node.name for node in self.topology.nodes}:
            raise TestbedError(f"no node {name!r} in testbed {self.name!r}")
        nodes = tuple(
            replace(node, labels=dict(labels)) if node.name == name else node
            for node in self.topology.nodes
        )
        self.topology = replace(self.topology, nodes=nodes)
        self._publish_nodes()

    def set_namespace_labels(self, name: str, labels: dict[str, str]) -> None:
        """Relabel namespace NAME, as ``kubectl label namespace`` would (the labels replace its
        old ones); the agents see it at their next source update."""
        if name not in {ns.name for ns in self.topology.namespaces}:
            raise TestbedError(f"no namespace {name!r} in testbed {self.name!r}")
        namespaces = tuple(
            replace(ns, labels=dict(labels)) if ns.name == name else ns
            for ns in self.topology.namespaces
        )
        self.topology = replace(self.topology, namespaces=namespaces)
        self._publish_namespaces()

    @contextlib.contextmanager
    def _creating_netns(self, ns: str) -> Iterator[None]:
        with self._lock:
            self.state.netns.append(ns)
            self.state.save()
        netlink.create_netns(ns)
        yield

    def _plug_into_underlay(self, ns: str, port: str, address: str) -> None:
        """A host's wire: veth PORT on the underlay bridge, its peer ``ul0`` in NS with ADDRESS."""
        with netlink.session(underlay_netns(self.name)) as ul:
            ul.add_veth(port, peer="ul0", peer_netns=ns)
            ul.enslave(port, "br0")
        with netlink.session(ns) as host:
            host.add_address("ul0", address)
            host.up("ul0")

    def _build_underlay(self) -> None:
        ul = underlay_netns(self.name)
        network = self.topology.network
        with self._creating_netns(ul), netlink.session(ul) as nl:
            nl.add_bridge("br0")
            nl.up("br0")
            # The stand-in API server's address (source: kubernetes), reached from every node.
            nl.add_address("br0", f"{network.apiserver_ip}/{network.underlay_cidr.prefixlen}")

    def _build_outside(self, outside: Outside) -> None:
        """The outside client: a netns wired to OUTSIDE.node by a veth pair, with a route to
        each of its pods' addresses only (a load balancer's view of a gateway; nothing else
        of the cluster is reachable, and nothing is routed in the root namespace)."""
        ns = layout.outside_netns(self.name)
        node_ns = node_netns(self.name, outside.node)
        prefix = OUTSIDE_CIDR.prefixlen
        with self._creating_netns(ns):
            with netlink.session(node_ns) as node:
                node.add_veth("outside0", peer="eth0", peer_netns=ns)
                node.add_address("outside0", f"{outside.node_ip}/{prefix}")
                node.up("outside0")
            with netlink.session(ns) as client:
                client.add_address("eth0", f"{outside.ip}/{prefix}")
                client.up("eth0")
                client.up("lo")
                for ref in outside.pods:
                    client.add_route(f"{self.state.pods[ref].ip}/32", str(outside.node_ip))

    def outside_exec(
        self, argv: list[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV in the outside client's netns (topology ``outside``)."""
        if self.topology.outside is None:
            raise TestbedError(f"testbed {self.name!r} has no outside client (topology outside)")
        return subprocess.run(
            netns.in_netns(layout.outside_netns(self.name), argv),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _build_node(self, node: Node) -> None:
        ns = node_netns(self.name, node.name)
        prefix = self.topology.network.underlay_cidr.prefixlen
        with self._creating_netns(ns):
            self._plug_into_underlay(ns, f"ul-{node.index}", f"{node.underlay_ip}/{prefix}")
            netlink.sysctl(
                ns,
                {
                    "net.ipv4.ip_forward": "1",
                    "net.ipv4.conf.all.rp_filter": "0",
                    "net.ipv4.conf.default.rp_filter": "0",
                },
            )
            with netlink.session(ns) as nl:
                for other in self.topology.nodes:
                    if other.name != node.name:
                        nl.add_route(str(other.pod_cidr), str(other.underlay_ip))
        # The node's own resolver (its host's /etc/resolv.conf): the testbed's, so that what
        # runs on the node (the node Envoy's DNS clusters, ServiceEntry resolution DNS)
        # resolves the externals' names as a node resolves public ones.
        with self._lock:
            self.state.etc_dirs.append(str(hosts.ETC_NETNS / ns))
            self.state.save()
        hosts.write_resolv_conf(ns, f"nameserver {self.resolver_ip}\n")
        conf_dir = layout.cni_conf_dir(self.name, node.name)
        conf_dir.mkdir(parents=True, exist_ok=True)
        layout.cni_bin_dir(self.name, node.name).mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-testbed.conflist").write_text(
            json.dumps(bridge_conflist(self.name, node), indent=2)
        )

    # -- the outside: resolver and external servers ----------------------------------------------

    def _build_edge_host(self, ns: str, port: str, address: ipaddress.IPv4Address) -> None:
        """A host on the underlay bridge outside every node that reaches the pods through
        their nodes (return routes to each node's pod CIDR)."""
        prefix = self.topology.network.underlay_cidr.prefixlen
        with self._creating_netns(ns):
            self._plug_into_underlay(ns, port, f"{address}/{prefix}")
            with netlink.session(ns) as nl:
                for node in self.topology.nodes:
                    nl.add_route(str(node.pod_cidr), str(node.underlay_ip))

    def _start_edge(self) -> list[DaemonRecord]:
        """The resolver's and the externals' hosts and processes (started, not waited for)."""
        started = []
        resolver.write_zone(layout.resolver_zone(self.name), self._zone())
        self._build_edge_host(layout.resolver_netns(self.name), "ul-dns", self.resolver_ip)
        started.append(daemons.start_resolver(self.name, str(self.resolver_ip)))
        for i, ext in enumerate(self.topology.externals):
            externals.write_pki(layout.external_dir(self.name, ext.name), ext)
            self._build_edge_host(layout.external_netns(self.name, ext.name), f"ul-x{i}", ext.ip)
            for kind in (externals.HTTP, externals.HTTPS):
                started.append(daemons.start_external(self.name, ext, kind))
        with self._lock:
            self.state.daemons += started
            self.state.save()
        return started

    def _zone(self) -> dict[str, list[str]]:
        return resolver.zone_records(
            self.services(), self.topology.externals, self.topology.network.cluster_domain
        )

    @property
    def resolver_ip(self) -> ipaddress.IPv4Address:
        """The testbed resolver's address (port 53, UDP and TCP): every pod's nameserver."""
        return self.topology.network.resolver_ip

    def external(self, name: str) -> External:
        """External server NAME (its names, address and ports); KeyError naming the known."""
        return self.topology.external(name)

    def external_ca_pem(self, name: str) -> bytes:
        """External NAME's own CA (PEM): what verifies its HTTPS server's certificate."""
        return layout.external_ca_file(self.name, self.external(name).name).read_bytes()

    # -- node daemons -----------------------------------------------------------------------------

    def set_mesh_config(self, fields: Mapping[str, Any]) -> None:
        """Replace the mesh config every node agent reads (Istio MeshConfig fields, e.g.
        ``{"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}``; {} for every default but
        the testbed's MESH_DEFAULTS, which FIELDS may override), as editing the istio ConfigMap
        would; the agents pick it up at their next poll."""
        path = layout.mesh_config_file(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.tmp")
        fields = {**MESH_DEFAULTS, **fields}
        aside.write_text(json.dumps(fields) + "\n")  # JSON is YAML
        aside.replace(path)

    def _start_daemons(self) -> None:
        if not layout.mesh_config_file(self.name).exists():
            self.set_mesh_config({})
        if self.topology.proxy_model == "sidecar":
            # Sidecar Envoys run as uid 1337 and reach their socket and bootstrap in
            # nodes/<node>/sidecars: let them through the testbed directory (not list it).
            os.chmod(TestbedState.directory(self.name), 0o711)
        if self.topology.source == "kubernetes" or self.topology.ca == "service":
            # The CA needs the API server whatever the agents read (TokenReview, Secrets, pods).
            self._start_apiserver()
        if self.topology.ca == "service":
            # Installed with the DaemonSet, as its CA Deployment; ready before any agent asks.
            self._start_control_plane()
        else:
            create_plugin_cacerts(layout.cacerts_dir(self.name), "cluster.local", intermediate=True)
        records = []
        names = [daemons.INSTALL_CNI, daemons.AGENT]
        if self.topology.envoy_container:
            names.append(daemons.ENVOY)  # the DaemonSet's envoy container
        for node in self.topology.nodes:
            for daemon in names:
                records.append(self._start_daemon(node.name, daemon))
        try:
            for record in records:
                daemons.wait_ready(self.name, record)
        except daemons.DaemonError as e:
            raise TestbedError(str(e)) from None

    def _start_apiserver(self) -> None:
        """The stand-in API server the agents watch (see nodeagent.testbed.daemons for why)."""
        if any(r.name == daemons.APISERVER for r in self.state.daemons):
            return
        self._run_ready(
            daemons.start_apiserver(
                self.name, str(self.topology.network.apiserver_ip), APISERVER_PORT
            )
        )

    def _run_ready(self, record: DaemonRecord) -> None:
        """Record a control-plane daemon just started; return once it is ready."""
        with self._lock:
            self.state.daemons.append(record)
            self.state.save()
        try:
            daemons.wait_ready(self.name, record)
        except daemons.DaemonError as e:
            raise TestbedError(str(e)) from None

    # -- the control plane (ca: service; see nodeagent.testbed.control_plane) ---------------------

    @property
    def ca_ip(self) -> str:
        """The CA service's underlay address (the control-plane host's)."""
        return str(self.topology.network.control_plane_ip)

    @property
    def ca_address(self) -> str:
        """HOST:PORT the node agents dial for certificates (``--ca-address``)."""
        return f"{self.ca_ip}:{control_plane.CA_PORT}"

    @property
    def apiserver_address(self) -> str:
        return f"{self.topology.network.apiserver_ip}:{APISERVER_PORT}"

    def _start_control_plane(self) -> None:
        if not netns.exists(layout.control_plane_netns(self.name)):
            self._build_control_plane()
        node_credentials.publish(self.name, self.topology.nodes)
        self.start_ca()

    def _build_control_plane(self) -> None:
        """The control-plane host: a netns on the underlay bridge, as a node is (no pods)."""
        ns = layout.control_plane_netns(self.name)
        prefix = self.topology.network.underlay_cidr.prefixlen
        with self._creating_netns(ns):
            self._plug_into_underlay(ns, "ul-cp", f"{self.ca_ip}/{prefix}")
            # Gateway pods ask the CA for their own certificate: its answers go back by
            # their node (the agents, on the underlay themselves, need no route).
            with netlink.session(ns) as nl:
                for node in self.topology.nodes:
                    nl.add_route(str(node.pod_cidr), str(node.underlay_ip))

    def ca_daemon(self) -> DaemonRecord | None:
        """The CA service's record while the testbed runs it (None: stopped, or ca: plugin)."""
        with self._lock:
            return next((r for r in self.state.daemons if r.name == daemons.CA), None)

    def start_ca(self) -> None:
        """Start the CA service (again), as its Deployment's pod would be; returns once its
        /ready says ready (signing key loaded, root ConfigMap published, gRPC serving).
        With no cacerts Secret, it signs with the self-signed root it keeps in Secret
        nodeagent-system/nodeagent-ca (made at its first start, reused after)."""
        if self.topology.ca != "service":
            raise TestbedError(f"testbed {self.name!r} runs no CA service (topology ca: plugin)")
        if self.ca_daemon() is not None:
            raise TestbedError(f"testbed {self.name!r}: the CA service already runs")
        self._run_ready(daemons.start_ca(self.name, self.ca_ip))

    def stop_ca(self, kill: bool = False) -> None:
        """Stop the CA service, as an outage would: SIGTERM then SIGKILL, or with KILL a
        SIGKILL at once (a crash: no graceful shutdown). The agents keep the certificates they
        hold. Idempotent; returns once the process is gone."""
        record = self.ca_daemon()
        if record is None:
            return
        if kill and netns.alive(record.pid, record.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        daemons.stop(record)  # waits for it (and stops it, without KILL)
        with self._lock:
            self.state.daemons.remove(record)
            self.state.save()

    def ca_pid(self) -> int | None:
        """The CA process's pid (it runs ``python -m nodeagent ca`` under ``ip netns exec``,
        which execs it: same pid), None when stopped."""
        record = self.ca_daemon()
        if record is None or not netns.alive(record.pid, record.start_time):
            return None
        return record.pid

    def ca_ready(self) -> str:
        """ "" when the CA's /ready answers 200, else why not."""
        status, body = control_plane.monitoring_get(self.name, self.ca_ip, "/ready")
        return "" if status == 200 else (body.strip() or f"HTTP {status}")

    def ca_metrics(self) -> str:
        """The CA's Prometheus text (/metrics on its monitoring port, :15014), fetched from the
        control-plane host; TestbedError when it does not answer."""
        status, body = control_plane.monitoring_get(self.name, self.ca_ip, "/metrics")
        if status != 200:
            raise TestbedError(f"CA /metrics: {status or 'no answer'} {body.strip()}")
        return body

    def ca_root_pem(self) -> bytes:
        """The root bundle the agents trust: the CA's ConfigMap as mounted (``--ca-root-file``)."""
        return layout.ca_root_file(self.name).read_bytes()

    def trust_root_pem(self) -> bytes:
        """The root bundle workload certificates verify to: the CA service's (its ConfigMap, as
        mounted) with ``ca: service``, the shared plug-in root with ``ca: plugin``."""
        if self.topology.ca == "service":
            return self.ca_root_pem()
        return (layout.cacerts_dir(self.name) / "root-cert.pem").read_bytes()

    def node_token(self, node: str) -> str:
        """NODE's agent's token for the CA (its ``--ca-token-file``)."""
        return layout.node_token_file(self.name, node).read_text().strip()

    def apply_secret(
        self, name: str, data: dict[str, bytes], namespace: str = layout.CA_NAMESPACE
    ) -> None:
        """Create or replace Secret NAMESPACE/NAME in the API server, as ``kubectl apply`` (e.g.
        ``cacerts``, Istio's plug-in CA keys ca-cert.pem, ca-key.pem, root-cert.pem,
        cert-chain.pem); the CA reads it at its next reload (every 2 s). The stand-in has no
        DELETE: replace a Secret rather than remove it."""
        obj = control_plane.secret_object(namespace, name, data)
        try:
            control_plane.apply(self.name, self.apiserver_address, "secrets", obj)
        except control_plane.APIRequestError as e:
            raise TestbedError(str(e)) from None

    def read_secret(self, name: str, namespace: str = layout.CA_NAMESPACE) -> dict[str, bytes]:
        """Secret NAMESPACE/NAME's data, decoded ({} when there is no such Secret); e.g. the
        CA's self-signed root and key, Secret ``nodeagent-ca``."""
        try:
            obj = control_plane.read(self.name, self.apiserver_address, "secrets", namespace, name)
        except control_plane.APIRequestError as e:
            raise TestbedError(str(e)) from None
        if obj is None:
            return {}
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _start_daemon(self, node: str, daemon: str) -> DaemonRecord:
        record = daemons.start(
            self.name,
            node,
            daemon,
            proxy=self.topology.proxy,
            cert_ttl=self.topology.cert_ttl,
            envoy_container=self.topology.envoy_container,
            proxy_model=self.topology.proxy_model,
            source=self.topology.source,
            ca_address=self.ca_address if self.topology.ca == "service" else None,
            capture_mode=self.topology.capture_mode_of(node),
        )
        with self._lock:
            self.state.daemons.append(record)
            self.state.save()
        return record

    def daemon(self, node: str, name: str) -> DaemonRecord:
        for record in self.state.daemons:
            if (record.node, record.name) == (node, name):
                return record
        raise TestbedError(f"node {node!r} runs no {name} (is nodeagent on in the topology?)")

    def install_nodeagent(self) -> None:
        """Install nodeagent on a testbed that runs without it, as applying the DaemonSet would.

        The pods already running never see our CNI plugin: each node's agent finds and captures
        them at start.
        """
        if self.topology.nodeagent:
            raise TestbedError(f"testbed {self.name!r} already runs nodeagent")
        with self._lock:
            self.state.installed_later = True
            self.state.save()
        self.topology = replace(self.topology, nodeagent=True)
        self._start_daemons()

    def stop_agent(self, node: str) -> None:
        """Stop NODE's agent, as a crash or a rolling update would (pods keep their capture)."""
        self.stop_daemon(node, daemons.AGENT)

    def start_agent(self, node: str) -> None:
        self.start_daemon(node, daemons.AGENT)

    def stop_daemon(self, node: str, name: str) -> None:
        """Stop one of NODE's daemons (SIGTERM, then SIGKILL); one that already exited is just
        forgotten, as kubelet notices a dead container."""
        record = self.daemon(node, name)
        daemons.stop(record)
        with self._lock:
            self.state.daemons.remove(record)
            self.state.save()

    def start_daemon(self, node: str, name: str) -> None:
        """Start one of NODE's daemons (again), as kubelet starts a container; returns once it
        is ready."""
        record = self._start_daemon(node, name)
        try:
            daemons.wait_ready(self.name, record)
        except daemons.DaemonError as e:
            raise TestbedError(str(e)) from None

    def restart_agent(self, node: str) -> None:
        self.stop_agent(node)
        self.start_agent(node)

    # -- pods -------------------------------------------------------------------------------------

    def add_pod(self, pod: Pod, *, publish_lead: float = 0.0, uid: str | None = None) -> PodRecord:
        """Create one more pod on a running testbed, as kubelet would: sandbox, then workload.

        Services keep the endpoints they had at ``up``; the pod reaches them by name.
        PUBLISH_LEAD: seconds between publishing the pod object and its sandbox's CNI ADD (on
        Kubernetes the node agent's watch has the pod before kubelet sets up its network; here
        the cluster directory is polled (by the API stand-in or the agents), so without a lead an
        ADD may wait for them).
        UID: a new sandbox for a pod that exists (kubelet re-creating it after a node reboot,
        ``remove_pod(node_lost=True)``): the pod keeps its UID, and its object stays published
        when the sandbox fails.
        """
        with self._lock:
            if pod.key in self.state.pods:
                raise TestbedError(f"pod {pod.key} already exists")
        try:
            self._create_sandbox(pod, publish_lead, uid)
            self._start_workload(pod)
            self._wait_ready([pod])
            self._publish()
        except BaseException:
            with contextlib.suppress(TestbedError):
                # a pod that failed to start leaves nothing behind (but its object, if it had one)
                self.remove_pod(pod, keep_object=uid is not None)
            raise
        return self.state.pods[pod.key]

    def remove_pod(
        self, pod: Pod, *, node_lost: bool = False, keep_object: bool = False
    ) -> list[str]:
        """Delete a pod as kubelet would: stop it, CNI DEL, remove its netns. Returns problems.

        NODE_LOST: as a node's reboot loses it instead: its processes SIGKILLed, its netns gone
        without any CNI DEL, its pod object kept (the API server still has it; kubelet makes a
        new sandbox with ``add_pod`` once the node is back). KEEP_OBJECT: the object stays
        published (a sandbox failed; the pod still exists)."""
        with self._lock:
            record = self.state.pods.get(pod.key)
        if record is None:
            raise TestbedError(f"no pod {pod.key}")
        # As Kubernetes does when a pod starts terminating: its endpoints go first, then the
        # workload is stopped and the sandbox torn down.
        with self._lock:
            record.ready = False
            self.state.save()
        self._publish()
        if record.pid:
            netns.terminate([(record.pid, record.start_time)], grace=0.0 if node_lost else 3.0)
        problems = cgroups.remove(
            cgroups.pod_dir(Path(self.state.cgroup), record.uid, record.container_id).parent
        )
        if not node_lost:
            problems += _cni_del(self.name, pod.key, record)
        # Under the publish lock: a publish of another pod's change (a parallel remove_pod)
        # would otherwise write this pod's hosts file back while its folder goes.
        with self._publish_lock:
            netlink.remove_netns(record.netns)
            shutil.rmtree(hosts.ETC_NETNS / record.netns, ignore_errors=True)
            etc_dir = str(hosts.ETC_NETNS / record.netns)
            if not (node_lost or keep_object):
                pods_dir = layout.cluster_dir(self.name) / "pods"
                (pods_dir / f"{pod.namespace}.{pod.name}.yaml").unlink(missing_ok=True)
            with self._lock:
                del self.state.pods[pod.key]
                if record.netns in self.state.netns:
                    self.state.netns.remove(record.netns)
                if etc_dir in self.state.etc_dirs:
                    self.state.etc_dirs.remove(etc_dir)
                self.state.save()
        self._publish()
        return problems

    def _create_sandbox(self, pod: Pod, publish_lead: float = 0.0, uid: str | None = None) -> None:
        ns = pod_netns(self.name, pod)
        record = PodRecord(
            netns=ns,
            node=pod.node,
            container_id=secrets.token_hex(32),
            uid=uid or str(uuid.uuid4()),
            labels=dict(pod.labels),
            service_account=pod.service_account,
        )
        pod_file = layout.cluster_dir(self.name) / "pods" / f"{pod.namespace}.{pod.name}.yaml"
        with self._lock:
            self.state.pods[pod.key] = record
        resources.write(pod_file, [resources.pod_object(pod, record.uid)])
        if publish_lead > 0:
            time.sleep(publish_lead)
        if self.state.cgroup:
            # kubelet makes the pod's cgroup before its sandbox: eBPF capture attaches there
            cgroups.pod_dir(Path(self.state.cgroup), record.uid, "").mkdir(
                parents=True, exist_ok=True
            )
        with self._creating_netns(ns):
            sandbox = _sandbox(pod.key, record)
            runtime = node_runtime(self.name, pod.node)
            runtime.add(LOOPBACK_CONFLIST, sandbox)
            conflist = load_conflist(layout.cni_conf_dir(self.name, pod.node))
            started = time.perf_counter()
            try:
                result = runtime.add(conflist, sandbox)
            except CNIError as e:
                raise TestbedError(f"pod {pod.key}: {e}") from None
            # The pod network's ADD as the runtime sees it (the whole chain; benchmarks read it).
            record.cni_add_seconds = time.perf_counter() - started
            record.ip = pod_ipv4(result)
            with self._lock:
                self.state.etc_dirs.append(str(hosts.ETC_NETNS / ns))
                self.state.save()
            resources.write(pod_file, [resources.pod_object(pod, record.uid, record.ip)])
            domain = self.topology.network.cluster_domain
            hosts.write_hosts(ns, hosts.render_hosts(pod, record.ip, self.services(), domain))
            hosts.write_resolv_conf(
                ns, resolver.resolv_conf(pod.namespace, str(self.resolver_ip), domain)
            )

    # -- services (the testbed is the cluster's endpoint controller and kube-proxy) --------------

    def services(self) -> list[Service]:
        """The topology's services with every change made since ``up`` (set_service)."""
        current = {svc.key: svc for svc in self.topology.services}
        for key, raw in self.state.service_overrides.items():
            current[key] = _service_from_json(raw)
        return [svc for svc in current.values() if svc.ports]

    def set_service(self, service: Service) -> None:
        """Add or change a service; endpoints, node proxies and name resolution follow."""
        with self._lock:
            self.state.service_overrides[service.key] = _service_json(service)
            self.state.save()
        self._publish()

    def delete_service(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        self.set_service(Service(namespace, name, {}, (), ipaddress.IPv4Address("0.0.0.0")))

    def set_pod_ready(self, key: str, ready: bool) -> None:
        """Mark running pod KEY (namespace/name) ready or not, as its readiness probe would: it
        joins or leaves the endpoints of every service selecting it; the pod keeps running."""
        with self._lock:
            record = self.state.pods.get(key)
            if record is None:
                raise TestbedError(f"no pod {key} in testbed {self.name!r}")
            record.ready = ready
            self.state.save()
        self._publish()

    def publish_extra(self, name: str, objects: list[dict[str, Any]]) -> Path:
        """Publish objects the testbed does not manage (say, thousands of synthetic services for
        a benchmark) as one file of their own in the cluster directory, in one atomic write: the
        agents' source (the directory, or the API server serving it) picks it up like any other
        file. [] removes the file.

        They reach the agents only: the testbed's node service tables (kube-proxy) and the pods'
        /etc/hosts do not include them.
        """
        if not name or not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
            raise TestbedError(f"extra object file name {name!r}: use letters, digits and '-'")
        path = layout.cluster_dir(self.name) / f"extra-{name}.json"
        if not objects:
            path.unlink(missing_ok=True)
            return path
        # One JSON `kind: List` document: written and parsed far faster than PyYAML's dumper.
        doc = {"apiVersion": "v1", "kind": "List", "items": objects}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # hidden: the directory source skips it
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        tmp.replace(path)
        return path

    def expected_endpoints(self) -> dict[str, set[str]]:
        """Cluster name -> "ip:port" of every ready endpoint, as the node Envoys should hold."""
        with self._lock:
            serving = {k: r.ip for k, r in self.state.pods.items() if r.ip and r.ready}
        domain = self.topology.network.cluster_domain
        pods = self._pods_now()
        out = {}
        for svc in self.services():
            eps = services.endpoints(svc, pods, serving)
            host = f"{svc.name}.{svc.namespace}.svc.{domain}"
            for port in svc.ports:
                out[f"outbound|{port.port}||{host}"] = {f"{e.ip}:{e.port}" for e in eps[port.port]}
        return out

    def wait_converged(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every node's Envoy holds exactly the published endpoints (bounded).

        Each service port's cluster (``outbound|port||host``) must hold the endpoints, and a
        node with captured pods must have them all. With
        ``proxyModel: sidecar`` the same holds for the sidecar Envoy of every captured pod.
        """
        want = self.expected_endpoints()
        deadline = time.monotonic() + timeout
        for node in self.topology.nodes:
            while problems := self._convergence_problems(node.name, want):
                if time.monotonic() > deadline:
                    raise TestbedError(
                        f"node {node.name}'s Envoy did not converge within {timeout:.0f}s "
                        f"(clusters differing: {', '.join(problems[:5])})"
                    )
                time.sleep(0.05)

    def _captured(self, node: str) -> list[str]:
        """namespace/name of the pods NODE's agent has captured."""
        try:
            status = wire.request(
                str(layout.agent_socket(self.name, node)), {"command": "STATUS"}, 5
            )
        except (OSError, wire.ProtocolError):
            return []
        return [
            f"{p['namespace']}/{p['name']}"
            for p in status.get("pods", [])
            if p["state"] == "captured"
        ]

    def _convergence_problems(self, node: str, want: dict[str, set[str]]) -> list[str]:
        if self.topology.proxy_model == "sidecar":
            with self._lock:
                netns_of = {k: r.netns for k, r in self.state.pods.items()}
            return [
                f"{key}: {problem}"
                for key in self._captured(node)
                if key in netns_of
                for problem in _endpoint_problems(
                    _envoy_endpoints(netns.in_netns(netns_of[key], SIDECAR_CLUSTERS)), want, True
                )
            ]
        held = _envoy_endpoints(daemons.admin_curl(self.name, node, "/clusters?format=json"))
        return _endpoint_problems(held, want, bool(self._captured(node)))

    # -- the sidecar model (proxyModel: sidecar) --------------------------------------------------

    def sidecar_pid(self, ref: str) -> int | None:
        """The pid of a pod's sidecar Envoy (from its pidfile, checked against the kernel's
        start time), None when it has none running."""
        with self._lock:  # a pod added since `up` is in the state only
            known = self.state.pods.get(ref)
        if known is not None:
            namespace, _, name = ref.partition("/")
            node = known.node
        else:
            pod = self.topology.find_pod(ref)
            namespace, name, node = pod.namespace, pod.name, pod.node
        pidfile = layout.sidecar_dir(self.name, node) / f"{namespace}.{name}" / "envoy.pid"
        try:
            record = json.loads(pidfile.read_text())
            pid, start_time = int(record["pid"]), int(record["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if netns.alive(pid, start_time) else None

    def sidecar_admin(self, ref: str, path: str, timeout: float = 5.0) -> str:
        """GET PATH (e.g. "/memory") from a pod's sidecar Envoy admin, 127.0.0.1:15000 inside
        the pod's netns; raises TestbedError when it does not answer 200."""
        proc = self.exec(
            ref,
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                str(timeout),
                f"http://127.0.0.1:15000{path}",
            ],
            timeout=timeout + 10,
        )
        if proc.returncode != 0:
            raise TestbedError(f"sidecar admin of {ref} {path}: {proc.stderr.strip()}")
        return proc.stdout

    def _pods_now(self) -> list[Pod]:
        with self._lock:
            records = list(self.state.pods.items())
        return [
            Pod(
                key.split("/")[0],
                key.split("/")[1],
                r.node,
                r.service_account,
                r.labels,
                {},
                Workload("sleep"),
            )
            for key, r in records
        ]

    def _publish(self) -> None:
        """Services and EndpointSlices for the agents, service tables and hosts for the nodes."""
        with self._publish_lock:
            self._publish_now()

    def _publish_now(self) -> None:
        with self._lock:
            pod_ips = {key: rec.ip for key, rec in self.state.pods.items() if rec.ip}
            serving = {k: ip for k, ip in pod_ips.items() if self.state.pods[k].ready}
            nodes = {key: rec.node for key, rec in self.state.pods.items()}
            netns_of = {key: rec.netns for key, rec in self.state.pods.items() if rec.ip}
        svcs, pods = self.services(), self._pods_now()
        objects = []
        for svc in svcs:
            objects.append(resources.service_object(svc))
            eps = services.endpoints(svc, pods, serving)
            objects.append(resources.endpoint_slice_object(svc, eps, nodes))
        resources.write(layout.cluster_dir(self.name) / "services.yaml", objects)
        resolver.write_zone(layout.resolver_zone(self.name), self._zone())
        for node in self.topology.nodes:
            ruleset = services.render_ruleset(svcs, pods, node, serving)
            services.apply(node_netns(self.name, node.name), ruleset)
        domain = self.topology.network.cluster_domain
        for pod in pods:
            if pod.key in netns_of:
                hosts.write_hosts(
                    netns_of[pod.key], hosts.render_hosts(pod, pod_ips[pod.key], svcs, domain)
                )

    def _start_workload(self, pod: Pod) -> None:
        record = self.state.pods[pod.key]
        wl = pod.workload
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            # What the downward API would give a container.
            "POD_NAME": pod.name,
            "POD_NAMESPACE": pod.namespace,
            "POD_IP": record.ip,
            "NODE_NAME": pod.node,
            "SERVICE_ACCOUNT": pod.service_account,
        }
        if wl.type == "fake-service":
            argv = [sys.executable, "-m", "nodeagent", "workload"]
            env |= {
                # This testbed's own nodeagent, also when it runs from a checkout other than
                # the installed one (the env is otherwise a container's: nothing inherited).
                "PYTHONPATH": str(Path(nodeagent.__file__).resolve().parents[1]),
                "NAME": pod.labels.get("app", pod.name),
                "VERSION": pod.labels.get("version", "v1"),
                "LISTEN_ADDR": f"0.0.0.0:{wl.port}",
            }
        elif wl.type == "gateway":
            argv = [sys.executable, "-m", "nodeagent", "gateway", *self._gateway_args(pod)]
            env["PYTHONPATH"] = str(Path(nodeagent.__file__).resolve().parents[1])
        elif wl.type == "sleep":
            argv = ["sleep", "infinity"]
        else:
            argv = list(wl.command)
        env |= wl.env
        if shutil.which(argv[0], path=env["PATH"]) is None:
            raise TestbedError(f"pod {pod.key}: workload command {argv[0]!r} not found")
        cgroup = cgroups.pod_dir(Path(self.state.cgroup), record.uid, record.container_id)
        cgroup.mkdir(parents=True, exist_ok=True)
        logs = layout.logs_dir(self.name)
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{pod.namespace}.{pod.name}.log", "ab") as log:
            proc = subprocess.Popen(
                cgroups.in_cgroup(cgroup, netns.in_netns(record.netns, argv)),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `up`, and a Ctrl-C in the caller's terminal
            )
        with self._lock:
            record.pid = proc.pid
            record.start_time = netns.process_start_time(proc.pid)
            self.state.save()
            self._started[pod.key] = time.monotonic()

    def _gateway_args(self, pod: Pod) -> list[str]:
        """``nodeagent gateway``'s arguments for gateway pod POD, as its Deployment gives them:
        its labels as the selector, the cluster as the agents read it (the directory: a pod
        cannot reach the stand-in API server), its certificate from the mesh's CA."""
        run_dir = layout.gateway_dir(self.name, pod)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [
            "--selector",
            ",".join(f"{k}={v}" for k, v in sorted(pod.labels.items())),
            "--source-dir",
            str(layout.cluster_dir(self.name)),
            "--run-dir",
            str(run_dir),
            "--envoy-log",
            str(layout.gateway_envoy_log(self.name, pod)),
            # The mesh config the node agents read (trust domain, root namespace).
            "--mesh-config",
            str(layout.mesh_config_file(self.name)),
            "--cert-ttl",
            str(self.topology.cert_ttl),
        ]
        if self.topology.ca != "service":
            return [*argv, "--ca-dir", str(layout.cacerts_dir(self.name))]
        # Its own projected token (audience istio-ca, bound to its pod): the CA gives any
        # caller its own identity (caservice/authz.py).
        record = self.state.pods[pod.key]
        token = node_credentials.publish_workload_token(
            self.name, pod.namespace, pod.name, pod.service_account, record.uid, run_dir
        )
        return [
            *argv,
            "--ca-address",
            self.ca_address,
            "--ca-root-file",
            str(layout.ca_root_file(self.name)),
            "--ca-token-file",
            str(token),
            "--ca-server-name",
            control_plane.SERVER_NAME,
        ]

    def _wait_ready(self, pods: tuple[Pod, ...] | list[Pod]) -> None:
        """Every workload with a port listens on it, every other one still runs."""
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(pods)
        while pending:
            for pod in list(pending):
                rec = self.state.pods[pod.key]
                assert rec.pid is not None
                if not netns.alive(rec.pid, rec.start_time):
                    raise TestbedError(f"pod {pod.key}: workload exited; {self._log_tail(pod)}")
                port = pod.workload.port
                if (port is None and time.monotonic() - self._started[pod.key] >= SETTLE_TIME) or (
                    port is not None and netns.listening(rec.pid, port)
                ):
                    pending.remove(pod)
                    with self._lock:
                        rec.ready = True
                        self.state.save()
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.key for p in pending)
                raise TestbedError(f"pods not ready after {READY_TIMEOUT:.0f}s: {names}")
            if pending:
                time.sleep(0.05)

    def _log_tail(self, pod: Pod) -> str:
        log = layout.logs_dir(self.name) / f"{pod.namespace}.{pod.name}.log"
        try:
            return "log: " + " | ".join(log.read_text().strip().splitlines()[-5:])
        except OSError:
            return "no log"


def down(name: str) -> list[str]:
    """Remove everything testbed NAME made; returns what could not be removed (empty: all gone).

    Works from the state file, and also from the namespaces' names alone when the state file is
    missing, so it cleans up after a crash at any point of ``up``.
    """
    state = TestbedState.load(name)
    prefix = netns_prefix(name)
    names = list(reversed(state.netns)) if state else []
    names += [n for n in netns.list_netns() if n.startswith(prefix) and n not in names]
    problems: list[str] = []

    # 1. The pods, as kubelet removes them: stop the workload, then CNI DEL (in reverse order,
    #    while the node agent still runs to remove their capture).
    if state:
        workloads = [(r.pid, r.start_time) for r in state.pods.values() if r.pid]
        netns.terminate(workloads)
        for key, record in reversed(state.pods.items()):
            problems += _cni_del(name, key, record)

    # 2. Every other process living in one of our namespaces (node agents, install-cni, strays).
    daemons_ = [(d.pid, d.start_time) for d in state.daemons] if state else []
    in_ns: list[tuple[int, int | None]] = [(pid, None) for ns in names for pid in netns.pids_in(ns)]
    for pid in netns.terminate(daemons_ + in_ns):
        problems.append(f"process {pid} survived SIGKILL")

    # Pods' cgroups, now empty (whatever still ran in one is killed).
    with contextlib.suppress(cgroups.CgroupError):
        # A state saved before up recorded its cgroup names none: never Path("") (the cwd).
        folder = state.cgroup if state and state.cgroup else cgroups.testbed_dir(name)
        problems += cgroups.remove(Path(folder))
    # The agents' eBPF capture pins (their links hold programs on cgroups now gone).
    bpf = layout.bpf_dir(name, "x").parent
    if bpf.exists():
        from nodeagent.redirect.ebpf import remove_pins

        remove_pins(bpf)

    # 3. Namespaces (their links, bridges, addresses and routes go with them), then files.
    for ns in names:
        try:
            netlink.remove_netns(ns)
        except netns.CommandError as e:
            problems.append(str(e))
    etc_dirs = set(state.etc_dirs if state else [])
    if hosts.ETC_NETNS.is_dir():
        etc_dirs |= {str(p) for p in hosts.ETC_NETNS.iterdir() if p.name.startswith(prefix)}
    for folder in sorted(etc_dirs):
        shutil.rmtree(folder, ignore_errors=True)

    left = [n for n in netns.list_netns() if n.startswith(prefix)]
    problems += [f"network namespace {n} still exists" for n in left]
    if not problems:
        shutil.rmtree(TestbedState.directory(name), ignore_errors=True)
        # Parent folders go too once empty; another testbed's files keep them.
        for parent in (hosts.ETC_NETNS, RUN_DIR, RUN_DIR.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()
    return problems


def _endpoint_problems(
    held: dict[str, set[str]], want: dict[str, set[str]], complete: bool
) -> list[str]:
    """Clusters an Envoy holds with other endpoints than WANT; COMPLETE: and the missing ones."""
    seen: set[str] = set()
    problems = []
    for name, endpoints in held.items():
        seen.add(name)
        if name in want and endpoints != want[name]:
            problems.append(name)
    if complete:
        problems += sorted(name for name in want if name not in seen)
    return problems


# A sidecar's admin, Istio's 127.0.0.1:15000 inside its pod (the node Envoy's is a socket).
SIDECAR_CLUSTERS = ["curl", "-sS", "--max-time", "2", "http://127.0.0.1:15000/clusters?format=json"]


def _envoy_endpoints(curl: list[str]) -> dict[str, set[str]]:
    """Outbound service clusters and their endpoints, from an Envoy's admin API (CURL)."""
    proc = subprocess.run(
        curl,
        capture_output=True,
        text=True,
        timeout=10,
    )
    try:
        statuses = json.loads(proc.stdout).get("cluster_statuses", [])
    except ValueError:
        return {}
    held: dict[str, set[str]] = {}
    for status in statuses:
        name = str(status.get("name", ""))
        if not name.startswith("outbound|"):
            continue
        held[name] = {host_address(h["address"]) for h in status.get("host_statuses", [])}
    return held


def _sandbox(key: str, record: PodRecord) -> Sandbox:
    namespace, _, name = key.partition("/")
    return Sandbox(record.container_id, netns.netns_path(record.netns), namespace, name, record.uid)


def _cni_del(testbed: str, key: str, record: PodRecord) -> list[str]:
    """CNI DEL for every network the sandbox was ADDed to (from the runtime's result cache)."""
    runtime = node_runtime(testbed, record.node)
    problems = []
    for conflist in _cached_networks(runtime, record.container_id):
        try:
            failures = runtime.delete(conflist, _sandbox(key, record), best_effort=True)
        except CNIError as e:
            failures = [e]
        problems += [f"pod {key}: {f}" for f in failures]
    return problems


def _topology_of(state: TestbedState) -> Topology:
    # The name may have been overridden at `up` (--name): the state's name wins.
    return replace(loads_topology(state.topology_text, state.topology_source), name=state.name)


def _cached_networks(runtime: Runtime, container_id: str) -> list[dict[str, Any]]:
    """The network configs a sandbox was ADDed with, from the runtime's result cache."""
    out = []
    for path in sorted(runtime.cache_dir.glob(f"*-{container_id}-*")):
        try:
            conf = json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError):
            continue
        out.append(conf)
    # Pod network first, loopback last: the reverse of the order they were added in.
    return sorted(out, key=lambda c: c.get("name") == LOOPBACK_CONFLIST["name"])


def _service_json(svc: Service) -> dict[str, Any]:
    return {
        "namespace": svc.namespace,
        "name": svc.name,
        "selector": dict(svc.selector),
        "clusterIP": str(svc.cluster_ip),
        "ports": [
            {
                "name": p.name,
                "port": p.port,
                "targetPort": p.target_port,
                "appProtocol": p.app_protocol,
            }
            for p in svc.ports
        ],
    }


def _service_from_json(raw: dict[str, Any]) -> Service:
    return Service(
        namespace=raw["namespace"],
        name=raw["name"],
        selector=raw["selector"],
        ports=tuple(
            ServicePort(p["name"], p["port"], p["targetPort"], app_protocol=p["appProtocol"])
            for p in raw["ports"]
        ),
        cluster_ip=ipaddress.IPv4Address(raw["clusterIP"]),
    )
