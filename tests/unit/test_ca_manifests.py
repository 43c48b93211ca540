"""The CA service beside the DaemonSet, as a user applies it (`kubectl apply -k daemonset/`,
rendered here by the pinned kubectl): the Deployment runs `nodeagent ca` with least privilege, the
node agents reach it by its Service and trust its published root, and no node holds a signing key
or may read one.

Istio is the reference: istiod's Deployment (replicaCount 1, :15012 CA, :15014 monitoring), the
istio-token projected volume (audience istio-ca, expirationSeconds 43200) and istio-ca-root-cert
mounted at /var/run/secrets/istio in every sidecar, ztunnel's node authorization
(CA_TRUSTED_NODE_ACCOUNTS), the plug-in CA Secret `cacerts`
(https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
from apiserver_standin import APIServerStandIn
from ca_client import create_certificate, make_csr
from kube_render import MIN_VERSION, client_version, render
from kube_schemas import K8S_VERSIONS, assert_valid

from nodeagent.agent import AgentConfig, _issuer
from nodeagent.caservice import config as ca_config
from nodeagent.caservice.config import CAConfig
from nodeagent.caservice.keystore import PLUGIN_SECRET, SELF_SIGNED_SECRET
from nodeagent.caservice.rootcert import ROOT_CONFIGMAP
from nodeagent.caservice.server import CAServer
from nodeagent.cli import cli
from nodeagent.cli.options import check_ca_options
from nodeagent.identity.ca import ROOT_CERT, plugin_cacerts
from nodeagent.identity.protocol import DEFAULT_PORT
from nodeagent.identity.remote import RemoteCA
from nodeagent.mesh.secret_access import username
from nodeagent.testbed import rbac

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET_DIR = ROOT / "daemonset"
NAMESPACE = "nodeagent-system"
NODE_ENV = {"NODE_NAME": "node-1", "HOST_IP": "10.0.0.5"}
READS = ("get", "list", "watch")
WRITES = ("create", "update", "patch", "delete", "deletecollection")


# -- the rendered manifests ------------------------------------------------------------------


def _docs() -> list[dict[str, Any]]:
    return render(DAEMONSET_DIR)


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _ca_deployment() -> dict[str, Any]:
    return _one("Deployment", ca_config.SERVICE_NAME)


def _daemonset() -> dict[str, Any]:
    return _one("DaemonSet", "nodeagent")


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in _pod(workload)["containers"] if c["name"] == name]
    return found


def _volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _pod(workload).get("volumes", [])}


def _volume_of(workload: dict[str, Any], container: str, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) under which PATH lies in CONTAINER."""
    for mount in _container(workload, container).get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return mount, _volumes(workload)[mount["name"]]
    raise AssertionError(f"{path} is on no volume of container {container}")


def _mounted(workload: dict[str, Any], container: str, root: Path) -> dict[str, Path]:
    """Materializes CONTAINER's ConfigMap and token volumes under ROOT, as the kubelet would
    mount them (ConfigMaps of these manifests with their data; the CA's root ConfigMap, which
    only the running CA publishes, with a fresh root; a placeholder token): mountPath -> local
    directory."""
    config_maps = {d["metadata"]["name"]: d for d in _docs() if d["kind"] == "ConfigMap"}
    root_pem = plugin_cacerts("cluster.local")[ROOT_CERT].decode()
    config_maps.setdefault(ROOT_CONFIGMAP, {"data": {ROOT_CERT: root_pem}})
    out = {}
    for mount in _container(workload, container).get("volumeMounts", []):
        volume = _volumes(workload)[mount["name"]]
        local = root / mount["mountPath"].lstrip("/")
        files: dict[str, str] = {}
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            assert name in config_maps, f"{container} mounts ConfigMap {name}: nobody makes it"
            data = config_maps[name]["data"]
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            files = {item["path"]: data[item["key"]] for item in items}
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                files[source["serviceAccountToken"]["path"]] = "a-token"
        else:
            continue
        for name, text in files.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_text(text)
        out[mount["mountPath"]] = local
    return out


