"""Istio objects checked against Istio's CRD schemas, with the Kubernetes API server's rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from istio_data import istio_files

from nodeagent.mesh import cel
from nodeagent.mesh.validation import DEFAULT_CRDS, IstioSchemas

REFERENCE_FILES = istio_files("bookinfo/networking/*.yaml", "samples/*.yaml")

VS = yaml.safe_load("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api}}]
    fault: {abort: {percentage: {value: 10}, httpStatus: 503}}
    retries: {attempts: 3}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
""")

DR = yaml.safe_load("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  subsets: [{name: v1, labels: {version: v1}}]
""")

SE = yaml.safe_load("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: google}
spec:
  hosts: [www.google.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
""")


@pytest.fixture(scope="session")
def schemas() -> IstioSchemas:
    return IstioSchemas.load()


def _istio_documents(path: Path, schemas: IstioSchemas) -> list[dict[str, Any]]:
    return [
        d
        for d in yaml.safe_load_all(path.read_text())
        if d and (d["apiVersion"].rpartition("/")[0], d["kind"]) in schemas.kinds()
    ]


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of OBJ with the dotted PATH (ints index lists) set to VALUE."""
    out = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


# -- the schemas ---------------------------------------------------------------------------------


def test_every_served_version_of_every_istio_kind_has_a_schema(schemas: IstioSchemas) -> None:
    crds = [d for d in yaml.load_all(DEFAULT_CRDS.read_bytes(), Loader=yaml.CSafeLoader) if d]
    served = {
        (c["spec"]["group"], c["spec"]["names"]["kind"], v["name"])
        for c in crds
        for v in c["spec"]["versions"]
        if v["served"]
    }
    assert {(g, k) for g, k, _ in served} == schemas.kinds()
    for group, kind, version in served:
        assert version in schemas.served_versions(group, kind)
        schema = schemas.schema(group, kind, version)
        assert schema["type"] == "object" and "spec" in schema["properties"]
    assert {
        ("networking.istio.io", "VirtualService"),
        ("security.istio.io", "PeerAuthentication"),
    } <= schemas.kinds()
    assert schemas.served_versions("networking.istio.io", "VirtualService") == [
        "v1",
        "v1beta1",
        "v1alpha3",
    ]
    assert schemas.served_versions("networking.istio.io", "Nope") == []


def test_schemas_are_loaded_once_per_process(schemas: IstioSchemas) -> None:
    assert IstioSchemas.load() is schemas
    assert IstioSchemas.load(DEFAULT_CRDS) is schemas


def test_cel_rules_are_evaluated_and_none_is_skipped(schemas: IstioSchemas) -> None:
    """Every CEL rule of Istio's CRDs is evaluated (tests/unit/test_cel_rules.py has each)."""
    assert schemas.cel_rules("ServiceEntry") > 0
    assert all(schemas.cel_rules_skipped(kind) == 0 for _, kind in schemas.kinds())
    assert schemas.cel_rules_skipped("NoSuchKind") == 0
    assert ("networking.istio.io", "ServiceEntry") in schemas.kinds_with_cel_rules()
    se = _with(SE, "spec.resolution", "NONE")
    assert schemas.validate(_with(se, "spec.endpoints", [{"address": "10.0.0.1"}])) == [
        'spec: Invalid value: "object": NONE mode cannot set endpoints'
    ]


# -- valid objects -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_istio_reference_objects_validate_in_every_served_version(
    path: Path, schemas: IstioSchemas
) -> None:
    for doc in _istio_documents(path, schemas):
        group = doc["apiVersion"].rpartition("/")[0]
        for version in schemas.served_versions(group, doc["kind"]):
            assert schemas.validate({**doc, "apiVersion": f"{group}/{version}"}) == [], version


def test_the_reference_files_hold_istio_objects(schemas: IstioSchemas) -> None:
    kinds = {d["kind"] for p in REFERENCE_FILES for d in _istio_documents(p, schemas)}
    assert kinds == {"VirtualService", "DestinationRule", "Gateway", "ServiceEntry"}


