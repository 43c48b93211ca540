"""The node-level processes of a testbed node, as the DaemonSet runs them on a real node, and the
testbed's stand-in API server.

``install-cni --watch`` chains nodeagent-cni into the node's CNI configuration and keeps it there;
``nodeagent run`` is the node agent; with the topology's ``envoyContainer``, ``nodeagent envoy``
runs the node's Envoy apart from the agent, as the DaemonSet's envoy container does (the agent then
runs in ``--envoy-mode external``). All run inside the node's network namespace, which is that
node's "host" network.

With ``source: kubernetes`` the agents read the cluster from the Kubernetes API, as on a real
cluster, through ``--kubeconfig``. No real API server can run here (no etcd, no kube-apiserver),
so the testbed runs a stand-in (``nodeagent.testbed.apiserver``) in its underlay netns, on the
underlay's last address, reachable from every node netns and from nothing outside the testbed.
It serves the testbed's cluster directory with the real list/watch protocol and takes the
agents' pod annotation patches; what it does not do (authentication, RBAC, admission,
pagination) is listed in its module. ``source: directory`` gives the agents the directory itself.

With ``ca: service`` the testbed also runs the CA service (``nodeagent ca``) on its control-plane
host (nodeagent.testbed.control_plane) and the agents are its clients (``--ca-address`` ...);
with ``ca: plugin`` every agent signs with the shared plug-in cacerts (``--ca-dir``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from nodeagent.cni import wire
from nodeagent.cni.bundle import locate_bundle
from nodeagent.cni.install import holds_entry
from nodeagent.testbed import cgroups, externals, layout, netns
from nodeagent.testbed.control_plane import SERVER_NAME, ca_argv, monitoring_get
from nodeagent.testbed.resolver import PORT as RESOLVER_PORT
from nodeagent.testbed.state import DaemonRecord
from nodeagent.testbed.topology import External

AGENT, INSTALL_CNI, ENVOY, APISERVER, CA = "agent", "install-cni", "envoy", "apiserver", "ca"
RESOLVER = "resolver"
EXTERNAL = "external-"  # + <external>-http / -https: an external server's two processes
READY_TIMEOUT = 30.0
# The DaemonSet envoy container's capabilities (daemonset/daemonset.yaml): the envoy daemon runs
# with exactly these, so the tests exercise what the manifest grants.
ENVOY_CAPABILITIES = ("SYS_ADMIN", "NET_ADMIN")


class DaemonError(RuntimeError):
    pass


def start(
    testbed: str,
    node: str,
    daemon: str,
    proxy: bool = True,
    cert_ttl: int = 24 * 3600,
    envoy_container: bool = False,
    proxy_model: str = "node",
    source: str = "directory",
    ca_address: str | None = None,
    capture_mode: str = "nftables",
) -> DaemonRecord:
    """Start one node daemon. Its output goes to ``logs/<node>.<daemon>.log``: for the envoy
    daemon that is ``<node>.envoy.log``, where the agent's own Envoy writes in managed mode."""
    prefix: list[str] = []
    if daemon == ENVOY:
        argv = ["envoy", "--run-dir", str(layout.agent_socket(testbed, node).parent)]
        # Root, with only the container's capabilities (bounding set; none inheritable).
        caps = ",".join(f"+{c.lower()}" for c in ENVOY_CAPABILITIES)
        prefix = ["setpriv", "--bounding-set", f"-all,{caps}", "--inh-caps=-all"]
    elif daemon == AGENT:
        argv = [
            "run",
            "--node",
            node,
            *(
                ["--kubeconfig", str(layout.apiserver_kubeconfig(testbed))]
                if source == "kubernetes"
                else ["--source-dir", str(layout.cluster_dir(testbed))]
            ),
            "--cni-socket",
            str(layout.agent_socket(testbed, node)),
            "--state-dir",
            str(layout.agent_state_dir(testbed, node)),
            "--run-dir",
            str(layout.agent_socket(testbed, node).parent),
            "--envoy-log",
            str(layout.logs_dir(testbed) / f"{node}.envoy.log"),
            "--mesh-config",
            str(layout.mesh_config_file(testbed)),
        ]
        if ca_address is not None:
            # A client of the CA service, with what the DaemonSet mounts: the root ConfigMap
            # (here the stand-in's ConfigMap "volume") and the node's projected token.
            argv += [
                "--ca-address",
                ca_address,
                "--ca-root-file",
                str(layout.ca_root_file(testbed)),
                "--ca-token-file",
                str(layout.node_token_file(testbed, node)),
                "--ca-server-name",
                SERVER_NAME,
            ]
        else:
            # Every node agent signs with the same plug-in CA, as Istio's cacerts secret would.
            argv += ["--ca-dir", str(layout.cacerts_dir(testbed))]
        argv += ["--cert-ttl", str(cert_ttl)]
        argv += ["--capture-mode", capture_mode, "--bpf-dir", str(layout.bpf_dir(testbed, node))]
        if capture_mode != "nftables":
            cgroups.host_mount("bpf", layout.BPFFS_MOUNT)
            cgroups.host_mount("cgroup2", layout.CGROUP2_MOUNT)
            argv += ["--cgroup-root", str(layout.CGROUP2_MOUNT)]
        if not proxy:
            argv.append("--no-proxy")
        elif envoy_container:
            argv += ["--envoy-mode", "external"]
        elif proxy_model == "sidecar":
            # One Envoy per pod; each one's output (access log) is logs/<ns>.<pod>.envoy.log.
            argv += [
                "--proxy-model",
                "sidecar",
                "--sidecar-dir",
                str(layout.sidecar_dir(testbed, node)),
                "--sidecar-log-dir",
                str(layout.logs_dir(testbed)),
            ]
    else:
        argv = [
            "install-cni",
            "--watch",
            "--cni-bin-dir",
            str(layout.cni_bin_dir(testbed, node)),
            "--cni-conf-dir",
            str(layout.cni_conf_dir(testbed, node)),
            "--bundle",
            str(locate_bundle()),
            "--agent-socket",
            str(layout.agent_socket(testbed, node)),
            "--log-file",
            str(layout.logs_dir(testbed) / f"{node}.nodeagent-cni.log"),
        ]
    pid = _spawn(
        testbed,
        layout.node_netns(testbed, node),
        [*prefix, sys.executable, "-m", "nodeagent", *argv],
        f"{node}.{daemon}.log",
    )
    return DaemonRecord(node, daemon, pid, netns.process_start_time(pid))


