"""The Vagrant cluster (vagrant/): its shell scripts (and scripts/*.sh) pass shellcheck, its
Vagrantfile parses and defines the cluster the README describes, every manifest validates offline,
and the pieces agree with each other, with daemonset/ and with nodeagent's own code.

No VM is started: nothing here needs root or a network. shellcheck, ruby and the pinned kubectl
(which renders the overlay as deploy.sh applies it) come from `make test-tools`; without them
these tests fail, they are not skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from kube_render import render
from kube_schemas import K8S_VERSIONS, assert_valid

from nodeagent.caservice.rootcert import ROOT_CONFIGMAP
from nodeagent.cli import cli
from nodeagent.mesh.membership import decide
from nodeagent.mesh.model import Namespace, Pod
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources.directory import parse_mesh_config
from nodeagent.testbed.workload import DEFAULT_PROPAGATE_HEADERS, HEALTH_PATH, FakeServiceConfig

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
VAGRANTFILE = VAGRANT / "Vagrantfile"
LIB_SH = VAGRANT / "provision" / "lib.sh"
SMOKE_SH = VAGRANT / "smoke.sh"
OVERLAY = VAGRANT / "nodeagent"
APPS = VAGRANT / "apps"
S1 = VAGRANT / "s1"
DAEMONSET_DIR = ROOT / "daemonset"
WORKSHOP = ROOT / "nodeagent" / "testbed" / "topologies" / "workshop.yaml"
SETUP_SH = ROOT / "scripts" / "setup.sh"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test-tools` (as root)")
    return path


def _ours(path: Path) -> bool:
    """Not Vagrant's machine state or the cluster's token directory."""
    return not {".vagrant", ".cluster"} & set(path.relative_to(VAGRANT).parts)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _lib_constants() -> dict[str, str]:
    """provision/lib.sh's literal assignments (NAME=value, no expansion)."""
    return dict(re.findall(r"^([A-Z_]+)=([^\s$]+)$", LIB_SH.read_text(), re.M))


# -- shell scripts ---------------------------------------------------------------------------

SHELL_SCRIPTS = sorted(
    [p for p in VAGRANT.rglob("*.sh") if _ours(p)] + list((ROOT / "scripts").glob("*.sh"))
)


