"""The directory source beyond pods: services, endpoints, service accounts, Istio kinds and the
mesh config file, applied incrementally and with bad documents named."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from istio_data import istio_data

from nodeagent.mesh import cel
from nodeagent.mesh.model import (
    REGISTRY_ONLY,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    MeshConfig,
    ServiceAccount,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource

SERVICES = """
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: web, labels: {app: web}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: metrics, port: 9090, targetPort: metrics, protocol: UDP}
  - {port: 443}
---
apiVersion: v1
kind: ServiceAccount
metadata: {namespace: shop, name: web}
---
apiVersion: v1
kind: Endpoints
metadata: {namespace: shop, name: web}
subsets:
- addresses:
  - ip: 10.244.1.7
    nodeName: node1
    targetRef: {kind: Pod, name: web-1, namespace: shop}
  notReadyAddresses:
  - {ip: 10.244.2.9, nodeName: node2, targetRef: {kind: Pod, name: web-2}}
  ports: [{name: http, port: 8080, appProtocol: http}]
- addresses: [{ip: 10.244.3.3}]
  ports: [{name: http, port: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: shop, name: api-x7k2p, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
endpoints:
- addresses: ["fd00::7"]
  nodeName: node1
  targetRef: {kind: Pod, namespace: shop, name: api-1}
- addresses: ["fd00::8"]
  conditions: {ready: false}
ports: [{name: grpc, port: 9000, protocol: TCP, appProtocol: grpc}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {namespace: shop, name: web}
spec: {replicas: 1}
"""

GOOD_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: shop, name: web}
spec:
  host: web
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"""

VS = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {namespace: shop, name: web}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
      weight: 100
"""


def _write(path: Path, text: str) -> None:
    """Writes TEXT so the next scan sees a change even within one mtime tick."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))


def _source(root: Path, mesh_config: Path | None = None) -> tuple[DirectorySource, MeshStore]:
    store = MeshStore()
    return DirectorySource(root, store, mesh_config), store


def test_services_endpoints_and_service_accounts_are_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "shop.yaml", SERVICES)
    source, store = _source(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="nodeagent.sources.directory"):
        source.scan()
    assert source.errors == {}
    assert "Deployment" in caplog.text  # skipped, and said so at debug level only
    svc = store.services["shop/web"]
    assert (svc.cluster_ip, svc.selector, svc.labels) == (
        "10.96.0.10",
        {"app": "web"},
        {"app": "web"},
    )
    assert svc.ports == (
        ServicePort(80, "http", 8080, "TCP", "http"),
        ServicePort(9090, "metrics", "metrics", "UDP"),
        ServicePort(443),
    )
    assert store.service_accounts == {"shop/web": ServiceAccount("shop", "web")}
    # Endpoints: one slice per port set, named after the Endpoints, not-ready addresses kept
    assert store.endpoint_slices["shop/web"] == EndpointSlice(
        "shop",
        "web",
        service="web",
        endpoints=(
            Endpoint(("10.244.1.7",), True, "node1", "shop/web-1"),
            Endpoint(("10.244.2.9",), False, "node2", "shop/web-2"),
        ),
        ports=(EndpointPort(8080, "http", "TCP", "http"),),
    )
    assert store.endpoint_slices["shop/web-1"].endpoints == (Endpoint(("10.244.3.3",)),)
    api = store.endpoint_slices["shop/api-x7k2p"]
    assert (api.service, api.address_type, api.ports) == (
        "api",
        "IPv6",
        (EndpointPort(9000, "grpc", "TCP", "grpc"),),
    )
    assert api.endpoints == (
        Endpoint(("fd00::7",), True, "node1", "shop/api-1"),  # no conditions: ready
        Endpoint(("fd00::8",), False),
    )
    assert [s.name for s in store.slices_of(svc)] == ["web", "web-1"]


def test_endpoint_slices_win_over_the_endpoints_they_mirror(tmp_path: Path) -> None:
    mirrored = SERVICES.replace("name: api-x7k2p", "name: web-abcde").replace(
        "service-name: api", "service-name: web"
    )
    _write(tmp_path / "dump.yaml", mirrored)
    source, store = _source(tmp_path)
    source.scan()
    assert [s.name for s in store.slices_of(store.services["shop/web"])] == ["web-abcde"]


def test_a_bad_istio_object_is_named_and_the_good_one_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "istio.yaml"
    bad = VS.replace("weight: 100", "weight: all").replace("- route:", "- rout:")
    _write(path, bad + "---" + GOOD_DR)
    source, store = _source(tmp_path)
    source.scan()
    assert list(store.istio) == ["DestinationRule/shop/web"]
    dr = store.istio["DestinationRule/shop/web"]
    assert (dr.group, dr.version, dr.spec["host"]) == ("networking.istio.io", "v1", "web")
    where = f"{path}: document 0: VirtualService shop/web"
    assert source.errors[path] == [
        f'{where}: unknown field "spec.http[0].rout" (did you mean "route"?)'
    ]
    _write(path, VS.replace("weight: 100", "weight: all") + "---" + GOOD_DR)
    source.scan()
    assert source.errors[path] == [
        f'{where}: spec.http[0].route[0].weight: must be of type integer, got string "all"',
        f"{where}: {cel.BLOCKED}",  # as an API server: no CEL rule runs on a mistyped object
    ]
    _write(path, VS + "---" + GOOD_DR)
    source.scan()
    assert path not in source.errors
    vs = store.istio["VirtualService/shop/web"]
    assert (vs.version, vs.namespace, vs.spec["http"][0]["route"][0]["weight"]) == (
        "v1beta1",
        "shop",
        100,
    )


def test_istio_objects_as_kubernetes_reads_them(tmp_path: Path) -> None:
    # unquoted port keys are strings to Kubernetes; null means unset; namespace defaults
    _write(
        tmp_path / "pa.yaml",
        """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  mtls:
  portLevelMtls:
    8080: {mode: DISABLE}
""",
    )
    source, store = _source(tmp_path)
    source.scan()
    assert source.errors == {}
    pa = store.istio["PeerAuthentication/default/web"]
    assert pa.spec == {
        "selector": {"matchLabels": {"app": "web"}},
        "portLevelMtls": {"8080": {"mode": "DISABLE"}},
    }


def test_unknown_istio_kinds_and_versions_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "istio.yaml"
    _write(
        path, VS.replace("v1beta1", "v2") + "---" + GOOD_DR.replace("DestinationRule", "DestRule")
    )
    source, store = _source(tmp_path)
    source.scan()
    assert store.istio == {}
    first, second = source.errors[path]
    assert first.startswith(f"{path}: document 0: VirtualService shop/web: apiVersion: ")
    assert "served: networking.istio.io/v1, networking.istio.io/v1beta1" in first
    assert second.startswith(f'{path}: document 1: DestRule shop/web: kind: "DestRule" is not')


def test_bad_kubernetes_fields_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    _write(
        path,
        SERVICES.replace("targetPort: 8080", 'targetPort: "8080"')
        .replace("ip: 10.244.3.3", "ip: 10.244.3")
        .replace("addressType: IPv6", "addressType: IPv4")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: 0}]}\n",
    )
    source, store = _source(tmp_path)
    source.scan()
    assert source.errors[path] == [
        f'{path}: document 0: Service shop/web: spec.ports[0].targetPort: "8080" is neither a '
        "port number nor a port name",
        f'{path}: document 2: Endpoints shop/web: subsets[1].addresses[0].ip: "10.244.3" is not '
        "an IP address",
        f"{path}: document 3: EndpointSlice shop/api-x7k2p: endpoints[0].addresses[0]: fd00::7 "
        "is not an IPv4 address",
        f"{path}: document 5: Service default/db: spec.ports[0].port: port 0 is out of range "
        "1-65535",
    ]
    assert list(store.service_accounts) == ["shop/web"]  # the rest of the file still applies


