"""Topology files: what a user writes, and the errors they get when it is wrong."""

import ipaddress
from pathlib import Path

import pytest

from nodeagent.testbed.topology import (
    TopologyError,
    builtin_topology_path,
    load_topology,
    loads_topology,
)
from nodeagent.testbed.workload import FakeServiceConfig

MINIMAL = """
name: t1
nodes: [{name: a}, {name: b}]
pods:
  - {name: web, namespace: shop, node: a, labels: {app: web}, workload: {type: fake-service}}
  - {name: web, namespace: other, node: b, labels: {app: web}}
  - {name: client, node: b}
services:
  - {name: web, namespace: shop, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
  - {name: db, namespace: shop, ports: [{port: 5432}], clusterIP: 10.96.1.1}
"""


def test_workshop_topology_is_the_s1_shop() -> None:
    topo = load_topology(builtin_topology_path("workshop"))
    assert [n.name for n in topo.nodes] == ["node1", "node2"]
    assert {p.key for p in topo.pods} == {
        "istioinaction/web-api",
        "istioinaction/recommendation",
        "istioinaction/purchase-history-v1",
        "istioinaction/purchase-history-v2",
        "istioinaction/sleep",
        "default/sleep",
    }
    history = next(s for s in topo.services if s.name == "purchase-history")
    assert sorted(p.labels["version"] for p in topo.pods if history.selects(p)) == ["v1", "v2"]


def test_addresses_are_planned_per_node_and_service() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    a, b = topo.nodes
    assert (a.pod_cidr, b.pod_cidr) == (
        ipaddress.IPv4Network("10.244.1.0/24"),
        ipaddress.IPv4Network("10.244.2.0/24"),
    )
    assert a.gateway == ipaddress.IPv4Address("10.244.1.1")
    assert a.underlay_ip != b.underlay_ip
    web, db = topo.services
    assert web.cluster_ip == ipaddress.IPv4Address("10.96.0.10")
    assert db.cluster_ip == ipaddress.IPv4Address("10.96.1.1")
    assert web.ports[0].target_port == 8080


def test_a_larger_node_cidr_holds_a_thousand_pods() -> None:
    topo = loads_topology(MINIMAL + "network: {nodeCIDRMaskSize: 22}\n", "t.yaml")
    a, b = topo.nodes
    assert (a.pod_cidr, b.pod_cidr) == (
        ipaddress.IPv4Network("10.244.4.0/22"),
        ipaddress.IPv4Network("10.244.8.0/22"),
    )
    assert a.pod_cidr.num_addresses - 3 >= 1000  # less network, gateway, broadcast


def test_nodes_carry_locality_labels_each_its_own_zone_by_default() -> None:
    """Node labels give endpoints their locality (DestinationRule localityLbSetting)."""
    topo = loads_topology(
        "name: t\nnodes: [{name: a}, {name: b}, {name: c, labels: {topology.kubernetes.io/"
        "region: eu}}]\n",
        "t.yaml",
    )
    region, zone = "topology.kubernetes.io/region", "topology.kubernetes.io/zone"
    assert [dict(n.labels) for n in topo.nodes] == [
        {region: "r1", zone: "z1"},
        {region: "r1", zone: "z2"},
        {region: "eu"},
    ]
    with pytest.raises(TopologyError, match=r"nodes\[0\]\.labels"):
        loads_topology("name: t\nnodes: [{name: a, labels: [x]}]\n", "t.yaml")


def test_defaults_follow_kubernetes() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    client = topo.find_pod("client")
    assert (client.namespace, client.service_account, client.workload.type) == (
        "default",
        "default",
        "sleep",
    )
    assert topo.find_pod("shop/web").workload.port == 8080
    assert {n.name for n in topo.namespaces} == {"shop", "other", "default"}


