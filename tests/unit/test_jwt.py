"""RequestAuthentication (issue #17 part 2): the jwt_authn filter on every inbound HTTP path of
the pods a policy selects, with Istio's requirement, provider fields and key handling
(istio.io/latest/docs/reference/config/security/request_authentication/; istio/istio
pilot/pkg/security/authn/policy_applier.go convertToEnvoyJwtConfig), checked by Envoy itself."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh import jwks
from nodeagent.mesh.model import IstioResource, MeshConfig
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import TranslationCache, filters, istio_stats, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.jwt import JWT_FILTER, REJECT_ALL_JWKS, inbound_filters
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.istio_data import istio_data
from tests.unit.test_fast_path import here, mesh
from tests.unit.test_translate import as_json

ISSUER = "testing@secure.istio.io"
JWKS = istio_data("jwt/jwks.json").read_text()
WEB = "shop/web-1"  # HTTP 8080 and TCP 5432, on node1 with front/f
INBOUND, FAST = "virtualInbound/shop/web-1", "inboundInternal/shop/web-1"
URI = "https://keys.example.com/jwks.json"


def request_authentication(
    spec: dict[str, Any], namespace: str = "shop", name: str = "jwt"
) -> IstioResource:
    return IstioResource("security.istio.io", "v1", "RequestAuthentication", namespace, name, spec)


def rule(**fields: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "jwks": JWKS, **fields}


def http_filters(listener: Any) -> dict[str, list[str]]:
    """chain name -> the HTTP filter names of its HTTP connection manager (HTTP chains only)."""
    found = {}
    for chain in as_json(listener).get("filterChains", []):
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                names = [
                    h["name"]
                    for h in f["typedConfig"]["httpFilters"]
                    if h["name"] != istio_stats.PEER_FILTER  # metrics, not authentication
                ]
                found[chain["name"]] = names
    return found


def jwt_config(store: MeshStore, pod: str = WEB) -> dict[str, Any]:
    [only] = inbound_filters(store, store.pods[pod])
    assert only["name"] == JWT_FILTER
    config: dict[str, Any] = only["typed_config"]
    return config


def test_the_s5_policy_guards_every_inbound_http_path_of_the_selected_pod() -> None:
    """Cross-node (mTLS and plaintext chains of virtualInbound) and same-node (the fast path):
    jwt_authn before the router; TCP chains have none; pods not selected have none."""
    ra = request_authentication({"selector": {"matchLabels": {"app": "web"}}, "jwtRules": [rule()]})
    s = mesh(ra)
    out = translate(s, [here(s, "front/f"), here(s, WEB)])
    for name in (INBOUND, FAST):
        chains = http_filters(out[e.LISTENER][name])
        assert chains, name
        assert all(f == [JWT_FILTER, "envoy.filters.http.router"] for f in chains.values()), chains
    assert inbound_filters(s, s.pods["front/f"]) == []
    config = jwt_config(s)
    # One provider: a token must be valid, no token passes (policy_applier.go).
    assert config["rules"] == [
        {
            "match": {"prefix": "/"},
            "requires": {
                "requires_any": {
                    "requirements": [{"provider_name": "origins-0"}, {"allow_missing": {}}]
                }
            },
        }
    ]
    assert config["bypass_cors_preflight"] is True
    provider = config["providers"]["origins-0"]
    assert provider["issuer"] == ISSUER
    assert provider["local_jwks"] == {"inline_string": JWKS}
    assert provider["payload_in_metadata"] == "payload"


def test_every_rule_field_reaches_envoy_and_envoy_accepts_it(tmp_path: Path) -> None:
    full = rule(
        audiences=["bookstore", "books"],
        fromHeaders=[{"name": "x-jwt", "prefix": "Bearer "}, {"name": "x-raw"}],
        fromParams=["access_token"],
        fromCookies=["session"],
        outputPayloadToHeader="x-jwt-payload",
        outputClaimToHeaders=[{"header": "x-jwt-sub", "claim": "sub"}],
        forwardOriginalToken=True,
    )
    other = {"issuer": "another@example.com", "jwksUri": URI}
    ra = request_authentication({"jwtRules": [full, other]})
    s = mesh(ra)
    config = jwt_config(s)
    assert config["providers"]["origins-0"]["issuer"] == "another@example.com"  # by issuer
    p = config["providers"]["origins-1"]
    assert p["audiences"] == ["bookstore", "books"]
    assert p["from_headers"] == [
        {"name": "x-jwt", "value_prefix": "Bearer "},
        {"name": "x-raw"},
    ]
    assert p["from_params"] == ["access_token"]
    assert p["from_cookies"] == ["session"]
    assert p["forward_payload_header"] == "x-jwt-payload"
    assert p["claim_to_headers"] == [{"header_name": "x-jwt-sub", "claim_name": "sub"}]
    assert p["forward"] is True
    # Two providers: either one alone, or every present token valid (policy_applier.go).
    each = [
        {"requires_any": {"requirements": [{"provider_name": n}, {"allow_missing": {}}]}}
        for n in ("origins-0", "origins-1")
    ]
    assert config["rules"][0]["requires"] == {
        "requires_any": {
            "requirements": [
                {"provider_name": "origins-0"},
                {"provider_name": "origins-1"},
                {"requires_all": {"requirements": each}},
            ]
        }
    }
    # The inbound HTTP connection manager with these filters, its route inline (a static
    # validation has no xDS to fetch it from).
    http = filters.http_connection_manager(
        "h", "r", "inbound", "p", inbound_filters=inbound_filters(s, s.pods[WEB])
    )
    del http["typed_config"]["rds"]
    http["typed_config"]["route_config"] = {
        "name": "r",
        "virtual_hosts": [
            {
                "name": "v",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
            }
        ],
    }
    listener = {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [http]}],
    }
    assert_envoy_accepts_resources(tmp_path, listeners=[listener])


@pytest.mark.parametrize(
    ("namespace", "spec", "applies"),
    [
        ("shop", {}, True),  # namespace-wide
        ("istio-system", {}, True),  # mesh-wide, from the root namespace
        ("istio-system", {"selector": {"matchLabels": {"app": "web"}}}, True),
        ("shop", {"selector": {"matchLabels": {"app": "web", "v": "2"}}}, False),
        ("front", {}, False),  # another namespace's
        # targetRef(s): Gateway API gateways and waypoints only (policyattachment.go)
        ("shop", {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]}, False),
        ("shop", {"targetRef": {"kind": "Gateway", "group": "x", "name": "gw"}}, False),
    ],
)
def test_which_policies_apply_to_a_pod(namespace: str, spec: dict[str, Any], applies: bool) -> None:
    s = mesh(request_authentication({**spec, "jwtRules": [rule()]}, namespace))
    assert bool(inbound_filters(s, s.pods[WEB])) is applies


def test_rules_of_every_applying_policy_are_combined() -> None:
    s = mesh(
        request_authentication({"jwtRules": [rule(issuer="b@x")]}, "istio-system", "mesh"),
        request_authentication({"jwtRules": [rule(issuer="a@x")]}, "shop", "ns"),
    )
    issuers = [p["issuer"] for p in jwt_config(s)["providers"].values()]
    assert sorted(issuers) == ["a@x", "b@x"]


def test_keys_by_uri_are_the_fetched_ones_else_a_key_that_rejects_every_token() -> None:
    s = mesh(request_authentication({"jwtRules": [{"issuer": ISSUER, "jwksUri": URI}]}))
    keys = lambda: jwt_config(s)["providers"]["origins-0"]["local_jwks"]["inline_string"]  # noqa: E731
    assert keys() == REJECT_ALL_JWKS
    s.put_jwks(URI, JWKS)
    assert keys() == JWKS
    bad_inline = mesh(request_authentication({"jwtRules": [rule(jwks="{not json")]}))
    assert jwt_config(bad_inline)["providers"]["origins-0"]["local_jwks"] == {
        "inline_string": REJECT_ALL_JWKS
    }


def test_fetched_keys_change_the_pods_inbound_config_incrementally() -> None:
    s = mesh(request_authentication({"jwtRules": [{"issuer": ISSUER, "jwksUri": URI}]}))
    pods = [here(s, "front/f"), here(s, WEB)]
    cache = TranslationCache()
    before = as_json(cache.build(s, pods).resources[e.LISTENER][INBOUND])
    s.put_jwks(URI, JWKS)
    after = as_json(cache.build(s, pods).resources[e.LISTENER][INBOUND])
    assert REJECT_ALL_JWKS.split('"n": ')[1][:20] in json.dumps(before)
    assert JWKS.split('"n":')[1][:20] in json.dumps(after)


class _Net:
    """A stand-in network: URL -> body, or an OSError when the server is down."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages, self.down, self.asked = pages, False, []
        self.timeouts: list[float] = []

    def get(self, url: str, timeout: float) -> str:
        self.asked.append(url)
        self.timeouts.append(timeout)
        if self.down or url not in self.pages:
            raise OSError(f"connection refused: {url}")
        return self.pages[url]


