"""Istio resources checked against Istio's own CRD schemas, as a Kubernetes API server would.

The schemas come from ``crds/crd-all.gen.yaml``, unmodified from istio/istio (Apache-2.0, see
``crds/LICENSE``; commit 86c9f01fd735fb01d8192f5bcaf0d424afb7f14c). They are Kubernetes
*structural* OpenAPI v3 schemas, and the rules below are the API server's, not plain JSON
Schema's: unknown fields are rejected (strict field validation) unless the schema preserves them,
``null`` in a non-nullable field means "unset" (the server prunes it), and ``status`` is ignored
(the status subresource drops it on create). ``oneOf``/``anyOf``/``allOf``/``not`` branches are
value validations only: they never make a field unknown.

``x-kubernetes-validations`` (CEL rules, e.g. Istio's duration and port-range checks) are compiled
when the schemas load and evaluated after the schema checks, as the API server does (``cel.py``).
The rules that cannot be evaluated (transition rules, functions not implemented) are counted per
kind (``cel_rules_skipped``) so the gap stays visible.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.mesh import cel

try:  # the C parser reads the 1 MB CRD file about ten times faster
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

DEFAULT_CRDS = Path(__file__).parent / "crds" / "crd-all.gen.yaml"

log = logging.getLogger(__name__)

Schema = Mapping[str, Any]

_INT_FORMATS = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
# RFC 3339, leniently: date and time separated by T, t or a space; fraction and zone optional.
_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})?$"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
_VERSION = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


@dataclass(frozen=True)
class _Crd:
    group: str
    kind: str
    schemas: Mapping[str, Schema]  # served version -> openAPIV3Schema
    cel_rules: Mapping[str, cel.RuleTree | None]  # served version -> its compiled CEL rules


class IstioSchemas:
    """The served versions and schemas of every Istio kind, and a validator for their objects."""

    def __init__(self, crds: Mapping[tuple[str, str], _Crd]) -> None:
        self._crds = dict(crds)

    @classmethod
    def load(cls, path: Path = DEFAULT_CRDS) -> IstioSchemas:
        """The schemas in a CRD file; parsed once per process and path."""
        return _load(path.resolve())

    @classmethod
    def from_crds(cls, documents: list[Any], source: str = "<crds>") -> IstioSchemas:
        crds: dict[tuple[str, str], _Crd] = {}
        for index, doc in enumerate(documents):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            crd = _read_crd(doc, f"{source}: document {index}")
            if crd.group.endswith(".istio.io"):
                crds[(crd.group, crd.kind)] = crd
        schemas = cls(crds)
        for group, kind in sorted(crds):
            for skipped in schemas.cel_skipped_rules(kind, group):
                log.warning("%s %s: CEL rule not evaluated: %s", source, kind, skipped)
        return schemas

    def kinds(self) -> set[tuple[str, str]]:
        """(group, kind) of every Istio kind."""
        return set(self._crds)

    def groups(self) -> set[str]:
        return {group for group, _ in self._crds}

    def served_versions(self, group: str, kind: str) -> list[str]:
        """Served versions, highest priority first (v1, v1beta1, v1alpha3); [] for unknown kinds."""
        crd = self._crds.get((group, kind))
        return sorted(crd.schemas, key=_version_priority) if crd else []

    def schema(self, group: str, kind: str, version: str) -> Schema:
        return self._crds[(group, kind)].schemas[version]

    def cel_rules_skipped(self, kind: str, group: str | None = None) -> int:
        """How many CEL rules validate() leaves out for KIND (the most of its served versions):
        transition rules (oldSelf) and rules calling functions not implemented here."""
        return len(self.cel_skipped_rules(kind, group))

    def cel_skipped_rules(self, kind: str, group: str | None = None) -> list[str]:
        """Each CEL rule validate() leaves out for KIND, with why (its most-skipping version)."""
        worst: list[str] = []
        for crd in self._crds.values():
            if crd.kind != kind or group not in (None, crd.group):
                continue
            for tree in crd.cel_rules.values():
                skipped = [f"{r.text.strip()}: {r.skipped}" for r in cel.skipped_rules(tree)]
                worst = max(worst, skipped, key=len)
        return worst

    def cel_rules(self, kind: str, group: str | None = None) -> int:
        """How many CEL rules KIND's schemas hold (the most of its served versions)."""
        return max(
            (
                cel.count_rules(tree)
                for crd in self._crds.values()
                if crd.kind == kind and group in (None, crd.group)
                for tree in crd.cel_rules.values()
            ),
            default=0,
        )

    def kinds_with_cel_rules(self) -> set[tuple[str, str]]:
        return {key for key, crd in self._crds.items() if any(crd.cel_rules.values())}

    def validate(self, obj: Mapping[str, Any]) -> list[str]:
        """Problems with OBJ, each naming its field path; [] if an API server would accept it."""
        return self.admit(obj)[1]

    def admit(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """OBJ as an API server would store it (nulls of non-nullable fields pruned, status
        dropped), and the problems that make it invalid (empty list: valid)."""
        api, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api, str) or not api:
            return {}, ["apiVersion: Required value"]
        if not isinstance(kind, str) or not kind:
            return {}, ["kind: Required value"]
        group, _, version = api.rpartition("/")
        crd = self._crds.get((group, kind))
        if crd is None:
            known = sorted(k for g, k in self._crds if g == group)
            if known:
                return {}, [f'kind: "{kind}" is not a kind of {group}; known: {", ".join(known)}']
            return {}, [f'apiVersion: "{api}" is not an Istio API group']
        if version not in crd.schemas:
            served = ", ".join(f"{group}/{v}" for v in self.served_versions(group, kind))
            return {}, [f'apiVersion: {kind} is not served as "{api}"; served: {served}']
        errors = _metadata_errors(obj.get("metadata"))
        # apiVersion, kind and metadata are implicit in every CRD schema; status is dropped.
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        body.pop("status", None)
        check = _Check()
        admitted = check.value(crd.schemas[version], body, "", structural=True)
        errors.extend(check.errors)
        out = {"apiVersion": api, "kind": kind, "metadata": obj.get("metadata")}
        if isinstance(admitted, Mapping):
            out.update(admitted)
        # The API server runs the CEL rules on the object as it would store it, unless a type,
        # required, enum or size error means it has not the shape the rules were written for
        # (apiextensions-apiserver pkg/registry/customresource/strategy.go, hasBlockingErr).
        rules = crd.cel_rules.get(version)
        if rules is not None:
            if check.blocking or _metadata_blocks(obj.get("metadata")):
                errors.append(cel.BLOCKED)
            else:
                errors.extend(rules.check(out, ""))
        return out, errors


