"""What a pod is as a workload, the way Istio names it in its metrics (pure).

Istio's standard metrics label each side of a request with its workload, not its pod
(istio.io/latest/docs/reference/config/metrics/: ``source_workload``, ``source_app``, ...). The
workload is the pod's controller, as Istio's injector derives it from the pod's owner references
(istio/istio pkg/kube/util.go ``GetDeployMetaFromPod``): a pod whose name was generated
(``metadata.generateName``) and which has a controlling owner reference is named after that
owner; a ReplicaSet whose name ends in the pod's ``pod-template-hash`` label is its Deployment
(the hash trimmed), an Argo Rollout's likewise; an OpenShift ReplicationController its
``deploymentconfig`` label; a Job named ``<name>-<8 to 10 digits>`` its CronJob. Anything else
(a bare pod, a StatefulSet's pod: its name is not generated) is named by the pod itself.

Canonical service and revision, which Kiali groups by, follow Istio's labels
(istio.io/latest/docs/ops/configuration/telemetry/monitoring-multicluster-prometheus/ and
pkg/model/labels: ``service.istio.io/canonical-name`` then ``app.kubernetes.io/name`` then ``app``,
else the workload; ``service.istio.io/canonical-revision`` then ``app.kubernetes.io/version`` then
``version``, else ``latest``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UNKNOWN = "unknown"  # what Istio reports for a value it does not know
LATEST = "latest"  # Istio's canonical revision when no label gives one
_CRON_JOB = re.compile(r"(.+)-\d{8,10}$")


@dataclass(frozen=True)
class Owner:
    """One entry of a pod's ``metadata.ownerReferences``."""

    kind: str
    name: str
    controller: bool = False


def workload_name(
    pod_name: str, generate_name: str, labels: Mapping[str, str], owners: Sequence[Owner]
) -> str:
    """The workload a pod belongs to (module docstring)."""
    if not generate_name:
        return pod_name
    owner = next((o for o in owners if o.controller), None)
    if owner is None or not owner.name:
        return pod_name
    for hash_label in ("pod-template-hash", "rollouts-pod-template-hash"):
        digest = labels.get(hash_label, "")
        if owner.kind == "ReplicaSet" and digest and owner.name.endswith(digest):
            return owner.name.removesuffix(f"-{digest}")
    if owner.kind == "ReplicationController" and labels.get("deploymentconfig"):
        return labels["deploymentconfig"]
    if owner.kind == "Job" and (cron := _CRON_JOB.match(owner.name)):
        return cron.group(1)
    return owner.name


def canonical_service(labels: Mapping[str, str], workload: str) -> str:
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return workload


def canonical_revision(labels: Mapping[str, str]) -> str:
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return LATEST


@dataclass(frozen=True)
class Peer:
    """One side of a request as Istio's metrics label it (``source_*`` or ``destination_*``)."""

    workload: str
    namespace: str
    principal: str
    app: str
    version: str
    canonical_service: str
    canonical_revision: str
    cluster: str

    def fields(self) -> dict[str, str]:
        return {
            "workload": self.workload,
            "namespace": self.namespace,
            "principal": self.principal,
            "app": self.app,
            "version": self.version,
            "canonical_service": self.canonical_service,
            "canonical_revision": self.canonical_revision,
            "cluster": self.cluster,
        }


def peer(
    namespace: str, workload: str, labels: Mapping[str, str], principal: str, cluster: str
) -> Peer:
    """A pod of WORKLOAD in NAMESPACE, its LABELS, its SPIFFE ID PRINCIPAL ("" if it has
    none) in the Kubernetes cluster CLUSTER. ``app``/``version``: Istio's ``app`` and
    ``version`` labels (istio.io/latest/docs/ops/deployment/application-requirements/),
    ``unknown`` without them."""
    return Peer(
        workload=workload,
        namespace=namespace,
        principal=principal or UNKNOWN,
        app=labels.get("app") or UNKNOWN,
        version=labels.get("version") or UNKNOWN,
        canonical_service=canonical_service(labels, workload),
        canonical_revision=canonical_revision(labels),
        cluster=cluster,
    )