def _parse(workload: dict[str, Any], container: str, root: Path) -> click.Context:
    """CONTAINER's args through the real CLI (without running it): $(VAR)s expanded from the
    downward API as the kubelet would, paths on its ConfigMap/token volumes mapped to ROOT."""
    spec = _container(workload, container)
    env = {**NODE_ENV, "POD_NAMESPACE": workload["metadata"]["namespace"]}
    declared = {e["name"] for e in spec.get("env", [])}
    args = []
    for arg in spec["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in declared, f"{container}: $({var}) is not in its env"
        args.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    for mount_path, local in _mounted(workload, container, root).items():
        args = [
            str(local) + a[len(mount_path) :] if a.startswith(mount_path + "/") else a for a in args
        ]
    name, *rest = args
    group = click.Context(cli, info_name="nodeagent")
    command = cli.get_command(group, name)
    assert command is not None, f"no subcommand {name!r}"
    return command.make_context(name, rest, parent=group)


def _container_path(ctx: click.Context, param: str, root: Path) -> str:
    """A path option's value as the container sees it (undoing _parse's mapping)."""
    return "/" + str(Path(ctx.params[param]).relative_to(root))


def test_the_pinned_kubectl_renders_the_kustomization() -> None:
    assert client_version() >= MIN_VERSION
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in _docs())
    assert kinds == sorted(
        [
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "nodeagent"),
            ("ServiceAccount", "nodeagent-ca"),
            ("ClusterRole", "nodeagent"),
            ("ClusterRole", "nodeagent-ca"),
            ("ClusterRole", "nodeagent-credentials"),  # bound per namespace by the operator
            ("ClusterRoleBinding", "nodeagent"),
            ("ClusterRoleBinding", "nodeagent-ca"),
            ("Role", "nodeagent-daemonset-reader"),
            ("Role", "nodeagent-ca"),
            ("RoleBinding", "nodeagent-daemonset-reader"),
            ("RoleBinding", "nodeagent-ca"),
            ("ConfigMap", "nodeagent-mesh"),
            ("Service", "nodeagent-ca"),
            ("Deployment", "nodeagent-ca"),
            ("DaemonSet", "nodeagent"),
        ]
    )
    for doc in _docs():
        # The kustomization's `labels:` (what Debian's kubectl 1.20 could not render).
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nodeagent", doc["kind"]
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_strictly(version: str) -> None:
    for doc in _docs():
        assert_valid(f"rendered {doc['kind']} {doc['metadata']['name']}", doc, version)


# -- no signing key on any node --------------------------------------------------------------


def _node_workloads() -> list[dict[str, Any]]:
    found = [d for d in _docs() if d["kind"] == "DaemonSet"]
    assert found
    return found


def test_no_node_workload_mounts_or_reads_a_secret() -> None:
    for ds in _node_workloads():
        pod = _pod(ds)
        where = f"DaemonSet {ds['metadata']['name']}"
        for volume in pod.get("volumes", []):
            assert "secret" not in volume, f"{where} mounts Secret volume {volume['name']}"
            for source in volume.get("projected", {}).get("sources", []):
                assert "secret" not in source, f"{where}: Secret in volume {volume['name']}"
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), (where, env["name"])
            for source in container.get("envFrom", []):
                assert "secretRef" not in source, (where, container["name"])
            # Neither Istio's plug-in CA files nor a CA directory are passed or mounted.
            text = " ".join(container.get("args", []) + container.get("command", []))
            assert "--ca-dir" not in text, (where, container["name"])
            for mount in container.get("volumeMounts", []):
                assert "cacerts" not in mount["mountPath"], (where, mount)
            assert not re.search(r"cacerts|ca-key\.pem", text), (where, container["name"])
        for volume in pod.get("volumes", []):
            host = volume.get("hostPath", {}).get("path", "")
            assert "cacerts" not in host and not host.endswith("/ca"), (where, host)