def test_a_pods_fake_service_misbehaves_as_its_workload_env_says() -> None:
    """VERSION, ERROR_RATE, ERROR_CODE and DELAY go to the fake service through workload.env
    (the testbed starts it with that env over its own NAME/VERSION from the labels); numbers
    written as YAML numbers arrive as the strings the service reads."""
    topo = loads_topology(
        MINIMAL.replace(
            "workload: {type: fake-service}",
            "workload: {type: fake-service, env: {VERSION: v2, ERROR_RATE: 0.25,"
            " ERROR_CODE: 503, DELAY: 1.5}}",
        ),
        "t.yaml",
    )

    env = topo.find_pod("shop/web").workload.env
    config = FakeServiceConfig.from_env(env)

    assert env == {"VERSION": "v2", "ERROR_RATE": "0.25", "ERROR_CODE": "503", "DELAY": "1.5"}
    assert (config.version, config.error_rate, config.error_code, config.delay) == (
        "v2",
        0.25,
        503,
        1.5,
    )


def test_envoy_runs_as_its_own_node_daemon_only_when_asked() -> None:
    assert loads_topology(MINIMAL, "t.yaml").envoy_container is False
    split = loads_topology(MINIMAL + "envoyContainer: true\n", "t.yaml")
    assert (split.envoy_container, split.nodeagent, split.proxy) == (True, True, True)


def test_selector_matches_only_its_namespace() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    web = topo.services[0]
    assert [p.key for p in topo.pods if web.selects(p)] == ["shop/web"]
    assert not any(topo.services[1].selects(p) for p in topo.pods)  # no selector, no endpoints


def test_ambiguous_and_unknown_pod_names() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    with pytest.raises(KeyError, match="ambiguous"):
        topo.find_pod("web")
    with pytest.raises(KeyError, match="no pod 'nope'"):
        topo.find_pod("nope")


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("name: t\nnodes: [{name: a, zone: x}]", "nodes[0].zone", "unknown field"),
        ("name: t\nnodes: [{name: a}]\npods: [{name: p, node: b}]", "pods[0].node", "no node"),
        (
            "name: t\nnodes: [{name: a}]\npods: [{name: p, node: a, workload: {type: vm}}]",
            "pods[0].workload.type",
            "unknown workload type 'vm'",
        ),
        (
            "name: t\nnodes: [{name: a}]\npods: [{name: p, node: a}, {name: p, node: a}]",
            "pods[1].name",
            "duplicate pod default/p",
        ),
        (
            "name: t\nnodes: [{name: a}]\nservices: [{name: s, ports: [{port: 99999}]}]",
            "services[0].ports[0].port",
            "port number",
        ),
        (
            "name: t\nnodes: [{name: a}]\nservices: [{name: s, ports: [{port: 1}], "
            "clusterIP: 10.0.0.1}]",
            "services[0].clusterIP",
            "outside serviceCIDR",
        ),
        ("name: Bad_Name\nnodes: [{name: a}]", "name", "not a valid name"),
        ("name: t\nnodes: []", "nodes", "at least one node"),
        ("name: t", "nodes", "required field is missing"),
        (
            "name: t\nnodes: [{name: a}]\nnetwork: {serviceCIDR: 10.244.0.0/20}",
            "serviceCIDR",
            "overlaps",
        ),
        (
            "name: t\nnodes: [{name: a}]\nnetwork: {nodeCIDRMaskSize: 8}",
            "network.nodeCIDRMaskSize",
            "prefix length 16-28",
        ),
        (
            "name: t\nnodes: [{name: a}]\nnetwork: {clusterCIDR: 10.244.0.0/24}",
            "network.clusterCIDR",
            "must be /23 or larger",
        ),
        ("name: t\nnodes: [{name: a}]\nenvoyContainer: 1", "envoyContainer", "true or false"),
        (
            "name: t\nnodes: [{name: a}]\nproxy: false\nenvoyContainer: true",
            "envoyContainer",
            "needs nodeagent: true and proxy: true",
        ),
    ],
)
def test_errors_name_the_file_and_field(text: str, where: str, what: str) -> None:
    with pytest.raises(TopologyError) as err:
        loads_topology(text, "cluster.yaml")
    assert str(err.value).startswith("cluster.yaml: ")
    assert where in str(err.value)
    assert what in str(err.value)


