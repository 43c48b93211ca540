"""YAML as Kubernetes reads it, for the Kubernetes and Istio YAML the agent loads.

PyYAML implements YAML 1.1, whose plain scalars Kubernetes does not read the same way: in a flow
sequence ``[1.2.3.4, 2001:db8::]`` the IPv6 address becomes a mapping, ``1:20`` is the sexagesimal
integer 80, ``1e3`` a string and a bare ``=`` an error. kubectl and the API server convert YAML
with go-yaml (sigs.k8s.io/yaml), where all of these are the strings (or the float) one wrote.

So the syntax is YAML 1.2 (ruamel.yaml, safe and pure Python) with go-yaml's resolution where the
two differ: ``yes``/``no``/``on``/``off``/``y``/``n`` (in go-yaml's spellings) are booleans and
``0755`` is octal, as go-yaml reads them; timestamps stay the strings they were (the schemas want
strings) and ``=`` is a string.

Input is bounded as go-yaml bounds it, so a file cannot stall or crash its reader: nesting (which
a self-referring alias makes endless) and the values aliases expand to (a "billion laughs" file
is a few hundred bytes) are limited, and each refusal is a YAMLError saying which limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import ConstructorError, SafeConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.resolver import VersionedResolver

BOOL = "tag:yaml.org,2002:bool"
INT = "tag:yaml.org,2002:int"
_DROPPED = frozenset({"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"})
# go-yaml v2's boolean words (resolve.go), each in exactly these spellings.
_BOOL_WORDS = re.compile(
    r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE"
    r"|on|On|ON|off|Off|OFF)$"
)
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")
_DOCUMENT_MARKER = re.compile(r"^---[ \t]*$", re.MULTILINE)
MAX_DEPTH = 100  # levels of nesting; Kubernetes and Istio objects need a few dozen at most
# Values the documents of a text may hold, aliases expanded: without aliases a value takes at
# least two characters, so this leaves room for anchors reused a few times, not for exponential
# growth.
EXPANSION = 4
MIN_VALUES = 10_000


class _Resolver(VersionedResolver):
    """ruamel's rules for the document's YAML version, changed once per version as above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changed: set[int] = set()

    @property
    def versioned_resolver(self) -> Any:
        rules = super().versioned_resolver
        if id(rules) not in self._changed:
            for resolvers in rules.values():
                resolvers[:] = [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
            for first in "yYnNtTfFoO":
                rules.setdefault(first, []).insert(0, (BOOL, _BOOL_WORDS))
            self._changed.add(id(rules))
        return rules


class _Constructor(SafeConstructor):
    def construct_yaml_int(self, node: Any) -> int:
        text = str(self.construct_scalar(node))
        try:
            if _OCTAL.match(text):  # go-yaml parses integers with Go's base prefixes: 0755 is octal
                digits = text.replace("_", "")
                sign = -1 if digits[0] == "-" else 1
                return sign * int(digits.lstrip("+-"), 8)
            return int(super().construct_yaml_int(node))
        except ValueError as e:  # more digits than Python converts (4300): no number of ours
            raise ConstructorError(
                None, None, f"integer out of range: {e}", node.start_mark
            ) from None


_Constructor.add_constructor(INT, _Constructor.construct_yaml_int)


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.Resolver = _Resolver
    yaml.Constructor = _Constructor
    return yaml


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would take NaN and Infinity


def _json_documents(text: str) -> list[Any] | None:
    """TEXT's documents when each one is plain JSON (as the testbed and ``kubectl -o json``
    write them), else None. JSON is YAML 1.2 with the same values, and json parses it about a
    hundred times faster than the pure-Python YAML parser (1000 Services: 0.01 s, not 1.5 s)."""
    chunks = _DOCUMENT_MARKER.split(text)
    if chunks and not chunks[0].strip():
        chunks = chunks[1:]  # nothing before the first marker
    documents = []
    for chunk in chunks:
        if not chunk.strip():
            return None  # what an empty document is, YAML says
        try:
            documents.append(json.loads(chunk, parse_constant=_not_json))
        except ValueError:
            return None
    return documents


def load_all(text: str) -> list[Any]:
    """Every document of TEXT. Raises YAMLError naming the line and column of a problem, or the
    limit (nesting, alias expansion) a document exceeds."""
    try:
        documents = _json_documents(text)
        if documents is None:
            documents = list(_yaml().load_all(text))
    except RecursionError:
        raise YAMLError(
            f"nested too deeply to parse (a document may nest {MAX_DEPTH} levels)"
        ) from None
    _check_bounds(documents, MIN_VALUES + EXPANSION * len(text))
    return documents


def load(text: str) -> Any:
    """The one document of TEXT (None when empty); YAMLError also when it holds several."""
    try:
        document = _yaml().load(text)
    except RecursionError:
        raise YAMLError(
            f"nested too deeply to parse (a document may nest {MAX_DEPTH} levels)"
        ) from None
    _check_bounds([document], MIN_VALUES + EXPANSION * len(text))
    return document


def _check_bounds(documents: list[Any], budget: int) -> None:
    """YAMLError when a document nests deeper than MAX_DEPTH, the documents hold more than
    BUDGET values with their aliases expanded (as every reader of them will walk them), or a
    string holds an unpaired surrogate (an escape such as "\\ud800": not text)."""
    left = budget

    def walk(value: Any, depth: int, index: int) -> None:
        nonlocal left
        left -= 1
        if left < 0:
            raise YAMLError(
                f"document {index}: aliases expand the text to more than {budget} values"
            )
        if depth > MAX_DEPTH:
            raise YAMLError(
                f"document {index}: nested deeper than {MAX_DEPTH} levels "
                "(or an alias refers to a value that holds it)"
            )
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as e:  # "\ud800": no UTF-8 text (or protobuf) holds it
                raise YAMLError(
                    f"document {index}: unpaired surrogate {value[e.start]!r} in a string"
                ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key, depth + 1, index)
                walk(item, depth + 1, index)
        elif isinstance(value, list):
            for item in value:
                walk(item, depth + 1, index)

    for index, document in enumerate(documents):
        walk(document, 0, index)


__all__ = ["YAMLError", "load", "load_all"]
