"""The testbed's service proxy rules and name resolution (rendering; loading is integration)."""

from nodeagent.testbed.hosts import render_hosts
from nodeagent.testbed.services import endpoints, render_ruleset
from nodeagent.testbed.topology import loads_topology

TOPO = loads_topology(
    """
name: t
nodes: [{name: a}, {name: b}]
pods:
  - {name: web-1, namespace: shop, node: a, labels: {app: web}}
  - {name: web-2, namespace: shop, node: b, labels: {app: web}}
  - {name: client, namespace: other, node: a}
services:
  - {name: web, namespace: shop, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
  - {name: empty, namespace: shop, selector: {app: none}, ports: [{port: 81}]}
""",
    "t.yaml",
)
IPS = {"shop/web-1": "10.244.1.2", "shop/web-2": "10.244.2.2", "other/client": "10.244.1.3"}


def test_endpoints_follow_selector_and_target_port() -> None:
    eps = endpoints(TOPO.services[0], TOPO.pods, IPS)
    assert [(e.pod, e.ip, e.port) for e in eps[80]] == [
        ("shop/web-1", "10.244.1.2", 8080),
        ("shop/web-2", "10.244.2.2", 8080),
    ]


def test_pods_without_an_address_are_not_endpoints() -> None:
    eps = endpoints(TOPO.services[0], TOPO.pods, {"shop/web-2": "10.244.2.2"})
    assert [e.pod for e in eps[80]] == ["shop/web-2"]


def test_ruleset_balances_over_all_endpoints_and_rejects_empty_services() -> None:
    rules = render_ruleset(TOPO.services, TOPO.pods, TOPO.nodes[0], IPS)
    web_vip, empty_vip = TOPO.services[0].cluster_ip, TOPO.services[1].cluster_ip
    assert f"ip daddr {web_vip} tcp dport 80 jump" in rules
    assert "numgen random mod 2" in rules
    assert "dnat to 10.244.1.2:8080" in rules and "dnat to 10.244.2.2:8080" in rules
    assert f"ip daddr {empty_vip} tcp dport 81 reject with tcp reset" in rules
    # Same-bridge replies must come back through the node to be un-NATed.
    assert "ip saddr 10.244.1.0/24 ip daddr 10.244.1.0/24 masquerade" in rules
    # Loading replaces the previous table in one transaction.
    assert rules.splitlines()[:2] == [
        "table ip testbed-services",
        "delete table ip testbed-services",
    ]


def test_hosts_resolve_short_names_only_in_the_own_namespace() -> None:
    client = TOPO.find_pod("other/client")
    text = render_hosts(client, "10.244.1.3", TOPO.services, "cluster.local")
    line = next(ln for ln in text.splitlines() if ln.startswith(str(TOPO.services[0].cluster_ip)))
    names = line.split()[1:]
    assert "web.shop.svc.cluster.local" in names and "web.shop" in names
    assert "web" not in names
    same_ns = render_hosts(
        TOPO.find_pod("shop/web-1"), "10.244.1.2", TOPO.services, "cluster.local"
    )
    assert f"{TOPO.services[0].cluster_ip}\tweb.shop.svc.cluster.local" in same_ns
    assert same_ns.splitlines()[2] == "10.244.1.2\tweb-1"
