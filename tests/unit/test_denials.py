"""Denials visible (issue #17): each local pod's authorization filters count under a key naming
the pod and the path (translate/denials.py), the node's metrics read those counters back per pod
(metrics.DenialCollector), and inbound access log lines end with the dry-run verdicts
(translate/filters.py dry_run_fields)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.envoy.admin import EnvoyAdminError
from nodeagent.metrics import DenialCollector
from nodeagent.translate import TranslationCache, authz, denials, filters
from nodeagent.translate import envoy as e
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_authz import policy as authz_policy
from tests.unit.test_translate import as_json, local, store

POD = "web.v1-7d9f"  # a pod name with dots: never parsed out of a dotted stat name
TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def translated() -> dict[str, dict[str, Any]]:
    """web's listeners for a DENY, an ALLOW and a dry-run DENY (Istio's dry-run task)."""
    s = store()
    s.put_istio(
        authz_policy({"action": "DENY", "rules": [{"to": [{"operation": {}}]}]}, name="deny-admin")
    )
    s.put_istio(authz_policy({"rules": [{}]}, name="allow-all"))
    dry = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}]}
    s.put_istio(authz_policy(dry, name="deny-path-headers", **{authz.DRY_RUN: "true"}))
    out = TranslationCache().build(s, [local(POD, {"app": "web"})]).resources
    return {
        name: as_json(out[e.LISTENER][name])
        for name in (f"virtualInbound/shop/{POD}", f"inboundInternal/shop/{POD}")
    }


def rbac_configs(chain: dict[str, Any]) -> list[dict[str, Any]]:
    """The RBAC filters' configs of CHAIN: network ones, or those inside its HCM."""
    out = []
    for f in chain.get("filters", []):
        config = f.get("typedConfig", {})
        if f["name"] == authz.NETWORK_RBAC:
            out.append(config)
        for inner in config.get("httpFilters", []):
            if inner["name"] == authz.HTTP_RBAC:
                out.append(inner["typedConfig"])
    return out


def test_each_chain_counts_under_its_pod_and_path() -> None:
    """mTLS chains count as ``mtls``, the others of the inbound listener (PERMISSIVE plaintext,
    the client's own TLS) as ``plaintext``, the fast path's as ``fast``; per action."""
    listeners = translated()
    seen: dict[str, set[str]] = {}
    for name, listener in listeners.items():
        for chain in listener["filterChains"]:
            configs = rbac_configs(chain)
            if not configs or chain["name"].endswith("-strict"):
                continue
            if name.startswith("inboundInternal/"):
                path = denials.FAST
            elif "transportSocket" in chain:
                path = denials.MTLS
            else:
                path = denials.PLAINTEXT
            key = denials.stat_key("shop", POD, path)
            deny, allow = configs
            if "httpFilters" in str(chain):
                assert deny["rulesStatPrefix"] == f"{key}_deny_", chain["name"]
                assert allow["rulesStatPrefix"] == f"{key}_allow_", chain["name"]
            else:
                assert deny["statPrefix"] == f"tcp.{key}_deny.", chain["name"]
                assert allow["statPrefix"] == f"tcp.{key}_allow.", chain["name"]
            # Dry-run keeps Istio's shadow prefix: the access log reads its metadata keys.
            assert deny["shadowRulesStatPrefix"] == "istio_dry_run_deny_"
            seen.setdefault(path, set()).add("http" if "httpFilters" in str(chain) else "tcp")
    assert seen == {p: {"http", "tcp"} for p in denials.PATHS}
    assert "." not in denials.stat_key("shop", POD, denials.MTLS)