def test_valid_objects_of_several_kinds(schemas: IstioSchemas) -> None:
    assert schemas.validate(VS) == []
    assert schemas.validate(DR) == []
    assert schemas.validate(SE) == []
    pa = yaml.safe_load("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: DISABLE}}
""")
    assert schemas.validate(pa) == []


def test_null_means_unset_and_status_is_dropped(schemas: IstioSchemas) -> None:
    obj = _with(DR, "spec.trafficPolicy.tls", None)
    obj["status"] = {"anything": ["goes", 1]}
    admitted, problems = schemas.admit(obj)
    assert problems == []
    assert "tls" not in admitted["spec"]["trafficPolicy"] and "status" not in admitted


def test_preserved_unknown_fields_are_kept(schemas: IstioSchemas) -> None:
    ef = yaml.safe_load("""
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: lua}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    patch: {operation: INSERT_BEFORE, value: {name: envoy.lua, typed_config: {x: [1, 2]}}}
""")
    admitted, problems = schemas.admit(ef)
    assert problems == []
    assert admitted["spec"]["configPatches"][0]["patch"]["value"]["typed_config"] == {"x": [1, 2]}


# -- invalid objects: each problem names its field path ------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            _with(VS, "spec.http.0.rout", []),
            'unknown field "spec.http[0].rout" (did you mean "route"?)',
            id="typo",
        ),
        pytest.param(
            _with(VS, "spec.http.0.route.0.weight", "eighty"),
            'spec.http[0].route[0].weight: must be of type integer, got string "eighty"',
            id="wrong-type",
        ),
        pytest.param(
            _with(
                DR, "spec.trafficPolicy.outlierDetection", {"outlierDetectionHttpErrorCodes": [700]}
            ),
            "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes[0]: "
            "must be less than or equal to 599, got 700",
            id="above-maximum",
        ),
        pytest.param(
            _with(VS, "spec.http.0.route.0.destination.port", {"number": -1}),
            "spec.http[0].route[0].destination.port.number: "
            "must be greater than or equal to 0, got -1",
            id="below-minimum",
        ),
        pytest.param(
            _with(VS, "spec.http.0.retries.attempts", 3_000_000_000),
            "spec.http[0].retries.attempts: must fit in int32, got 3000000000",
            id="int32-overflow",
        ),
        pytest.param(
            _with(DR, "spec.trafficPolicy.tls.mode", "STRICTEST"),
            'spec.trafficPolicy.tls.mode: Unsupported value: "STRICTEST": supported values: '
            '"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"',
            id="enum",
        ),
        pytest.param(
            _with(VS, "spec.http.0.match.0.uri", {"exact": "/api", "prefix": "/api"}),
            "spec.http[0].match[0].uri: exact, prefix, regex are mutually exclusive: "
            "set at most one, got exact and prefix",
            id="string-match-oneof",
        ),
        pytest.param(
            _with(DR, "spec.trafficPolicy.loadBalancer.simple", "ROUND_ROBIN"),
            "spec.trafficPolicy.loadBalancer: simple, consistentHash, backendUtilization are "
            "mutually exclusive: set at most one, got simple and consistentHash",
            id="load-balancer-oneof",
        ),
        pytest.param(
            _with(DR, "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp", True),
            "spec.trafficPolicy.loadBalancer.consistentHash: httpHeaderName, httpCookie, "
            "useSourceIp, httpQueryParameterName are mutually exclusive: set at most one, "
            "got httpHeaderName and useSourceIp",
            id="oneof-inside-allof",
        ),
        pytest.param(_with(DR, "spec.host", None), "spec.host: Required value", id="required-null"),
        pytest.param(
            _with(
                SE, "spec.ports", [{"number": 80, "name": "http"}, {"number": 81, "name": "http"}]
            ),
            'spec.ports[1]: Duplicate value: {"name": "http"} (as spec.ports[0])',
            id="list-map-keys",
        ),
        pytest.param(
            _with(VS, "spec.http.0.directResponse", {"status": 200, "body": {"bytes": "no!"}}),
            'spec.http[0].directResponse.body.bytes: Invalid value: string "no!": '
            "must be base64-encoded",
            id="format-byte",
        ),
        pytest.param(
            _with(VS, "spec.hosts", "reviews"),
            'spec.hosts: must be of type array, got string "reviews"',
            id="scalar-for-list",
        ),
        pytest.param(
            _with(VS, "specs", {}), 'unknown field "specs" (did you mean "spec"?)', id="root-field"
        ),
        pytest.param(
            _with(VS, "metadata.name", "Reviews_1"),
            'metadata.name: Invalid value: "Reviews_1": must be a lowercase RFC 1123 subdomain',
            id="metadata-name",
        ),
        pytest.param(
            _with(VS, "metadata.labels", {"version": 2}),
            "metadata.labels[version]: must be of type string, got integer 2",
            id="metadata-label",
        ),
        pytest.param(
            _with(VS, "apiVersion", "networking.istio.io/v2"),
            'apiVersion: VirtualService is not served as "networking.istio.io/v2"; served: '
            "networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3",
            id="unserved-version",
        ),
        pytest.param(
            _with(VS, "kind", "VirtualSevice"),
            'kind: "VirtualSevice" is not a kind of networking.istio.io',
            id="unknown-kind",
        ),
    ],
)
def test_invalid_objects_are_rejected_naming_the_field(
    obj: dict[str, Any], expected: str, schemas: IstioSchemas
) -> None:
    problems = schemas.validate(obj)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported(schemas: IstioSchemas) -> None:
    obj = _with(VS, "spec.http.0.rout", [])
    obj = _with(obj, "spec.http.0.route.1.weight", "twenty")
    obj = _with(obj, "spec.http.0.match.0.uri.regex", ".*")
    problems = schemas.validate(obj)
    assert len(problems) == 4
    assert problems[-1] == cel.BLOCKED  # a type error: the CEL rules wait, as on a server


# -- the structural-schema rules, on a small CRD ------------------------------------------------

TEST_CRD = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.istio.io}
spec:
  group: example.istio.io
  names: {kind: Widget, plural: widgets}
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
            required: [size]
            properties:
              size: {x-kubernetes-int-or-string: true, anyOf: [{type: integer}, {type: string}]}
              when: {type: string, format: date-time}
              ratio: {type: number, format: double, minimum: 0, exclusiveMinimum: true}
              name: {type: string, minLength: 2, maxLength: 4, pattern: "^[a-z]+$"}
              tags:
                type: array
                items: {type: string}
                minItems: 1
                maxItems: 2
                x-kubernetes-list-type: set
              counts: {type: object, additionalProperties: {type: integer, format: uint32}}
              note: {type: string, nullable: true}
              free: {type: object, x-kubernetes-preserve-unknown-fields: true}
              either:
                type: object
                properties: {a: {type: string}, b: {type: string}, c: {type: string}}
                anyOf: [{required: [a]}, {required: [b]}]
                not: {required: [c]}
              rule:
                type: string
                x-kubernetes-validations: [{rule: "self != 'x'"}]
  - name: v2
    served: false
    storage: false
    schema: {openAPIV3Schema: {type: object}}
""")


