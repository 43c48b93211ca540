"""The attack surface, from inside a captured pod (issue #20 part 3), on a one-node testbed.

Every probe runs in the client pod's network namespace (``Testbed.exec_argv``), as root and as
unprivileged users (``setpriv``: no capabilities), with the system's python3 and
``attack_probe.py``. What each test shows, and which protection does it:

- the pod's network namespace holds only Envoy's two capture listeners and no UNIX socket at
  all (abstract UNIX sockets are per network namespace: there is no path-less way to the agent
  or Envoy); the node's agent and Envoy keep none in the node's namespace either;
- every TCP port listening on the node, reached from the pod, answers nothing secret: no admin
  endpoint, no private key, no encoding of the CA's signing key, no node token;
- the agent's CNI and xDS sockets and Envoy's admin socket are files: root-only by mode (a
  non-root process, on the node or in a pod, gets EACCES), and out of a pod's sight by its mount
  namespace (shown in a private mount and PID namespace with a root of its own, as a container
  has; in the testbed, pods share the host's file system, so root in a pod's netns alone can
  reach them: the netns is not that boundary);
- the mesh bypass mark (SO_MARK 0x539) cannot be set by a process without CAP_NET_ADMIN and
  CAP_NET_RAW, and its traffic stays captured, uid 1337 included (Istio's sidecar exempts that
  uid; nothing here does); CAP_NET_RAW alone suffices on Linux >= 5.17, and CAP_NET_ADMIN can
  also delete the pod's nftables table: such a pod bypasses its own capture, never another
  pod's (STRICT mTLS at the destination refuses its plaintext; spoofing the node's probe source
  does not complete a connection), as Istio documents for its sidecar
  (istio.io/latest/docs/ops/best-practices/security/#understand-traffic-capture-limitations).

Network safety: every address is inside namespaces the testbed created.
"""

from __future__ import annotations

import base64
import json
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent import ports
from nodeagent.testbed import control_plane, layout, netns
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration import keyscan
from tests.integration.helpers import http_status, put_yaml, ruleset, wait_for

pytestmark = pytest.mark.integration

NAME = "tbattack"
CLIENT, SERVER = "shop/client-1", "shop/web-1"
TOPOLOGY = f"""
name: {NAME}
nodes: [{{name: n1}}]
namespaces:
  - {{name: shop, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: web-1, namespace: shop, node: n1, serviceAccount: web-sa, labels: {{app: web}},
     workload: {{type: fake-service, port: 80}}}}
  - {{name: client-1, namespace: shop, node: n1, serviceAccount: client-sa,
     labels: {{app: client}}}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}},
     ports: [{{name: http, port: 8080, targetPort: 80}}]}}
"""
STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: STRICT}}
"""
URL = "http://web.shop:8080/"
PROBE = Path(__file__).with_name("attack_probe.py").read_text()
PYTHON = "/usr/bin/python3"  # the system's: an unprivileged user cannot be assumed to reach .venv
CLOSED_PORT = 9  # nothing listens on it on the node: a direct connection is refused

# Who runs a probe: a prefix to its argv (setpriv drops uid, groups and capabilities).
ROOT: list[str] = []
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
UID_1337 = ["setpriv", f"--reuid={ports.PROXY_UID}", f"--regid={ports.PROXY_UID}", "--clear-groups"]
UID_1337.append("--")
ROOT_NO_NET_CAPS = ["setpriv", "--bounding-set=-net_admin,-net_raw", "--"]
ROOT_NET_RAW_ONLY = ["setpriv", "--bounding-set=-net_admin", "--"]


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        bed = Testbed.up(loads_topology(TOPOLOGY, "test_attack_surface"), TOPOLOGY, "attack")
        put_yaml(bed, "strict.yaml", STRICT, namespace="shop")
        wait_for(lambda: bypassing_plaintext(bed) == "", 20, "STRICT mTLS at web-1", step=0.3)
        assert http_status(bed.exec, CLIENT, URL) == "200"  # the mesh path works
        yield bed
    finally:
        down(NAME)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd="/")


def probe(tb: Testbed, who: list[str], *args: str, pod: str = CLIENT) -> dict[str, Any]:
    done = run(tb.exec_argv(pod, [*who, PYTHON, "-c", PROBE, *args]))
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def in_node(tb: Testbed, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run(netns.in_netns(layout.node_netns(tb.name, "n1"), argv))


def bypassing_plaintext(tb: Testbed) -> str:
    """The status line web-1's port 80 gives a plaintext request that bypassed the client's
    capture (root, SO_MARK set): the app's answer under PERMISSIVE, none under STRICT."""
    web = tb.pod_ip(SERVER)
    status: str = probe(tb, ROOT, "http", web, "80", "mark", "/")["answers"]["/"]["status"]
    return status


