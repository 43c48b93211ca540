"""Access loggers of the node's listeners per MeshConfig and the Telemetry API (access_logs.py).

Istio: MeshConfig accessLogFile ("" = none, the default), accessLogEncoding, accessLogFormat
(istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/); Telemetry accessLogging
(istio.io/latest/docs/reference/config/telemetry/); envoyFileAccessLog providers (path,
logFormat text or labels).
"""

from __future__ import annotations

import json
from typing import Any

from nodeagent.mesh.model import IstioResource, Namespace, Pod, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import parse_mesh_config
from nodeagent.translate import LocalPod, TranslationCache
from nodeagent.translate import envoy as e
from nodeagent.translate.access_logs import ISTIO_JSON_FORMAT, LOG_CLASS_KEY
from tests.unit.test_translate import as_json

SERVICE = "outbound|80||web.shop.svc.cluster.local"
PASSTHROUGH = "InboundPassthroughCluster"  # a pod's inbound chain for ports no service names


def store(mesh: dict[str, Any] | None = None, *telemetries: IstioResource) -> MeshStore:
    s = MeshStore()
    s.set_mesh_config(parse_mesh_config(mesh or {}))
    s.put_namespace(Namespace("shop", {"istio-injection": "enabled"}))
    s.put_service(
        Service("shop", "web", "10.96.0.10", (ServicePort(80, "http", 8080),), {"app": "web"})
    )
    for name, app, ip in (
        ("web-1", "web", "10.244.1.5"),
        ("a", "a", "10.244.1.6"),
        ("b", "b", "10.244.1.7"),
    ):
        s.put_pod(Pod("shop", name, "u", "node1", app, {"app": app}, pod_ips=(ip,)))
    for t in telemetries:
        s.put_istio(t)
    return s


def tel(name: str, spec: dict[str, Any], namespace: str = "shop") -> IstioResource:
    return IstioResource("telemetry.istio.io", "v1", "Telemetry", namespace, name, spec)


def build(s: MeshStore, cache: TranslationCache | None = None) -> dict[str, Any]:
    local = [LocalPod(s.pods[f"shop/{n}"], f"/run/netns/{n}") for n in ("web-1", "a", "b")]
    out = (cache or TranslationCache()).build(s, local).resources
    return {name: as_json(listener) for name, listener in out[e.LISTENER].items()}


def loggers(listener: dict[str, Any], chain: str) -> list[dict[str, Any]]:
    """The access loggers of the terminal filter of LISTENER's chain CHAIN (not the loggers of
    Istio's metrics, translate/istio_stats.py, which Envoy configures as access loggers too)."""
    chains = [*listener.get("filterChains", []), listener.get("defaultFilterChain", {})]
    found = next(c for c in chains if c.get("name") == chain)
    config = found["filters"][-1]["typedConfig"]
    logs: list[dict[str, Any]] = config.get("accessLog", [])
    return [log for log in logs if log["name"] != "envoy.access_loggers.stats"]


def fmt(logger: dict[str, Any]) -> Any:
    log_format = logger["typedConfig"]["logFormat"]
    return log_format.get("jsonFormat") or log_format["textFormatSource"]["inlineString"]


def stamp_of(listeners: dict[str, Any], pod: str) -> str:
    chain = listeners[f"virtualOutbound/shop/{pod}"]["defaultFilterChain"]
    values = chain["filters"][0]["typedConfig"]["onNewConnection"]
    found = [v for v in values if v["objectKey"] == LOG_CLASS_KEY]
    return str(found[0]["formatString"]["textFormatSource"]["inlineString"]) if found else ""


def test_istio_default_is_no_access_log() -> None:
    listeners = build(store())
    assert loggers(listeners["outbound-internal"], SERVICE) == []
    assert loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||") == []


def test_access_log_file_text_names_direction_and_pod() -> None:
    listeners = build(store({"accessLogFile": "/dev/stdout"}))
    shared = loggers(listeners["outbound-internal"], SERVICE)
    assert [lg["name"] for lg in shared] == ["envoy.access_loggers.stdout"]
    assert '] outbound %FILTER_STATE(io.nodeagent.pod:PLAIN)% "%REQ(:METHOD)%' in fmt(shared[0])
    assert "filter" not in shared[0]  # one class: no filter on the caller
    inbound = loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||")
    assert "] inbound shop/web-1 " in fmt(inbound[0])
    assert fmt(inbound[0]).endswith(
        "dry_run_allow=%DYNAMIC_METADATA(envoy.filters.http.rbac:istio_dry_run_allow_shadow_engine_result)%\n"
    )
    assert stamp_of(listeners, "a") == ""


