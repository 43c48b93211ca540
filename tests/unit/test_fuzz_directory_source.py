"""Fuzzing the directory source: Istio and Kubernetes YAML, mutated, into a directory it polls.

Seeds are Istio's own samples (tests/data/istio) and one object of each Kubernetes kind the source
reads. Each example mutates one object (values of other types, unknown and removed fields, huge
strings, odd numbers) and then perhaps its text (cut short, duplicated keys, bytes that are not
UTF-8, an alias bomb, self-referring aliases, deep nesting). Property: the scan never raises; each
problem names the file and, when the file is YAML at all, the document and the object; the file's
other documents and the directory's other files keep working; a fixed file clears its problems.
Budget: see fuzzing.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from fuzzing import budget
from hypothesis import example, given
from hypothesis import strategies as st
from istio_data import istio_files

from nodeagent import kubeyaml
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources.directory import DirectorySource

SCHEMAS = IstioSchemas.load()

KUBERNETES = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"a": "b"}}},
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "web-1", "uid": "u-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {"podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}]},
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "shop",
            "name": "web-x",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.7"], "targetRef": {"kind": "Pod", "name": "web-1"}}],
        "ports": [{"name": "http", "port": 8080}],
    },
    {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"namespace": "shop", "name": "db"},
        "subsets": [{"addresses": [{"ip": "10.244.1.8"}], "ports": [{"port": 5432}]}],
    },
    {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"namespace": "shop", "name": "web"},
    },
    {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
    },
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": "shop", "name": "tls"},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "eA==", "tls.key": "eA=="},
    },
]


def _istio_seeds() -> list[dict[str, Any]]:
    seeds = []
    for path in istio_files("**/*.yaml"):
        for doc in kubeyaml.load_all(path.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).endswith(
                ("istio.io/v1", "istio.io/v1beta1", "istio.io/v1alpha3", "istio.io/v1alpha1")
            ):
                seeds.append(doc)
    return seeds


SEEDS = KUBERNETES + _istio_seeds()

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "0", "1e3", "80", "yes", "::1", "10.0.0.1/8", "*"])
    | st.integers(3, 5).map(lambda n: "a" * 10**n)  # up to 100 kB
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _containers(doc: Any) -> list[Any]:
    """Every mapping and list inside DOC (DOC included), in a stable order."""
    found = [doc]
    for value in doc.values() if isinstance(doc, dict) else doc:
        if isinstance(value, dict | list):
            found += _containers(value)
    return found


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(_containers(doc)))
        if isinstance(target, list):
            if target and draw(st.booleans()):
                target[draw(st.integers(0, len(target) - 1))] = draw(VALUES)
            else:
                target.append(draw(VALUES))
            continue
        keys = sorted(target)
        action = draw(st.sampled_from(["replace", "remove", "add"] if keys else ["add"]))
        if action == "add":
            target[draw(st.text(max_size=10))] = draw(VALUES)
        elif action == "remove":
            del target[draw(st.sampled_from(keys))]
        else:
            target[draw(st.sampled_from(keys))] = draw(VALUES)
    return doc


BOMB = "".join(
    f"{k}: &{k} [{', '.join([f'*{p}'] * 9 if p else ['x'] * 9)}]\n"
    for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


@st.composite
def file_text(draw: st.DrawFn) -> bytes:
    """A valid Namespace, then the mutated document; perhaps its text mutated too."""
    doc = draw(mutated())
    body = json.dumps(doc) if draw(st.booleans()) else _yaml(doc)
    text = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: kept}}\n---\n{body}".encode()
    edit = draw(
        st.sampled_from(
            ["none", "none", "cut", "insert", "duplicate", "not-utf8", "bomb", "loop", "deep"]
        )
    )
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(
                st.binary(max_size=8)
                | st.sampled_from([b"&a ", b"*a", b"!!binary ", b": ", b"\t", b"- ", b"{", b"? "])
            )
            + text[at:]
        )
    elif edit == "duplicate":  # a key twice in a mapping
        lines = text.split(b"\n")
        at = draw(st.integers(0, len(lines) - 1))
        text = b"\n".join([*lines[: at + 1], lines[at], *lines[at + 1 :]])
    elif edit == "not-utf8":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
            + text[at:]
        )
    elif edit == "bomb":
        text += b"\n---\n" + BOMB.encode()
    elif edit == "loop":
        text += b"\n---\n&loop {apiVersion: v1, kind: Pod, metadata: *loop}\n"
    elif edit == "deep":
        depth = draw(st.integers(90, 200))
        text += b"\n---\nkind: Pod\napiVersion: v1\nmetadata: " + b"[" * depth + b"]" * depth
    return text


def _yaml(doc: Any) -> str:
    """DOC as block YAML (the way people write these files)."""
    import io

    from ruamel.yaml import YAML

    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, out)
    return out.getvalue()


GOOD = """apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {namespace: other, name: api}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
"""
# A document's problem names its position, then its kind and namespace/name (or that it is no
# object at all).
WHERE = re.compile(r"document \d+( items\[\d+\])?: (expected a mapping$|.+ \S+: )", re.DOTALL)


def _write(path: Path, data: bytes) -> None:
    """DATA into PATH so that the next scan sees a change even within one mtime tick."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))


@budget(150)
@example(text=b"apiVersion: v1\nkind: Namespace\nmetadata: {name: kept}\n---\n" + BOMB.encode())
@example(text=b"apiVersion: v1\nkind: Namespace\nmetadata: {name: kept}\n---\n&x [*x]\n")
@example(text=b'{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "\\ud800"}}')
@example(text=b"[" * 100_000 + b"]" * 100_000)
@example(text=b"kind: Service\napiVersion: v1\nspec: {ports: [{port: " + b"9" * 5000 + b"}]}")
@given(text=file_text())
def test_any_file_is_read_or_named_and_the_rest_keeps_working(tmp_path: Path, text: bytes) -> None:
    root = tmp_path / "fuzz"
    root.mkdir(exist_ok=True)
    good, bad = root / "good.yaml", root / "bad.yaml"
    _write(good, GOOD.encode())
    _write(bad, text)
    store = MeshStore()
    source = DirectorySource(root, store, schemas=SCHEMAS)
    source.scan()
    assert "other" in store.namespaces and "other/api" in store.services
    assert good not in source.errors
    problems = source.errors.get(bad, [])
    unreadable = any("cannot be read as YAML" in p for p in problems)
    for problem in problems:
        assert len(problem) < 2000, problem[:2000]  # a value is quoted, never copied whole
        assert problem.startswith(f"{bad}: "), problem
        assert "cannot be read as YAML" in problem or WHERE.match(problem, len(f"{bad}: ")), problem
    if not unreadable and text.startswith(
        b"apiVersion: v1\nkind: Namespace\nmetadata: {name: kept}\n---\n"
    ):
        assert "kept" in store.namespaces, problems
    _write(bad, b"apiVersion: v1\nkind: Namespace\nmetadata: {name: fixed}\n")
    source.scan()
    assert bad not in source.errors and "fixed" in store.namespaces
