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


def node_netns(name: str, node: str) -> str:
    return f"{netns_prefix(name)}node-{node}"


def pod_netns(name: str, pod: Pod) -> str:
    return f"{netns_prefix(name)}pod-{pod.namespace}.{pod.name}"


def logs_dir(name: str) -> Path:
    return TestbedState.directory(name) / "logs"


def cluster_dir(name: str) -> Path:
    """Kubernetes YAML of the testbed's namespaces and pods, read by every node agent."""
    return TestbedState.directory(name) / "cluster"


def apiserver_kubeconfig(name: str) -> Path:
    """The kubeconfig of the testbed's stand-in API server (``source: kubernetes``), written by
    the server once it listens; every node agent is given it."""
    return TestbedState.directory(name) / "apiserver" / "kubeconfig"


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


def sidecar_dir(name: str, node: str) -> Path:
    """The node agent's --sidecar-dir (proxyModel: sidecar): sidecars' xDS socket, bootstraps
    and pidfiles (``<namespace>.<pod>/envoy.pid``)."""
    return node_dir(name, node) / "sidecars"
