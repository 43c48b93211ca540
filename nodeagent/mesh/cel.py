"""CRD validation rules (``x-kubernetes-validations``) evaluated as the Kubernetes API server does.

The API server's behaviour followed here (kubernetes/kubernetes,
staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/validation.go):
- a rule sees its schema node's value as ``self``; it runs only where the value is present and not
  null, once per list item and once per map value below it (items, additionalProperties), and the
  rules of ``allOf`` branches run too;
- a rule that is false gives ``<path>: Invalid value: "<schema type>": <message>`` where the
  message is messageExpression's value, else ``message``, else ``failed rule: <rule>``; the path
  is the rule's location plus its ``fieldPath``; ``reason`` picks Forbidden, Required or Duplicate;
- a rule that fails to evaluate gives ``<error> evaluating rule: <message or rule>``;
- transition rules (``oldSelf``) run only on updates: see TRANSITION.

The language is cel-python (``celpy``), with the Kubernetes extension functions Istio's CRDs call
(kubernetes.io/docs/reference/using-api/cel/): ``substring`` (cel-go's strings extension),
``url``/``isURL`` and the URL accessors (k8s.io/apiserver/pkg/cel/library/urls.go, Go's
``url.ParseRequestURI``), and ``duration`` as cel-go parses it (Go's ``time.ParseDuration``:
``1h30m``, ``100us``, ``0``; cel-python alone would take ``1d`` and refuse ``1µs``). A rule that
calls anything else is not evaluated but counted as skipped, with the reason.

Evaluation is bounded: it runs only when the schema found no type, required, enum or size error
(as the API server, see ``pkg/registry/customresource/strategy.go`` ``hasBlockingErr``), so every
list and map a rule iterates is within its ``maxItems``/``maxProperties``; a library error is
caught per rule and reported naming the rule. Istio's one quadratic rule (unique ServiceEntry port
numbers) is evaluated natively in O(n), see UniqueBy; bench/validation.py measures the rest.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError, base_functions

# Why a transition rule is skipped: the agent sees objects, never an object's previous version.
# The API server runs such a rule only on an update, against the stored object; on create it is
# not run at all. Treating every object as a create is what an API server would have accepted.
TRANSITION = (
    "transition rule (oldSelf): runs only on updates, and the agent sees no previous version"
)

BLOCKED = (
    "<object>: some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)

# messageExpression's value is limited like the API server's (celconfig).
_MAX_MESSAGE_BYTES = 5 * 1024
_MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter"})


@dataclass(frozen=True)
class Rule:
    """One compiled validation rule, or why it is skipped."""

    text: str
    message: str
    reason: str
    field_path: str
    program: Program | None
    message_program: Program | None
    compile_error: str = ""
    skipped: str = ""  # why the rule is not evaluated ("" when it is)

    @property
    def error_name(self) -> str:
        """How the API server names the rule in an evaluation error (ruleErrorString)."""
        return self.message or self.text.strip()

    def failure(self, value: Any, path: str, type_name: str) -> str | None:
        """The API server's error for VALUE at PATH, or None when the rule holds."""
        if self.skipped:
            return None
        shown = _field(path)
        if self.program is None:
            return (
                f'{shown}: Invalid value: "{type_name}": rule compile error: {self.compile_error}'
            )
        try:
            activation = {"self": json_to_cel(value)}
            result = self.program.evaluate(activation)
        except CELEvalError as e:
            detail = f"{_eval_problem(e)} evaluating rule: {self.error_name}"
            return f'{shown}: Invalid value: "{type_name}": {detail}'
        except Exception as e:  # the library itself failed: report it, never raise
            detail = f"{type(e).__name__}: {e} evaluating rule: {self.error_name}"
            return f'{shown}: Invalid value: "{type_name}": {detail}'
        if isinstance(result, CELEvalError):
            detail = f"{_eval_problem(result)} evaluating rule: {self.error_name}"
            return f'{shown}: Invalid value: "{type_name}": {detail}'
        if isinstance(result, celtypes.BoolType) and bool(result):
            return None
        target = _field(_join_field_path(path, self.field_path))
        detail = self._message(activation) or (self.message or f"failed rule: {self.text.strip()}")
        if self.reason == "FieldValueForbidden":
            return f"{target}: Forbidden: {detail}"
        if self.reason == "FieldValueRequired":
            return f"{target}: Required value: {detail}"
        if self.reason == "FieldValueDuplicate":
            return f'{target}: Duplicate value: "{type_name}"'
        return f'{target}: Invalid value: "{type_name}": {detail}'

    def _message(self, activation: Mapping[str, Any]) -> str:
        """messageExpression's value, or "" when it has none or it fails (then message is used)."""
        if self.message_program is None:
            return ""
        try:
            value = self.message_program.evaluate(dict(activation))
        except Exception:
            return ""
        if not isinstance(value, str):
            return ""
        text = value.strip()
        if not text or "\n" in text or len(text.encode()) > _MAX_MESSAGE_BYTES:
            return ""
        return text