def test_the_expected_scripts_exist_and_are_executable() -> None:
    names = {str(p.relative_to(ROOT)) for p in SHELL_SCRIPTS}
    expected = {
        "vagrant/up.sh",
        "vagrant/smoke.sh",
        "vagrant/provision/lib.sh",
        "vagrant/provision/control-plane.sh",
        "vagrant/provision/worker.sh",
        "vagrant/provision/deploy.sh",
        "scripts/setup.sh",
    }
    assert expected <= names
    for script in SHELL_SCRIPTS:
        if script == LIB_SH:  # sourced, never run
            continue
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), script
        if script.parent != ROOT / "scripts":  # scripts/ are run as `bash scripts/x.sh`
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_shellcheck(script: Path) -> None:
    shellcheck = _tool("shellcheck")
    # -x follows `source` into provision/lib.sh (each script says where it is).
    result = subprocess.run(
        [shellcheck, "-x", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_use_strict_mode() -> None:
    for script in SHELL_SCRIPTS:
        if script != LIB_SH:
            assert "\nset -euo pipefail\n" in script.read_text(), script


# -- the Vagrantfile -------------------------------------------------------------------------


def test_vagrantfile_is_valid_ruby() -> None:
    result = subprocess.run(
        [_tool("ruby"), "-c", str(VAGRANTFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stdout


# Evaluates the Vagrantfile against a recording stand-in for the parts of Vagrant's configuration
# API it uses, and prints what it configured as JSON. This checks what the Vagrantfile defines
# (and that its Ruby runs), not that Vagrant itself accepts every option.
_VAGRANT_STAND_IN = r"""
require "json"

class ProviderSettings
  attr_reader :values
  def initialize
    @values = {}
  end
  def method_missing(name, *args)
    key = name.to_s
    return super unless key.end_with?("=") && args.size == 1
    @values[key.chomp("=")] = args.first
  end
  def respond_to_missing?(name, include_private = false)
    name.to_s.end_with?("=") || super
  end
end

class VMSettings
  attr_accessor :box, :hostname
  attr_reader :machines, :networks, :providers, :provisioners, :synced_folders
  def initialize
    @machines = {}
    @networks = []
    @providers = {}
    @provisioners = []
    @synced_folders = []
  end
  def define(name, **options)
    machine = MachineConfig.new
    yield machine
    @machines[name] = [options, machine]
  end
  def network(type, **options)
    @networks << [type, options]
  end
  def provider(name)
    yield(@providers[name] ||= ProviderSettings.new)
  end
  def provision(name, **options)
    @provisioners << [name, options]
  end
  def synced_folder(host, guest, **options)
    @synced_folders << [host, guest, options]
  end
end

class MachineConfig
  attr_reader :vm
  def initialize
    @vm = VMSettings.new
  end
end

module Vagrant
  def self.require_version(*requirements)
    $required_version = requirements
  end
  def self.configure(version)
    raise "configuration version #{version.inspect}, expected \"2\"" unless version == "2"
    $root = MachineConfig.new
    yield $root
  end
end

load ARGV.fetch(0)
root = $root.vm
puts JSON.generate(
  "required_version" => $required_version,
  "box" => root.box,
  "synced_folders" => root.synced_folders,
  "global_providers" => root.providers.transform_values(&:values),
  "machines" => root.machines.map do |name, (options, machine)|
    vm = machine.vm
    {
      "name" => name,
      "options" => options,
      "hostname" => vm.hostname,
      "networks" => vm.networks,
      "providers" => vm.providers.transform_values(&:values),
      "provisioners" => vm.provisioners,
    }
  end,
)
"""


def _evaluate_vagrantfile(
    state_dir: Path, **settings: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEAGENT_")}
    env |= {"NODEAGENT_STATE_DIR": str(state_dir), **settings}
    result = subprocess.run(
        [_tool("ruby"), "-e", _VAGRANT_STAND_IN, str(VAGRANTFILE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=VAGRANT,
        check=False,
    )
    config = json.loads(result.stdout) if result.returncode == 0 else {}
    return result, config


def _vagrantfile(state_dir: Path, **settings: str) -> dict[str, Any]:
    result, config = _evaluate_vagrantfile(state_dir, **settings)
    assert result.returncode == 0, result.stderr
    return config


def _provisioners(machine: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: options for name, options in machine["provisioners"]}


def _private_ip(machine: Mapping[str, Any]) -> str:
    networks = [opts for kind, opts in machine["networks"] if kind == "private_network"]
    assert len(networks) == 1, machine["networks"]
    ip: str = networks[0]["ip"]
    return ip


def test_vagrantfile_defines_a_control_plane_and_two_workers_by_default(tmp_path: Path) -> None:
    config = _vagrantfile(tmp_path)
    assert config["box"] == "debian/bookworm64"
    machines = config["machines"]
    assert [m["name"] for m in machines] == ["control-plane", "worker-1", "worker-2"]
    assert [m["hostname"] for m in machines] == ["control-plane", "worker-1", "worker-2"]
    assert [_private_ip(m) for m in machines] == ["192.168.56.10", "192.168.56.11", "192.168.56.12"]
    assert machines[0]["options"] == {"primary": True}
    for machine in machines:
        providers = machine["providers"]
        assert set(providers) == {"virtualbox", "libvirt"}, machine["name"]
        for settings in providers.values():
            assert settings["cpus"] >= 2
            assert settings["memory"] >= 2048
    # The control plane also builds the image.
    assert machines[0]["providers"]["libvirt"]["memory"] == 4096


def test_vagrantfile_syncs_the_repository_where_the_scripts_look(tmp_path: Path) -> None:
    folders = {
        guest: (host, opts) for host, guest, opts in _vagrantfile(tmp_path)["synced_folders"]
    }
    assert folders["/vagrant"] == (".", {"disabled": True})
    host, options = folders[_lib_constants()["REPO"]]
    assert (VAGRANT / host).resolve() == ROOT
    assert options["type"] == "rsync"
    assert {".git/", ".venv/", "build/", "vagrant/.vagrant/", "vagrant/.cluster/"} <= set(
        options["rsync__exclude"]
    )


def test_vagrantfile_provisioners_run_existing_scripts_with_their_environment(
    tmp_path: Path,
) -> None:
    machines = _vagrantfile(tmp_path)["machines"]
    control_plane, workers = machines[0], machines[1:]
    repo = _lib_constants()["REPO"]
    tokens = set()
    for machine in machines:
        for name, options in _provisioners(machine).items():
            assert options["type"] == "shell"
            match = re.fullmatch(
                rf"bash {re.escape(repo)}/(vagrant/provision/[\w-]+\.sh)", options["inline"]
            )
            assert match, options["inline"]
            assert (ROOT / match.group(1)).is_file(), (name, match.group(1))
            # Every variable the script requires is passed.
            required = re.search(r"^require_env (.+)$", (ROOT / match.group(1)).read_text(), re.M)
            assert required, match.group(1)
            assert set(required.group(1).split()) == set(options["env"]), (name, options["env"])
            if "K3S_TOKEN" in options["env"]:
                tokens.add(options["env"]["K3S_TOKEN"])
    cp = _provisioners(control_plane)
    assert set(cp) == {"control-plane", "deploy"}
    assert cp["control-plane"]["env"]["NODE_IP"] == _private_ip(control_plane)
    assert "run" not in cp["control-plane"]
    # deploy waits for every node, so it runs only when asked (up.sh), after all VMs are up.
    assert cp["deploy"]["run"] == "never"
    assert cp["deploy"]["env"] == {"EXPECTED_NODES": str(len(machines))}
    assert "--provision-with deploy" in (VAGRANT / "up.sh").read_text()
    for worker in workers:
        env = _provisioners(worker)["worker"]["env"]
        assert env["NODE_IP"] == _private_ip(worker)
        assert env["SERVER_IP"] == _private_ip(control_plane)
        assert env["K3S_VERSION"] == cp["control-plane"]["env"]["K3S_VERSION"]
    # One join token for the whole cluster, kept private on the host and reused.
    assert len(tokens) == 1
    token_file = tmp_path / "k3s-token"
    assert token_file.read_text().strip() == tokens.pop()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    again = _vagrantfile(tmp_path)["machines"][1]
    assert _provisioners(again)["worker"]["env"]["K3S_TOKEN"] == token_file.read_text().strip()


def test_vagrantfile_settings_come_from_the_environment(tmp_path: Path) -> None:
    config = _vagrantfile(
        tmp_path,
        NODEAGENT_WORKERS="3",
        NODEAGENT_NETWORK="10.20.30",
        NODEAGENT_MEMORY="3072",
        NODEAGENT_CPUS="4",
        NODEAGENT_K3S_VERSION="v1.32.9+k3s1",
    )
    machines = config["machines"]
    assert [m["name"] for m in machines] == ["control-plane", "worker-1", "worker-2", "worker-3"]
    assert [_private_ip(m) for m in machines] == [f"10.20.30.{i}" for i in (10, 11, 12, 13)]
    assert machines[1]["providers"]["virtualbox"] == {"cpus": 4, "memory": 3072}
    assert _provisioners(machines[0])["deploy"]["env"] == {"EXPECTED_NODES": "4"}
    assert _provisioners(machines[3])["worker"]["env"]["K3S_VERSION"] == "v1.32.9+k3s1"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NODEAGENT_WORKERS", "0"),
        ("NODEAGENT_WORKERS", "two"),
        ("NODEAGENT_MEMORY", "512"),
        ("NODEAGENT_NETWORK", "192.168"),
        ("NODEAGENT_NETWORK", "192.168.300"),
    ],
)
def test_vagrantfile_rejects_bad_settings_naming_them(
    tmp_path: Path, variable: str, value: str
) -> None:
    result, _ = _evaluate_vagrantfile(tmp_path, **{variable: value})
    assert result.returncode != 0
    assert f"{variable}={value!r}".replace("'", '"') in result.stderr


# -- manifests -------------------------------------------------------------------------------


def _kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _patch_files(directory: Path) -> set[str]:
    return {p["path"] for p in _kustomization(directory).get("patches", [])}


def _local_resources(directory: Path) -> list[str]:
    return [r for r in _kustomization(directory)["resources"] if not (directory / r).is_dir()]


def _istio(doc: Mapping[str, Any]) -> bool:
    return str(doc["apiVersion"]).split("/")[0].endswith(".istio.io")


def _s1_files() -> list[Path]:
    return sorted(S1.glob("*.yaml"))


def _app_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in _local_resources(APPS) for doc in _yaml_docs(APPS / name)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _app_docs() if doc["kind"] == kind]


def test_every_yaml_file_under_vagrant_is_checked() -> None:
    """Each is a kustomization, a patch or a resource one names, or an S1 file smoke.sh applies;
    all of those are validated below."""
    checked = {S1 / name for name in _smoke_s1_references()}
    for directory in (OVERLAY, APPS):
        checked.add(directory / "kustomization.yaml")
        checked |= {directory / name for name in _patch_files(directory)}
        checked |= {directory / name for name in _local_resources(directory)}
    on_disk = {p for p in VAGRANT.rglob("*.y*ml") if _ours(p)}
    assert on_disk == checked


@pytest.mark.parametrize("directory", [OVERLAY, APPS], ids=["nodeagent", "apps"])
def test_kustomization_lists_every_manifest_and_only_existing_ones(directory: Path) -> None:
    resources = _kustomization(directory)["resources"]
    assert len(resources) == len(set(resources))
    local = set(_local_resources(directory))
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert local == on_disk - _patch_files(directory)
    for resource in set(resources) - local:
        assert (directory / resource / "kustomization.yaml").is_file(), resource


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly_against_the_kubernetes_schemas(
    version: str,
) -> None:
    docs = [(f"apps/{name}", doc) for name, doc in _app_docs()]
    docs += [
        (f"nodeagent/{name}", doc)
        for name in _local_resources(OVERLAY)
        for doc in _yaml_docs(OVERLAY / name)
    ]
    docs.append(("nodeagent/ (rendered DaemonSet)", _rendered_daemonset()))
    assert not [name for name, doc in docs if _istio(doc)]
    assert {doc["kind"] for _, doc in docs} == {
        "Namespace",
        "ServiceAccount",
        "Service",
        "Deployment",
        "DaemonSet",
    }
    for name, doc in docs:
        assert_valid(name, doc, version)


@pytest.mark.parametrize("path", _s1_files(), ids=lambda p: p.name)
def test_s1_config_validates_against_istios_crds(path: Path) -> None:
    docs = _yaml_docs(path)
    assert len(docs) == 1
    assert _istio(docs[0])
    assert IstioSchemas.load().validate(docs[0]) == []


# -- the nodeagent overlay -------------------------------------------------------------------


def _base_daemonset() -> dict[str, Any]:
    found = [d for d in _yaml_docs(DAEMONSET_DIR / "daemonset.yaml") if d["kind"] == "DaemonSet"]
    assert len(found) == 1
    return found[0]


def _merge(base: Any, patch: Any, where: str) -> Any:
    """A strategic merge patch as kustomize applies it to what this overlay patches: maps merge
    key by key, lists of named items merge by name (containers, volumes), anything else is
    replaced. A name the base lacks is an error: a real merge would silently add an item."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value, f"{where}.{key}") if key in base else value
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch]):
        by_name = {item["name"]: item for item in base}
        unknown = [item["name"] for item in patch if item["name"] not in by_name]
        assert not unknown, f"{where} names {unknown}, which daemonset/daemonset.yaml lacks"
        patched = {item["name"]: item for item in patch}
        return [
            _merge(item, patched[item["name"]], f"{where}[{item['name']}]")
            if item["name"] in patched
            else item
            for item in base
        ]
    return patch


def _rendered_daemonset() -> dict[str, Any]:
    """daemonset/daemonset.yaml with the overlay's patches and image applied."""
    base = _base_daemonset()
    kustomization = _kustomization(OVERLAY)
    rendered = base
    for name in _patch_files(OVERLAY):
        (patch,) = _yaml_docs(OVERLAY / name)
        assert {k: patch[k] for k in ("apiVersion", "kind")} == {
            k: base[k] for k in ("apiVersion", "kind")
        }
        assert patch["metadata"] == {
            "name": base["metadata"]["name"],
            "namespace": _kustomization(DAEMONSET_DIR)["namespace"],
        }
        rendered = _merge(rendered, {k: v for k, v in patch.items() if k != "metadata"}, name)
    (image,) = kustomization["images"]
    containers = rendered["spec"]["template"]["spec"]["containers"]
    for container in containers:
        repository = container["image"].rsplit(":", 1)[0]
        assert repository == image["name"], f"kustomize would not rewrite {container['image']}"
        container["image"] = f"{image['newName']}:{image['newTag']}"
    return rendered


def _host_path_of_mount(
    daemonset: Mapping[str, Any], container: str, mount_path: str
) -> dict[str, Any]:
    pod = daemonset["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] if c["name"] == container]
    (mount,) = [m for m in found["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    host_path: dict[str, Any] = volume["hostPath"]
    return host_path


def _option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def test_overlay_points_install_cni_at_k3s_cni_directories() -> None:
    rendered = _rendered_daemonset()
    constants = _lib_constants()
    (install_cni,) = [
        c for c in rendered["spec"]["template"]["spec"]["containers"] if c["name"] == "install-cni"
    ]
    for flag, constant in (("--cni-bin-dir", "CNI_BIN_DIR"), ("--cni-conf-dir", "CNI_CONF_DIR")):
        host_path = _host_path_of_mount(rendered, "install-cni", _option(install_cni["args"], flag))
        # The same directory provisioning checks k3s's containerd uses.
        assert host_path == {"path": constants[constant], "type": "Directory"}, flag


def test_overlay_changes_nothing_else_in_the_daemonset() -> None:
    base, rendered = _base_daemonset(), _rendered_daemonset()
    image = _lib_constants()["IMAGE"]
    pod = rendered["spec"]["template"]["spec"]
    for container in pod["containers"]:
        assert container["image"] == image
    # Put back what the overlay changes: the rest must be daemonset/'s, untouched.
    for container, original in zip(
        pod["containers"], base["spec"]["template"]["spec"]["containers"], strict=True
    ):
        container["image"] = original["image"]
    original_volumes = {v["name"]: v for v in base["spec"]["template"]["spec"]["volumes"]}
    changed = {p["name"] for p in pod["volumes"] if p != original_volumes[p["name"]]}
    assert changed == {"cni-bin-dir", "cni-conf-dir"}
    pod["volumes"] = base["spec"]["template"]["spec"]["volumes"]
    assert rendered == base


def _kubectl_rendered(directory: Path, kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in render(directory) if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_overlay_as_kubectl_renders_it(version: str) -> None:
    """What deploy.sh applies (`kubectl apply -k vagrant/nodeagent`), rendered by the pinned
    kubectl: valid, the DaemonSet as _rendered_daemonset says, the CA service unchanged but for
    the image."""
    for doc in render(OVERLAY):
        assert_valid(f"rendered vagrant/nodeagent {doc['kind']}", doc, version)
    daemonset = _kubectl_rendered(OVERLAY, "DaemonSet", "nodeagent")
    assert daemonset["spec"] == _rendered_daemonset()["spec"]
    image = _lib_constants()["IMAGE"]
    ca = _kubectl_rendered(OVERLAY, "Deployment", "nodeagent-ca")
    base_ca = _kubectl_rendered(DAEMONSET_DIR, "Deployment", "nodeagent-ca")
    containers = ca["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [image]
    for container in base_ca["spec"]["template"]["spec"]["containers"]:
        container["image"] = image
    assert ca == base_ca


def test_deploy_waits_for_the_ca_before_the_daemonset() -> None:
    """The DaemonSet's pods mount the root ConfigMap the CA publishes: deploy.sh waits for the
    CA's rollout (and its ConfigMap), then for the DaemonSet's."""
    text = (VAGRANT / "provision" / "deploy.sh").read_text()
    ca = _kubectl_rendered(OVERLAY, "Deployment", "nodeagent-ca")["metadata"]
    ds = _kubectl_rendered(OVERLAY, "DaemonSet", "nodeagent")["metadata"]
    ca_wait = f"kubectl -n {ca['namespace']} rollout status deployment/{ca['name']} --timeout="
    ds_wait = f"kubectl -n {ds['namespace']} rollout status daemonset/{ds['name']} --timeout="
    root = f"kubectl -n {ca['namespace']} get configmap {ROOT_CONFIGMAP} "
    assert text.count(ca_wait) == text.count(ds_wait) == text.count(root) == 1
    assert text.index(ca_wait) < text.index(root) < text.index(ds_wait)
    # A rebuilt image restarts the CA too.
    assert f"rollout restart deployment/{ca['name']}" in text


def test_the_image_is_named_alike_everywhere() -> None:
    image = _lib_constants()["IMAGE"]
    (entry,) = _kustomization(OVERLAY)["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == image
    containers = [
        c for d in _of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert containers
    for container in containers:
        assert container["image"] == image
        # There is no registry: the image is only in each node's containerd.
        assert container["imagePullPolicy"] == "Never"


def test_mesh_root_namespace_exists_and_holds_s1_mesh_wide_policy() -> None:
    (configmap,) = _yaml_docs(DAEMONSET_DIR / "configmap.yaml")
    mesh = parse_mesh_config(yaml.safe_load(configmap["data"]["mesh.yaml"]))
    namespaces = [
        d["metadata"]["name"] for n in _local_resources(OVERLAY) for d in _yaml_docs(OVERLAY / n)
    ]
    assert mesh.root_namespace in namespaces
    (policy,) = _yaml_docs(S1 / "peer-authentication-strict.yaml")
    assert policy["kind"] == "PeerAuthentication"
    assert policy["metadata"]["namespace"] == mesh.root_namespace
    assert "selector" not in policy["spec"]
    assert policy["spec"]["mtls"] == {"mode": "STRICT"}


# -- the S1 apps -----------------------------------------------------------------------------


def _deployments() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in _of_kind("Deployment")}


def _pod_spec(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _services() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in _of_kind("Service")}


def test_apps_are_in_the_mesh_by_nodeagents_own_rules() -> None:
    labels = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in _of_kind("Namespace")}
    # The API server labels every namespace with its name; default is not ours to label.
    labels.setdefault("default", {})
    for (namespace, name), deployment in _deployments().items():
        template = deployment["spec"]["template"]
        pod = Pod(
            namespace=namespace,
            name=name,
            labels=template["metadata"].get("labels", {}),
            annotations=template["metadata"].get("annotations", {}),
            host_network=template["spec"].get("hostNetwork", False),
        )
        ns_labels = {"kubernetes.io/metadata.name": namespace, **labels[namespace]}
        membership = decide(pod, Namespace(namespace, ns_labels), ("kube-system",))
        assert membership.in_mesh == (namespace == "istioinaction"), (namespace, name, membership)


def test_every_service_account_exists() -> None:
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"]) for d in _of_kind("ServiceAccount")
    }
    for (namespace, name), deployment in _deployments().items():
        assert (namespace, _pod_spec(deployment)["serviceAccountName"]) in accounts, name


def test_fake_services_are_configured_as_the_workload_expects() -> None:
    group_ctx = click.Context(cli, info_name="nodeagent")
    services = _services()
    fake = 0
    for (namespace, _), deployment in _deployments().items():
        (container,) = _pod_spec(deployment)["containers"]
        if container.get("args") != ["workload"]:
            continue
        fake += 1
        assert "command" not in container  # the image's entrypoint is `nodeagent`
        assert cli.get_command(group_ctx, "workload") is not None
        config = FakeServiceConfig.from_env(_env(container))
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (config.name, config.version) == (labels["app"], labels["version"])
        assert [p["containerPort"] for p in container["ports"]] == [config.listen_port]
        probe = container["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == (HEALTH_PATH, config.listen_port)
        service = services[(namespace, labels["app"])]
        assert service["spec"]["selector"] == {"app": labels["app"]}
        assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
            ("http", config.listen_port)
        ]
        for uri in config.upstream_uris:
            parts = urllib.parse.urlsplit(uri)
            upstream = services[(namespace, str(parts.hostname))]
            assert parts.port in [p["port"] for p in upstream["spec"]["ports"]], uri
    assert fake == 4


def test_sleep_clients_run_sleep_from_the_image_which_has_curl() -> None:
    deployments = _deployments()
    for namespace in ("istioinaction", "default"):
        (container,) = _pod_spec(deployments[(namespace, "sleep")])["containers"]
        assert container["command"] == ["sleep", "infinity"]
        assert container["name"] == "sleep"  # smoke.sh: kubectl exec ... -c sleep
    # The image installs exactly scripts/setup.sh's packages (tests/unit/test_daemonset.py).
    packages = re.search(r"^PACKAGES=\((.*?)\)", SETUP_SH.read_text(), re.M | re.S)
    assert packages and "curl" in packages.group(1).split()


def test_the_shop_is_the_testbeds_workshop() -> None:
    workshop = yaml.safe_load(WORKSHOP.read_text())
    expected = {
        (
            p["namespace"],
            p["labels"]["app"],
            p["labels"].get("version"),
            p["serviceAccount"],
            p["workload"].get("env", {}).get("UPSTREAM_URIS"),
        )
        for p in workshop["pods"]
    }
    actual = set()
    for (namespace, _), deployment in _deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (container,) = _pod_spec(deployment)["containers"]
        actual.add(
            (
                namespace,
                labels["app"],
                labels.get("version"),
                _pod_spec(deployment)["serviceAccountName"],
                _env(container).get("UPSTREAM_URIS"),
            )
        )
    assert actual == expected
    assert {(s["namespace"], s["name"], s["ports"][0]["port"]) for s in workshop["services"]} == {
        (namespace, name, svc["spec"]["ports"][0]["port"])
        for (namespace, name), svc in _services().items()
    }


# -- S1 routing config and smoke.sh ----------------------------------------------------------


def _one(path: Path) -> dict[str, Any]:
    (doc,) = _yaml_docs(path)
    return doc


def _destinations(
    virtual_service: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for route in virtual_service["spec"]["http"]:
        for destination in route["route"]:
            yield route, destination


def test_s1_routing_targets_purchase_history_subsets_by_version_label() -> None:
    rule = _one(S1 / "destination-rule.yaml")
    assert rule["metadata"]["namespace"] == "istioinaction"
    assert rule["spec"]["host"] == "purchase-history.istioinaction.svc.cluster.local"
    subsets = {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}
    versions = {
        d["spec"]["template"]["metadata"]["labels"]["version"]
        for (_, name), d in _deployments().items()
        if name.startswith("purchase-history")
    }
    assert (
        subsets
        == {v: {"version": v} for v in versions}
        == {
            "v1": {"version": "v1"},
            "v2": {"version": "v2"},
        }
    )
    for path in S1.glob("virtual-service-*.yaml"):
        service = _one(path)
        assert service["metadata"]["namespace"] == "istioinaction", path.name
        assert service["spec"]["hosts"] == ["purchase-history"], path.name
        for _, destination in _destinations(service):
            assert destination["destination"]["host"] == "purchase-history"
            assert destination["destination"]["subset"] in subsets


def test_s1_routes_say_what_the_scenario_says() -> None:
    def weights(name: str) -> dict[str, int]:
        return {
            d["destination"]["subset"]: d.get("weight", 100)
            for _, d in _destinations(_one(S1 / name))
        }

    assert weights("virtual-service-all-v1.yaml") == {"v1": 100}
    assert weights("virtual-service-canary-80-20.yaml") == {"v1": 80, "v2": 20}
    tom, rest = _one(S1 / "virtual-service-user-tom-v2.yaml")["spec"]["http"]
    assert tom["match"] == [{"headers": {"user": {"exact": "Tom"}}}]
    assert [d["destination"]["subset"] for d in tom["route"]] == ["v2"]
    assert "match" not in rest
    assert [d["destination"]["subset"] for d in rest["route"]] == ["v1"]
    # The header has to survive web-api -> recommendation to be routed on.
    assert "user" in DEFAULT_PROPAGATE_HEADERS


def _smoke_s1_references() -> set[str]:
    """The vagrant/s1 files smoke.sh names: "$S1/file.yaml", and `apply file.yaml ...` lines."""
    text = SMOKE_SH.read_text()
    names = set(re.findall(r"\$S1/([\w.-]+\.yaml)", text))
    for files in re.findall(r"^\s*apply ((?:[\w.-]+\.yaml ?)+)$", text, re.M):
        names |= set(files.split())
    return names


def test_smoke_applies_every_s1_file_and_only_existing_ones() -> None:
    assert _smoke_s1_references() == {p.name for p in _s1_files()}


def test_smoke_expects_the_sleep_identity_nodeagent_issues() -> None:
    (configmap,) = _yaml_docs(DAEMONSET_DIR / "configmap.yaml")
    trust_domain = parse_mesh_config(yaml.safe_load(configmap["data"]["mesh.yaml"])).trust_domain
    account = _pod_spec(_deployments()[("istioinaction", "sleep")])["serviceAccountName"]
    identity = f"spiffe://{trust_domain}/ns/istioinaction/sa/{account}"
    assert f"SLEEP_IDENTITY={identity}\n" in SMOKE_SH.read_text()


def test_scripts_refer_only_to_repository_paths_that_exist() -> None:
    scripts = [*VAGRANT.glob("provision/*.sh"), SMOKE_SH]
    referenced = {
        path for script in scripts for path in re.findall(r"\$REPO/([\w./-]+)", script.read_text())
    }
    assert {
        "nodeagent/mesh/crds/crd-all.gen.yaml",
        "vagrant/nodeagent",
        "vagrant/apps",
    } <= referenced
    for path in referenced:
        assert (ROOT / path).exists(), path
