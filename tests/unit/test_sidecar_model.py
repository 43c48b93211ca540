"""The sidecar model's pure parts: istio-init's rule set and the sidecar form of translate()."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from test_translate import as_json, local, store

from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.nftables import (
    NODE_RULES,
    SIDECAR_RULES,
    NftablesBackend,
    describe,
    differences,
    render,
    ruleset,
)
from nodeagent.testbed.sidecar import in_pod_prefix, sidecar_node_id
from nodeagent.testbed.topology import TopologyError, loads_topology
from nodeagent.translate import envoy as e
from nodeagent.translate import translate
from nodeagent.translate.tls import ROOTCA, spiffe_id

# istio-init as the sidecar injector runs it: -p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT
# -i '*' -b '*' -d 15090,15021,15020 (istio/istio tools/istio-nftables golden files, in our table)
ISTIO_SIDECAR_DEFAULT = {
    "prerouting": ["meta l4proto tcp jump istio-inbound"],
    "output": ["jump istio-output"],
    "istio-inbound": [
        "tcp dport 15008 return",
        "tcp dport 15090 return",
        "tcp dport 15021 return",
        "tcp dport 15020 return",
        "meta l4proto tcp jump istio-in-redirect",
    ],
    "istio-redirect": ["meta l4proto tcp redirect to :15001"],
    "istio-in-redirect": ["meta l4proto tcp redirect to :15006"],
    "istio-output": [
        "meta oifname lo ip saddr 127.0.0.6 return",
        "meta oifname lo ip daddr != 127.0.0.1 tcp dport != 15008 meta skuid 1337"
        " jump istio-in-redirect",
        "meta oifname lo meta skuid != 1337 return",
        "meta skuid 1337 return",
        "meta oifname lo ip daddr != 127.0.0.1 tcp dport != 15008 meta skgid 1337"
        " jump istio-in-redirect",
        "meta oifname lo meta skgid != 1337 return",
        "meta skgid 1337 return",
        "ip daddr 127.0.0.1 return",
        "jump istio-redirect",
    ],
}


def chains(spec: CaptureSpec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for obj in ruleset(spec, SIDECAR_RULES):
        if "chain" in obj:
            out.setdefault(obj["chain"]["name"], [])
        if "rule" in obj:
            out[obj["rule"]["chain"]].append(describe(obj["rule"]["expr"]))
    return out


def test_default_sidecar_rules_are_istio_inits() -> None:
    assert chains(CaptureSpec()) == ISTIO_SIDECAR_DEFAULT
    hooks = {
        o["chain"]["name"]: (o["chain"].get("hook"), o["chain"].get("prio"))
        for o in ruleset(CaptureSpec(), SIDECAR_RULES)
        if "chain" in o
    }
    assert hooks["prerouting"] == ("prerouting", -100) and hooks["output"] == ("output", -100)
    assert hooks["istio-output"] == (None, None)  # a regular chain, reached by jump only


def test_annotations_map_to_istio_inits_flags() -> None:
    spec = CaptureSpec(
        exclude_outbound_ports=(9000,),
        exclude_inbound_ports=(8081,),
        exclude_outbound_ranges=(ipaddress.ip_network("10.1.0.0/16"),),
        include_outbound_ranges=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    got = chains(spec)
    assert got["istio-inbound"][-2:] == [
        "tcp dport 8081 return",
        "meta l4proto tcp jump istio-in-redirect",
    ]
    assert got["istio-output"][:2] == ["tcp dport 9000 return", "udp dport 9000 return"]
    assert got["istio-output"][-3:] == [
        "ip daddr 127.0.0.1 return",
        "ip daddr 10.1.0.0/16 return",
        "ip daddr 10.0.0.0/8 jump istio-redirect",
    ]
    # -b with ports: only those are captured (exclusions then do not apply); -b "": no inbound
    ports = chains(CaptureSpec(include_inbound_ports=(80,), exclude_inbound_ports=(81,)))
    assert ports["istio-inbound"] == [
        "tcp dport 15008 return",
        "tcp dport 80 jump istio-in-redirect",
    ]
    assert "prerouting" not in chains(CaptureSpec(include_inbound_ports=()))
    # -i "": nothing outbound is redirected; loopback included: the app's own-address calls too
    assert (
        "jump istio-redirect" not in chains(CaptureSpec(include_outbound_ranges=()))["istio-output"]
    )
    loop = chains(CaptureSpec(include_outbound_ranges=(ipaddress.ip_network("127.1.2.3/32"),)))
    assert "meta oifname lo meta skuid != 1337 return" not in loop["istio-output"]


def test_the_rule_sets_share_one_table_and_verify_tells_them_apart() -> None:
    spec = CaptureSpec()
    sidecar, node = ruleset(spec, SIDECAR_RULES), ruleset(spec, NODE_RULES)
    assert sidecar[0] == node[0] == {"table": {"family": "inet", "name": "nodeagent"}}
    assert differences(sidecar, sidecar) == []
    problems = differences(sidecar, node)
    assert "chain istio-output is missing" in problems
    document = render(spec, SIDECAR_RULES)["nftables"]
    assert [next(iter(c)) for c in document[:3]] == ["add", "delete", "add"]  # atomic replace
    assert json.dumps(document).count('"rule"') == sum("rule" in o for o in sidecar)
    with pytest.raises(ValueError, match="unknown capture rule set"):
        NftablesBackend("ambient")


def secret(name: str) -> Any:
    return secret_pb2.Secret(name=name)


def test_sidecar_form_is_the_node_forms_services_in_the_pods_own_envoy() -> None:
    """The sidecar holds what the node form shares through its internal listeners: the same
    service chains, clusters, routes and endpoints, in the pod's own Envoy, presenting the
    pod's identity itself (Istio's sidecar), with no netns, no filter state, no mark."""
    s = store()
    pod = local("web-1", {"app": "web"})
    node = translate(s, [pod], [secret(ROOTCA)])
    side = translate(s, [pod], [secret(ROOTCA)], sidecar=True)
    fast_route = "inboundInternal|8080||"  # the node's same-node fast path
    assert side[e.ROUTE] == {k: v for k, v in node[e.ROUTE].items() if k != fast_route}
    assert set(side[e.ENDPOINT]) == set(node[e.ENDPOINT])
    internals = {"outbound-internal", "originate", "originate-mtls", "originate-tls", "mirror"}
    assert set(side[e.CLUSTER]) == set(node[e.CLUSTER]) - internals
    fast = {"inboundInternal/shop/web-1"}  # the same-node fast path: sidecars have none
    assert set(side[e.LISTENER]) == set(node[e.LISTENER]) - internals - fast
    text = json.dumps({t: [as_json(m) for m in r.values()] for t, r in side.items()})
    assert "network_namespace_filepath" not in text and "networkNamespaceFilepath" not in text
    assert "set_filter_state" not in text and "upstream_bind_override" not in text
    assert "envoyInternalAddress" not in text and "internal_upstream" not in text
    assert '"intValue": "1337"' not in text  # no SO_MARK: a sidecar runs without NET_ADMIN
    outbound = as_json(side[e.LISTENER]["virtualOutbound/shop/web-1"])
    assert outbound["address"] == {"socketAddress": {"address": "127.0.0.1", "portValue": 15001}}
    shared = as_json(node[e.LISTENER]["outbound-internal"])
    matches = {c["name"]: c["filterChainMatch"] for c in shared["filterChains"]}
    assert {c["name"]: c["filterChainMatch"] for c in outbound["filterChains"]} == {
        **matches,
        "virtualOutbound-blackhole": {"destinationPort": 15001},
    }
    inbound = as_json(side[e.LISTENER]["virtualInbound/shop/web-1"])
    assert inbound["address"] == {"socketAddress": {"address": "0.0.0.0", "portValue": 15006}}
    endpoints = as_json(side[e.ENDPOINT]["outbound|80||web.shop.svc.cluster.local"])
    assert endpoints["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"] == {
        "socketAddress": {"address": "10.244.1.5", "portValue": 8080}
    }
    web = as_json(side[e.CLUSTER]["outbound|80||web.shop.svc.cluster.local"])
    mtls, plain = web["transportSocketMatches"]  # auto mTLS with this pod's identity
    assert mtls["match"] == {"tlsMode": "istio"} and plain["match"] == {}
    common = mtls["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert common["tlsCertificateSdsSecretConfigs"][0]["name"] == spiffe_id(
        "cluster.local", "shop", "default"
    )
    for name in ("InboundPassthroughCluster", "inbound|8080||"):
        bind = as_json(side[e.CLUSTER][name])["upstreamBindConfig"]
        assert bind == {"sourceAddress": {"address": "127.0.0.6", "portValue": 0}}
    assert "upstreamBindConfig" not in as_json(side[e.CLUSTER]["PassthroughCluster"])


def test_sidecar_form_holds_one_pod_and_only_its_identity() -> None:
    s = store()
    mine, other = local("web-1", sa="web"), local("db-1", sa="db")
    secrets = [secret(ROOTCA), secret(spiffe_id("cluster.local", "shop", "web"))]
    secrets.append(secret(spiffe_id("cluster.local", "shop", "db")))
    side = translate(s, [mine], secrets, sidecar=True)
    assert set(side[e.SECRET]) == {ROOTCA, "spiffe://cluster.local/ns/shop/sa/web"}
    web = as_json(side[e.CLUSTER]["outbound|80||web.shop.svc.cluster.local"])
    common = web["transportSocketMatches"][0]["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert common["tlsCertificateSdsSecretConfigs"][0]["name"] == spiffe_id(
        "cluster.local", "shop", "web"
    )
    assert len(translate(s, [mine, other], secrets)[e.SECRET]) == 3  # node form: every one
    with pytest.raises(ValueError, match="one pod's config"):
        translate(s, [mine, other], secrets, sidecar=True)


def test_sidecar_runs_in_the_pods_netns_as_istios_proxy_uid() -> None:
    assert sidecar_node_id("shop", "web-1") == "sidecar~shop~web-1"
    prefix = in_pod_prefix("/run/netns/web-1")
    assert prefix[:2] == ["nsenter", "--net=/run/netns/web-1"]
    assert "--reuid=1337" in prefix and "--regid=1337" in prefix and prefix[-1] == "--"


def test_topology_proxy_model() -> None:
    base = "name: t\nnodes: [{name: n1}]\n"
    assert loads_topology(base, "t").proxy_model == "node"
    assert loads_topology(base + "proxyModel: sidecar\n", "t").proxy_model == "sidecar"
    with pytest.raises(TopologyError, match="proxyModel: expected node or sidecar"):
        loads_topology(base + "proxyModel: ambient\n", "t")
    with pytest.raises(TopologyError, match="proxyModel: sidecar needs"):
        loads_topology(base + "proxyModel: sidecar\nproxy: false\n", "t")