def test_the_agent_asks_the_ca_service_and_keeps_no_ca_of_its_own(tmp_path: Path) -> None:
    ctx = _parse(_daemonset(), "agent", tmp_path)
    params = ctx.params
    assert params["ca_dir"] is None  # no plug-in CA files on the node
    # --ca-address is what keeps the agent from its built-in CA under --state-dir.
    host, port = ca_config.host_port(params["ca_address"], "--ca-address")
    service = _one("Service", ca_config.SERVICE_NAME)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc-ca"]
    assert port == grpc_port["port"]
    # The name the agent checks in the CA's TLS certificate is one the CA puts there.
    ca = _parse(_ca_deployment(), "ca", tmp_path / "ca").params
    names = ca["server_names"] or ca_config.default_server_names(ca["namespace"])
    assert params["ca_server_name"] in names
    assert host in names
    # Istio's workload certificate lifetime.
    assert params["cert_ttl"] == ca_config.DEFAULT_CERT_TTL


def test_the_agent_so_configured_uses_the_ca_service_and_creates_no_ca(tmp_path: Path) -> None:
    """The agent's own choice of issuer, from the DaemonSet's arguments, on a fresh node: the CA
    service; nothing written under the state dir (where the built-in CA would keep its key)."""
    params = _parse(_daemonset(), "agent", tmp_path).params
    check_ca_options(
        params["ca_dir"], params["ca_address"], params["ca_root_file"], params["ca_token_file"]
    )
    state_dir = tmp_path / "var/lib/nodeagent"
    state_dir.mkdir(parents=True)
    config = AgentConfig(
        node_name="node-1",
        state_dir=state_dir,
        ca_dir=params["ca_dir"],
        ca_address=params["ca_address"],
        ca_root_file=params["ca_root_file"],
        ca_token_file=params["ca_token_file"],
        ca_server_name=params["ca_server_name"],
    )

    async def choose() -> object:
        issuer = await asyncio.wait_for(_issuer(config, "cluster.local", asyncio.Event()), 10)
        if isinstance(issuer, RemoteCA):
            await issuer.close()
        return issuer

    assert isinstance(asyncio.run(choose()), RemoteCA)
    assert list(state_dir.iterdir()) == []


def test_the_service_reaches_the_ca_pods_ports(tmp_path: Path) -> None:
    service, deployment = _one("Service", ca_config.SERVICE_NAME), _ca_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # ...and nothing else: not the node agents' pods.
    assert (
        not service["spec"]["selector"].items()
        <= _daemonset()["spec"]["template"]["metadata"]["labels"].items()
    )
    container = _container(deployment, "ca")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    params = _parse(deployment, "ca", tmp_path).params
    listen = ca_config.host_port(params["listen"], "--listen")
    monitoring = ca_config.host_port(params["monitoring"], "--monitoring")
    assert ports == {"grpc-ca": listen[1], "http-monitoring": monitoring[1]}
    assert listen[0] == monitoring[0] == "0.0.0.0"  # reachable through the pod IP
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, port
        assert port["port"] == ports[port["targetPort"]]
    assert {p["port"] for p in service["spec"]["ports"]} == {
        DEFAULT_PORT,
        ca_config.MONITORING_PORT,
    }


def test_the_token_volume_is_for_the_cas_audience(tmp_path: Path) -> None:
    ds = _daemonset()
    ctx = _parse(ds, "agent", tmp_path)
    token_file = _container_path(ctx, "ca_token_file", tmp_path)
    mount, volume = _volume_of(ds, "agent", token_file)
    assert mount.get("readOnly") is True
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert PurePosixPath(token_file) == PurePosixPath(mount["mountPath"]) / token["path"]
    ca = _parse(_ca_deployment(), "ca", tmp_path / "ca").params
    assert token["audience"] == ca["token_audience"] == "istio-ca"
    # Short-lived (Istio's istio-token: 12h); the API server's minimum is 10 minutes.
    assert 600 <= token["expirationSeconds"] <= 43200
    # The token is the DaemonSet's ServiceAccount's, the one account the CA trusts to ask for
    # other identities (of pods on its node).
    trusted = {ca_config.node_account(a) for a in ca["node_accounts"]}
    assert trusted == {(ds["metadata"]["namespace"], _pod(ds)["serviceAccountName"])}


