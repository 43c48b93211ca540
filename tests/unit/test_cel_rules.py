"""The CEL rules (x-kubernetes-validations) of Istio's CRDs, evaluated as the API server does.

One object that passes and one that fails for each distinct rule in nodeagent/mesh/crds/, with the
message the API server prints (``<path>: Invalid value: "<type>": <message>``, see
k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/validation.go); the rules and messages are
Istio's (crd-all.gen.yaml). Kubernetes' CEL library: kubernetes.io/docs/reference/using-api/cel/.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import celpy
import pytest
import yaml
from celpy.evaluation import CELEvalError
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.mesh import cel
from nodeagent.mesh.validation import DEFAULT_CRDS, IstioSchemas

DURATION = "must be a valid duration greater than 1ms"
PORT = "port must be between 1-65535"


@pytest.fixture(scope="module")
def schemas() -> IstioSchemas:
    return IstioSchemas.load()


def _obj(api: str, kind: str, spec: str) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": yaml.safe_load(spec),
    }


def _dr(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "DestinationRule", spec)


def _vs(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "VirtualService", spec)


def _se(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "ServiceEntry", spec)


def _we(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "WorkloadEntry", spec)


def _wg(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "WorkloadGroup", spec)


def _gw(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1", "Gateway", spec)


def _ef(spec: str) -> dict[str, Any]:
    return _obj("networking.istio.io/v1alpha3", "EnvoyFilter", spec)


def _ap(spec: str) -> dict[str, Any]:
    return _obj("security.istio.io/v1", "AuthorizationPolicy", spec)


def _pa(spec: str) -> dict[str, Any]:
    return _obj("security.istio.io/v1", "PeerAuthentication", spec)


def _ra(spec: str) -> dict[str, Any]:
    return _obj("security.istio.io/v1", "RequestAuthentication", spec)


def _telemetry(spec: str) -> dict[str, Any]:
    return _obj("telemetry.istio.io/v1", "Telemetry", spec)


def _wasm(spec: str) -> dict[str, Any]:
    return _obj("extensions.istio.io/v1alpha1", "WasmPlugin", spec)


def _te(spec: str) -> dict[str, Any]:
    return _obj("extensions.istio.io/v1alpha1", "TrafficExtension", spec)


TCP_TIMEOUT = "host: r\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: %s}}}"
VS_TIMEOUT = "hosts: [r]\nhttp: [{timeout: %s, route: [{destination: {host: r}}]}]"
SEL = "selector: {matchLabels: {app: a}}"
TAGS = "metrics: [{overrides: [{tagOverrides: {tag: %s}}]}]"
BAD_UDS = "UDS must be an absolute path or abstract socket"

# (case, object the API server accepts, object it refuses, the errors it prints for the latter)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str | list[str]]] = [
    (
        "duration below 1ms",
        _dr(TCP_TIMEOUT % "1h30m"),
        _dr(TCP_TIMEOUT % "500us"),
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout: "
        f'Invalid value: "string": {DURATION}',
    ),
    (
        "negative duration",
        _dr(TCP_TIMEOUT % "10ms"),
        _dr(TCP_TIMEOUT % "-1s"),
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout: "
        f'Invalid value: "string": {DURATION}',
    ),
    (
        "zero duration (Go's ParseDuration reads a bare 0)",
        _vs(VS_TIMEOUT % "1.5s"),
        _vs(VS_TIMEOUT % "'0'"),
        f'spec.http[0].timeout: Invalid value: "string": {DURATION}',
    ),
    (
        "duration in days (no such unit in Go)",
        _vs(VS_TIMEOUT % "24h"),
        _vs(VS_TIMEOUT % "1d"),
        'spec.http[0].timeout: Invalid value: "string": time: unknown unit "d" in duration "1d"'
        f" evaluating rule: {DURATION}",
    ),
    (
        "not a duration",
        _vs(VS_TIMEOUT % "100µs1s"),
        _vs(VS_TIMEOUT % "soon"),
        'spec.http[0].timeout: Invalid value: "string": time: invalid duration "soon"'
        f" evaluating rule: {DURATION}",
    ),
    (
        "duration in a list item (a subset's policy)",
        _dr("host: r\nsubsets: [{name: v1, trafficPolicy: {tls: {mode: SIMPLE}}}]"),
        _dr(
            "host: r\nsubsets: [{name: v1,"
            " trafficPolicy: {connectionPool: {http: {idleTimeout: 1ns}}}}]"
        ),
        "spec.subsets[0].trafficPolicy.connectionPool.http.idleTimeout: "
        f'Invalid value: "string": {DURATION}',
    ),
    (
        "port range",
        _se("hosts: [a.example]\nports: [{number: 65535, name: p}]"),
        _se("hosts: [a.example]\nports: [{number: 0, name: p}]"),
        f'spec.ports[0].number: Invalid value: "integer": {PORT}',
    ),
    (
        "port range in a map value",
        _we("address: 10.0.0.1\nports: {http: 8080}"),
        _we("address: 10.0.0.1\nports: {http: 0}"),
        f'spec.ports[http]: Invalid value: "integer": {PORT}',
    ),
    (
        "port name",
        _we("address: 10.0.0.1\nports: {http-web: 80}"),
        _we("address: 10.0.0.1\nports: {-web: 80}"),
        'spec.ports: Invalid value: "object": port name must be valid',
    ),
    (
        "duplicate service port",
        _se("hosts: [a.example]\nports: [{number: 80, name: a}, {number: 81, name: b}]"),
        _se("hosts: [a.example]\nports: [{number: 80, name: a}, {number: 80, name: b}]"),
        'spec.ports: Invalid value: "array": port number cannot be duplicated',
    ),
    (
        "wildcard host",
        _se("hosts: ['*.example']"),
        _se("hosts: ['*']"),
        'spec.hosts[0]: Invalid value: "string": hostname cannot be wildcard',
    ),
    (
        "selector or endpoints",
        _se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]"),
        _se(
            "hosts: [a.example]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]\n"
            "workloadSelector: {labels: {app: a}}"
        ),
        'spec: Invalid value: "object": only one of WorkloadSelector or Endpoints can be set',
    ),
    (
        "CIDR address with DNS resolution",
        _se("hosts: [a.example]\naddresses: [10.0.0.0/24]\nresolution: STATIC"),
        _se("hosts: [a.example]\naddresses: [10.0.0.0/24]\nresolution: DNS"),
        'spec: Invalid value: "object": CIDR addresses are allowed only for NONE/STATIC '
        "resolution types",
    ),
    (
        "endpoints without resolution (NONE)",
        _se("hosts: [a.example]\nresolution: DNS\nendpoints: [{address: a.example}]"),
        _se("hosts: [a.example]\nendpoints: [{address: 10.0.0.1}]"),
        'spec: Invalid value: "object": NONE mode cannot set endpoints',
    ),
    (
        "DNS_ROUND_ROBIN endpoints",
        _se("hosts: [a.example]\nresolution: DNS_ROUND_ROBIN\nendpoints: [{address: b.example}]"),
        _se(
            "hosts: [a.example]\nresolution: DNS_ROUND_ROBIN\n"
            "endpoints: [{address: b.example}, {address: c.example}]"
        ),
        'spec: Invalid value: "object": DNS_ROUND_ROBIN mode cannot have multiple endpoints',
    ),
    (
        "endpoint address or network",
        _se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{network: n1}]"),
        _se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{labels: {a: b}}]"),
        'spec.endpoints[0]: Invalid value: "object": Address is required',
    ),
    (
        "UDS with ports",
        _we("address: unix:///var/run/a.sock"),
        _we("address: unix:///var/run/a.sock\nports: {http: 80}"),
        'spec: Invalid value: "object": UDS may not include ports',
    ),
    (
        "UDS relative path",
        _we("address: unix://@abstract"),
        _we("address: unix://relative.sock"),
        f'spec.address: Invalid value: "string": {BAD_UDS}',
    ),
    (
        "UDS without a path (substring past the end)",
        _wg("template: {address: 'unix:///a'}"),
        _wg("template: {address: 'unix://'}"),
        [
            'spec.template.address: Invalid value: "string": index out of range: 7, 8 (length 7)'
            f" evaluating rule: {BAD_UDS}",
            'spec.template.address: Invalid value: "string": UDS may not be a dir',
        ],
    ),
    (
        "UDS directory",
        _we("address: unix:///var/run/a.sock"),
        _we("address: unix:///var/run/"),
        'spec.address: Invalid value: "string": UDS may not be a dir',
    ),
    (
        "probe scheme",
        _wg("template: {}\nprobe: {httpGet: {port: 80, scheme: HTTPS}}"),
        _wg("template: {}\nprobe: {httpGet: {port: 80, scheme: ftp}}"),
        'spec.probe.httpGet.scheme: Invalid value: "string": scheme must be one of [HTTP, HTTPS]',
    ),
    (
        "TLS credential name and names",
        _gw(
            "servers: [{port: {number: 443, name: h, protocol: HTTPS}, hosts: ['*'],"
            " tls: {mode: SIMPLE, credentialName: c}}]"
        ),
        _gw(
            "servers: [{port: {number: 443, name: h, protocol: HTTPS}, hosts: ['*'],"
            " tls: {mode: SIMPLE, credentialName: c, credentialNames: [d]}}]"
        ),
        'spec.servers[0].tls: Invalid value: "object": only one of credentialName or '
        "credentialNames can be set",
    ),
    (
        "TLS certificates and credential names",
        _gw(
            "servers: [{port: {number: 443, name: h, protocol: HTTPS}, hosts: ['*'],"
            " tls: {mode: SIMPLE, credentialNames: [c]}}]"
        ),
        _gw(
            "servers: [{port: {number: 443, name: h, protocol: HTTPS}, hosts: ['*'],"
            " tls: {mode: SIMPLE, credentialNames: [c],"
            " tlsCertificates: [{serverCertificate: a, privateKey: b}]}}]"
        ),
        [
            'spec.servers[0].tls: Invalid value: "object": only one of credentialNames or '
            "tlsCertificates can be set",
            # Istio's CRD states this rule twice, the second time with a misleading message
            'spec.servers[0].tls: Invalid value: "object": only one of credentialName or '
            "tlsCertificates can be set",
        ],
    ),
    (
        "wildcard in a label value",
        _dr("host: r\nworkloadSelector: {matchLabels: {app: a}}"),
        _dr("host: r\nworkloadSelector: {matchLabels: {app: 'a*'}}"),
        'spec.workloadSelector.matchLabels[app]: Invalid value: "string": '
        "wildcard not allowed in label value match",
    ),
    (
        "wildcard in a label key",
        _pa(SEL),
        _pa("selector: {matchLabels: {'app*': a}}"),
        'spec.selector.matchLabels: Invalid value: "object": '
        "wildcard not allowed in label key match",
    ),
    (
        "empty label key",
        _ap(SEL),
        _ap("selector: {matchLabels: {'': a}}"),
        'spec.selector.matchLabels: Invalid value: "object": key must not be empty',
    ),
    (
        "selector and targetRefs",
        _ap("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]"),
        _ap(SEL + "\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]"),
        'spec: Invalid value: "object": only one of targetRefs or selector can be set',
    ),
    (
        "cross-namespace targetRef",
        _ra("targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}"),
        _ra("targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g, namespace: o}"),
        'spec.targetRef.namespace: Invalid value: "string": '
        "cross namespace referencing is not currently supported",
    ),
    (
        "serviceAccounts with principals",
        _ap("rules: [{from: [{source: {serviceAccounts: [ns/sa]}}]}]"),
        _ap("rules: [{from: [{source: {serviceAccounts: [ns/sa], principals: [p]}}]}]"),
        'spec.rules[0].from[0].source: Invalid value: "object": '
        "Cannot set serviceAccounts with namespaces or principals",
    ),
    (
        "port-level mTLS without a selector",
        _pa(SEL + "\nportLevelMtls: {'8080': {mode: DISABLE}}"),
        _pa("portLevelMtls: {'8080': {mode: DISABLE}}"),
        'spec: Invalid value: "object": portLevelMtls requires selector',
    ),
    (
        "port-level mTLS port out of range",
        _pa(SEL + "\nportLevelMtls: {'65535': {mode: DISABLE}}"),
        _pa(SEL + "\nportLevelMtls: {'65536': {mode: DISABLE}}"),
        f'spec.portLevelMtls: Invalid value: "object": {PORT}',
    ),
    (
        "port-level mTLS key not a number",
        _pa(SEL + "\nportLevelMtls: {'1': {mode: DISABLE}}"),
        _pa(SEL + "\nportLevelMtls: {http: {mode: DISABLE}}"),
        'spec.portLevelMtls: Invalid value: "object": invalid literal for int() with base 10: '
        f"'http' evaluating rule: {PORT}",
    ),
    (
        "JWKS twice",
        _ra("jwtRules: [{issuer: i, jwksUri: 'https://i.example/jwks'}]"),
        _ra("jwtRules: [{issuer: i, jwksUri: 'https://i.example/jwks', jwks: '{}'}]"),
        'spec.jwtRules[0]: Invalid value: "object": only one of jwks or jwksUri can be set',
    ),
    (
        "JWKS URI scheme",
        _ra("jwtRules: [{issuer: i, jwksUri: 'HTTP://i.example:8080/jwks'}]"),
        _ra("jwtRules: [{issuer: i, jwksUri: 'ftp://i.example/jwks'}]"),
        'spec.jwtRules[0].jwksUri: Invalid value: "string": url must have scheme http:// or '
        "https://",
    ),
    (
        "JWKS URI not a URL",
        _ra("jwtRules: [{issuer: i, jwks_uri: 'https://i.example/jwks'}]"),
        _ra("jwtRules: [{issuer: i, jwks_uri: 'i.example/jwks'}]"),
        'spec.jwtRules[0].jwks_uri: Invalid value: "string": URL parse error during conversion '
        'from string: parse "i.example/jwks": invalid URI for request evaluating rule: '
        "url must have scheme http:// or https://",
    ),
    (
        "tag override UPSERT without a value",
        _telemetry(TAGS % "{operation: UPSERT, value: request.host}"),
        _telemetry(TAGS % "{operation: UPSERT, value: ''}"),
        'spec.metrics[0].overrides[0].tagOverrides[tag]: Invalid value: "object": '
        "value must be set when operation is UPSERT",
    ),
    (
        "tag override REMOVE with a value",
        _telemetry(TAGS % "{operation: REMOVE}"),
        _telemetry(TAGS % "{operation: REMOVE, value: v}"),
        'spec.metrics[0].overrides[0].tagOverrides[tag]: Invalid value: "object": '
        "value must not be set when operation is REMOVE",
    ),
    (
        "Wasm URL scheme",
        _wasm("url: oci://ghcr.io/a/b:v1"),
        _wasm("url: ftp://ghcr.io/a/b"),
        'spec.url: Invalid value: "string": url must have schema one of [http, https, file, oci]',
    ),
    (
        "Wasm URL without a scheme is read as http://",
        _wasm("url: ghcr.io/a/b:v1"),
        _wasm("url: 'ghcr.io:port/a'"),
        'spec.url: Invalid value: "string": url must have schema one of [http, https, file, oci]',
    ),
    (
        "Wasm env value from the host",
        _wasm("url: oci://a/b\nvmConfig: {env: [{name: A, valueFrom: HOST}]}"),
        _wasm("url: oci://a/b\nvmConfig: {env: [{name: A, valueFrom: HOST, value: v}]}"),
        'spec.vmConfig.env[0]: Invalid value: "object": '
        "value may only be set when valueFrom is INLINE",
    ),
    (
        "Wasm selector, targetRef and targetRefs",
        _wasm("url: oci://a/b\n" + SEL),
        _wasm("url: oci://a/b\n" + SEL + "\ntargetRef: {kind: Gateway, name: g}"),
        'spec: Invalid value: "object": only one of targetRefs or selector can be set',
    ),
    (
        "TrafficExtension wasm or lua",
        _te("wasm: {url: oci://a/b}"),
        _te("{}"),
        'spec: Invalid value: "object": exactly one of wasm or lua must be set',
    ),
    (
        "TrafficExtension selector and targetRefs",
        _te("wasm: {url: oci://a/b}\n" + SEL),
        _te("wasm: {url: oci://a/b}\n" + SEL + "\ntargetRefs: [{kind: Gateway, name: g}]"),
        'spec: Invalid value: "object": only one of targetRefs or selector can be set',
    ),
    (
        "TrafficExtension Wasm URL scheme",
        _te("wasm: {url: 'file:///opt/f.wasm'}"),
        _te("wasm: {url: 'gs://b/f.wasm'}"),
        'spec.wasm.url: Invalid value: "string": url must have schema one of '
        "[http, https, file, oci]",
    ),
    (
        "wildcard in a workload selector",
        _ef("workloadSelector: {labels: {app: a}}"),
        _ef("workloadSelector: {labels: {app: 'a*'}}"),
        'spec.workloadSelector.labels[app]: Invalid value: "string": '
        "wildcard is not supported in selector",
    ),
    (
        "EnvoyFilter workloadSelector and targetRefs",
        _ef("workloadSelector: {labels: {app: a}}"),
        _ef("workloadSelector: {labels: {app: a}}\ntargetRefs: [{kind: Gateway, name: g}]"),
        'spec: Invalid value: "object": only one of targetRefs or workloadSelector can be set',
    ),
    (
        "EnvoyFilter waypoint match outside WAYPOINT",
        _ef("configPatches: [{applyTo: LISTENER, match: {context: WAYPOINT, waypoint: {}}}]"),
        _ef(
            "configPatches: [{applyTo: LISTENER, match: {context: SIDECAR_INBOUND, waypoint: {}}}]"
        ),
        'spec.configPatches[0].match: Invalid value: "object": '
        "only support waypointMatch when context is WAYPOINT",
    ),
    (
        "EnvoyFilter waypoint port",
        _ef(
            "configPatches: [{applyTo: LISTENER, match: {context: WAYPOINT,"
            " waypoint: {portNumber: 80}}}]"
        ),
        _ef(
            "configPatches: [{applyTo: LISTENER, match: {context: WAYPOINT,"
            " waypoint: {portNumber: 70000}}}]"
        ),
        f'spec.configPatches[0].match.waypoint.portNumber: Invalid value: "integer": {PORT}',
    ),
]


@pytest.mark.parametrize(("case", "good", "bad", "error"), CASES, ids=[c[0] for c in CASES])
def test_istio_rule_accepts_and_refuses_as_the_api_server(
    case: str,
    good: dict[str, Any],
    bad: dict[str, Any],
    error: str | list[str],
    schemas: IstioSchemas,
) -> None:
    assert schemas.validate(good) == []
    assert schemas.validate(bad) == ([error] if isinstance(error, str) else error)


def test_every_distinct_istio_rule_has_a_case(schemas: IstioSchemas) -> None:
    """Each rule text in the shipped CRDs fails in at least one case above, and none is skipped."""
    documents = yaml.load_all(DEFAULT_CRDS.read_bytes(), Loader=yaml.CSafeLoader)
    messages = set()
    for doc in documents:
        if not doc:
            continue
        for version in doc["spec"]["versions"]:
            tree = cel.build(version["schema"]["openAPIV3Schema"])
            assert tree is not None
            messages.update(rule.message for rule in tree.all_rules())
        assert schemas.cel_skipped_rules(doc["spec"]["names"]["kind"]) == []
    errors = [e for *_, error in CASES for e in ([error] if isinstance(error, str) else error)]
    covered = {m for m in messages if any(m in e for e in errors)}
    assert messages - covered == set()


def test_the_rules_run_only_on_an_object_of_the_right_shape(schemas: IstioSchemas) -> None:
    """A type, required, enum or size error keeps the rules out, as the API server does."""
    bad = _vs(VS_TIMEOUT % "1d")
    bad["spec"]["http"][0]["retries"] = {"attempts": "three"}
    assert schemas.validate(bad) == [
        'spec.http[0].retries.attempts: must be of type integer, got string "three"',
        cel.BLOCKED,
    ]


def test_a_range_or_pattern_error_does_not_keep_the_rules_out(schemas: IstioSchemas) -> None:
    bad = _vs(VS_TIMEOUT % "'0'")
    bad["spec"]["http"][0]["retries"] = {"attempts": -1}
    problems = schemas.validate(bad)
    assert f'spec.http[0].timeout: Invalid value: "string": {DURATION}' in problems
    assert cel.BLOCKED not in problems


def test_a_list_over_its_max_items_is_not_iterated_by_a_rule(schemas: IstioSchemas) -> None:
    """ServiceEntry's duplicate-port rule is quadratic in the ports; maxItems (256) bounds it,
    because a size error keeps the rules out."""
    se = _se("hosts: [a.example]")
    se["spec"]["ports"] = [{"number": 80, "name": f"p{n}"} for n in range(257)]
    assert schemas.validate(se) == ["spec.ports: must have at most 256 items, got 257", cel.BLOCKED]


# -- the rule machinery, on a small CRD --------------------------------------------------------

GADGET_CRD = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.istio.io}
spec:
  group: example.istio.io
  names: {kind: Gadget, plural: gadgets}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: "self.min <= self.max"
              messageExpression: "'min ' + string(self.min) + ' is above max ' + string(self.max)"
              fieldPath: .min
            - rule: "!has(self.legacy)"
              reason: FieldValueForbidden
              message: legacy is gone
            - rule: "self.min == oldSelf.min"
              message: min is immutable
            - rule: "self.name.lowerAscii() == self.name"
            - rule: "self.name != 'bad' || self.min < 0"
            - rule: "!has(self.labels) || !('app' in self.labels) || self.labels.app != ''"
              message: app label may not be empty
              fieldPath: ".labels['app']"
            properties:
              min: {type: integer}
              max: {type: integer}
              legacy: {type: string}
              name: {type: string}
              labels: {type: object, additionalProperties: {type: string}}
            allOf:
            - x-kubernetes-validations: [{rule: "self.max < 100", message: max below 100}]
""")