def start_apiserver(testbed: str, address: str, port: int) -> DaemonRecord:
    """The stand-in API server in the underlay netns, serving the testbed's cluster directory;
    its output goes to ``logs/apiserver.log``. Ready once its kubeconfig exists. Its TokenReview
    accepts the tokens of ``layout.apiserver_tokens`` (node credentials, written later) and it
    writes ConfigMaps' keys under ``layout.configmap_dir`` (the kubelet's configMap volume)."""
    kubeconfig = layout.apiserver_kubeconfig(testbed)
    kubeconfig.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "nodeagent.testbed.apiserver",
        str(layout.cluster_dir(testbed)),
        "--listen",
        f"{address}:{port}",
        "--kubeconfig",
        str(kubeconfig),
        "--tokens",
        str(layout.apiserver_tokens(testbed)),
        "--configmap-dir",
        str(layout.configmap_dir(testbed)),
    ]
    pid = _spawn(testbed, layout.underlay_netns(testbed), argv, f"{APISERVER}.log")
    return DaemonRecord("", APISERVER, pid, netns.process_start_time(pid))


def start_ca(testbed: str, address: str) -> DaemonRecord:
    """The CA service on the control-plane host, listening on ADDRESS (its underlay IP); its
    output goes to ``logs/ca.log``. Ready once its monitoring port answers /ready 200 (it has a
    signing key, serves the certificate API and has published the root ConfigMap)."""
    argv = [sys.executable, "-m", "nodeagent", *ca_argv(testbed, address)]
    pid = _spawn(testbed, layout.control_plane_netns(testbed), argv, f"{CA}.log")
    return DaemonRecord("", CA, pid, netns.process_start_time(pid), address)


def start_resolver(testbed: str, address: str) -> DaemonRecord:
    """The testbed resolver (nodeagent.testbed.resolver) on ADDRESS:53 in its netns, answering
    from ``layout.resolver_zone``; output in ``logs/resolver.log``. Ready once it listens."""
    argv = [
        sys.executable,
        "-m",
        "nodeagent.testbed.resolver",
        "--listen",
        f"{address}:{RESOLVER_PORT}",
        "--zone",
        str(layout.resolver_zone(testbed)),
    ]
    pid = _spawn(testbed, layout.resolver_netns(testbed), argv, f"{RESOLVER}.log")
    return DaemonRecord(
        "", RESOLVER, pid, netns.process_start_time(pid), f"{address}:{RESOLVER_PORT}"
    )