def test_the_root_volume_is_the_configmap_the_ca_publishes(tmp_path: Path) -> None:
    ds = _daemonset()
    ctx = _parse(ds, "agent", tmp_path)
    root_file = _container_path(ctx, "ca_root_file", tmp_path)
    mount, volume = _volume_of(ds, "agent", root_file)
    assert mount.get("readOnly") is True
    config_map = volume["configMap"]
    assert config_map["name"] == ROOT_CONFIGMAP
    # Not optional: the agent does not start without the mesh's root of trust.
    assert config_map.get("optional") is not True
    assert config_map["items"] == [{"key": ROOT_CERT, "path": PurePosixPath(root_file).name}]
    # Published by the CA in its own namespace, which is the DaemonSet's.
    ca = _parse(_ca_deployment(), "ca", tmp_path / "ca").params
    assert ca["namespace"] == ds["metadata"]["namespace"]
    # Not shipped by kustomize: an apply would overwrite what the CA published.
    assert ROOT_CONFIGMAP not in {
        d["metadata"]["name"] for d in _docs() if d["kind"] == "ConfigMap"
    }


def test_ca_deployment_arguments_are_accepted_by_the_real_cli(tmp_path: Path) -> None:
    deployment = _ca_deployment()
    container = _container(deployment, "ca")
    assert "command" not in container  # the image's ENTRYPOINT is `nodeagent`
    assert container["image"] == _container(_daemonset(), "agent")["image"]
    ctx = _parse(deployment, "ca", tmp_path)
    assert ctx.command.name == "ca"
    params = ctx.params
    assert params["in_cluster"] is True and params["kubeconfig"] is None
    assert params["namespace"] == NAMESPACE
    # The same trust domain as the node agents: both read the mesh ConfigMap's file.
    agent = _parse(_daemonset(), "agent", tmp_path / "agent")
    ca_mesh, _ = _volume_of(deployment, "ca", _container_path(ctx, "mesh_config", tmp_path))
    agent_mesh_file = _container_path(agent, "mesh_config", tmp_path / "agent")
    agent_mesh, _ = _volume_of(_daemonset(), "agent", agent_mesh_file)
    assert _volumes(deployment)[ca_mesh["name"]] == _volumes(_daemonset())[agent_mesh["name"]]
    assert ca_config.trust_domain_of(params["mesh_config"]) == "cluster.local"
    # Ready when it can sign (its /ready on the monitoring port); scraped there too.
    monitoring = ca_config.host_port(params["monitoring"], "--monitoring")[1]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": monitoring}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(monitoring),
        "prometheus.io/path": "/metrics",
    }


def test_ca_pod_runs_unprivileged() -> None:
    deployment = _ca_deployment()
    pod = _pod(deployment)
    assert pod["serviceAccountName"] == "nodeagent-ca"
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field), field
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    pod_security = pod.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True
    assert pod_security.get("runAsUser", 0) != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert not security.get("privileged")
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}
        assert "memory" in container["resources"]["limits"]
        for mount in container["volumeMounts"]:
            volume = _volumes(deployment)[mount["name"]]
            assert "configMap" in volume or "emptyDir" in volume, mount


def test_replicas_follow_istiod_and_a_budget_comes_with_more() -> None:
    deployment = _ca_deployment()
    replicas = deployment["spec"].get("replicas", 1)
    budgets = [d for d in _docs() if d["kind"] == "PodDisruptionBudget"]
    # istiod's chart: replicaCount 1. A budget of minAvailable 1 on one replica would block
    # every node drain, so one comes only with more replicas.
    assert replicas == 1
    assert not budgets
    rollout = deployment["spec"]["strategy"]
    # The new CA pod is ready before the old one goes.
    assert rollout["rollingUpdate"]["maxUnavailable"] in (0, "0%", "25%")