@dataclass
class RuleTree:
    """The rules of one schema node and of the nodes below it that have any (k8s' Validator)."""

    type_name: str
    rules: tuple[Rule, ...] = ()
    properties: dict[str, RuleTree] = field(default_factory=dict)
    additional: RuleTree | None = None
    items: RuleTree | None = None
    all_of: tuple[RuleTree, ...] = ()

    def check(self, value: Any, path: str) -> list[str]:
        """The errors of every rule at and below this node for VALUE (at PATH)."""
        if value is None:
            return []  # rules validate present, non-null values only
        errors = [e for rule in self.rules if (e := rule.failure(value, path, self.type_name))]
        for branch in self.all_of:
            errors.extend(branch.check(value, path))
        if isinstance(value, list) and self.items is not None:
            for i, item in enumerate(value):
                errors.extend(self.items.check(item, f"{path}[{i}]"))
        elif isinstance(value, Mapping):
            for key, child in value.items():
                if self.additional is not None:
                    errors.extend(self.additional.check(child, f"{path}[{key}]"))
                if (sub := self.properties.get(key)) is not None:
                    errors.extend(sub.check(child, f"{path}.{key}" if path else key))
        return errors

    def all_rules(self) -> Iterator[Rule]:
        yield from self.rules
        for child in (*self.properties.values(), self.additional, self.items, *self.all_of):
            if child is not None:
                yield from child.all_rules()


def build(schema: Mapping[str, Any], where: str = "") -> RuleTree | None:
    """The compiled rules of SCHEMA's tree, None when it has none. Rules are compiled here, once."""
    rules = tuple(
        _compile_at(schema, raw, f"{where or '<root>'}: x-kubernetes-validations[{i}]")
        for i, raw in enumerate(schema.get("x-kubernetes-validations") or ())
    )
    properties: dict[str, RuleTree] = {}
    for name, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, Mapping) and (tree := build(sub, f"{where}.{name}")) is not None:
            properties[name] = tree
    extra = schema.get("additionalProperties")
    additional = build(extra, f"{where}[*]") if isinstance(extra, Mapping) else None
    item_schema = schema.get("items")
    items = build(item_schema, f"{where}[*]") if isinstance(item_schema, Mapping) else None
    all_of = tuple(
        tree
        for i, sub in enumerate(schema.get("allOf") or ())
        if (tree := build(sub, f"{where}.allOf[{i}]")) is not None
    )
    if not (rules or properties or additional or items or all_of):
        return None
    return RuleTree(
        type_name=str(schema.get("type", "")),
        rules=rules,
        properties=properties,
        additional=additional,
        items=items,
        all_of=all_of,
    )


def _compile_at(schema: Mapping[str, Any], raw: Any, where: str) -> Rule:
    """RAW compiled, its fieldPath resolved against SCHEMA (the rule's location)."""
    rule = compile_rule(raw, where)
    return dataclasses.replace(rule, field_path=_field_path(schema, rule.field_path))