def _resolver(s: MeshStore, net: _Net) -> tuple[jwks.JwksResolver, list[float]]:
    now = [100.0]
    return jwks.JwksResolver(s, net.get, refresh=60.0, clock=lambda: now[0]), now


def test_the_resolver_fetches_refreshes_and_keeps_cached_keys_through_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = MeshStore()
    s.put_istio(request_authentication({"jwtRules": [{"issuer": ISSUER, "jwksUri": URI}]}))
    net = _Net({URI: JWKS})
    resolver, now = _resolver(s, net)
    asyncio.run(resolver.sync_once())
    assert s.jwks == {URI: JWKS}
    asyncio.run(resolver.sync_once())
    assert net.asked == [URI]  # cached until the refresh is due
    net.down = True
    now[0] += 61
    with caplog.at_level(logging.WARNING, "nodeagent.mesh.jwks"):
        asyncio.run(resolver.sync_once())
    assert s.jwks == {URI: JWKS}  # the outage keeps the cached keys
    assert "cached keys stay in use" in caplog.text
    net.down = False
    net.pages[URI] = JWKS.replace("AQAB", "AAEAAQ")
    now[0] += 1.5  # retried after a failure, well before the next refresh
    asyncio.run(resolver.sync_once())
    assert "AAEAAQ" in s.jwks[URI]
    s.delete_istio("RequestAuthentication/shop/jwt")
    asyncio.run(resolver.sync_once())
    assert s.jwks == {}  # no policy names it: forgotten