def test_envoy_accepts_the_keyed_filters_and_the_dry_run_log(tmp_path: Path) -> None:
    """The translated mTLS HTTP chain's connection manager (route inline) and TCP chain's
    filters, checked by Envoy itself."""
    inbound = translated()[f"virtualInbound/shop/{POD}"]
    chains = {c["name"]: c for c in inbound["filterChains"]}
    hcm = copy.deepcopy(chains["inbound|8080||-mtls"]["filters"][-1])
    del hcm["typedConfig"]["rds"]
    hcm["typedConfig"]["routeConfig"] = {
        "name": "r",
        "virtualHosts": [
            {
                "name": "v",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200}}],
            }
        ],
    }
    tcp = copy.deepcopy(chains["inbound|5432||-mtls"]["filters"][1:])
    assert [f["name"] for f in tcp] == [authz.NETWORK_RBAC, authz.NETWORK_RBAC, TCP_PROXY]
    tcp[-1]["typedConfig"]["cluster"] = "c"
    listeners = [
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": chain}],
        }
        for name, chain in (("http", [hcm]), ("tcp", tcp))
    ]
    cluster = {"name": "c", "type": "STATIC", "connect_timeout": "1s"}
    assert_envoy_accepts_resources(tmp_path, clusters=[cluster], listeners=listeners)


# Stat names as Envoy 1.40 prints them (admin /stats) for the keyed filters, e.g.
# http.inbound|8000||.rbac.nodeagent_0123456789abcdef_mtls_deny_.denied and
# tcp.nodeagent_0123456789abcdef_mtls_deny.rbac.denied: Envoy puts "rbac." after the network
# filter's stat_prefix, and a "." after the HTTP filter's rules_stat_prefix.
def http_stat(key: str, action: str, counter: str = "denied", port: int = 8080) -> str:
    return f"http.inbound|{port}||.rbac.{denials.stat_prefix(key, action)}.{counter}"


def tcp_stat(key: str, action: str, counter: str = "denied") -> str:
    return f"{denials.network_stat_prefix(key, action)}rbac.{counter}"


def test_parse_reads_denials_and_nothing_else() -> None:
    key = denials.stat_key("shop", POD, denials.FAST)
    digest = denials.digest("shop", POD)
    assert denials.parse(http_stat(key, "DENY")) == denials.DenialStat(
        digest, "fast", "http", "deny"
    )
    assert denials.parse(tcp_stat(key, "ALLOW")) == denials.DenialStat(
        digest, "fast", "tcp", "allow"
    )
    others = [
        http_stat(key, "DENY", "allowed"),
        tcp_stat(key, "DENY", "allowed"),
        "http.inbound|8080||.rbac.istio_dry_run_deny_.shadow_denied",
        f"{denials.network_stat_prefix(key, 'DENY')}rbac.istio_dry_run_deny_.shadow_denied",
        "http.inbound|8080||.rbac.denied",  # a filter without a key
        "inbound|8080||-strictrbac.denied",  # PeerAuthentication STRICT's refusal
    ]
    assert [denials.parse(name) for name in others] == [None] * len(others)
    with pytest.raises(ValueError, match="denial path 'tls'"):
        denials.stat_key("shop", POD, "tls")


def scrape(collector: DenialCollector) -> list[str]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.startswith("nodeagent_authz_denials_total")]


def test_the_collector_sums_per_pod_path_protocol_and_action() -> None:
    """Two HTTP ports of one pod add up; another pod's counters are its own; a pod the agent
    no longer holds (deleted) has no series; shadow (dry-run) and allowed counters are not read."""
    mtls = denials.stat_key("shop", POD, denials.MTLS)
    fast = denials.stat_key("shop", "db", denials.FAST)
    gone = denials.stat_key("shop", "deleted", denials.MTLS)
    stats = {
        http_stat(mtls, "DENY", port=8080): 2,
        http_stat(mtls, "DENY", port=9090): 3,
        http_stat(mtls, "DENY", "allowed"): 50,
        http_stat(mtls, "ALLOW"): 1,
        tcp_stat(fast, "DENY"): 4,
        f"{denials.network_stat_prefix(fast, 'DENY')}rbac.istio_dry_run_deny_.shadow_denied": 9,
        http_stat(gone, "DENY"): 7,
    }
    collector = DenialCollector(lambda: stats, lambda: [("shop", POD), ("shop", "db")])

    def line(pod: str, path: str, protocol: str, action: str, value: int) -> str:
        labels = (
            f'action="{action}",namespace="shop",path="{path}",pod="{pod}",protocol="{protocol}"'
        )
        return f"nodeagent_authz_denials_total{{{labels}}} {value:.1f}"

    assert sorted(scrape(collector)) == sorted(
        [
            line(POD, "mtls", "http", "deny", 5),
            line(POD, "mtls", "http", "allow", 1),
            line("db", "fast", "tcp", "deny", 4),
        ]
    )