@functools.cache
def _load(path: Path) -> IstioSchemas:
    with path.open("rb") as f:
        documents = list(yaml.load_all(f, Loader=_Loader))
    return IstioSchemas.from_crds(documents, str(path))


def _read_crd(doc: Mapping[str, Any], where: str) -> _Crd:
    try:
        spec = doc["spec"]
        group, kind = spec["group"], spec["names"]["kind"]
        schemas: dict[str, Schema] = {}
        cel_rules: dict[str, cel.RuleTree | None] = {}
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            schema = version["schema"]["openAPIV3Schema"]
            schemas[version["name"]] = schema
            _prepare(schema)
            cel_rules[version["name"]] = cel.build(schema, f"{where}: {kind} {version['name']}")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a CRD with a schema for every served version: {e}") from e
    return _Crd(group, kind, schemas, cel_rules)


def _prepare(schema: Schema) -> None:
    """Compiles every pattern (a bad one fails the load, not a validation)."""
    for node in _nodes(schema):
        if "pattern" in node:
            _regex(node["pattern"])


def _nodes(schema: Schema) -> Iterator[Schema]:
    yield schema
    for child in (schema.get("properties") or {}).values():
        yield from _nodes(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), Mapping):
            yield from _nodes(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key) or ():
            yield from _nodes(child)


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes version priority: GA before beta before alpha, higher numbers first."""
    m = _VERSION.match(version)
    if not m:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0), version)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = json.dumps(value)
        return "string " + (text if len(text) <= 80 else text[:76] + '..."')
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _wants_integer(schema: Schema) -> bool:
    return schema.get("type") == "integer" or bool(schema.get("x-kubernetes-int-or-string"))


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


class _Check:
    """One validation walk: collects problems and returns the value as the server stores it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        # A type, required, enum, maxLength, maxItems or maxProperties error: the API server
        # then leaves the CEL rules out (the object lacks the shape they were written for).
        self.blocking = False

    def fail(self, path: str, problem: str, blocking: bool = False) -> None:
        self.errors.append(f"{path or '<object>'}: {problem}")
        self.blocking = self.blocking or blocking

    def value(self, schema: Schema, value: Any, path: str, structural: bool) -> Any:
        if value is None:
            if schema.get("x-kubernetes-int-or-string") and not schema.get("nullable"):
                self.fail(path, "must be an integer or a string, got null", blocking=True)
            elif "type" in schema and not schema.get("nullable"):
                self.fail(path, f"must be of type {schema['type']}, got null", blocking=True)
            return value
        if schema.get("x-kubernetes-int-or-string"):
            if not (_is_integer(value) or isinstance(value, str)):
                self.fail(
                    path, f"must be an integer or a string, got {_show(value)}", blocking=True
                )
                return value
        elif "type" in schema and not _TYPES.get(schema["type"], lambda _: True)(value):
            self.fail(path, f"must be of type {schema['type']}, got {_show(value)}", blocking=True)
            return value
        if isinstance(value, float) and value.is_integer() and _wants_integer(schema):
            value = int(value)  # 80.0 is the integer 80 in JSON
        if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
            allowed = ", ".join(json.dumps(e) for e in schema["enum"])
            self.fail(
                path,
                f"Unsupported value: {json.dumps(value)}: supported values: {allowed}",
                blocking=True,
            )
        if isinstance(value, Mapping):
            value = self._object(schema, value, path, structural)
        elif isinstance(value, list):
            value = self._array(schema, value, path, structural)
        elif isinstance(value, str):
            self._string(schema, value, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self._number(schema, value, path)
        self._junctors(schema, value, path)
        return value

    def _object(
        self, schema: Schema, obj: Mapping[Any, Any], path: str, structural: bool
    ) -> dict[str, Any]:
        properties: Mapping[str, Schema] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
        out: dict[str, Any] = {}
        for key, child in obj.items():
            if not isinstance(key, str):
                self.fail(path, f"field names must be strings, got {_show(key)}", blocking=True)
                continue
            sub = properties.get(key)
            child_path = _join(path, key)
            if sub is None and isinstance(extra, Mapping):
                sub, child_path = extra, f"{path}[{key}]"
            if sub is None:
                if structural and not keeps_unknown:
                    self.errors.append(_unknown_field(child_path, key, properties))
                else:
                    out[key] = child
                continue
            if child is None and not sub.get("nullable"):
                continue  # the API server prunes it: null means unset
            out[key] = self.value(sub, child, child_path, structural)
        for name in schema.get("required") or ():
            if name not in out:
                self.fail(_join(path, name), "Required value", blocking=True)
        size = len(out)
        if (n := schema.get("minProperties")) is not None and size < n:
            self.fail(path, f"must have at least {n} fields, got {size}")
        if (n := schema.get("maxProperties")) is not None and size > n:
            self.fail(path, f"must have at most {n} fields, got {size}", blocking=True)
        return out

    def _array(self, schema: Schema, items: list[Any], path: str, structural: bool) -> list[Any]:
        item_schema = schema.get("items")
        out = [
            self.value(item_schema, item, f"{path}[{i}]", structural)
            if isinstance(item_schema, Mapping)
            else item
            for i, item in enumerate(items)
        ]
        if (n := schema.get("minItems")) is not None and len(out) < n:
            self.fail(path, f"must have at least {n} items, got {len(out)}")
        if (n := schema.get("maxItems")) is not None and len(out) > n:
            self.fail(path, f"must have at most {n} items, got {len(out)}", blocking=True)
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("set", "map"):
            keys = schema.get("x-kubernetes-list-map-keys") or ()
            seen: dict[str, int] = {}
            for i, item in enumerate(out):
                identity = (
                    {k: item.get(k) for k in keys}
                    if list_type == "map" and isinstance(item, Mapping)
                    else item
                )
                text = json.dumps(identity, sort_keys=True, default=str)
                if text in seen:
                    self.fail(f"{path}[{i}]", f"Duplicate value: {text} (as {path}[{seen[text]}])")
                seen.setdefault(text, i)
        return out

    def _string(self, schema: Schema, value: str, path: str) -> None:
        if (n := schema.get("minLength")) is not None and len(value) < n:
            self.fail(path, f"must be at least {n} characters long, got {len(value)}")
        if (n := schema.get("maxLength")) is not None and len(value) > n:
            self.fail(
                path, f"may not be longer than {n} characters, got {len(value)}", blocking=True
            )
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            self.fail(path, f"Invalid value: {_show(value)}: must match {schema['pattern']!r}")
        fmt = schema.get("format")
        if fmt == "date-time" and not _DATE_TIME.match(value):
            self.fail(path, f"Invalid value: {_show(value)}: must be an RFC 3339 date-time")
        elif fmt == "byte":
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error:
                self.fail(path, f"Invalid value: {_show(value)}: must be base64-encoded")

    def _number(self, schema: Schema, value: float, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {value}")
            return
        if (low := schema.get("minimum")) is not None:
            if schema.get("exclusiveMinimum") and value <= low:
                self.fail(path, f"must be greater than {low}, got {value}")
            elif value < low:
                self.fail(path, f"must be greater than or equal to {low}, got {value}")
        if (high := schema.get("maximum")) is not None:
            if schema.get("exclusiveMaximum") and value >= high:
                self.fail(path, f"must be less than {high}, got {value}")
            elif value > high:
                self.fail(path, f"must be less than or equal to {high}, got {value}")
        bounds = _INT_FORMATS.get(schema.get("format", ""))
        if bounds and not bounds[0] <= value <= bounds[1]:
            self.fail(path, f"must fit in {schema['format']}, got {value}")

    def _junctors(self, schema: Schema, value: Any, path: str) -> None:
        for sub in schema.get("allOf") or ():
            self.errors.extend(_branch(sub, value, path))
        # anyOf of integer|string only restates x-kubernetes-int-or-string, already checked
        if (branches := schema.get("anyOf")) and not schema.get("x-kubernetes-int-or-string"):
            results = [_branch(sub, value, path) for sub in branches]
            if all(results):
                fields = _required_fields(branches)
                if fields is not None:
                    self.fail(path, f"must set at least one of {', '.join(fields)}")
                else:
                    firsts = "; or ".join(r[0] for r in results)
                    self.fail(path, f"must match at least one alternative (anyOf): {firsts}")
        if branches := schema.get("oneOf"):
            matched = sum(1 for sub in branches if not _branch(sub, value, path))
            if matched != 1:
                self.fail(path, _one_of_problem(branches, value, matched))
        if isinstance(schema.get("not"), Mapping) and not _branch(schema["not"], value, path):
            fields = _required_fields(schema["not"].get("anyOf") or [schema["not"]])
            if fields is not None:
                self.fail(path, f"must not set {', '.join(fields)}")
            else:
                self.fail(path, "must not match the schema in 'not'")


def _branch(schema: Schema, value: Any, path: str) -> list[str]:
    """Problems of VALUE against a oneOf/anyOf/allOf/not branch (value validation only)."""
    check = _Check()
    check.value(schema, value, path, structural=False)
    return check.errors


def _required_fields(branches: list[Schema]) -> list[str] | None:
    """The field names if every branch is just `required`, Istio's way to spell its oneofs."""
    fields: list[str] = []
    for branch in branches:
        if set(branch) != {"required"}:
            return None
        fields.extend(branch["required"])
    return fields


def _one_of_problem(branches: list[Schema], value: Any, matched: int) -> str:
    # Istio's protobuf oneof: [not: {anyOf: [required a, required b]}, required a, required b]
    plain = [b for b in branches if set(b) != {"not"}]
    negated = [b["not"] for b in branches if set(b) == {"not"}]
    fields = _required_fields(plain)
    none_allowed = len(negated) == 1 and set(negated[0]) == {"anyOf"}
    if fields is not None and (none_allowed or not negated):
        if matched > 1:
            present = [f for f in fields if isinstance(value, Mapping) and f in value]
            return (
                f"{', '.join(fields)} are mutually exclusive: set at most one, "
                f"got {' and '.join(present)}"
            )
        return f"must set exactly one of {', '.join(fields)}"
    return f"must match exactly one alternative (oneOf), matched {matched}"


def _unknown_field(path: str, key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'unknown field "{path}"{hint}'


def _metadata_blocks(meta: Any) -> bool:
    """Whether METADATA has an error that keeps the CEL rules from running (type, required)."""
    return (
        not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]
    )


def _metadata_errors(meta: Any) -> list[str]:
    """ObjectMeta as the API server checks it for a namespaced custom resource."""
    if not isinstance(meta, Mapping):
        return [f"metadata: must be of type object, got {_show(meta)}"]
    errors = [
        _unknown_field(f"metadata.{key}", str(key), dict.fromkeys(_OBJECT_META_FIELDS))
        for key in meta
        if key not in _OBJECT_META_FIELDS
    ]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: Required value")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(
            f"metadata.name: Invalid value: {json.dumps(name)}: must be a lowercase RFC 1123 "
            "subdomain (a-z, 0-9, '-', '.'; at most 253 characters)"
        )
    namespace = meta.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace)
    ):
        errors.append(
            f"metadata.namespace: Invalid value: {_show(namespace)}: must be a lowercase "
            "RFC 1123 label (a-z, 0-9, '-'; at most 63 characters)"
        )
    for field in ("labels", "annotations"):
        errors.extend(_string_map_errors(meta.get(field), f"metadata.{field}", field == "labels"))
    return errors


def _string_map_errors(value: Any, path: str, labels: bool) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"{path}: must be of type object, got {_show(value)}"]
    errors: list[str] = []
    for key, item in value.items():
        if not isinstance(key, str) or not _qualified_name(key):
            errors.append(f"{path}: Invalid key: {_show(key)}: must be a qualified name")
        elif not isinstance(item, str):
            errors.append(f"{path}[{key}]: must be of type string, got {_show(item)}")
        elif labels and (len(item) > 63 or not _LABEL_VALUE.match(item)):
            errors.append(f"{path}[{key}]: Invalid value: {_show(item)}: not a valid label value")
    return errors


def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))
