"""The ingress and egress gateways as a user applies them (`kubectl apply -k daemonset/gateways/`,
rendered by the pinned kubectl): valid objects, arguments the real CLI accepts, least privilege
(the mesh read-only, Secrets only in the gateways' namespace, the control plane's two ConfigMaps
by name), and a Service that reaches the pod's ports.

Istio is the reference: its gateway charts (istio-ingressgateway / istio-egressgateway in
istio-system, labels istio=ingressgateway, service accounts
istio-<kind>gateway-service-account, Service 80/443 to the pod's 8080/8443, uid 1337).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
from kube_render import render
from kube_schemas import K8S_VERSIONS, assert_valid

from nodeagent.cli import cli
from nodeagent.gateway.mirror import MESH_CONFIGMAP, ROOT_CONFIGMAP

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS_DIR = ROOT / "daemonset" / "gateways"
KINDS = ("ingress", "egress")
READS = {"get", "list", "watch"}


def _docs() -> list[dict[str, Any]]:
    return render(GATEWAYS_DIR)


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _container(gateway: str) -> dict[str, Any]:
    deployment = _one("Deployment", f"istio-{gateway}gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_strictly(version: str) -> None:
    for doc in _docs():
        assert_valid(f"daemonset/gateways {doc['kind']}", doc, version)


@pytest.mark.parametrize("gateway", KINDS)
def test_gateway_arguments_are_accepted_by_the_real_cli(
    gateway: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = _one("Deployment", f"istio-{gateway}gateway")
    container = _container(gateway)
    env = {"POD_NAME": "p", "POD_NAMESPACE": "istio-system", "NODE_NAME": "n"}
    for key, value in env.items():  # the downward API's, as the kubelet sets them
        monkeypatch.setenv(key, value)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    name, *rest = args
    group = click.Context(cli, info_name="nodeagent")
    command = cli.get_command(group, name)
    assert command is not None
    ctx = command.make_context(name, rest, parent=group)
    # Its selector is its pod's labels: the Gateways selecting it are its own.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert ctx.params["labels"].items() <= labels.items()
    assert ctx.params["labels"]["istio"] == f"{gateway}gateway"
    assert ctx.params["in_cluster"] and ctx.params["control_plane_namespace"] == "nodeagent-system"
    assert (ctx.params["namespace"], ctx.params["pod_name"]) == ("istio-system", "p")
    # POD_NAME, POD_NAMESPACE and SERVICE_ACCOUNT come from the downward API.
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert fields["POD_NAMESPACE"] == "metadata.namespace"
    assert fields["SERVICE_ACCOUNT"] == "spec.serviceAccountName"
    # Not captured: outside the mesh whatever its namespace says.
    assert labels["nodeagent.io/mesh"] == "disabled"


@pytest.mark.parametrize("gateway", KINDS)
def test_gateway_runs_unprivileged_with_its_own_ca_token(gateway: str) -> None:
    pod = _one("Deployment", f"istio-{gateway}gateway")["spec"]["template"]["spec"]
    container = _container(gateway)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    token = next(v for v in pod["volumes"] if v["name"] == "istio-token")
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "istio-ca"
    assert pod["serviceAccountName"] == f"istio-{gateway}gateway-service-account"
    _one("ServiceAccount", pod["serviceAccountName"])


@pytest.mark.parametrize("gateway", KINDS)
def test_the_service_reaches_the_gateway_pods_ports(gateway: str) -> None:
    service = _one("Service", f"istio-{gateway}gateway")
    deployment = _one("Deployment", f"istio-{gateway}gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["containerPort"] for p in _container(gateway)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert {p["port"] for p in service["spec"]["ports"]} == {80, 443}


def _rules(kind: str, name: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = _one(kind, name)["rules"]
    return rules


def test_rbac_reads_the_mesh_and_only_its_own_namespaces_secrets() -> None:
    for rule in _rules("ClusterRole", "nodeagent-gateway"):
        assert set(rule["verbs"]) <= READS
        assert "secrets" not in rule["resources"]
    (secrets,) = _rules("Role", "nodeagent-gateway-secrets")
    assert secrets["resources"] == ["secrets"] and set(secrets["verbs"]) <= READS
    assert _one("Role", "nodeagent-gateway-secrets")["metadata"]["namespace"] == "istio-system"
    (config,) = _rules("Role", "nodeagent-gateway-config")
    assert config == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [MESH_CONFIGMAP, ROOT_CONFIGMAP],
        "verbs": ["get"],
    }
    role = _one("Role", "nodeagent-gateway-config")
    assert role["metadata"]["namespace"] == "nodeagent-system"
    # Every binding names the gateways' service accounts, which exist.
    accounts = {d["metadata"]["name"] for d in _docs() if d["kind"] == "ServiceAccount"}
    for doc in _docs():
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            names = {s["name"] for s in doc["subjects"]}
            assert names == accounts
            assert {s["namespace"] for s in doc["subjects"]} == {"istio-system"}
