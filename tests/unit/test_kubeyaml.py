"""YAML that Kubernetes accepts loads as Kubernetes stores it (issue #12, defect 10).

kubectl and the API server turn YAML into JSON with go-yaml (sigs.k8s.io/yaml); PyYAML's YAML 1.1
reads some plain scalars differently: in a flow sequence ``2001:db8::`` became a mapping, ``1:20``
the sexagesimal integer 80, a bare ``=`` an error. These must load as the strings one wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import kubeyaml
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource, MeshConfigFile
from nodeagent.testbed import resources
from nodeagent.testbed.topology import TopologyError, loads_topology

SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-db
  namespace: shop
  annotations: {window: 1:20, opens: 10:30:00, marker: =, release: 2024-01-01}
spec:
  hosts: [db.example.com]
  addresses: [1.2.3.4, 001:db8::, 2001:db8::]
  ports: [{number: 5432, name: tcp-db, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 2001:db8::5}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db.example.com
  trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: yes}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: [2001:db8::10], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
"""


def test_a_service_entry_with_ipv6_addresses_loads_as_kubernetes_stores_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "db.yaml").write_text(SERVICE_ENTRY)
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    entry = store.istio["ServiceEntry/shop/external-db"]
    assert entry.spec["addresses"] == ["1.2.3.4", "001:db8::", "2001:db8::"]
    assert entry.spec["endpoints"] == [{"address": "2001:db8::5"}]
    assert entry.annotations == {
        "window": "1:20",  # not the sexagesimal 80
        "opens": "10:30:00",
        "marker": "=",
        "release": "2024-01-01",
    }
    # go-yaml's booleans: `yes` is true for Kubernetes too, so the schema's boolean accepts it
    tls = store.istio["DestinationRule/shop/db"].spec["trafficPolicy"]["tls"]
    assert tls == {"mode": "SIMPLE", "insecureSkipVerify": True}
    assert store.endpoint_slices["shop/web-v6"].endpoints[0].addresses == ("2001:db8::10",)


def test_plain_scalars_resolve_as_go_yaml_resolves_them() -> None:
    [doc] = kubeyaml.load_all(
        "a: [1:20, 190:20:30.15, fd00::1, '1:20']\n"
        "b: [yes, No, on, OFF, y, n, true, yEs]\n"
        "c: [0755, 0o755, 0x1F, 1_000, 1e3, 08, ~]\n"
    )
    assert doc["a"] == ["1:20", "190:20:30.15", "fd00::1", "1:20"]
    assert doc["b"] == [True, False, True, False, True, False, True, "yEs"]
    assert doc["c"] == [0o755, 0o755, 31, 1000, 1000.0, 8, None]


def test_a_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop\n")
    source = DirectorySource(tmp_path, MeshStore())
    source.scan()
    [problem] = source.errors[bad]
    assert str(bad) in problem and "cannot be read as YAML" in problem and "line 3" in problem


def test_the_mesh_config_and_topologies_use_the_same_reading(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("trustDomain: on\n")  # a boolean for Kubernetes too: rejected, not "on"
    config = MeshConfigFile(mesh, MeshStore())
    config.scan()
    assert "trustDomain: invalid value true" in config.errors[mesh][0]
    with pytest.raises(TopologyError, match=r"extra: unknown field"):  # read, then checked
        loads_topology("nodes: [{name: n1}]\nextra: [2001:db8::]\n", "topo.yaml")


def test_what_the_testbed_writes_reads_back_unchanged(tmp_path: Path) -> None:
    """The testbed's cluster files (JSON documents, read on the fast path) keep every string."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": "shop",
            "name": "web",
            "annotations": {"a": "y", "b": "08", "c": "1e3", "d": "1:20", "e": "NaN"},
        },
        "spec": {"nodeName": "n1"},
    }
    resources.write(tmp_path / "pods.yaml", [pod, {**pod, "metadata": {"name": "two"}}])
    assert kubeyaml.load_all((tmp_path / "pods.yaml").read_text())[0] == pod
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    assert store.pods["shop/web"].annotations == pod["metadata"]["annotations"]
    assert set(store.pods) == {"shop/web", "default/two"}