def test_the_collector_answers_without_envoy() -> None:
    """Envoy down or restarting: the scrape still answers, without denial samples."""

    def down() -> dict[str, int]:
        raise EnvoyAdminError("Envoy admin unix:/run/x: GET failed")

    assert scrape(DenialCollector(down, lambda: [("shop", POD)])) == []


def test_inbound_log_lines_end_with_the_dry_run_verdicts() -> None:
    """Istio's dry-run task reports the DENY policy's name and the ALLOW policies' result; the
    inbound lines carry both (HTTP and TCP, from their RBAC filter's metadata), outbound none."""
    http_in = filters.access_log("inbound", "shop/web")[0]["typed_config"]
    line = http_in["log_format"]["text_format_source"]["inline_string"]
    assert line.endswith(
        " dry_run_deny=%DYNAMIC_METADATA(envoy.filters.http.rbac:"
        "istio_dry_run_deny_shadow_effective_policy_id)%"
        " dry_run_allow=%DYNAMIC_METADATA(envoy.filters.http.rbac:"
        "istio_dry_run_allow_shadow_engine_result)%\n"
    )
    assert line.startswith("[%START_TIME%] inbound shop/web ")
    tcp_in = filters.access_log("inbound", "shop/web", tcp=True)[0]["typed_config"]
    tcp_line = tcp_in["log_format"]["text_format_source"]["inline_string"]
    assert "envoy.filters.network.rbac:istio_dry_run_deny_shadow_effective_policy_id" in tcp_line
    for tcp in (False, True):
        out = filters.access_log("outbound", "shop/web", tcp=tcp)[0]["typed_config"]
        assert "dry_run" not in out["log_format"]["text_format_source"]["inline_string"]
    # The shadow prefixes the log reads are the ones the RBAC filters get.
    for action in ("deny", "allow"):
        prefix = f"istio_dry_run_{action}_"
        assert prefix in filters.dry_run_fields(tcp=False)
        pod_authz = authz.PodAuthz(
            (authz.Policy("shop", "p", action.upper(), ("{}",), True),), "cluster.local"
        )
        (f,) = pod_authz.http_filters()
        assert f["typed_config"]["shadow_rules_stat_prefix"] == prefix
        assert f["typed_config"]["@type"] == HTTP_RBAC_TYPE


# -- CUSTOM (ext_authz) denials -------------------------------------------------------------------
# Names as Envoy 1.40 prints them (admin /stats, checked against a running Envoy with the keyed
# HTTP filter): the HTTP ext_authz filter counts under its connection manager,
# http.<hcm>.ext_authz.<stat_prefix>.denied, and again under the route's cluster,
# cluster.<cluster>.ext_authz.<stat_prefix>.denied (source/extensions/filters/http/ext_authz/
# ext_authz.h generateStats, createPoolStatName); the network one as ext_authz.<stat_prefix>.denied
# (source/extensions/filters/network/ext_authz/ext_authz.cc generateStats).


def custom_translated(provider: str) -> dict[str, dict[str, Any]]:
    """web's listeners (both inbound paths) under the authz-custom task's policy."""
    from tests.unit.test_extauthz import TASK_PROVIDERS, mesh_store, task_policy

    s = mesh_store(TASK_PROVIDERS, task_policy(provider))
    out = TranslationCache().build(s, [local("web", {"app": "web"})]).resources
    return {
        name: as_json(out[e.LISTENER][name])
        for name in ("virtualInbound/shop/web", "inboundInternal/shop/web")
    }


def chain_path(listener: str, chain: dict[str, Any]) -> str:
    if listener.startswith("inboundInternal/"):
        return denials.FAST
    return denials.MTLS if "transportSocket" in chain else denials.PLAINTEXT