def test_a_kubectl_list_is_read_item_by_item(tmp_path: Path) -> None:
    path = tmp_path / "dump.yaml"
    _write(
        path,
        """
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ServiceAccount, metadata: {namespace: shop, name: web}}
- {apiVersion: v1, kind: ServiceAccount, metadata: {namespace: shop}}
""",
    )
    source, store = _source(tmp_path)
    source.scan()
    assert list(store.service_accounts) == ["shop/web"]
    assert source.errors[path] == [
        f"{path}: document 0 items[1]: ServiceAccount shop/<unnamed>: metadata.name: "
        "required string is missing"
    ]


def test_updates_and_deletions_touch_only_what_changed(tmp_path: Path) -> None:
    istio, services = tmp_path / "istio.yaml", tmp_path / "services.yaml"
    _write(istio, VS + "---" + GOOD_DR)
    _write(services, SERVICES)
    source, store = _source(tmp_path)
    source.scan()
    generation, svc = store.generation, store.services["shop/web"]
    _write(services, SERVICES)  # rewritten, same content
    assert source.scan() is True and store.generation == generation
    _write(
        istio,
        VS.replace("weight: 100", "weight: 100  # all\n      headers: null") + "---" + GOOD_DR,
    )
    source.scan()
    assert store.generation == generation  # a comment and a null (unset) field change nothing
    _write(istio, VS.replace("host: web}", "host: web, subset: v1}") + "---" + GOOD_DR)
    source.scan()
    assert store.generation == generation + 1
    assert store.istio["VirtualService/shop/web"].spec["http"][0]["route"][0]["destination"] == {
        "host": "web",
        "subset": "v1",
    }
    _write(istio, GOOD_DR)
    source.scan()
    assert store.generation == generation + 2 and list(store.istio) == ["DestinationRule/shop/web"]
    assert store.services["shop/web"] is svc  # never re-put
    services.unlink()
    source.scan()
    assert store.services == {} and store.endpoint_slices == {} and store.service_accounts == {}