def test_keys_never_fetched_stay_out_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    s = MeshStore()
    s.put_istio(request_authentication({"jwtRules": [{"issuer": ISSUER, "jwksUri": URI}]}))
    net = _Net({URI: "<html>not a key set</html>"})
    resolver, _ = _resolver(s, net)
    with caplog.at_level(logging.WARNING, "nodeagent.mesh.jwks"):
        asyncio.run(resolver.sync_once())
    assert s.jwks == {}
    assert "every token for it is rejected" in caplog.text


def test_an_issuer_without_keys_is_resolved_by_openid_discovery() -> None:
    """No jwks and no jwksUri: the issuer's discovery document names the keys (JWTRule.jwksUri,
    "If not set, ... OpenID Discovery")."""
    s = MeshStore()
    s.set_mesh_config(MeshConfig())
    issuer = "https://issuer.example.com"
    s.put_istio(request_authentication({"jwtRules": [{"issuer": issuer}]}))
    net = _Net({f"{issuer}/.well-known/openid-configuration": json.dumps({"jwks_uri": URI})})
    net.pages[URI] = JWKS
    resolver, _ = _resolver(s, net)
    asyncio.run(resolver.sync_once())
    assert s.jwks == {f"oidc:{issuer}": JWKS}


def test_the_refresh_interval_is_istiods_setting_from_the_environment() -> None:
    assert jwks.refresh_interval({}) == 20 * 60  # PILOT_JWT_PUB_KEY_REFRESH_INTERVAL's default
    assert jwks.refresh_interval({jwks.REFRESH_ENV: "1h30m"}) == 5400
    assert jwks.refresh_interval({jwks.REFRESH_ENV: "2s"}) == 2
    for bad in ("2x", "0s", "-1s", "20"):
        with pytest.raises(ValueError, match=jwks.REFRESH_ENV):
            jwks.refresh_interval({jwks.REFRESH_ENV: bad})


def test_a_rules_timeout_bounds_the_fetch_of_its_keys() -> None:
    """JWTRule.timeout (request_authentication reference: "The maximum amount of time that the
    resolver ... will spend waiting for the JWKS to be fetched. Default is 5s."): the fetch gets
    it; unset, 5 s; two rules naming one source, the longer one."""
    s = MeshStore()
    other = "http://keys.example.com/other.json"
    rules = [
        {"issuer": ISSUER, "jwksUri": URI, "timeout": "1.5s"},
        {"issuer": "second", "jwksUri": URI, "timeout": "250ms"},
        {"issuer": "third", "jwksUri": other},
    ]
    s.put_istio(request_authentication({"jwtRules": rules}))
    assert jwks.wanted_sources(s) == {URI: 1.5, other: 5.0}
    net = _Net({URI: JWKS, other: JWKS})
    resolver, _ = _resolver(s, net)
    asyncio.run(resolver.sync_once())
    given = dict(zip(net.asked, net.timeouts, strict=True))
    assert given == {URI: pytest.approx(1.5, abs=0.1), other: pytest.approx(5.0, abs=0.1)}
    assert jwks.rule_timeout({"timeout": "1m"}) == 60.0
    assert jwks.rule_timeout({"timeout": "soon"}) == jwks.TIMEOUT  # schema-invalid: the default


def test_a_discovery_and_its_keys_share_one_timeout() -> None:
    """The timeout bounds the whole fetch: what the discovery document took is not given again
    to the keys, and nothing left is a timeout (an OSError: the cached keys stay)."""
    issuer = "https://issuer.example.com"
    discovery = f"{issuer}/.well-known/openid-configuration"
    now = [0.0]
    given: dict[str, float] = {}

    def slow_get(url: str, timeout: float) -> str:
        given[url] = timeout
        now[0] += 0.75  # each request takes 0.75 s
        return json.dumps({"jwks_uri": URI}) if url == discovery else JWKS

    assert jwks.fetch(f"oidc:{issuer}", slow_get, 2.0, clock=lambda: now[0]) == JWKS
    assert given == {discovery: 2.0, URI: 1.25}
    now[0] = 0.0
    with pytest.raises(TimeoutError, match=r"timeout of 0\.5s"):
        jwks.fetch(f"oidc:{issuer}", slow_get, 0.5, clock=lambda: now[0])
    assert isinstance(TimeoutError(), OSError)  # the resolver's failure path takes it


def test_http_get_gives_up_after_the_timeout() -> None:
    """A server that accepts and never answers: the real fetch ends after the rule's timeout."""
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/jwks.json"
        started = time.monotonic()
        with pytest.raises(OSError):
            jwks.http_get(url, 0.3)
        assert time.monotonic() - started < 2.0