def start_external(testbed: str, external: External, kind: str) -> DaemonRecord:
    """One server (externals.HTTP or HTTPS) of an external, in its netns; output in
    ``logs/external-<name>-<kind>.log``. Ready once it listens on its port."""
    name = f"{EXTERNAL}{external.name}-{kind}"
    port = external.http_port if kind == externals.HTTP else external.https_port
    pid = _spawn(
        testbed,
        layout.external_netns(testbed, external.name),
        externals.server_argv(),
        f"{name}.log",
        env=externals.server_env(testbed, external, kind),
    )
    return DaemonRecord("", name, pid, netns.process_start_time(pid), f"{external.ip}:{port}")


def _spawn(
    testbed: str, ns: str, argv: list[str], log_name: str, env: dict[str, str] | None = None
) -> int:
    """Start ARGV in netns NS, in its own session, appending its output to logs/LOG_NAME."""
    logs = layout.logs_dir(testbed)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / log_name, "ab") as log:
        proc = subprocess.Popen(
            netns.in_netns(ns, argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def stop(record: DaemonRecord) -> None:
    left = netns.terminate([(record.pid, record.start_time)])
    if left:
        raise DaemonError(f"{_what(record)} (pid {record.pid}) did not stop")


def wait_ready(testbed: str, record: DaemonRecord, timeout: float = READY_TIMEOUT) -> None:
    """install-cni: our entry is in the node's config; agent: its socket answers STATUS ok;
    envoy: Envoy's admin /ready says LIVE."""
    deadline = time.monotonic() + timeout
    why = "not started"
    while time.monotonic() < deadline:
        if not netns.alive(record.pid, record.start_time):
            raise DaemonError(f"{_what(record)} exited; {log_tail(testbed, record)}")
        why = _not_ready(testbed, record)
        if not why:
            return
        time.sleep(0.05)
    raise DaemonError(f"{_what(record)} not ready after {timeout:.0f}s: {why}")


def _what(record: DaemonRecord) -> str:
    return f"{record.name} on {record.node}" if record.node else f"the testbed's {record.name}"


def _not_ready(testbed: str, record: DaemonRecord) -> str:
    if record.name == INSTALL_CNI:
        conf_dir = layout.cni_conf_dir(testbed, record.node)
        if not (layout.cni_bin_dir(testbed, record.node) / "nodeagent-cni").is_file():
            return "nodeagent-cni binary not installed yet"
        return "" if holds_entry(conf_dir) else f"no nodeagent-cni entry in {conf_dir} yet"
    if record.name == ENVOY:
        return envoy_not_ready(testbed, record.node)
    if record.name == APISERVER:
        kubeconfig = layout.apiserver_kubeconfig(testbed)
        return "" if kubeconfig.is_file() else f"no {kubeconfig} yet"
    if record.name == RESOLVER or record.name.startswith(EXTERNAL):
        port = int(record.address.rpartition(":")[2])
        return "" if netns.listening(record.pid, port) else f"not listening on {record.address}"
    if record.name == CA:
        status, body = monitoring_get(testbed, record.address, "/ready", 1)
        return "" if status == 200 else f"CA /ready: {status or ''} {body.strip()}".strip()
    try:
        answer = wire.request(
            str(layout.agent_socket(testbed, record.node)), {"command": "STATUS"}, 2
        )
    except (OSError, wire.ProtocolError) as e:
        return str(e)
    return "" if answer.get("ok") else str(answer.get("reason"))


def admin_curl(testbed: str, node: str, path: str, max_time: float = 2.0) -> list[str]:
    """curl PATH from the node Envoy's admin: its UNIX socket in the agent's run dir (root only;
    no TCP port), from the node's netns as an operator on the node would."""
    sock = layout.envoy_admin_socket(testbed, node)
    return netns.in_netns(
        layout.node_netns(testbed, node),
        [
            "curl",
            "-sS",
            "--max-time",
            str(max_time),
            "--unix-socket",
            str(sock),
            f"http://envoy{path}",
        ],
    )


def envoy_not_ready(testbed: str, node: str) -> str:
    """Empty when the node's Envoy answers LIVE on its admin /ready, else what it said."""
    proc = subprocess.run(
        admin_curl(testbed, node, "/ready", 1),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    state = proc.stdout.strip()
    if state == "LIVE":
        return ""
    return f"Envoy admin /ready: {state or proc.stderr.strip() or 'no answer'}"


def log_tail(testbed: str, record: DaemonRecord) -> str:
    name = f"{record.node}.{record.name}" if record.node else record.name
    path: Path = layout.logs_dir(testbed) / f"{name}.log"
    try:
        return "log: " + " | ".join(path.read_text().strip().splitlines()[-5:])
    except OSError:
        return "no log"