def custom_configs(chain: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The configs of CHAIN's filters named NAMES: network ones, or those inside its HCM."""
    out = []
    for f in chain.get("filters", []):
        config = f.get("typedConfig", {})
        if f["name"] in names:
            out.append(config)
        out += [i["typedConfig"] for i in config.get("httpFilters", []) if i["name"] in names]
    return out


def test_custom_ext_authz_counts_under_its_pod_and_path() -> None:
    """Every chain's ext_authz filter (HTTP, and a gRPC provider's network one) carries the
    chain's key with action custom; the shadow RBAC before it (which denies nothing) does not."""
    from nodeagent.translate import extauthz

    seen: set[tuple[str, str]] = set()
    for name, listener in custom_translated("sample-ext-authz-grpc").items():
        for chain in listener["filterChains"]:
            if chain["name"].endswith("-strict"):
                continue
            key = denials.stat_key("shop", "web", chain_path(name, chain))
            for protocol, filter_name, want, stat in (
                ("http", extauthz.HTTP_FILTER, f"{key}_custom_", "http.x.ext_authz.{}.denied"),
                ("tcp", extauthz.NETWORK_FILTER, f"{key}_custom", "ext_authz.{}.denied"),
            ):
                for config in custom_configs(chain, (filter_name,)):
                    assert config["statPrefix"] == want, chain["name"]
                    parsed = denials.parse(stat.format(want))
                    assert parsed is not None and parsed.action == denials.CUSTOM
                    assert parsed.protocol == protocol
                    seen.add((chain_path(name, chain), protocol))
            for shadow in custom_configs(chain, (authz.HTTP_RBAC, authz.NETWORK_RBAC)):
                assert "rulesStatPrefix" not in shadow and "rules" not in shadow
    assert seen == {(p, proto) for p in denials.PATHS for proto in ("http", "tcp")}


def test_a_provider_in_error_denies_under_the_key_with_action_custom() -> None:
    """An unknown provider: the RBAC filter that denies what the CUSTOM rules match counts as
    custom, HTTP (rules_stat_prefix) and TCP (stat_prefix)."""
    seen: set[tuple[str, str]] = set()
    for name, listener in custom_translated("no-such-provider").items():
        for chain in listener["filterChains"]:
            configs = rbac_configs(chain)
            if not configs or chain["name"].endswith("-strict"):
                continue
            (config,) = configs
            assert all(r.endswith("-bad-custom-action") for r in config["rules"]["policies"])
            key = denials.stat_key("shop", "web", chain_path(name, chain))
            if "httpFilters" in str(chain):
                assert config["rulesStatPrefix"] == f"{key}_custom_"
                stat = http_stat(key, "CUSTOM")
            else:
                assert config["statPrefix"] == f"tcp.{key}_custom."
                stat = tcp_stat(key, "CUSTOM")
            parsed = denials.parse(stat)
            assert parsed is not None and parsed.action == denials.CUSTOM
            seen.add((chain_path(name, chain), parsed.protocol))
    assert seen == {(p, proto) for p in denials.PATHS for proto in ("http", "tcp")}


def test_the_collector_counts_custom_denials_once() -> None:
    """ext_authz's HTTP denial counted under the connection manager and again under the route's
    cluster: read once; its ok/error/failure_mode_allowed counters are no denials."""
    key = denials.stat_key("shop", POD, denials.MTLS)
    fast = denials.stat_key("shop", POD, denials.FAST)
    prefix = denials.stat_prefix(key, "CUSTOM")
    stats = {
        f"http.inbound|8080||.ext_authz.{prefix}.denied": 3,
        f"cluster.inbound|8080||.ext_authz.{prefix}.denied": 3,
        f"http.inbound|8080||.ext_authz.{prefix}.ok": 10,
        f"http.inbound|8080||.ext_authz.{prefix}.error": 2,
        f"http.inbound|8080||.ext_authz.{prefix}.failure_mode_allowed": 1,
        f"ext_authz.{denials.network_ext_authz_prefix(fast)}.denied": 4,
        f"ext_authz.{denials.network_ext_authz_prefix(fast)}.cx_closed": 9,
        http_stat(fast, "CUSTOM"): 1,  # a provider in error, same node
    }
    collector = DenialCollector(lambda: stats, lambda: [("shop", POD)])
    labels = 'action="custom",namespace="shop",path="{}",pod="' + POD + '",protocol="{}"'
    assert sorted(scrape(collector)) == sorted(
        f"nodeagent_authz_denials_total{{{labels.format(path, proto)}}} {value:.1f}"
        for path, proto, value in (("mtls", "http", 3), ("fast", "tcp", 4), ("fast", "http", 1))
    )
