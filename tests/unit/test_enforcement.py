"""What is accepted but not enforced is said, once per resource (issue #12, defect 10).

Accepted means schema-valid (Istio's CRDs); enforced means the field changes Envoy's config. Today
that is PeerAuthentication and DestinationRule TLS mode DISABLE/ISTIO_MUTUAL (whole rule or per
port): https://istio.io/latest/docs/reference/config/networking/destination-rule/ lists the rest
(subsets, loadBalancer, connectionPool, outlierDetection, TLS but credentialName, ...)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from istio_data import istio_data
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.mesh.enforcement import (
    METRIC,
    PLANNED,
    NotEnforcedCollector,
    not_enforced,
    report,
)
from nodeagent.mesh.model import IstioResource
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource


def _dr(spec: dict[str, object]) -> IstioResource:
    return IstioResource("networking.istio.io", "v1", "DestinationRule", "shop", "web", spec)


def test_enforced_destination_rule_tls_modes_are_not_reported() -> None:
    for mode in ("DISABLE", "ISTIO_MUTUAL"):
        spec = {
            "host": "web",
            "exportTo": ["."],
            "trafficPolicy": {
                "tls": {"mode": mode},
                "portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": mode}}],
            },
        }
        assert not_enforced(_dr(spec)) is None
    pa = IstioResource(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "shop",
        "strict",
        {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}},
    )
    assert not_enforced(pa) is None


def test_ignored_destination_rule_fields_are_named() -> None:
    spec = {
        "host": "web",
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        "trafficPolicy": {
            # SIMPLE/MUTUAL with files, sni, SANs, credentialName (Istio reads it at sidecars
            # only in rules with a workloadSelector, and ignores it elsewhere, as the node does):
            # enforced.
            "tls": {"mode": "SIMPLE", "sni": "web.example", "credentialName": "web-ca"},
            "loadBalancer": {
                "simple": "LEAST_REQUEST",
                # a caller pod's own label: the node's shared endpoints cannot rank by it
                "localityLbSetting": {"failoverPriority": ["topology.kubernetes.io/zone", "app"]},
            },
            "portLevelSettings": [
                {
                    "port": {"number": 80},
                    "tls": {"mode": "MUTUAL", "clientCertificate": "/c", "privateKey": "/k"},
                    "outlierDetection": {},
                }
            ],
        },
    }
    found = not_enforced(_dr(spec))
    assert found is not None and found.planned.startswith("#15")
    assert found.fields == ("trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[1]=app",)
    # PASSTHROUGH, for the rule, a port or a subset: enforced (translate/passthrough.py).
    passthrough = {"loadBalancer": {"simple": "PASSTHROUGH"}}
    spec = {
        "host": "web",
        "trafficPolicy": {
            **passthrough,
            "portLevelSettings": [{"port": {"number": 80}, **passthrough}],
        },
        "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": passthrough}],
    }
    assert not_enforced(_dr(spec)) is None
    # A rule with a workloadSelector applies to the pods it selects (mesh/policy.py).
    selected = {"host": "web", "workloadSelector": {"matchLabels": {"a": "b"}}}
    assert not_enforced(_dr(selected)) is None


def test_istios_bookinfo_samples_are_reported_kind_by_kind(tmp_path: Path) -> None:
    shutil.copytree(istio_data("bookinfo/networking"), tmp_path / "networking")
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    source.scan()
    assert source.errors == {}
    items = {(n.kind, n.name): n for n in report(store.istio.values())}
    assert {kind for kind, _ in items} == set()
    # Every VirtualService and DestinationRule of Bookinfo is enforced (#15), the ingress
    # Gateway and the VirtualService bound to it too (nodeagent gateway, #16).
    assert ("VirtualService", "reviews") not in items
    assert ("DestinationRule", "reviews") not in items
    assert ("VirtualService", "bookinfo") not in items
    assert ("Gateway", "bookinfo-gateway") not in items
    # The egress sample is enforced whole: its ServiceEntry (#16) and its TLS origination.
    assert ("DestinationRule", "originate-tls-for-googleapis") not in items
    assert ("ServiceEntry", "googleapis") not in items


def _entry(kind: str, spec: dict[str, object]) -> IstioResource:
    return IstioResource("networking.istio.io", "v1", kind, "shop", "ext", spec)


def test_service_entry_fields_enforced_and_not_yet() -> None:
    """Every ServiceEntry field takes effect (an endpoint's network and serviceAccount too,
    mesh/service_entries.py) but a MESH_INTERNAL endpoint's serviceAccount with resolution DNS,
    which is named with the reason (not yet)."""
    spec: dict[str, object] = {
        "hosts": ["api.example.com"],
        "addresses": ["240.0.0.1"],
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
        "location": "MESH_EXTERNAL",
        "resolution": "STATIC",
        "endpoints": [{"address": "10.0.0.1", "ports": {"http": 8080}, "labels": {"v": "1"}}],
        "subjectAltNames": ["api.example.com"],
        "exportTo": ["."],
    }
    assert not_enforced(_entry("ServiceEntry", spec)) is None
    vm = {"address": "10.0.0.1", "network": "n2", "weight": 3, "locality": "r2/z1"}
    vm["serviceAccount"] = "vm"
    internal = {**spec, "location": "MESH_INTERNAL", "endpoints": [vm]}
    assert not_enforced(_entry("ServiceEntry", internal)) is None
    by_name = {**internal, "resolution": "DNS", "endpoints": [{"address": "a.example"}, vm]}
    found = not_enforced(_entry("ServiceEntry", by_name))
    assert found is not None and found.fields == ("endpoints[1].serviceAccount",)
    assert found.planned.startswith("not yet")
    # MESH_EXTERNAL never sends mTLS, as Istio: nothing is left out there.
    assert not_enforced(_entry("ServiceEntry", {**by_name, "location": "MESH_EXTERNAL"})) is None
    we = {"address": "10.0.0.2", "serviceAccount": "vm", "network": "n2", "labels": {"a": "b"}}
    assert not_enforced(_entry("WorkloadEntry", we)) is None


def test_what_is_not_yet_says_why_not_an_issue_number() -> None:
    """The kinds #16 covers name the reason for what is left, not the issue."""
    for kind in ("ServiceEntry", "WorkloadEntry", "WorkloadGroup", "Sidecar", "Gateway"):
        assert PLANNED[kind].startswith("not yet: "), kind
        assert "#16" not in PLANNED[kind], kind
    group = not_enforced(_entry("WorkloadGroup", {"template": {"serviceAccount": "vm"}}))
    assert group is not None and group.fields == ("template",)
    assert "VM" in group.planned