def gateway(tb: Testbed) -> str:
    """The node's address on the pod network (the pod's default route)."""
    route = run(tb.exec_argv(CLIENT, ["ip", "-4", "route", "show", "default"])).stdout.split()
    return route[route.index("via") + 1]


def listening(argv_prefix: list[str], flags: str) -> set[str]:
    """``<netid> <local address>`` of each socket ``ss FLAGS`` lists (FLAGS must select more than
    one socket type, e.g. -ltnu or -x, so that ss prints the netid column)."""
    done = run([*argv_prefix, "ss", "-H", flags])
    assert done.returncode == 0, done.stderr
    return {f"{line.split()[0]} {line.split()[4]}" for line in done.stdout.splitlines()}


def sockets(tb: Testbed) -> dict[str, Path]:
    return {
        "cni": layout.agent_socket(tb.name, "n1"),
        "xds": layout.agent_socket(tb.name, "n1").parent / "xds.sock",
        "envoy-admin": layout.envoy_admin_socket(tb.name, "n1"),
    }


# -- what the pod's network namespace holds ----------------------------------------------------


def test_the_pods_netns_holds_only_the_capture_listeners_and_no_unix_socket(tb: Testbed) -> None:
    """Envoy's admin and the agent's sockets are not in the pod's netns; abstract UNIX sockets
    are per netns, and neither the pod's nor the node's holds one of the agent or Envoy (a
    hostNetwork pod shares the node's): nothing is reachable there without a file path."""
    pod = netns.in_netns(tb.pod_netns(CLIENT), [])
    assert listening(pod, "-ltnu") == {
        f"tcp 127.0.0.1:{ports.OUTBOUND_PORT}",
        f"tcp 0.0.0.0:{ports.INBOUND_PORT}",
    }
    assert listening(pod, "-xa") == set()
    for who in (ROOT, NOBODY):
        assert probe(tb, who, "netns")["sockets"] == 0
    node = in_node_prefix(tb)
    named = {line.split()[1] for line in listening(node, "-xl")}
    assert named == {str(p) for p in sockets(tb).values()}
    abstract = {line for line in listening(node, "-xa") if line.split()[1].startswith("@")}
    assert abstract == set()


def test_node_ports_reached_from_the_pod_answer_nothing_secret(tb: Testbed) -> None:
    """Every TCP port listening on the node (the agent's :15020 metrics and :15021 readiness,
    Envoy's :15090 stats) and the CA service's monitoring port, from the pod as root and as
    nobody: Istio's admin and debug endpoints answer 404 or nothing, and no answer carries a
    private key, any encoding of the CA's signing key, or the node's CA token."""
    on_node = listening(in_node_prefix(tb), "-ltnu")
    assert all(line.startswith("tcp ") for line in on_node), on_node  # and no UDP
    node_ports = {int(line.rsplit(":", 1)[1]) for line in on_node}
    assert node_ports == {
        ports.AGENT_METRICS_PORT,
        ports.AGENT_READINESS_PORT,
        ports.ENVOY_STATS_PORT,
    }
    needles = keyscan.key_encodings(tb.read_secret("nodeagent-ca")["ca-key.pem"])
    needles["private-key-pem"] = b"PRIVATE KEY"
    needles["node-token"] = layout.node_token_file(tb.name, "n1").read_bytes().strip()
    admin = ["/config_dump", "/certs", "/clusters", "/listeners", "/server_info", "/runtime"]
    admin += ["/memory", "/stats", "/logging", "/debug/config_dump", "/debug/syncz"]
    posts = ["POST:/quitquitquit", "POST:/healthcheck/fail", "POST:/logging?level=trace"]
    public = ["/", "/stats/prometheus", "/metrics", "/healthz/ready", "/ready"]
    targets = [(gateway(tb), port) for port in sorted(node_ports)]
    targets.append((tb.ca_ip, control_plane.MONITORING_PORT))
    ok, seen = set(), {}
    for host, port in targets:
        for who in (ROOT, NOBODY):
            answers = probe(tb, who, "http", host, str(port), *public, *admin, *posts)["answers"]
            for path, answer in answers.items():
                seen[f"{port}{path}"] = answer["status"] or answer.get("error", "closed")
                body = base64.b64decode(answer["body"])
                leaked = {name for name, needle in needles.items() if needle in body}
                assert not leaked, f"{host}:{port}{path} returned {leaked}"
                if " 200" in answer["status"]:
                    ok.add((port, path))
                    assert path in public, f"{host}:{port}{path} answered 200"
    # The public endpoints still serve (so the probe did reach them).
    served = {(15020, "/stats/prometheus"), (15021, "/healthz/ready"), (15090, "/ready")}
    assert served <= ok, seen
    assert http_status(tb.exec, CLIENT, URL) == "200"  # the POSTs changed nothing