def compile_rule(raw: Any, where: str) -> Rule:
    """RAW (one x-kubernetes-validations entry) compiled; a malformed entry fails the load."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("rule"), str):
        raise ValueError(f"{where}: a validation rule needs a string 'rule'")
    text: str = raw["rule"]
    message = str(raw.get("message") or "").strip()
    reason = str(raw.get("reason") or "")
    field_path = str(raw.get("fieldPath") or "")
    message_expression = str(raw.get("messageExpression") or "")
    try:
        program, names = _compile(text)
    except Exception as e:
        return Rule(text, message, reason, field_path, None, None, compile_error=_first_line(e))
    skipped = ""
    if "oldSelf" in names.variables or raw.get("optionalOldSelf"):
        skipped = TRANSITION
    elif unsupported := sorted(names.functions - _supported()):
        skipped = f"calls {', '.join(unsupported)}, which this validator does not implement"
    message_program = None
    if message_expression and not skipped:
        try:
            message_program, _ = _compile(message_expression)
        except Exception:
            message_program = None  # the API server falls back to message too
    return Rule(text, message, reason, field_path, program, message_program, skipped=skipped)


@dataclass(frozen=True)
class _Names:
    functions: frozenset[str]
    variables: frozenset[str]


@functools.cache
def _environment() -> celpy.Environment:
    # The interpreting runner: celpy 0.5's transpiling one mistypes has() and multi-line rules.
    # celpy.Environment raises the interpreter's recursion limit for the whole process: keep ours.
    limit = sys.getrecursionlimit()
    try:
        return celpy.Environment()
    finally:
        sys.setrecursionlimit(limit)


class Program(Protocol):
    def evaluate(self, activation: Any) -> Any: ...


@functools.cache
def _compile(text: str) -> tuple[Program, _Names]:
    """TEXT parsed and bound once per process (Istio repeats a few rules hundreds of times)."""
    env = _environment()
    tree = env.compile(text)
    names = _names(tree)
    if m := _UNIQUE_BY.fullmatch(text):
        item, other = m.group("item"), m.group("other")
        if item != other and m.group("a") == item and m.group("b") == other:
            return UniqueBy(m.group("key")), names
    return env.program(tree, functions=dict(_FUNCTIONS)), names


# Istio's "port number cannot be duplicated", self.all(a, self.exists_one(b, a.k == b.k)), costs
# n² evaluations of its body: 6 s of CPU for a ServiceEntry at its 256 ports in cel-python. It is
# evaluated natively, as what it means under cel-go's rules (exists_one counts with a ternary,
# so an error in any comparison is its result; all() lets a false win over an error).
_UNIQUE_BY = re.compile(
    r"\s*self\.all\(\s*(?P<item>\w+)\s*,\s*self\.exists_one\(\s*(?P<other>\w+)\s*,"
    r"\s*(?P<a>\w+)\.(?P<key>\w+)\s*==\s*(?P<b>\w+)\.(?P=key)\s*\)\s*\)\s*"
)


@dataclass(frozen=True)
class UniqueBy:
    """``self.all(a, self.exists_one(b, a.KEY == b.KEY))`` in O(n): an error when an item has
    no KEY (every comparison with it fails), else whether the items' KEY values are unique."""

    key: str

    def evaluate(self, activation: Any) -> celtypes.BoolType:
        items = activation["self"]
        if not isinstance(items, list):
            raise CELEvalError("no such overload", TypeError, (f"all() on {type(items).__name__}",))
        values = []
        for item in items:
            if not isinstance(item, Mapping) or self.key not in item:
                raise CELEvalError(f"no such key: {self.key}", KeyError, (self.key,))
            values.append(item[self.key])
        seen: list[Any] = []
        hashed: set[tuple[bool, Any]] = set()
        for value in values:
            if isinstance(value, Hashable):
                marked = (isinstance(value, bool | celtypes.BoolType), value)  # CEL: true != 1
                if marked in hashed:
                    return celtypes.BoolType(False)
                hashed.add(marked)
            elif value in seen:
                return celtypes.BoolType(False)
            else:
                seen.append(value)
        return celtypes.BoolType(True)