# -- RBAC ------------------------------------------------------------------------------------


RBAC_KINDS = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


def _refuse_what_cannot_be_told(docs: list[dict[str, Any]]) -> None:
    """Fails on a binding whose grant these manifests alone do not tell: to a role they do not
    define (cluster-admin, ...) or an aggregated ClusterRole (its rules are the cluster's), of a
    subject other than a ServiceAccount (a User or Group is anyone's), or of nonResourceURLs."""
    roles = {
        (d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] == "Role"
    }
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        meta, ref = binding["metadata"], binding["roleRef"]
        where = f"{binding['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")
        if ref["kind"] == "Role" and binding["kind"] == "RoleBinding":
            role = roles.get((meta.get("namespace"), ref["name"]))
        elif ref["kind"] == "ClusterRole":
            role = cluster_roles.get(ref["name"])
        else:
            raise AssertionError(f"{where}: roleRef kind {ref['kind']!r} is not allowed here")
        assert role is not None, (
            f"{where} binds {ref['kind']} {ref['name']}, which these manifests do not define:"
            " what it grants cannot be told"
        )
        assert not role.get("aggregationRule"), (
            f"{where}: {ref['kind']} {ref['name']} is aggregated"
        )
        for subject in binding.get("subjects") or []:
            assert subject["kind"] == "ServiceAccount", (
                f"{where}: subject {subject} is not a ServiceAccount"
            )
        for rule in role.get("rules") or []:
            assert not rule.get("nonResourceURLs"), (
                f"{where}: nonResourceURLs {rule['nonResourceURLs']}"
            )


def _grants() -> list[rbac.Grant]:
    """Every (subject, rule) the manifests' bindings make, by the stand-in API server's RBAC."""
    docs = _docs()
    _refuse_what_cannot_be_told(docs)
    objs = {kind: [d for d in docs if d["kind"] == kind] for kind in RBAC_KINDS}
    return rbac.grants(*(objs[kind] for kind in RBAC_KINDS))


def _ca_account() -> str:
    return username(NAMESPACE, _pod(_ca_deployment())["serviceAccountName"])


def _agent_account() -> str:
    return username(NAMESPACE, _pod(_daemonset())["serviceAccountName"])


def _request(
    user: str, verb: str, group: str, resource: str, namespace: str | None, name: str | None
) -> rbac.Request:
    """The authorizer's attributes of a request (namespace None: cluster-wide): a subresource
    after the "/"; no name for a create of a collection, which the API server does not know
    then, so resourceNames never allow it (kubernetes.io/docs/reference/access-authn-authz/rbac/
    "Referring to resources")."""
    resource, _, subresource = resource.partition("/")
    if verb == "create" and not subresource:
        name = None
    return rbac.Request(user, (), namespace or "", verb, group, resource, subresource, name or "")


def _allowed(
    all_grants: list[rbac.Grant],
    user: str,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None,
    name: str | None = None,
) -> list[str]:
    """The bindings and rules that let USER do it (empty: denied), for messages."""
    request = _request(user, verb, group, resource, namespace, name)
    return [f"{g.source}: {g.rule}" for g in rbac.allowing(request, all_grants)]


def _rule(grant: rbac.Grant, field: str) -> list[str]:
    values: list[str] = grant.rule.get(field) or []
    return values


def _secret_readers(
    all_grants: list[rbac.Grant],
) -> set[tuple[str, str | None, str, frozenset[str]]]:
    """(subject, namespace or None for every one, verb, names or {"*"}) of each grant that lets
    someone read Secrets."""
    out = set()
    for g in all_grants:
        names = _rule(g, "resourceNames")
        for verb in READS:
            probe = names[0] if names else None
            if g.allows(_request(g.subject, verb, "", "secrets", g.namespace, probe)):
                out.add((g.subject, g.namespace or None, verb, frozenset(names or ["*"])))
    return out


