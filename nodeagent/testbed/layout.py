"""Names and paths of everything a testbed makes (pure)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.testbed.state import TestbedState
from nodeagent.testbed.topology import Pod


def netns_prefix(name: str) -> str:
    # Testbed names cannot hold a dot, so this prefix never matches another testbed's namespaces.
    return f"tb-{name}."


def underlay_netns(name: str) -> str:
    return f"{netns_prefix(name)}underlay"


def control_plane_netns(name: str) -> str:
    """The control-plane host (``ca: service``): the CA service runs here."""
    return f"{netns_prefix(name)}control-plane"


def resolver_netns(name: str) -> str:
    """The testbed resolver's host (the cluster DNS, kube-dns' role; see testbed/resolver.py)."""
    return f"{netns_prefix(name)}resolver"


def external_netns(name: str, external: str) -> str:
    """An external server's host: outside the mesh and every node (topology ``externals``)."""
    return f"{netns_prefix(name)}ext-{external}"


def node_netns(name: str, node: str) -> str:
    return f"{netns_prefix(name)}node-{node}"


def pod_netns(name: str, pod: Pod) -> str:
    return f"{netns_prefix(name)}pod-{pod.namespace}.{pod.name}"


def logs_dir(name: str) -> Path:
    return TestbedState.directory(name) / "logs"


def cluster_dir(name: str) -> Path:
    """Kubernetes YAML of the testbed's namespaces and pods, read by every node agent."""
    return TestbedState.directory(name) / "cluster"


def mesh_config_file(name: str) -> Path:
    """The mesh config every node agent reads (``--mesh-config``; Istio's MeshConfig fields,
    the istio ConfigMap's ``mesh`` key); ``{}`` (every default) until a test sets one."""
    return TestbedState.directory(name) / "mesh-config.yaml"


def resolver_zone(name: str) -> Path:
    """The names the testbed resolver answers (JSON, rewritten as services change)."""
    return TestbedState.directory(name) / "resolver" / "zone.json"


def external_dir(name: str, external: str) -> Path:
    """An external server's files: its own CA (``ca.pem``), its certificate and key."""
    return TestbedState.directory(name) / "externals" / external


def external_ca_file(name: str, external: str) -> Path:
    """The PEM root of an external server's own CA: what a DestinationRule's caCertificates
    names to verify it (readable by root only, as the testbed directory is)."""
    return external_dir(name, external) / "ca.pem"


def apiserver_kubeconfig(name: str) -> Path:
    """The kubeconfig of the testbed's stand-in API server (``source: kubernetes``), written by
    the server once it listens; every node agent is given it."""
    return TestbedState.directory(name) / "apiserver" / "kubeconfig"


def apiserver_tokens(name: str) -> Path:
    """The stand-in's tokens file (``--tokens``): the tokens its TokenReview accepts, as the
    kubelet's TokenRequest would have issued them (node credentials, ``ca: service``)."""
    return TestbedState.directory(name) / "apiserver" / "tokens.json"


def configmap_dir(name: str) -> Path:
    """Where the stand-in writes every ConfigMap's keys as ``<ns>/<name>/<key>`` files: the
    kubelet's configMap volume, standing in (shared by every node of the testbed)."""
    return TestbedState.directory(name) / "apiserver" / "configmaps"


# The CA's namespace and root ConfigMap (nodeagent.caservice's defaults; kept literal here so
# that this module stays free of imports; a unit test checks they agree).
CA_NAMESPACE = "nodeagent-system"
CA_ROOT_CONFIGMAP = "nodeagent-ca-root"
CA_ROOT_KEY = "root-cert.pem"


def ca_root_file(name: str) -> Path:
    """The CA's root bundle as the node agents mount it: ConfigMap nodeagent-system/
    nodeagent-ca-root, key root-cert.pem (written by the CA, ``ca: service``)."""
    return configmap_dir(name) / CA_NAMESPACE / CA_ROOT_CONFIGMAP / CA_ROOT_KEY


def node_token_file(name: str, node: str) -> Path:
    """NODE's agent's projected service account token (audience istio-ca), mode 0600."""
    return node_dir(name, node) / "ca-token"


def cacerts_dir(name: str) -> Path:
    """The testbed's CA in Istio's plug-in layout (root + intermediate), shared by all nodes."""
    return TestbedState.directory(name) / "cacerts"


def node_dir(name: str, node: str) -> Path:
    return TestbedState.directory(name) / "nodes" / node


def cni_conf_dir(name: str, node: str) -> Path:
    """The node's CNI configuration directory (what /etc/cni/net.d is on a real node)."""
    return node_dir(name, node) / "net.d"


def cni_bin_dir(name: str, node: str) -> Path:
    """The node's CNI binary directory (/opt/cni/bin), where install-cni puts our plugin."""
    return node_dir(name, node) / "bin"


def agent_socket(name: str, node: str) -> Path:
    return node_dir(name, node) / "run" / "cni.sock"


def envoy_admin_socket(name: str, node: str) -> Path:
    """The node Envoy's admin socket, in the agent's --run-dir (next to its CNI socket)."""
    return agent_socket(name, node).parent / "envoy-admin.sock"


def agent_state_dir(name: str, node: str) -> Path:
    return node_dir(name, node) / "agent"


# Node daemons run under `ip netns exec`, which mounts a fresh /sys: the host's bpffs and cgroup v2
# mounts are out of their sight there. The testbed mounts both here, outside /sys, where the
# agents see them (as a DaemonSet mounts the host's /sys/fs/bpf and /sys/fs/cgroup).
BPFFS_MOUNT = Path("/run/nodeagent-testbed-bpf")
CGROUP2_MOUNT = Path("/run/nodeagent-testbed-cgroup2")


def bpf_dir(name: str, node: str) -> Path:
    """Where the node's agent pins its eBPF capture (one bpffs for the machine: a folder each)."""
    return BPFFS_MOUNT / name / node


def sidecar_dir(name: str, node: str) -> Path:
    """The node agent's --sidecar-dir (proxyModel: sidecar): sidecars' xDS socket, bootstraps
    and pidfiles (``<namespace>.<pod>/envoy.pid``)."""
    return node_dir(name, node) / "sidecars"


def outside_netns(name: str) -> str:
    """The client outside the mesh and the nodes (topology ``outside``)."""
    return f"{netns_prefix(name)}outside"


def gateway_dir(name: str, pod: Pod) -> Path:
    """A gateway pod's --run-dir (xDS socket, Envoy's bootstrap, admin socket, pidfile) and
    its CA token (``ca: service``)."""
    return TestbedState.directory(name) / "gateways" / f"{pod.namespace}.{pod.name}"


def gateway_envoy_log(name: str, pod: Pod) -> Path:
    """A gateway's Envoy output, its access log included."""
    return logs_dir(name) / f"{pod.namespace}.{pod.name}.envoy.log"