def test_malformed_yaml_is_reported_with_the_file() -> None:
    with pytest.raises(TopologyError, match=r"^bad\.yaml: invalid YAML"):
        loads_topology("name: [unclosed", "bad.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "absent.yaml")


def test_agents_read_the_kubernetes_api_unless_told_directory() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    assert topo.source == "kubernetes"  # as the DaemonSet runs
    assert topo.network.apiserver_ip == ipaddress.IPv4Address("172.31.0.254")
    assert all(n.underlay_ip != topo.network.apiserver_ip for n in topo.nodes)
    assert loads_topology(MINIMAL + "source: directory\n", "t.yaml").source == "directory"
    with pytest.raises(TopologyError, match=r"t.yaml: source: expected one of kubernetes"):
        loads_topology(MINIMAL + "source: etcd\n", "t.yaml")
    # The underlay's last host is the API server's: a /30 addresses one node, not two.
    small = MINIMAL + "network: {underlayCIDR: 10.9.0.0/30}\n"
    with pytest.raises(TopologyError, match="more nodes than"):
        loads_topology(small, "t.yaml")


def test_the_ca_service_signs_unless_told_plugin() -> None:
    topo = loads_topology(MINIMAL, "t.yaml")
    assert topo.ca == "service"  # as the DaemonSet and the CA Deployment run
    # The control plane's host is neither the API server's nor a node's.
    assert topo.network.control_plane_ip == ipaddress.IPv4Address("172.31.0.253")
    taken = {n.underlay_ip for n in topo.nodes} | {topo.network.apiserver_ip}
    assert topo.network.control_plane_ip not in taken
    assert loads_topology(MINIMAL + "ca: plugin\n", "t.yaml").ca == "plugin"
    # The CA needs an API server whatever the agents read: directory + service is allowed.
    both = loads_topology(MINIMAL + "source: directory\nca: service\n", "t.yaml")
    assert (both.source, both.ca) == ("directory", "service")
    with pytest.raises(TopologyError, match=r"t.yaml: ca: expected one of service, plugin"):
        loads_topology(MINIMAL + "ca: vault\n", "t.yaml")
    # A /29 has 6 hosts: the API server, control plane and resolver take three, 3 nodes fit.
    nodes = "nodes: [{name: a}, {name: b}, {name: c}]\n"
    three = "name: t1\nnetwork: {underlayCIDR: 10.9.0.0/29}\n" + nodes
    assert len(loads_topology(three, "t.yaml").nodes) == 3
    four = three.replace("{name: c}]", "{name: c}, {name: d}]")
    with pytest.raises(TopologyError, match=r"nodes\[3\]: more nodes than"):
        loads_topology(four, "t.yaml")


EXTERNALS = """
externals:
  - {name: api, names: [api.external.test, www.external.test]}
  - {name: legacy, names: [legacy.example.org], httpPort: 8080, httpsPort: 8443}
"""


def test_externals_live_below_the_resolver_outside_every_node() -> None:
    topo = loads_topology(MINIMAL + EXTERNALS, "t.yaml")
    net = topo.network
    assert net.resolver_ip == ipaddress.IPv4Address("172.31.0.252")
    api, legacy = topo.externals
    assert api == topo.external("api")
    assert api.names == ("api.external.test", "www.external.test")
    assert (api.http_port, api.https_port) == (80, 443)  # a public web server's
    assert (legacy.http_port, legacy.https_port) == (8080, 8443)
    assert (api.ip, legacy.ip) == (
        ipaddress.IPv4Address("172.31.0.251"),
        ipaddress.IPv4Address("172.31.0.250"),
    )
    taken = {n.underlay_ip for n in topo.nodes}
    taken |= {net.apiserver_ip, net.control_plane_ip, net.resolver_ip}
    assert not taken & {api.ip, legacy.ip}
    assert all(ext.ip in net.underlay_cidr for ext in topo.externals)
    assert loads_topology(MINIMAL, "t.yaml").externals == ()
    with pytest.raises(KeyError, match=r"no external 'nope' .*externals: api, legacy"):
        topo.external("nope")


@pytest.mark.parametrize(
    ("externals", "where", "what"),
    [
        ("[{name: a}]", "externals[0].names", "at least one DNS name"),
        ("[{names: [a.test]}]", "externals[0].name", "required field is missing"),
        ("[{name: a, names: [a.test], port: 1}]", "externals[0].port", "unknown field"),
        ("[{name: a, names: [Not_A_Name]}]", "externals[0].names[0]", "not a valid name"),
        ("[{name: a, names: [localhost]}]", "externals[0].names[0]", "not a valid name"),
        (
            "[{name: a, names: [x.default.svc.cluster.local]}]",
            "externals[0].names[0]",
            "inside the cluster domain",
        ),
        (
            "[{name: a, names: [a.test]}, {name: b, names: [a.test]}]",
            "externals[1].names[0]",
            "already a name of external 'a'",
        ),
        ("[{name: a, names: [a.test]}, {name: a, names: [b.test]}]", "externals[1].name", "dup"),
        ("[{name: a, names: [a.test], httpPort: 0}]", "externals[0].httpPort", "1-65535"),
        ("[{name: a, names: [a.test], httpsPort: 80}]", "externals[0].httpsPort", "httpPort"),
        ("{name: a}", "externals", "expected a list"),
    ],
)
def test_external_errors_name_the_field(externals: str, where: str, what: str) -> None:
    with pytest.raises(TopologyError) as err:
        loads_topology(f"name: t\nnodes: [{{name: a}}]\nexternals: {externals}\n", "x.yaml")
    assert str(err.value).startswith(f"x.yaml: {where}: ")
    assert what in str(err.value)


def test_externals_and_nodes_share_the_underlay_without_meeting() -> None:
    # A /29: 6 hosts, 3 reserved (API server, control plane, resolver); 2 nodes + 1 external fit.
    base = "name: t\nnetwork: {underlayCIDR: 10.9.0.0/29}\nnodes: [{name: a}, {name: b}]\n"
    one = base + "externals: [{name: x, names: [x.test]}]\n"
    assert loads_topology(one, "t.yaml").externals[0].ip == ipaddress.IPv4Address("10.9.0.3")
    two = base + "externals: [{name: x, names: [x.test]}, {name: z, names: [z.test]}]\n"
    with pytest.raises(TopologyError, match=r"externals\[1\]: more nodes and externals"):
        loads_topology(two, "t.yaml")


GATEWAY_TOPOLOGY = """
name: t1
nodes: [{name: a}, {name: b}]
pods:
  - {name: gw, namespace: istio-system, node: a, labels: {istio: ingressgateway},
     workload: {type: gateway}}
  - {name: web, node: a, labels: {app: web}, workload: {type: fake-service}}
  - {name: far, node: b, labels: {app: far}}
outside: {pods: [istio-system/gw]}
"""


def test_a_gateway_pod_and_the_outside_client_reaching_it() -> None:
    topo = loads_topology(GATEWAY_TOPOLOGY, "t.yaml")
    gateway = topo.find_pod("gw")
    assert gateway.workload.type == "gateway"
    assert gateway.workload.port == 15090  # ready once its Envoy's stats listener listens
    assert topo.outside is not None
    assert (topo.outside.pods, topo.outside.node) == (("istio-system/gw",), "a")
    assert str(topo.outside.ip) == "198.18.0.2" and str(topo.outside.node_ip) == "198.18.0.1"
    assert loads_topology(MINIMAL, "t.yaml").outside is None


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("istio-system/gw]", "gw]"), "outside.pods[0]", "no pod 'gw' (write namespace/name)"),
        (("istio-system/gw]", "istio-system/gw, default/far]"), "outside.pods", "on one node"),
        (("pods: [istio-system/gw]", "pods: []"), "outside.pods", "at least one pod"),
        (("labels: {istio: ingressgateway},", ""), "pods[0].labels", "needs labels"),
        (("{type: gateway}", "{type: gateway, port: 80}"), "pods[0].workload.port", "Gateways"),
    ],
)
def test_gateway_and_outside_errors_name_the_field(
    change: tuple[str, str], where: str, what: str
) -> None:
    with pytest.raises(TopologyError) as err:
        loads_topology(GATEWAY_TOPOLOGY.replace(*change), "t.yaml")
    assert f"t.yaml: {where}: " in str(err.value) and what in str(err.value)