def in_node_prefix(tb: Testbed) -> list[str]:
    return netns.in_netns(layout.node_netns(tb.name, "n1"), [])


# -- the agent's and Envoy's UNIX sockets ------------------------------------------------------


def test_the_sockets_are_root_only_files(tb: Testbed) -> None:
    """Mode 0600, owned by root, in a 0700 directory: a non-root process gets EACCES, on the
    node (host network) and in the pod alike; uid 1337 is no exception."""
    paths = sockets(tb)
    for path in paths.values():
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600 and path.stat().st_uid == 0
    assert stat.S_IMODE(paths["cni"].parent.stat().st_mode) == 0o700
    names = [str(p) for p in paths.values()]
    for who in (NOBODY, UID_1337):
        assert {v for k, v in probe(tb, who, "unix", *names).items() if k != "uid"} == {"EACCES"}
        on_node = in_node(tb, [*who, PYTHON, "-c", PROBE, "unix", *names])
        answer = json.loads(on_node.stdout)
        assert {v for k, v in answer.items() if k != "uid"} == {"EACCES"}, answer


def test_a_pods_own_mount_namespace_has_no_path_to_the_sockets(tb: Testbed) -> None:
    """A container has its own mount namespace (its image as root) and PID namespace: emulated
    with ``unshare --mount --pid`` and a chroot into a root holding only the OS's /usr and its
    own /proc. There, root in the pod finds none of the sockets, and /proc shows no agent whose
    /proc/<pid>/root could lead to them. Without it (the testbed's pods share the host's file
    system), root in the pod's netns does connect: the boundary is the mount namespace."""
    names = [str(p) for p in sockets(tb).values()]
    shared = probe(tb, ROOT, "unix", *names)
    assert {v for k, v in shared.items() if k != "uid"} == {"connected"}
    agent_pid = tb.daemon("n1", "agent").pid
    through_proc = f"/proc/{agent_pid}/root{names[0]}"
    inside = pod_like(tb, ["unix", *names, through_proc])
    assert {v for k, v in inside.items() if k != "uid"} == {"ENOENT"}, inside
    assert agent_pid not in pod_like(tb, ["procs"])["pids"]


def pod_like(tb: Testbed, args: list[str]) -> dict[str, Any]:
    """The probe as root in the client pod's netns, in a private mount and PID namespace whose
    root is a tmpfs holding /usr (read-only bind) and a fresh /proc. Nothing is left behind:
    the mounts die with the namespace, the directory is removed."""
    root = tempfile.mkdtemp(prefix="pod-root-")
    script = f"""set -e
mount -t tmpfs -o mode=0755 pod-root {root}
mkdir {root}/usr {root}/proc {root}/tmp
mount --bind /usr {root}/usr
mount -o remount,bind,ro {root}/usr
for d in bin lib lib64 sbin; do [ -e /usr/$d ] && ln -s usr/$d {root}/$d; done
mount -t proc proc {root}/proc
exec chroot {root} "$@"
"""
    try:
        argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork"]
        argv += ["sh", "-c", script, "pod", PYTHON, "-c", PROBE, *args]
        done = run(tb.exec_argv(CLIENT, argv))
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the bypass mark and CAP_NET_ADMIN ---------------------------------------------------------


def kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