@pytest.fixture(scope="module")
def widget() -> IstioSchemas:
    return IstioSchemas.from_crds([TEST_CRD])


def _widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.istio.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 1, **spec},
    }


def test_structural_rules_accept_what_a_server_accepts(widget: IstioSchemas) -> None:
    assert widget.served_versions("example.istio.io", "Widget") == ["v1"]
    assert widget.cel_rules("Widget") == 1
    assert widget.cel_rules_skipped("Widget") == 0
    ok = _widget(
        size="50%",
        when="2024-05-01T10:00:00Z",
        ratio=0.5,
        name="abc",
        tags=["a", "b"],
        counts={"x": 4294967295},
        note=None,
        free={"anything": {"at": ["all"]}},
        either={"a": "1"},
    )
    assert widget.validate(ok) == []
    assert widget.admit(ok)[0]["spec"]["note"] is None  # nullable: kept
    assert widget.validate(_widget(size=80.0)) == []  # a whole number is an integer


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"size": True}, "spec.size: must be an integer or a string, got boolean true"),
        ({"size": None}, "spec.size: Required value"),
        ({"when": "yesterday"}, 'spec.when: Invalid value: string "yesterday": must be an RFC'),
        ({"ratio": 0}, "spec.ratio: must be greater than 0, got 0"),
        ({"name": "a"}, "spec.name: must be at least 2 characters long, got 1"),
        ({"name": "abcde"}, "spec.name: may not be longer than 4 characters, got 5"),
        ({"name": "AB"}, "spec.name: Invalid value: string \"AB\": must match '^[a-z]+$'"),
        ({"tags": []}, "spec.tags: must have at least 1 items, got 0"),
        ({"tags": ["a", "b", "c"]}, "spec.tags: must have at most 2 items, got 3"),
        ({"tags": ["a", "a"]}, 'spec.tags[1]: Duplicate value: "a" (as spec.tags[0])'),
        ({"tags": [None]}, "spec.tags[0]: must be of type string, got null"),
        ({"counts": {"x": -1}}, "spec.counts[x]: must fit in uint32, got -1"),
        ({"counts": {"x": "1"}}, 'spec.counts[x]: must be of type integer, got string "1"'),
        ({"either": {}}, "spec.either: must set at least one of a, b"),
        ({"either": {"a": "1", "c": "2"}}, "spec.either: must not set c"),
        ({"either": {"a": "1", "d": "2"}}, 'unknown field "spec.either.d"'),
        ({"ratio": float("nan")}, "spec.ratio: must be a finite number"),
        ({"rule": "x"}, "spec.rule: Invalid value: \"string\": failed rule: self != 'x'"),
    ],
)
def test_structural_rules_reject_what_a_server_rejects(
    spec: dict[str, Any], expected: str, widget: IstioSchemas
) -> None:
    problems = widget.validate(_widget(**spec))
    assert any(p.startswith(expected) for p in problems), problems


def test_an_unserved_version_is_rejected(widget: IstioSchemas) -> None:
    assert widget.validate({**_widget(), "apiVersion": "example.istio.io/v2"}) == [
        'apiVersion: Widget is not served as "example.istio.io/v2"; served: example.istio.io/v1'
    ]
