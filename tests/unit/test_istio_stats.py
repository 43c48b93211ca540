"""Istio's standard metrics: workload names, the stats loggers' labels (translate/istio_stats.py).

Istio's reference: istio.io/latest/docs/reference/config/metrics/ (metric names and labels);
workload names as Istio's injector derives them from owner references (istio/istio
pkg/kube/util.go GetDeployMetaFromPod); canonical service/revision labels
(istio.io/latest/docs/reference/config/labels/ ``service.istio.io/canonical-name``,
``service.istio.io/canonical-revision``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import yaml

from nodeagent.mesh.workload import Owner, canonical_revision, canonical_service, workload_name
from nodeagent.sources.directory import parse_document, parse_mesh_config
from nodeagent.translate import envoy as e
from nodeagent.translate import istio_stats, translate
from tests.unit.test_translate import as_json, local, store

RS = "ReplicaSet"


@pytest.mark.parametrize(
    ("name", "generate", "labels", "owners", "want"),
    [
        # A Deployment's pod: ReplicaSet <deployment>-<pod-template-hash>.
        ("web-7d4b9c-x2x", "web-7d4b9c-", {"pod-template-hash": "7d4b9c"}, [Owner(RS, "web-7d4b9c", True)], "web"),  # noqa: E501
        # The hash label does not end the ReplicaSet's name: the ReplicaSet is the workload.
        ("rs-abc-x", "rs-abc-", {"pod-template-hash": "zzz"}, [Owner(RS, "rs-abc", True)], "rs-abc"),  # noqa: E501
        # An Argo Rollout's.
        ("ro-5f-x", "ro-5f-", {"rollouts-pod-template-hash": "5f"}, [Owner(RS, "ro-5f", True)], "ro"),  # noqa: E501
        # A CronJob's Job: <cronjob>-<8 to 10 digits>.
        ("nightly-28000000-x", "nightly-28000000-", {}, [Owner("Job", "nightly-28000000", True)], "nightly"),  # noqa: E501
        ("once-x", "once-", {}, [Owner("Job", "once", True)], "once"),
        # OpenShift's DeploymentConfig.
        ("dc-1-x", "dc-1-", {"deploymentconfig": "dc"}, [Owner("ReplicationController", "dc-1", True)], "dc"),  # noqa: E501
        # A DaemonSet's pod: its controller.
        ("ds-x", "ds-", {}, [Owner("DaemonSet", "ds", True)], "ds"),
        # A StatefulSet's pod has no generated name: the pod itself.
        ("db-0", "", {}, [Owner("StatefulSet", "db", True)], "db-0"),
        # An owner that is not the controller does not count.
        ("p-x", "p-", {}, [Owner(RS, "p", False)], "p-x"),
        # A bare pod.
        ("bare", "", {}, [], "bare"),
    ],
)  # fmt: skip
def test_workload_names_follow_istio(
    name: str, generate: str, labels: dict[str, str], owners: list[Owner], want: str
) -> None:
    assert workload_name(name, generate, labels, owners) == want


def test_canonical_service_and_revision_labels_in_istios_order() -> None:
    assert canonical_service({"app": "a", "app.kubernetes.io/name": "k"}, "w") == "k"
    assert canonical_service({"service.istio.io/canonical-name": "c", "app": "a"}, "w") == "c"
    assert canonical_service({}, "w") == "w"
    assert canonical_revision({"version": "v1", "app.kubernetes.io/version": "2"}) == "2"
    assert canonical_revision({"service.istio.io/canonical-revision": "r"}) == "r"
    assert canonical_revision({}) == "latest"


def test_a_pod_object_names_its_deployment_as_its_workload() -> None:
    doc = """
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-5b8f9d-abcde
  generateName: reviews-v1-5b8f9d-
  namespace: default
  labels: {app: reviews, version: v1, pod-template-hash: 5b8f9d}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5b8f9d, uid: u, controller: true}