def test_json_encoding_has_istios_keys_and_the_pod() -> None:
    listeners = build(store({"accessLogFile": "/var/log/mesh.log", "accessLogEncoding": "JSON"}))
    inbound = loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||")[0]
    assert inbound["name"] == "envoy.access_loggers.file"
    assert inbound["typedConfig"]["path"] == "/var/log/mesh.log"
    keys = fmt(inbound)
    assert set(ISTIO_JSON_FORMAT) <= keys.keys()
    assert (keys["pod"], keys["direction"]) == ("shop/web-1", "inbound")
    assert {"dry_run_deny", "dry_run_allow"} <= keys.keys()
    custom = build(
        store(
            {
                "accessLogFile": "/dev/stdout",
                "accessLogEncoding": "JSON",
                "accessLogFormat": '{"code": "%RESPONSE_CODE%"}',
            }
        )
    )
    shared = fmt(loggers(custom["outbound-internal"], SERVICE)[0])
    assert shared == {
        "code": "%RESPONSE_CODE%",
        "direction": "outbound",
        "pod": "%FILTER_STATE(io.nodeagent.pod:PLAIN)%",
    }


def test_custom_text_format_is_prefixed_with_direction_and_pod() -> None:
    listeners = build(store({"accessLogFile": "/dev/stdout", "accessLogFormat": "%RESPONSE_CODE%"}))
    assert (
        fmt(loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||")[0])
        == "inbound shop/web-1 %RESPONSE_CODE%\n"
    )


def test_shared_chains_log_per_caller_class() -> None:
    # b is quiet (a workload Telemetry); a and web-1 follow the mesh: two classes, so the shared
    # chains' logger names its class and a pod's outbound listener stamps its own.
    quiet = tel(
        "b-quiet",
        {"selector": {"matchLabels": {"app": "b"}}, "accessLogging": [{"disabled": True}]},
    )
    listeners = build(store({"accessLogFile": "/dev/stdout"}, quiet))
    shared = loggers(listeners["outbound-internal"], SERVICE)
    assert len(shared) == 1
    stamp = stamp_of(listeners, "a")
    assert stamp and stamp == stamp_of(listeners, "web-1")
    assert stamp_of(listeners, "b") not in ("", stamp)
    expression = shared[0]["filter"]["extensionFilter"]["typedConfig"]["expression"]
    assert expression == f"filter_state['{LOG_CLASS_KEY}'] == b'{stamp}'"
    # b's own listeners log nothing; its inbound side (SERVER) is off too.
    assert loggers(listeners["virtualInbound/shop/b"], PASSTHROUGH) == []
    assert loggers(listeners["virtualOutbound/shop/b"], "outbound-internal") == []


def test_telemetry_provider_with_filter_and_labels() -> None:
    mesh = {
        "extensionProviders": [
            {
                "name": "json-log",
                "envoyFileAccessLog": {
                    "path": "/dev/stdout",
                    "logFormat": {"labels": {"code": "%RESPONSE_CODE%"}},
                },
            }
        ]
    }
    errors = tel(
        "errors",
        {
            "accessLogging": [
                {
                    "providers": [{"name": "json-log"}],
                    "filter": {"expression": "response.code >= 400"},
                }
            ]
        },
    )
    listeners = build(store(mesh, errors))
    inbound = loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||")[0]
    assert fmt(inbound) == {"code": "%RESPONSE_CODE%", "direction": "inbound", "pod": "shop/web-1"}
    assert (
        inbound["filter"]["extensionFilter"]["typedConfig"]["expression"] == "response.code >= 400"
    )
    shared = loggers(listeners["outbound-internal"], SERVICE)[0]
    assert (
        shared["filter"]["extensionFilter"]["name"] == "envoy.access_loggers.extension_filters.cel"
    )


def test_a_telemetry_change_rebuilds_the_loggers() -> None:
    cache = TranslationCache()
    s = store({"accessLogFile": "/dev/stdout"})
    assert len(loggers(build(s, cache)["virtualInbound/shop/web-1"], "inbound|8080||")) == 1
    s.put_istio(
        tel(
            "off",
            {"accessLogging": [{"disabled": True}], "selector": {"matchLabels": {"app": "web"}}},
        )
    )
    listeners = build(s, cache)
    assert loggers(listeners["virtualInbound/shop/web-1"], "inbound|8080||") == []
    assert len(loggers(listeners["virtualInbound/shop/a"], PASSTHROUGH)) == 1
    s.delete_istio("Telemetry/shop/off")
    assert len(loggers(build(s, cache)["virtualInbound/shop/web-1"], "inbound|8080||")) == 1
    assert json.dumps(build(s, cache)) == json.dumps(build(s))


def test_pods_of_the_mesh_class_cost_no_full_recompute() -> None:
    # The shared chains' loggers depend on the node's log classes: a pod that joins the class
    # already there (no Telemetry: the mesh config's) is an incremental change.
    s = store({"accessLogFile": "/dev/stdout"})
    cache = TranslationCache()
    cache.build(s, [])
    build(s, cache)
    assert cache.full_recomputes == 1