def test_only_the_ca_reads_secrets_and_only_its_own() -> None:
    readers = _secret_readers(_grants())
    assert readers == {
        (_ca_account(), NAMESPACE, "get", frozenset({PLUGIN_SECRET, SELF_SIGNED_SECRET}))
    }


@pytest.mark.parametrize("namespace", [NAMESPACE, "kube-system", "shop", None])
def test_the_node_agent_cannot_read_secrets_mint_or_review_tokens(namespace: str | None) -> None:
    g, agent = _grants(), _agent_account()
    denied: list[tuple[str, str, str, str | None]] = [
        (verb, "", "secrets", name)
        for verb in READS + WRITES
        for name in (None, PLUGIN_SECRET, SELF_SIGNED_SECRET)
    ]
    denied += [
        ("create", "authentication.k8s.io", "tokenreviews", None),
        # A token of another ServiceAccount (the CA's) would be its identity.
        ("create", "", "serviceaccounts/token", "nodeagent-ca"),
        ("impersonate", "", "serviceaccounts", "nodeagent-ca"),
        # Running a pod as the CA's ServiceAccount would be the same.
        ("create", "", "pods", None),
        ("create", "apps", "deployments", None),
        ("patch", "apps", "deployments", "nodeagent-ca"),
        ("create", "", "pods/exec", "nodeagent-ca-0"),
        # The root every agent trusts: only the CA writes it.
        *[(v, "", "configmaps", ROOT_CONFIGMAP) for v in WRITES],
        ("escalate", "rbac.authorization.k8s.io", "roles", None),
        ("bind", "rbac.authorization.k8s.io", "clusterroles", None),
    ]
    for verb, group, resource, name in denied:
        granted = _allowed(g, agent, verb, group, resource, namespace, name)
        assert not granted, f"{agent} may {verb} {group}/{resource} {name}: {granted}"
    # ...nor may anyone but the CA review tokens.
    reviewers = {
        x.subject
        for x in g
        if x.allows(
            _request(x.subject, "create", "authentication.k8s.io", "tokenreviews", None, None)
        )
    }
    assert reviewers == {_ca_account()}


def test_the_ca_cannot_become_another_workload_or_widen_its_access() -> None:
    g, ca = _grants(), _ca_account()
    for verb, group, resource, namespace, name in [
        ("list", "", "secrets", NAMESPACE, None),
        ("get", "", "secrets", "kube-system", PLUGIN_SECRET),
        ("update", "", "secrets", NAMESPACE, PLUGIN_SECRET),
        ("delete", "", "secrets", NAMESPACE, SELF_SIGNED_SECRET),
        ("create", "", "pods", NAMESPACE, None),
        ("patch", "", "pods", "shop", "cart-1"),
        ("create", "", "serviceaccounts/token", NAMESPACE, "nodeagent"),
        ("update", "", "configmaps", NAMESPACE, "nodeagent-mesh"),
        ("update", "", "configmaps", "shop", ROOT_CONFIGMAP),
        ("watch", "", "pods", None, None),
    ]:
        granted = _allowed(g, ca, verb, group, resource, namespace, name)
        assert not granted, (verb, resource, name, granted)


# The CA, run against the stand-in API server, makes exactly the requests its RBAC allows, and its
# RBAC allows no other kind of request.

_PATH = re.compile(
    r"^(?P<method>GET|LIST|POST|PUT) (?:/api/v1|/apis/(?P<group>[\w.]+)/v1)"
    r"(?:/namespaces/(?P<ns>[\w-]+))?/(?P<resource>\w+)(?:/(?P<name>[\w.-]+))?$"
)
_VERBS = {"GET": "get", "LIST": "list", "POST": "create", "PUT": "update"}


def _attributes(request: str) -> tuple[str, str, str, str | None, str | None]:
    """The authorizer's (verb, group, resource, namespace, name) of a stand-in request line."""
    match = _PATH.match(request)
    assert match, f"unexpected request {request!r}"
    return (
        _VERBS[match["method"]],
        match["group"] or "",
        match["resource"],
        match["ns"],
        match["name"],
    )