spec: {nodeName: n1}
"""
    (parsed,) = parse_document(yaml.safe_load(doc), "pod.yaml", 0)
    assert parsed.record.workload_name == "reviews-v1"  # type: ignore[union-attr]


def _tags(logger: dict[str, Any]) -> dict[str, str]:
    config = logger["typedConfig"]
    stat = (config.get("counters") or config["histograms"])[0]["stat"]
    return {t["name"]: t["valueFormat"] for t in stat["tags"]}


def _loggers(filt: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        log
        for log in filt["typedConfig"]["accessLog"]
        if log["name"] == "envoy.access_loggers.stats"
    ]


def test_source_reporter_in_every_outbound_internal_chain() -> None:
    out = translate(store(), [local("a", labels={"app": "web", "version": "v1"})])
    listener = as_json(out[e.LISTENER]["outbound-internal"])
    chains = [*listener["filterChains"], listener["defaultFilterChain"]]
    for chain in chains:
        (last,) = [f for f in chain["filters"] if "typedConfig" in f][-1:]
        loggers = _loggers(last)
        assert loggers, chain["name"]
        tags = _tags(loggers[0])
        assert tags["reporter"] == "source"
        assert tags["source_workload"] == "%FILTER_STATE(io.nodeagent.peer.workload:PLAIN)%"
        assert tags["destination_workload"] == "%METADATA(UPSTREAM_HOST:istio:workload)%"
        assert tags["connection_security_policy"] == "unknown"
        # Bounded labels: nothing per request but codes and flags.
        assert not any("ADDRESS" in v or "PATH" in v for v in tags.values()), tags


def test_destination_reporter_names_the_pod_and_its_callers_per_path() -> None:
    pod = local("web", labels={"app": "web", "version": "v1"})
    out = translate(store(), [pod])
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web"])
    fast = as_json(out[e.LISTENER]["inboundInternal/shop/web"])
    seen = set()
    for listener, path in ((inbound, "inbound"), (fast, "fast")):
        for chain in listener["filterChains"]:
            for filt in chain["filters"]:
                for logger in _loggers(filt) if "accessLog" in filt.get("typedConfig", {}) else []:
                    tags = _tags(logger)
                    assert tags["reporter"] == "destination"
                    assert tags["destination_workload"] == "web"
                    assert tags["destination_app"] == "web"
                    assert tags["destination_version"] == "v1"
                    security = tags["connection_security_policy"]
                    seen.add((path, chain["name"], security))
                    if chain["name"].endswith("-mtls") or path == "fast":
                        assert security == "mutual_tls"
                    else:
                        assert security == "none"
                        assert tags["source_workload"] == "unknown"
    assert any(p == "fast" for p, _, _ in seen) and any(s == "none" for *_, s in seen), seen


def test_mtls_chains_take_the_callers_side_from_its_nodes_headers_first() -> None:
    out = translate(store(), [local("web", labels={"app": "web"})])
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web"])
    for chain in inbound["filterChains"]:
        for filt in chain["filters"]:
            if not filt["name"].endswith("http_connection_manager"):
                continue
            names = [f["name"] for f in filt["typedConfig"]["httpFilters"]]
            # First: a request RBAC denies is still counted with its caller.
            assert (names[0] == istio_stats.PEER_FILTER) == chain["name"].endswith("-mtls")
    routes = out[e.ROUTE]
    outbound = [as_json(r) for name, r in routes.items() if name.startswith("outbound|")]
    assert outbound
    for table in outbound:
        added = {h["header"]["key"] for h in table.get("requestHeadersToAdd", [])}
        assert set(istio_stats.PEER_HEADERS.values()) <= added, table["name"]
    inbound_routes = [as_json(r) for name, r in routes.items() if name.startswith("inbound|")]
    for table in inbound_routes:
        assert set(istio_stats.PEER_HEADERS.values()) <= set(table["requestHeadersToRemove"])


def _all_stats_loggers(out: dict[str, Any]) -> int:
    text = json.dumps([as_json(r) for r in out[e.LISTENER].values()])
    return text.count('"envoy.access_loggers.stats"')


def test_default_providers_metrics_turns_them_on_and_off_as_istio() -> None:
    """MeshConfig ``defaultProviders.metrics`` (istio.io/latest/docs/reference/config/
    istio.mesh.v1alpha1/#MeshConfig-DefaultProviders): Istio's default mesh config names
    ``prometheus``; ``[]`` reports nothing; setting another field keeps the default."""
    pod = [local("web", labels={"app": "web"})]
    assert _all_stats_loggers(translate(store(), pod)) > 0
    off = parse_mesh_config({"defaultProviders": {"metrics": []}})
    assert _all_stats_loggers(translate(store(**_fields(off)), pod)) == 0
    kept = parse_mesh_config({"defaultProviders": {"accessLogging": ["envoy"]}})
    assert kept.default_providers.metrics == ("prometheus",)


def _fields(mesh: Any) -> dict[str, Any]:
    return {f.name: getattr(mesh, f.name) for f in dataclasses.fields(mesh)}