def test_bookinfo_loads_without_errors(tmp_path: Path) -> None:
    shutil.copytree(istio_data("bookinfo/platform"), tmp_path / "platform")
    shutil.copytree(istio_data("bookinfo/networking"), tmp_path / "networking")
    shutil.copytree(istio_data("samples"), tmp_path / "samples")
    source, store = _source(tmp_path)
    source.scan()
    assert source.errors == {}
    assert {"default/productpage", "default/reviews", "default/httpbin", "default/sleep"} <= set(
        store.services
    )
    assert store.services["default/productpage"].ports == (ServicePort(9080, "http"),)
    assert "default/bookinfo-productpage" in store.service_accounts
    assert {"VirtualService", "DestinationRule", "Gateway", "ServiceEntry"} == {
        r.kind for r in store.istio.values()
    }


# -- the mesh config file ------------------------------------------------------------------------


def test_the_mesh_config_is_read_and_re_read(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"  # inside the resource directory: not read as resources
    _write(
        mesh,
        "trustDomain: example.org\nrootNamespace: mesh-system\nclusterDomain: c.local\n"
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    )
    source, store = _source(tmp_path, mesh)
    assert source.scan() is True
    assert source.errors == {}
    assert store.mesh_config == MeshConfig("example.org", "mesh-system", REGISTRY_ONLY, "c.local")
    generation = store.generation
    assert source.scan() is False and store.generation == generation
    _write(mesh, "trustDomain: example.org\n")
    source.scan()
    assert store.mesh_config == MeshConfig(trust_domain="example.org")


def test_a_broken_mesh_config_keeps_the_last_good_one(tmp_path: Path) -> None:
    mesh = tmp_path / "config" / "mesh.yaml"
    mesh.parent.mkdir()
    _write(mesh, "trustDomain: example.org\n")
    source, store = _source(tmp_path / "resources", mesh)
    source.scan()
    good = store.mesh_config
    _write(mesh, "trustDomain: example.org\nouboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    source.scan()
    assert store.mesh_config == good
    assert source.errors[mesh] == [
        f'{mesh}: unknown field "ouboundTrafficPolicy" (known: trustDomain, rootNamespace, '
        "outboundTrafficPolicy, clusterDomain, localityLbSetting, defaultConfig, "
        "extensionProviders, accessLogFile, accessLogEncoding, accessLogFormat, defaultProviders, "
        "enableTracing)"
    ]
    _write(mesh, "outboundTrafficPolicy: {mode: DENY}\nrootNamespace: Mesh_System\n")
    source.scan()
    assert source.errors[mesh] == [
        f'{mesh}: rootNamespace: invalid value "Mesh_System"',
        f'{mesh}: outboundTrafficPolicy.mode: unsupported value "DENY"; one of ALLOW_ANY, '
        "REGISTRY_ONLY",
    ]
    _write(mesh, "trustDomain: [unclosed\n")
    source.scan()
    assert "cannot be read as YAML" in source.errors[mesh][0]
    mesh.unlink()
    source.scan()
    assert source.errors[mesh] == [f"{mesh}: does not exist"] and store.mesh_config == good
    _write(mesh, "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    source.scan()
    assert mesh not in source.errors
    assert store.mesh_config == MeshConfig(outbound_traffic_policy=REGISTRY_ONLY)