async def _ca_requests(tmp_path: Path, api: APIServerStandIn) -> list[str]:
    """Starts the CA against API, has a node agent ask for one of its pods' identities."""
    api.add(_pod_object(NAMESPACE, "nodeagent-a", "nodeagent", "node-a", "uid-a"))
    api.add(_pod_object("shop", "cart-1", "cart", "node-a", "uid-cart"))
    api.register_token("t", NAMESPACE, "nodeagent", "nodeagent-a", "uid-a", ["istio-ca"])
    await api.start()
    try:
        config = CAConfig(
            kubeconfig=api.write_kubeconfig(tmp_path / f"kubeconfig-{time.monotonic_ns()}"),
            namespace=NAMESPACE,
            listen=("127.0.0.1", 0),
            server_names=("127.0.0.1",),
            monitoring=None,
        )
        ca = CAServer(config)
        stop = asyncio.Event()
        await asyncio.wait_for(ca.start(stop), 20)
        try:
            identity = "spiffe://cluster.local/ns/shop/sa/cart"
            root = api.objects["/api/v1/configmaps"][(NAMESPACE, ROOT_CONFIGMAP)]["data"][ROOT_CERT]
            answer = await create_certificate(
                ca.port, root.encode(), make_csr([identity]), "t", impersonate=identity
            )
            assert answer.chain, answer.details
        finally:
            stop.set()
            await ca.stop()
    finally:
        await api.stop()
    return list(api.requests)


def _pod_object(ns: str, name: str, sa: str, node: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa},
    }


def _stale_root_and_cacerts() -> APIServerStandIn:
    """An API server with Istio's plug-in Secret and an outdated root ConfigMap (the CA then
    reads cacerts and updates the ConfigMap)."""
    api = APIServerStandIn()
    files = plugin_cacerts("cluster.local")
    api.add(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": NAMESPACE, "name": PLUGIN_SECRET},
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
        }
    )
    api.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"namespace": NAMESPACE, "name": ROOT_CONFIGMAP},
            "data": {ROOT_CERT: "an old root"},
        }
    )
    return api


Request = tuple[str, str, str, str | None, str | None]


def _observed_requests(tmp_path: Path) -> list[Request]:
    """What the CA asks the API server for: on a first start (creates its root Secret and the
    root ConfigMap) and with Istio's plug-in Secret and a stale ConfigMap (updates it); each
    time also authorizing one node agent's CSR."""
    fresh = asyncio.run(_ca_requests(tmp_path, APIServerStandIn()))
    plugged = asyncio.run(_ca_requests(tmp_path, _stale_root_and_cacerts()))
    return [_attributes(r) for r in fresh + plugged]


def test_the_cas_rbac_allows_every_request_it_makes_and_no_other_kind(tmp_path: Path) -> None:
    g, ca = _grants(), _ca_account()
    observed = _observed_requests(tmp_path)
    kinds = {(verb, group, resource) for verb, group, resource, _, _ in observed}
    # Both paths ran: created, read and updated.
    assert {("create", "", "secrets"), ("update", "", "configmaps")} <= kinds
    assert ("create", "authentication.k8s.io", "tokenreviews") in kinds
    for request in observed:
        assert _allowed(g, ca, *request), f"the CA's RBAC denies a request it makes: {request}"
    granted = {
        (verb, group, resource)
        for x in g
        if x.subject == ca
        for verb in _rule(x, "verbs")
        for group in _rule(x, "apiGroups")
        for resource in _rule(x, "resources")
    }
    assert granted == kinds, f"granted but never used: {sorted(granted - kinds)}"
    # Names, where RBAC can restrict them, are exactly the ones the CA uses.
    named = {(v, r, n) for v, _, r, _, n in observed if n is not None and r != "pods"}
    restricted = {
        (verb, resource, name)
        for x in g
        if x.subject == ca
        for verb in _rule(x, "verbs")
        for resource in _rule(x, "resources")
        for name in _rule(x, "resourceNames")
    }
    assert restricted == named