# SO_MARK needs CAP_NET_ADMIN, or CAP_NET_RAW since Linux 5.17 ("net: allow SO_MARK with
# CAP_NET_RAW"; socket(7)): containerd's default capability set holds NET_RAW.
NET_RAW_MARKS = kernel_at_least(5, 17)


@pytest.mark.parametrize(
    ("who", "can_mark"),
    [
        pytest.param(NOBODY, False, id="nobody"),
        pytest.param(UID_1337, False, id="uid-1337"),
        pytest.param(ROOT_NO_NET_CAPS, False, id="root-without-net-admin-and-net-raw"),
        pytest.param(ROOT_NET_RAW_ONLY, NET_RAW_MARKS, id="root-with-net-raw-only"),
        pytest.param(ROOT, True, id="root-with-net-admin"),
    ],
)
def test_the_bypass_mark_needs_a_network_capability(
    tb: Testbed, who: list[str], can_mark: bool
) -> None:
    """Connecting to a node port where nothing listens: captured, Envoy's outbound listener
    accepts it; bypassing capture, the node refuses it. Without the mark every user's
    connection is captured; with it, only a process allowed to set SO_MARK bypasses."""
    host = gateway(tb)
    assert probe(tb, who, "connect", host, str(CLOSED_PORT))["connect"] == "accepted"
    marked = probe(tb, who, "connect", host, str(CLOSED_PORT), "mark")
    if can_mark:
        assert marked["mark"] == "set" and marked["connect"] == "refused", marked
    else:
        assert marked["mark"] == "EPERM" and marked["connect"] == "accepted", marked


def test_a_bypassing_pod_cannot_bypass_another_pods_capture(tb: Testbed) -> None:
    """Root with CAP_NET_ADMIN in the client pod: its marked plaintext reaches web-1's netns,
    whose own capture (marks do not cross network namespaces) hands it to Envoy's inbound
    listener, and STRICT mTLS refuses it; spoofing the node's probe source (169.254.7.127, let
    through unredirected for kubelet's probes) gets no answer back: the reply is routed to the
    node, which has no connection to hand it to."""
    web = tb.pod_ip(SERVER)
    marked = probe(tb, ROOT, "connect", web, "80", "mark")
    assert marked == {"mark": "set", "connect": "accepted", "uid": 0}  # Envoy's inbound accepts
    assert bypassing_plaintext(tb) == ""  # ...and closes it: no HTTP answer
    add = ["ip", "addr", "add", f"{ports.PROBE_SOURCE}/32", "dev", "eth0"]
    assert run(tb.exec_argv(CLIENT, add)).returncode == 0
    try:
        spoofed = probe(tb, ROOT, "connect", web, "80", "mark", f"source={ports.PROBE_SOURCE}")
        assert spoofed["connect"] == "timeout", spoofed
    finally:
        run(tb.exec_argv(CLIENT, ["ip", "addr", "del", f"{ports.PROBE_SOURCE}/32", "dev", "eth0"]))


def test_net_admin_can_delete_the_pods_capture_and_the_agent_restores_it(tb: Testbed) -> None:
    """Root with CAP_NET_ADMIN deletes the pod's nftables table: every process of the pod then
    bypasses its capture (nobody included), and STRICT at web-1 still refuses its plaintext.
    The agent puts the table back when it re-verifies (every --reconcile-interval, 60 s by
    default, and at its start: restarted here)."""
    pod_netns = tb.pod_netns(CLIENT)
    host = gateway(tb)
    delete = ["nft", "delete", "table", "inet", "nodeagent"]
    assert run(tb.exec_argv(CLIENT, delete)).returncode == 0
    try:
        assert ruleset(pod_netns) == []
        assert probe(tb, NOBODY, "connect", host, str(CLOSED_PORT))["connect"] == "refused"
        answer = probe(tb, NOBODY, "http", tb.pod_ip(SERVER), "80", "/")["answers"]["/"]
        assert answer["status"] == "", answer
    finally:
        tb.restart_agent("n1")
    assert [t["name"] for t in ruleset(pod_netns)] == ["nodeagent"]
    assert probe(tb, NOBODY, "connect", host, str(CLOSED_PORT))["connect"] == "accepted"
    wait_for(lambda: http_status(tb.exec, CLIENT, URL) == "200", 20, "mesh traffic", step=0.3)