@pytest.fixture(scope="module")
def gadgets() -> IstioSchemas:
    return IstioSchemas.from_crds([GADGET_CRD])


def _gadget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.istio.io/v1",
        "kind": "Gadget",
        "metadata": {"name": "g"},
        "spec": {"min": 1, "max": 2, "name": "g", **spec},
    }


def test_transition_and_unsupported_rules_are_skipped_and_counted(
    gadgets: IstioSchemas, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nodeagent.mesh.validation"):
        IstioSchemas.from_crds([GADGET_CRD], "gadgets.yaml")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2
    assert all(m.startswith("gadgets.yaml Gadget: CEL rule not evaluated: ") for m in logged)
    assert gadgets.cel_rules("Gadget") == 7
    assert gadgets.cel_rules_skipped("Gadget") == 2
    skipped = gadgets.cel_skipped_rules("Gadget")
    assert any(s.startswith("self.min == oldSelf.min: transition rule") for s in skipped)
    assert any("calls lowerAscii" in s for s in skipped)
    assert gadgets.validate(_gadget(name="G")) == []  # the unsupported rule is not guessed


def test_message_expression_field_path_reason_and_default_message(gadgets: IstioSchemas) -> None:
    assert gadgets.validate(_gadget()) == []
    assert gadgets.validate(_gadget(min=5)) == [
        'spec.min: Invalid value: "object": min 5 is above max 2'
    ]
    assert gadgets.validate(_gadget(legacy="x")) == ["spec: Forbidden: legacy is gone"]
    assert gadgets.validate(_gadget(labels={"app": ""})) == [
        'spec.labels[app]: Invalid value: "object": app label may not be empty'
    ]
    assert gadgets.validate(_gadget(name="bad")) == [
        "spec: Invalid value: \"object\": failed rule: self.name != 'bad' || self.min < 0"
    ]
    # an allOf branch has no type of its own: the API server prints it empty
    assert gadgets.validate(_gadget(max=100)) == ['spec: Invalid value: "": max below 100']


def test_an_evaluation_error_names_the_rule(gadgets: IstioSchemas) -> None:
    problems = gadgets.validate(_gadget(max=None))  # null: pruned, so self.max has no value
    assert problems == [
        "spec: Invalid value: \"object\": no such member in mapping: 'max' evaluating rule: "
        "self.min <= self.max",
        "spec: Invalid value: \"\": no such member in mapping: 'max' evaluating rule: "
        "max below 100",
    ]


def test_a_rule_that_does_not_compile_is_reported_not_raised() -> None:
    rule = cel.compile_rule({"rule": "self.(", "message": "m"}, "test")
    problem = rule.failure("v", "spec.a", "string")
    assert problem is not None and problem.startswith(
        'spec.a: Invalid value: "string": rule compile error:'
    )


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("0", 0),
        ("1h30m", 5_400_000_000_000),
        ("1.5s", 1_500_000_000),
        (".5ms", 500_000),
        ("-1s", -1_000_000_000),
        ("+5us", 5_000),
        ("1µs", 1_000),
        ("3ns", 3),
    ],
)
def test_durations_are_read_as_go_reads_them(text: str, nanos: int) -> None:
    assert cel.go_duration_nanos(text) == nanos