def _names(tree: lark.Tree[Any]) -> _Names:
    functions: set[str] = set()
    variables: set[str] = set()
    for node in tree.iter_subtrees():
        tokens = [c for c in node.children if isinstance(c, lark.Token)]
        if node.data in ("ident_arg", "dot_ident_arg", "member_dot_arg") and tokens:
            functions.add(str(tokens[0]))
        elif node.data == "ident" and tokens:
            variables.add(str(tokens[0]))
    return _Names(frozenset(functions), frozenset(variables))


@functools.cache
def _supported() -> frozenset[str]:
    return frozenset(base_functions) | frozenset(_FUNCTIONS) | _MACROS


def _eval_problem(error: CELEvalError) -> str:
    """A one-line account of a CEL evaluation error, without celpy's activation dump."""
    args = error.args
    if len(args) >= 3 and isinstance(args[2], tuple) and args[2]:
        inner = str(args[2][0])
        nested = re.search(
            r"CELEvalError\(\*\('[^']*', <class '[\w.]+'>, \((['\"])(.*?)\1,?\)", inner
        )
        if nested:
            inner = nested.group(2)
        return _first_line(inner)
    return _first_line(str(args[0]) if args else "evaluation error")


def _first_line(value: object) -> str:
    plain = re.sub(r"StringType\(('[^']*')\)", r"\1", str(value))  # celpy's reprs, as literals
    text = plain.split(" (in activation", 1)[0].strip().splitlines() or [""]
    line = text[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _field(path: str) -> str:
    return path or "<object>"


def _field_path(schema: Mapping[str, Any], field_path: str) -> str:
    """A rule's fieldPath (".a", ".m['key']") as field.Path prints it below the rule's location:
    a property is ".name", a map key "[key]" (apiextensions' ValidFieldPath)."""
    out = ""
    for dotted, quoted in re.findall(r"\.([^.\[\]]+)|\['((?:[^'\\]|\\.)*)'\]", field_path):
        name = dotted or quoted.replace("\\'", "'")
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        if name not in properties and isinstance(extra, Mapping):
            out, schema = f"{out}[{name}]", extra
        else:
            out, schema = f"{out}.{name}", properties.get(name) or {}
    return out


def _join_field_path(path: str, field_path: str) -> str:
    """The rule's location plus its normalized fieldPath."""
    if not path:
        return field_path.removeprefix(".")
    return path + field_path


# -- the Kubernetes extension functions Istio's rules call ----------------------------------------


def _substring(text: str, start: int, end: int | None = None) -> celtypes.StringType:
    """cel-go strings extension: code points [start, end); out of range is an error."""
    stop = len(text) if end is None else int(end)
    if not 0 <= int(start) <= stop <= len(text):
        raise ValueError(f"index out of range: {start}, {stop} (length {len(text)})")
    return celtypes.StringType(str(text)[int(start) : stop])


_NANOS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def go_duration_nanos(text: str) -> int:
    """TEXT as Go's time.ParseDuration reads it, in nanoseconds; ValueError as Go words it."""
    invalid = ValueError(f'time: invalid duration "{text}"')
    rest, negative = text, False
    if rest[:1] in ("+", "-"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise invalid
    total, pos = Fraction(0), 0
    while pos < len(rest):
        m = _DURATION_PART.match(rest, pos)
        assert m is not None  # every part of the pattern may be empty
        whole, fraction, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not fraction:
            raise invalid
        if not unit:
            raise ValueError(f'time: missing unit in duration "{text}"')
        if unit not in _NANOS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{text}"')
        amount = Fraction(int(whole or "0"))
        if fraction:
            amount += Fraction(int(fraction), 10 ** len(fraction))
        total += amount * _NANOS[unit]
        pos = m.end()
    nanos = int(total)
    if nanos > 2**63 - (0 if negative else 1):
        raise invalid
    return -nanos if negative else nanos


def _duration(value: Any) -> celtypes.DurationType:
    if isinstance(value, celtypes.DurationType):
        return value
    if not isinstance(value, str):
        raise TypeError(f"no such overload: duration({type(value).__name__})")
    nanos = go_duration_nanos(str(value))
    return celtypes.DurationType(datetime.timedelta(microseconds=nanos // 1000))


@dataclass(frozen=True)
class Url:
    """A URL as k8s' url() holds it (Go's url.URL, the parts its accessors return)."""

    scheme: str
    host: str  # host[:port] as written
    path: str
    opaque: bool


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# Characters Go's url package lets through unescaped in a host ("net/url: invalid character").
_HOST_CHARS = re.compile(r"[A-Za-z0-9\-_.~!$&'()*+,;=:\[\]<>\"%]*")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_request_uri(text: str) -> Url:
    """TEXT as Go's url.ParseRequestURI accepts it (an absolute URL, or an absolute path)."""
    if not text:
        raise ValueError('parse "": empty url')
    quoted = json.dumps(text)  # as Go's %q
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"parse {quoted}: net/url: invalid control character in URL")
    if text.startswith(":"):
        raise ValueError(f"parse {quoted}: missing protocol scheme")
    scheme, rest = "", text
    if m := _SCHEME.match(text):
        scheme, rest = m.group(0)[:-1].lower(), text[m.end() :]
    rest = rest.split("?", 1)[0]
    if not rest.startswith("/"):
        if scheme:
            return Url(scheme, "", "", opaque=True)
        raise ValueError(f"parse {quoted}: invalid URI for request")
    host, path = "", rest
    if scheme and rest.startswith("//"):
        authority, slash, tail = rest[2:].partition("/")
        path = slash + tail
        host = authority.rpartition("@")[2]
        _check_host(quoted, host)
    if _PERCENT.search(path):
        raise ValueError(f"parse {quoted}: invalid URL escape")
    return Url(scheme, host, path, opaque=False)


def _check_host(quoted: str, host: str) -> None:
    if not _HOST_CHARS.fullmatch(host) or _PERCENT.search(host):
        raise ValueError(f"parse {quoted}: invalid character in host name")
    if host.startswith("["):
        close = host.find("]")
        if close < 0:
            raise ValueError(f"parse {quoted}: missing ']' in host")
        port = host[close + 1 :]
    else:
        port = host[host.rfind(":") :] if ":" in host else ""
    if port and not re.fullmatch(r":\d*", port):
        raise ValueError(f"parse {quoted}: invalid port {json.dumps(port)} after host")


def _hostname(u: Url) -> str:
    if u.host.startswith("["):
        return u.host[1 : u.host.find("]")]
    return u.host.rpartition(":")[0] if ":" in u.host else u.host


def _port(u: Url) -> str:
    tail = u.host[u.host.find("]") + 1 :] if u.host.startswith("[") else u.host
    return tail.rpartition(":")[2] if ":" in tail else ""


def _url(value: Any) -> Url:
    if not isinstance(value, str):
        raise TypeError(f"no such overload: url({type(value).__name__})")
    try:
        return parse_request_uri(str(value))
    except ValueError as e:
        raise ValueError(f"URL parse error during conversion from string: {e}") from None


def _is_url(value: Any) -> celtypes.BoolType:
    try:
        parse_request_uri(str(value))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _accessor(part: Callable[[Url], str]) -> Callable[[Any], celtypes.StringType]:
    def get(value: Any) -> celtypes.StringType:
        if not isinstance(value, Url):
            raise TypeError(f"no such overload: URL accessor on {type(value).__name__}")
        return celtypes.StringType(part(value))

    return get


_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "duration": _duration,
    "substring": _substring,
    "url": _url,
    "isURL": _is_url,
    "getScheme": _accessor(lambda u: u.scheme),
    "getHost": _accessor(lambda u: u.host),
    "getHostname": _accessor(_hostname),
    "getPort": _accessor(_port),
    "getEscapedPath": _accessor(lambda u: u.path),
}


def skipped_rules(tree: RuleTree | None) -> list[Rule]:
    """The rules of TREE that are not evaluated."""
    return [] if tree is None else [r for r in tree.all_rules() if r.skipped]


def count_rules(tree: RuleTree | None) -> int:
    return 0 if tree is None else sum(1 for _ in tree.all_rules())
