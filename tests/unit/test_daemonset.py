"""The DaemonSet manifests (daemonset/): schema-valid, least privilege, and consistent with the
CLI, scripts/setup.sh and the CNI bundle location. Offline, no root."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from kube_render import render
from kube_schemas import K8S_VERSIONS, assert_valid

from nodeagent.cli import cli
from nodeagent.cni.bundle import IMAGE_BUNDLE
from nodeagent.dns.resolvconf import CONTAINERD_SANDBOXES, CRIO_CONTAINERS
from nodeagent.envoy.bootstrap import READY_PATH, bootstrap, bootstrap_path
from nodeagent.proxy import ProxySettings
from nodeagent.sources.directory import parse_mesh_config

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET_DIR = ROOT / "daemonset"
CONTAINERFILE = DAEMONSET_DIR / "Containerfile"
SETUP_SH = ROOT / "scripts" / "setup.sh"

READ_VERBS = {"get", "list", "watch"}


def _kustomization() -> dict[str, Any]:
    data = yaml.safe_load((DAEMONSET_DIR / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((DAEMONSET_DIR / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    return docs


def _one(kind: str, app: str = "nodeagent") -> dict[str, Any]:
    """The one object of KIND that belongs to APP (label app.kubernetes.io/name): the node
    agent's, by default; the CA service's objects are "nodeagent-ca" (test_ca_manifests.py)."""
    found = [
        doc
        for _, doc in _documents()
        if doc["kind"] == kind and doc["metadata"]["labels"]["app.kubernetes.io/name"] == app
    ]
    assert len(found) == 1, f"expected one {kind} of {app}, found {len(found)}"
    return found[0]


def _container(name: str) -> dict[str, Any]:
    containers = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    by_name = {c["name"]: c for c in containers}
    assert name in by_name, f"no container {name!r} (have {sorted(by_name)})"
    container: dict[str, Any] = by_name[name]
    return container


def _container_text(name: str) -> str:
    """The manifest's text of one container, comments included (up to the next one)."""
    text = (DAEMONSET_DIR / "daemonset.yaml").read_text()
    start = text.index(f"        - name: {name}\n")
    ends = (text.find("\n        - name: ", start + 1), text.find("\n      volumes:"))
    # From the blank line above (the container's comment block belongs to it) to the next one.
    return text[text.rfind("\n\n", 0, start) : min(i for i in ends if i > 0)]


def _mounts_by_volume(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container["volumeMounts"]}


def _option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _parse(args: list[str]) -> click.Context:
    """Parses ARGS (a subcommand and its options) with the real CLI, without running it."""
    env = {"NODE_NAME": "node-1", "POD_NAMESPACE": "nodeagent-system", "HOST_IP": "10.0.0.5"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    name, *rest = expanded
    group_ctx = click.Context(cli, info_name="nodeagent")
    command = cli.get_command(group_ctx, name)
    assert command is not None, f"no subcommand {name!r}"
    return command.make_context(name, rest, parent=group_ctx)


# -- the kustomization -----------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in DAEMONSET_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk
    assert _kustomization()["namespace"] == "nodeagent-system"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_validates_strictly_against_the_kubernetes_schemas(version: str) -> None:
    docs = _documents()
    assert {doc["kind"] for _, doc in docs} == {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "Deployment",
    }
    for name, doc in docs:
        assert_valid(name, doc, version)


def test_namespaced_objects_live_in_the_agent_namespace() -> None:
    for name, doc in _documents():
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "nodeagent-system", name


# -- RBAC ------------------------------------------------------------------------------------

REVIEWS = ("authorization.k8s.io", "subjectaccessreviews")


def test_cluster_role_is_read_only_but_for_patching_pods_and_reviewing_access() -> None:
    """Writes: the capture annotation on pods; SubjectAccessReviews (credentialName: may a
    workload's service account list its namespace's Secrets, as istiod asks)."""
    rules = _one("ClusterRole")["rules"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs etc.
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "/" not in resource, f"no subresources: {resource}"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for (group, resource), verbs in granted.items():
        writes = verbs - READ_VERBS
        if (group, resource) == ("", "pods"):
            assert writes == {"patch"}
        elif (group, resource) == REVIEWS:
            assert verbs == {"create"}
        else:
            assert not writes, f"{group}/{resource} may {sorted(writes)}"
    expected = {
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),  # locality labels (localityLbSetting)
        ("", "services"),
        ("", "serviceaccounts"),
        ("discovery.k8s.io", "endpointslices"),
        *{
            ("networking.istio.io", r)
            for r in (
                "virtualservices",
                "destinationrules",
                "serviceentries",
                "sidecars",
                "gateways",
                "workloadentries",
                "workloadgroups",
                "envoyfilters",
                "proxyconfigs",
            )
        },
        *{
            ("security.istio.io", r)
            for r in ("peerauthentications", "authorizationpolicies", "requestauthentications")
        },
        ("telemetry.istio.io", "telemetries"),
    }
    assert set(granted) == expected | {REVIEWS}
    assert all(granted[key] >= READ_VERBS for key in expected)


def test_the_credentials_role_only_watches_secrets_and_nothing_binds_it() -> None:
    """DestinationRule credentialName: the operator binds it per namespace (a RoleBinding);
    shipped bound, it would let every node read every Secret (test_ca_manifests.py checks the
    agent reads none by default)."""
    role = _one("ClusterRole", "nodeagent-credentials")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}
    ]
    name = role["metadata"]["name"]
    for _, doc in _documents():
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            assert doc["roleRef"]["name"] != name, doc["metadata"]["name"]