@pytest.mark.parametrize("text", ["", "1", "1d", ".s", "1h-", "s", "1e3s", "9999999999h"])
def test_what_go_refuses_as_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        cel.go_duration_nanos(text)


@pytest.mark.parametrize(
    ("text", "scheme", "host"),
    [
        ("https://a.example:8443/x?y", "https", "a.example:8443"),
        ("HTTP://[::1]:80/", "http", "[::1]:80"),
        ("oci:ghcr.io/a", "oci", ""),
        ("/just/a/path", "", ""),
    ],
)
def test_urls_are_read_as_parse_request_uri_reads_them(text: str, scheme: str, host: str) -> None:
    url = cel.parse_request_uri(text)
    assert (url.scheme, url.host) == (scheme, host)


@pytest.mark.parametrize(
    "text", ["", "a.example/x", "http://a b/", "http://a:port/", "http://a/%zz", "ht\ttp://a"]
)
def test_what_parse_request_uri_refuses_is_not_a_url(text: str) -> None:
    with pytest.raises(ValueError):
        cel.parse_request_uri(text)


UNIQUE_PORTS = "self.all(l1, self.exists_one(l2, l1.number == l2.number))"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"number": st.integers(1, 6)}),
            st.fixed_dictionaries({"name": st.just("p")}),  # no number: every comparison fails
        ),
        max_size=6,
    )
)
def test_the_unique_by_rule_means_what_the_interpreter_computes(items: list[Any]) -> None:
    """The native O(n) form of Istio's duplicate-port rule against celpy's interpretation (on
    integers: where types mix, celpy departs from cel-go's heterogeneous equality)."""
    native = cel.compile_rule({"rule": UNIQUE_PORTS, "message": "dup"}, "test")
    assert isinstance(native.program, cel.UniqueBy)
    limit = sys.getrecursionlimit()  # celpy.Environment raises it for the process
    env = celpy.Environment()
    sys.setrecursionlimit(limit)
    interpreted = env.program(env.compile(UNIQUE_PORTS))

    def outcome(program: cel.Program) -> bool | str:
        try:
            return bool(program.evaluate({"self": celpy.json_to_cel(items)}))
        except CELEvalError:
            return "error"

    assert outcome(native.program) == outcome(interpreted)


def test_the_largest_service_entry_costs_linear_time(schemas: IstioSchemas) -> None:
    se = _se("hosts: [a.example]")
    se["spec"]["ports"] = [{"number": n, "name": f"p{n}"} for n in range(1, 257)]
    assert schemas.validate(se) == []
    se["spec"]["ports"][255]["number"] = 1
    assert schemas.validate(se) == [
        'spec.ports: Invalid value: "array": port number cannot be duplicated'
    ]