def _write(path: Path, text: str) -> None:
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    hosts: ["%s.local"]
    tls: {mode: AUTO_PASSTHROUGH}
"""


def test_the_warning_comes_once_per_resource_and_change_and_the_metric_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MeshStore()
    source = DirectorySource(tmp_path, store)
    registry = CollectorRegistry()
    registry.register(NotEnforcedCollector(store.istio.values))
    caplog.set_level(logging.WARNING, logger="nodeagent.mesh.store")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not enforced" in r.getMessage()]

    _write(tmp_path / "gateway.yaml", GATEWAY % "*")
    source.scan()
    for i in range(3):  # other changes, each a push: no new warning
        _write(
            tmp_path / "other.yaml", f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: n{i}}}\n"
        )
        source.scan()
    assert warnings() == [
        "Gateway shop/edge is accepted but not enforced:"
        f" servers[0].tls.mode=AUTO_PASSTHROUGH ({PLANNED['Gateway']})"
    ]
    text = generate_latest(registry).decode()
    assert f'{METRIC}{{kind="Gateway"}} 1.0' in text
    assert f'{METRIC}{{kind="AuthorizationPolicy"}} 0.0' in text

    _write(tmp_path / "gateway.yaml", GATEWAY % "*.svc")  # a changed resource is reported again
    source.scan()
    assert len(warnings()) == 2
    (tmp_path / "gateway.yaml").unlink()
    source.scan()
    assert f'{METRIC}{{kind="Gateway"}} 0.0' in generate_latest(registry).decode()