def test_cluster_role_binding_names_the_daemonsets_service_account() -> None:
    binding = _one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == _one("ClusterRole")["metadata"]["name"]
    account = _one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    pod_spec = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == account["name"]


def test_role_only_reads_the_agents_own_daemonset() -> None:
    role, ds = _one("Role"), _one("DaemonSet")
    assert role["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": [ds["metadata"]["name"]],
            "verbs": ["get"],
        }
    ]
    binding = _one("RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = _one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]


@pytest.mark.parametrize("container", ["install-cni", "agent"])
def test_both_containers_ask_about_their_own_daemonset_on_sigterm(container: str) -> None:
    ds = _one("DaemonSet")
    spec = _container(container)
    env = {e["name"]: e for e in spec["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    daemonset = _parse(spec["args"]).params["daemonset"]
    assert (daemonset.namespace, daemonset.name) == (
        ds["metadata"]["namespace"],
        ds["metadata"]["name"],
    )


# -- the DaemonSet ---------------------------------------------------------------------------


def test_daemonset_pod_settings() -> None:
    ds = _one("DaemonSet")
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    metrics_port = _option(_container("agent")["args"], "--metrics-port")
    assert spec["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": metrics_port,
        "prometheus.io/path": "/metrics",
    }


def test_agent_arguments_are_accepted_by_the_real_cli() -> None:
    agent = _container("agent")
    assert "command" not in agent  # the image's ENTRYPOINT is `nodeagent`
    ctx = _parse(agent["args"])
    assert ctx.command.name == "run"
    params = ctx.params
    assert params["in_cluster"] is True
    assert params["source_dir"] is None and params["kubeconfig"] is None
    assert params["node_name"] == "node-1"
    assert params["mesh_config"] == Path("/etc/nodeagent/mesh.yaml")
    assert params["state_dir"] == Path("/var/lib/nodeagent")
    assert params["run_dir"] == Path("/var/run/nodeagent")
    # Envoy runs in the envoy container: the agent only configures and watches it.
    assert params["envoy_mode"] == "external"
    assert params["no_proxy"] is False
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The unauthenticated ports bind the node IP, not every address of the host (#12).
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert params["metrics_host"] == params["stats_host"] == "10.0.0.5"  # $(HOST_IP)
    probe = agent["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz/ready", "port": params["readiness_port"]}
    # The socket the agent serves is the one install-cni writes into the CNI config.
    install_ctx = _parse(_container("install-cni")["args"])
    assert str(params["cni_socket"]) == install_ctx.params["agent_socket"]
    # Every path the agent writes to or reads from is a mounted volume.
    mounts = [m["mountPath"] for m in agent["volumeMounts"]]
    for path in (
        params["mesh_config"],
        params["state_dir"],
        params["run_dir"],
        params["cni_socket"],
        params["ca_root_file"],
        params["ca_token_file"],
    ):
        assert any(Path(path).is_relative_to(m) for m in mounts), path
    # Certificates from the CA service, never from a CA on the node (test_ca_manifests.py).
    assert params["ca_address"] and params["ca_dir"] is None


def test_envoy_container_arguments_are_accepted_by_the_real_cli() -> None:
    envoy, agent = _container("envoy"), _container("agent")
    assert "command" not in envoy  # the image's ENTRYPOINT is `nodeagent`
    ctx = _parse(envoy["args"])
    assert ctx.command.name == "envoy"
    params = ctx.params
    agent_params = _parse(agent["args"]).params
    # The agent writes the bootstrap and serves xDS in its run dir; Envoy finds both there,
    # through the same volume at the same path (the bootstrap names the socket by its path).
    assert params["run_dir"] == agent_params["run_dir"]
    assert params["envoy_binary"] is None  # the image's, installed with nodeagent
    assert params["log_file"] is None  # stdout: the container's log
    settings = ProxySettings("node-1", agent_params["run_dir"], Path("/e"), Path("/l"))
    config = bootstrap(settings.node_id, "node-1", settings.xds_socket)
    ads = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    socket_path = Path(ads["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"])
    envoy_mounts, agent_mounts = _mounts_by_volume(envoy), _mounts_by_volume(agent)
    run_dir = next(n for n, m in envoy_mounts.items() if m["mountPath"] == str(params["run_dir"]))
    assert agent_mounts[run_dir]["mountPath"] == envoy_mounts[run_dir]["mountPath"]
    for path in (socket_path, bootstrap_path(params["run_dir"])):
        assert path.is_relative_to(envoy_mounts[run_dir]["mountPath"]), path
    # Pod netns paths, as the agent puts them into listeners and clusters, resolve in here too,
    # also for pods created after Envoy started.
    netns = envoy_mounts["netns"]
    assert netns["mountPath"] == agent_mounts["netns"]["mountPath"] == "/var/run/netns"
    assert netns["mountPropagation"] == "HostToContainer"
    assert netns["readOnly"] is True
    assert set(envoy_mounts) == {run_dir, "netns"}  # nothing else of the host
    # Ready when Envoy is: its /ready, which the bootstrap routes on the stats port (the admin
    # is a UNIX socket in the shared run dir, reached by root only).
    settings = ProxySettings("node-1", agent_params["run_dir"], Path("/e"), Path("/l"))
    assert settings.admin_socket.is_relative_to(envoy_mounts[run_dir]["mountPath"])
    probe = envoy["readinessProbe"]["httpGet"]
    assert probe == {"path": READY_PATH, "port": agent_params["stats_port"]}
    assert {p["containerPort"] for p in envoy["ports"]} == {agent_params["stats_port"]}


@pytest.mark.parametrize(
    ("container", "capabilities"),
    [
        ("agent", {"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}),
        ("envoy", {"NET_ADMIN", "SYS_ADMIN"}),
    ],
)
def test_capabilities_are_few_and_explained(container: str, capabilities: set[str]) -> None:
    security = _container(container)["securityContext"]
    assert security["privileged"] is False
    assert security["runAsUser"] == 0
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == capabilities
    text = _container_text(container)
    for capability in capabilities:
        assert re.search(rf"#.*\b{capability}\b", text), f"no comment explains {capability}"


def test_envoy_container_caps_are_the_testbeds() -> None:
    """The testbed runs its envoy daemon with exactly these: the integration tests (real Envoy,
    real traffic) exercise what the manifest grants."""
    from nodeagent.testbed.daemons import ENVOY_CAPABILITIES

    security = _container("envoy")["securityContext"]
    assert set(security["capabilities"]["add"]) == set(ENVOY_CAPABILITIES)
    assert security["readOnlyRootFilesystem"] is True


def test_agent_host_mounts() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {v["hostPath"]["path"]: v for v in volumes.values() if "hostPath" in v}
    # Only what the code uses today (#12): no bpffs or cgroup mount while capture is nftables.
    assert set(host_paths) == {
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/run/netns",
        "/proc",
        "/var/run/nodeagent",
        "/var/lib/nodeagent",
        # the pods' resolv.conf, as containerd and CRI-O keep it (the DNS proxy's upstreams)
        CONTAINERD_SANDBOXES.as_posix(),
        CRIO_CONTAINERS.as_posix(),
    }
    for path in (CONTAINERD_SANDBOXES.as_posix(), CRIO_CONTAINERS.as_posix()):
        # read where the code looks for them: the same path in the container, read-only
        (mount,) = [
            m
            for m in _container("agent")["volumeMounts"]
            if volumes[m["name"]].get("hostPath", {}).get("path") == path
        ]
        assert (mount["mountPath"], mount.get("readOnly")) == (path, True)
    for path in ("/var/run/nodeagent", "/var/lib/nodeagent"):
        assert host_paths[path]["hostPath"]["type"] == "DirectoryOrCreate"
    mounts = {m["name"]: m for m in _container("agent")["volumeMounts"]}
    by_host = {
        volumes[name]["hostPath"]["path"]: m
        for name, m in mounts.items()
        if name in volumes and "hostPath" in volumes[name]
    }
    assert by_host["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    # Writable host paths: only the agent's own run and state dirs (install-cni: the CNI dirs).
    writable = {path for path, m in by_host.items() if not m.get("readOnly")}
    assert writable == {"/var/run/nodeagent", "/var/lib/nodeagent"}
    assert by_host["/proc"]["mountPath"] == "/host/proc"
    assert by_host["/proc"]["readOnly"] is True
    config = next(m for m in mounts.values() if m["mountPath"] == "/etc/nodeagent")
    assert volumes[config["name"]]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]


def test_containers_have_requests_and_limits() -> None:
    for container in _one("DaemonSet")["spec"]["template"]["spec"]["containers"]:
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, (container["name"], kind)


def test_install_cni_arguments_are_accepted_by_the_real_cli() -> None:
    install = _container("install-cni")
    ctx = _parse(install["args"])
    assert ctx.command.name == "install-cni"
    params = ctx.params
    assert params["watch"] is True
    assert params["uninstall"] is False
    assert params["cni_bin_dir"] == Path("/host/opt/cni/bin")
    assert params["cni_conf_dir"] == Path("/host/etc/cni/net.d")
    assert params["bundle"] == IMAGE_BUNDLE
    assert params["agent_socket"] == "/var/run/nodeagent/cni.sock"
    assert params["log_file"] == "/var/log/nodeagent-cni.log"
    probe = install["readinessProbe"]["httpGet"]
    assert probe == {"path": "/readyz", "port": params["readiness_port"]}
    mounts = {m["mountPath"] for m in install["volumeMounts"]}
    assert {str(params["cni_bin_dir"]), str(params["cni_conf_dir"])} <= mounts


def test_mesh_config_is_a_valid_mesh_config_file() -> None:
    data = _one("ConfigMap")["data"]
    assert set(data) == {"mesh.yaml"}
    config = parse_mesh_config(yaml.safe_load(data["mesh.yaml"]))
    assert config.trust_domain == "cluster.local"
    assert config.root_namespace == "istio-system"
    assert config.outbound_traffic_policy == "ALLOW_ANY"


# -- the image -------------------------------------------------------------------------------


def _containerfile_lines() -> list[str]:
    """The Containerfile's instructions, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    assert not pending
    return lines


def _setup_packages() -> list[str]:
    match = re.search(r"^PACKAGES=\((.*?)\)", SETUP_SH.read_text(), re.M | re.S)
    assert match, "no PACKAGES=(...) in scripts/setup.sh"
    return shlex.split(match.group(1), comments=True)


def test_containerfile_installs_exactly_setup_sh_packages_plus_python() -> None:
    installs = []
    for line in _containerfile_lines():
        for command in re.findall(r"apt-get install (.*?)(?:&&|$)", line):
            installs.append([w for w in shlex.split(command) if not w.startswith("-")])
    assert len(installs) == 1, installs
    packages = installs[0]
    assert len(packages) == len(set(packages))
    setup = _setup_packages()
    assert setup
    assert sorted(packages) == sorted([*setup, "python3", "python3-venv"])


def test_containerfile_bundle_path_is_where_the_cli_looks() -> None:
    lines = _containerfile_lines()
    assert lines[0].split() == ["FROM", "debian:bookworm-slim"]
    text = "\n".join(lines)
    copies = re.findall(r"cp -a build/cni/nodeagent-cni (\S+)", text)
    assert copies == [str(IMAGE_BUNDLE)]
    assert f"NODEAGENT_CNI_BUNDLE={IMAGE_BUNDLE}" in text
    assert "bash scripts/build-cni.sh" in text
    entrypoints = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert entrypoints == ['ENTRYPOINT ["nodeagent"]']


# -- daemonset-ebpf/: the same DaemonSet with eBPF capture (#18) ----------------------------------

EBPF_DIR = ROOT / "daemonset-ebpf"


def _rendered(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(directory)}


def _pod_spec(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects[("DaemonSet", "nodeagent")]["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_ebpf_variant_validates_strictly(version: str) -> None:
    for (kind, name), doc in _rendered(EBPF_DIR).items():
        assert_valid(f"daemonset-ebpf {kind} {name}", doc, version)


def test_the_ebpf_variant_changes_only_the_agents_capture() -> None:
    """`kubectl apply -k daemonset-ebpf/` is the base but for the agent container's capture
    mode and the host paths that mode reads: no object, container or capability more."""
    base, ebpf = _rendered(DAEMONSET_DIR), _rendered(EBPF_DIR)
    assert base.keys() == ebpf.keys()
    for key in base.keys() - {("DaemonSet", "nodeagent")}:
        assert base[key] == ebpf[key], key
    base_pod, ebpf_pod = _pod_spec(base), _pod_spec(ebpf)
    base_agent, ebpf_agent = (
        next(c for c in pod["containers"] if c["name"] == "agent") for pod in (base_pod, ebpf_pod)
    )
    others = [
        [c for c in pod["containers"] if c["name"] != "agent"] for pod in (base_pod, ebpf_pod)
    ]
    assert others[0] == others[1]
    assert ebpf_agent["securityContext"] == base_agent["securityContext"]
    assert ebpf_agent["args"][: len(base_agent["args"])] == base_agent["args"]
    params = _parse(ebpf_agent["args"]).params
    assert params["capture_mode"] == "ebpf"
    volumes = {v["name"]: v for v in ebpf_pod["volumes"]}
    host = {
        m["mountPath"]: (volumes[m["name"]]["hostPath"]["path"], m.get("readOnly", False))
        for m in ebpf_agent["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    added = {
        path: source
        for path, source in host.items()
        if path not in {m["mountPath"] for m in base_agent["volumeMounts"]}
    }

    def mount_of(path: Path) -> tuple[str, bool]:
        (mount,) = [m for m in added if path.is_relative_to(m)]
        return added[mount]

    # Pins outlive the container in the host's bpffs (written); pods' cgroups and the root are
    # the host's hierarchy (only opened); bcc reads the node's kernel headers.
    assert mount_of(params["bpf_dir"]) == ("/sys/fs/bpf", False)
    assert mount_of(params["cgroup_root"]) == ("/sys/fs/cgroup", True)
    assert added[str(params["cgroup_root"])] == ("/sys/fs/cgroup", True)
    assert mount_of(Path("/lib/modules")) == ("/lib/modules", True)
    assert mount_of(Path("/usr/src")) == ("/usr/src", True)
    assert len(added) == 4
    # Envoy's inbound sockets are taken from the envoy container's process (pidfd_getfd).
    assert ebpf_pod["shareProcessNamespace"] is True and "shareProcessNamespace" not in base_pod
    assert "SYS_PTRACE" in ebpf_agent["securityContext"]["capabilities"]["add"]
