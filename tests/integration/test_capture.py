"""In-pod capture end to end: the real CNI chain (bridge + host-local + nodeagent-cni as installed
by install-cni), the node agent and its capture, on a two-node testbed, once per capture mode:
nftables, and eBPF (outbound TCP by cgroup connect hooks, inbound by sk_lookup; no nftables).

Pods run capture_probe.py: whatever listener a connection lands on answers with its port and the
connection's original destination, so a client sees exactly what capture did to it. In eBPF mode
the probe's own 0.0.0.0:15006 is the pod's inbound listener the agent steers inbound to, as it
would Envoy's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nodeagent import ports
from nodeagent.cni.install import holds_entry
from nodeagent.redirect import bpf_sys
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.ebpf import POD_LINKS, netns_cookie
from nodeagent.redirect.ebpf_maps import addr_key, listener_key, pod_key
from nodeagent.redirect.nftables import NODE_RULES, NftablesBackend
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, TestbedError, bridge_conflist, down
from nodeagent.testbed.topology import Pod, Workload, loads_topology
from tests.integration.helpers import agent_pods, node_metrics, ruleset, wait_for

pytestmark = pytest.mark.integration

PROBE = str(Path(__file__).with_name("capture_probe.py"))
PY = sys.executable
SERVE = [PY, PROBE, "serve", "15001@127.0.0.1", "15006", "8080", "9090", "7777"]
NAME = "tbcap"
TOPOLOGY = f"""
name: {NAME}
proxy: false  # capture itself: the probe pods listen on 15001/15006 where Envoy would
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
  - {{name: plain}}
pods:
  - name: app
    namespace: mesh
    node: n1
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: excluded
    namespace: mesh
    node: n1
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "7777"
      traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.244.2.0/24"
      traffic.sidecar.istio.io/excludeInboundPorts: "9090"
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: optout
    namespace: mesh
    node: n1
    annotations: {{nodeagent.io/mesh: disabled}}
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: asks-nft
    namespace: mesh
    node: n1
    annotations: {{nodeagent.io/capture-mode: nftables}}
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
  - name: server
    namespace: plain
    node: n2
    workload: {{type: command, command: {json.dumps(SERVE)}, port: 8080}}
"""


@pytest.fixture(scope="module", params=["nftables", "ebpf"])
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    text = TOPOLOGY + f"captureMode: {request.param}\n"
    down(NAME)
    topology = loads_topology(text, "test_capture")
    try:
        tb = Testbed.up(topology, text, "test_capture")
        if request.param == "ebpf":  # the probes listen after their ADD: steered within 0.2 s
            for pod in ("mesh/app", "mesh/excluded"):
                wait_for(lambda pod=pod: steered(tb, pod), 5, f"{pod}'s inbound listener")
        yield tb
    finally:
        down(NAME)


def ebpf(tb: Testbed) -> bool:
    return tb.topology.capture_mode == "ebpf"


def bpf_map(tb: Testbed, name: str) -> str:
    return str(layout.bpf_dir(tb.name, "n1") / "maps" / name)


def steered(tb: Testbed, pod: str) -> bool:
    """Whether POD's inbound listener is in n1's listeners sockhash."""
    cookie = netns_cookie(Path("/run/netns") / tb.pod_netns(pod))
    with bpf_sys.pinned(bpf_map(tb, "listeners")) as fd:
        return bpf_sys.map_lookup(fd, listener_key(cookie), 8) is not None


def pod_pins(tb: Testbed, key: str, uid: str = "") -> list[str]:
    """The eBPF links pinned for pod KEY (or UID) by n1's agent."""
    uid = uid or tb.state.pods[key].uid
    folder = layout.bpf_dir(tb.name, "n1") / "pods" / uid
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def landed(tb: Testbed, pod: str, host: str, port: int, *extra: str) -> dict[str, Any]:
    """Connect from POD to host:port; the answer says which listener got it, dialled what."""
    proc = tb.exec(pod, [PY, PROBE, "connect", host, str(port), *extra])
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def test_a_mesh_pod_holds_exactly_our_table(testbed: Testbed) -> None:
    tables = ruleset(testbed.pod_netns("mesh/app"))
    if ebpf(testbed):  # eBPF mode keeps nothing in nftables (DNS: test_dns_proxy)
        assert tables == []
        assert not NftablesBackend().holds_table(Path("/run/netns") / testbed.pod_netns("mesh/app"))
    else:
        assert [(t["family"], t["name"]) for t in tables] == [("inet", "nodeagent")]
        check = NftablesBackend(NODE_RULES).verify(
            Path("/run/netns") / testbed.pod_netns("mesh/app"), CaptureSpec()
        )
        assert check.ok, check.reason
    record = agent_pods(testbed.name, "n1")["mesh/app"]
    assert (record["state"], record["backend"]) == ("captured", testbed.topology.capture_mode)
    assert pod_pins(testbed, "mesh/app") == (POD_LINKS if ebpf(testbed) else [])


def test_a_pod_asking_for_nftables_gets_it_in_either_mode(testbed: Testbed) -> None:
    """nodeagent.io/capture-mode: nftables on a pod: its capture is the nftables backend's,
    whatever its node's --capture-mode; `nodeagent pods` says so."""
    netns = Path("/run/netns") / testbed.pod_netns("mesh/asks-nft")
    check = NftablesBackend(NODE_RULES).verify(netns, CaptureSpec(mode="nftables"))
    assert check.ok, check.reason
    record = agent_pods(testbed.name, "n1")["mesh/asks-nft"]
    assert (record["state"], record["backend"]) == ("captured", "nftables")
    assert pod_pins(testbed, "mesh/asks-nft") == []
    answer = landed(testbed, "mesh/asks-nft", "192.0.2.10", 443)
    assert (answer["pod"], answer["listener"]) == ("asks-nft", ports.OUTBOUND_PORT), answer
    assert answer["original_dst"] == "192.0.2.10:443"


def test_outbound_lands_on_15001_with_the_dialled_destination(testbed: Testbed) -> None:
    server_ip = testbed.pod_ip("plain/server")
    for host, port in [("10.96.0.99", 80), (server_ip, 8080), ("192.0.2.10", 443)]:
        answer = landed(testbed, "mesh/app", host, port)
        assert (answer["pod"], answer["listener"]) == ("app", ports.OUTBOUND_PORT), answer
        assert answer["original_dst"] == f"{host}:{port}"
        # the app's socket names what it dialled as its peer (eBPF: getpeername4)
        assert answer["app_peer"] == f"{host}:{port}"
    # IPv4 dialled on a dual-stack socket is IPv4 traffic (eBPF: connect6 -> ::ffff:127.0.0.1)
    answer = landed(testbed, "mesh/app", "::ffff:192.0.2.11", 443)
    assert (answer["pod"], answer["listener"]) == ("app", ports.OUTBOUND_PORT), answer
    assert answer["original_dst"] == "192.0.2.11:443"
    assert answer["app_peer"] == "::ffff:192.0.2.11:443"


def test_inbound_lands_on_15006_with_the_original_port(testbed: Testbed) -> None:
    app_ip = testbed.pod_ip("mesh/app")
    answer = landed(testbed, "plain/server", app_ip, 8080)
    assert (answer["pod"], answer["listener"]) == ("app", ports.INBOUND_PORT)
    if ebpf(testbed):  # sk_lookup rewrites nothing: the listener's socket has what was dialled
        # (and getsockopt answers SO_ORIGINAL_DST with it, as Envoy's original_dst cluster needs)
        assert answer["local"] == answer["original_dst"] == f"{app_ip}:8080", answer
    else:  # NAT: the socket is on 15006, conntrack keeps what was dialled
        assert answer["original_dst"] == f"{app_ip}:8080"
        assert answer["local"] == f"{app_ip}:{ports.INBOUND_PORT}"


def test_envoy_marked_and_loopback_traffic_is_not_captured(testbed: Testbed) -> None:
    server_ip = testbed.pod_ip("plain/server")
    marked = landed(testbed, "mesh/app", server_ip, 8080, "--mark", hex(ports.MESH_MARK))
    assert (marked["pod"], marked["listener"]) == ("server", 8080)
    local = landed(testbed, "mesh/app", "127.0.0.1", 8080)
    assert (local["pod"], local["listener"]) == ("app", 8080)
    # the pod calling its own IP (as Envoy delivers inbound to the app, from inside the pod)
    own = landed(testbed, "mesh/app", testbed.pod_ip("mesh/app"), 8080)
    assert (own["pod"], own["listener"]) == ("app", 8080)


def test_node_probes_reach_the_app_from_the_probe_source(testbed: Testbed) -> None:
    app_ip = testbed.pod_ip("mesh/app")
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            layout.node_netns(testbed.name, "n1"),
            PY,
            PROBE,
            "connect",
            app_ip,
            "8080",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    answer = json.loads(proc.stdout)
    assert (answer["pod"], answer["listener"]) == ("app", 8080)  # the app itself, not 15006
    assert answer["peer"].split(":")[0] == ports.PROBE_SOURCE


def test_istio_annotations_exclude_ports_and_ranges(testbed: Testbed) -> None:
    server_ip = testbed.pod_ip("plain/server")
    # An excluded port reaches the real server (the server answers as itself, on 7777).
    real = landed(testbed, "mesh/excluded", server_ip, 7777)
    assert (real["pod"], real["listener"]) == ("server", 7777)
    in_range = landed(testbed, "mesh/excluded", server_ip, 8080)  # 10.244.2.0/24 is excluded
    assert (in_range["pod"], in_range["listener"]) == ("server", 8080)
    excluded_ip = testbed.pod_ip("mesh/excluded")
    inbound_excluded = landed(testbed, "plain/server", excluded_ip, 9090)
    assert (inbound_excluded["pod"], inbound_excluded["listener"]) == ("excluded", 9090)
    inbound_captured = landed(testbed, "plain/server", excluded_ip, 8080)
    assert inbound_captured["listener"] == ports.INBOUND_PORT


def test_an_opted_out_pod_gets_no_table(testbed: Testbed) -> None:
    assert ruleset(testbed.pod_netns("mesh/optout")) == []
    assert pod_pins(testbed, "mesh/optout") == []
    record = agent_pods(testbed.name, "n1")["mesh/optout"]
    assert record["state"] == "not-in-mesh" and "opts out" in record["reason"]
    assert ruleset(testbed.pod_netns("plain/server")) == []


def test_capture_state_is_exported_as_metrics(testbed: Testbed) -> None:
    """Counted by state; :15020 is unauthenticated, so it names no pod (#12): each pod's own
    state is `nodeagent pods`, over the root-only socket."""
    text = node_metrics(testbed.name, "n1")
    pods = agent_pods(testbed.name, "n1")
    for state in ("captured", "not-in-mesh"):
        count = sum(1 for r in pods.values() if r["state"] == state)
        assert count and f'nodeagent_pods{{state="{state}"}} {count}.0' in text, text
    assert "nodeagent_pod_capture_state" not in text
    assert f'nodeagent_capture_mode{{mode="{testbed.topology.capture_mode}"}} 1.0' in text
    for key in pods:
        assert f'"{key.rpartition("/")[2]}"' not in text


def test_conflist_rewritten_by_the_primary_cni_gets_our_entry_back(testbed: Testbed) -> None:
    conf_dir = layout.cni_conf_dir(testbed.name, "n2")
    assert holds_entry(conf_dir)
    node = testbed.topology.node("n2")
    (conf_dir / "10-testbed.conflist").write_text(json.dumps(bridge_conflist(testbed.name, node)))
    assert not holds_entry(conf_dir)
    took = wait_for(lambda: holds_entry(conf_dir), 5, "our entry back", step=0.02)
    assert took < 1.0, f"our entry came back after {took:.2f}s"


def test_agent_down_fails_add_closed_and_agent_back_lets_it_succeed(testbed: Testbed) -> None:
    late = Pod("mesh", "late", "n1", "default", {}, {}, Workload("sleep"))
    testbed.stop_agent("n1")
    try:
        with pytest.raises(TestbedError) as err:
            testbed.add_pod(late)
        assert "code 11" in str(err.value)
        assert str(layout.agent_socket(testbed.name, "n1")) in str(err.value)
        assert not Path("/run/netns", layout.pod_netns(testbed.name, late)).exists()
    finally:
        testbed.start_agent("n1")
    testbed.add_pod(late)
    tables = [t["name"] for t in ruleset(layout.pod_netns(testbed.name, late))]
    assert tables == ([] if ebpf(testbed) else ["nodeagent"])
    testbed.remove_pod(late)


def test_twenty_pods_created_at_once_are_all_captured(testbed: Testbed) -> None:
    pods = [
        Pod("mesh", f"burst-{i}", "n1" if i % 2 else "n2", "default", {}, {}, Workload("sleep"))
        for i in range(20)
    ]
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(testbed.add_pod, pods))
    uids = [testbed.state.pods[p.key].uid for p in pods if p.node == "n1"]
    try:
        for pod in pods:
            tables = [t["name"] for t in ruleset(layout.pod_netns(testbed.name, pod))]
            assert tables == ([] if ebpf(testbed) else ["nodeagent"]), pod.key
            if ebpf(testbed) and pod.node == "n1":
                assert pod_pins(testbed, pod.key) == POD_LINKS, pod.key
        records = {**agent_pods(testbed.name, "n1"), **agent_pods(testbed.name, "n2")}
        assert all(records[p.key]["state"] == "captured" for p in pods)
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(testbed.remove_pod, pods))
    records = {**agent_pods(testbed.name, "n1"), **agent_pods(testbed.name, "n2")}
    assert not [p.key for p in pods if p.key in records]
    # eBPF: a deleted pod's links are detached and unpinned
    assert uids and not [uid for uid in uids if pod_pins(testbed, "", uid)]


def test_captured_pods_stay_captured_while_the_agent_is_down(testbed: Testbed) -> None:
    """eBPF: the pinned links outlive the agent, as nftables' tables do."""
    testbed.stop_agent("n1")
    try:
        answer = landed(testbed, "mesh/app", "10.96.0.99", 80)
        assert answer["listener"] == ports.OUTBOUND_PORT
        assert answer["original_dst"] == "10.96.0.99:80"
        inbound = landed(testbed, "plain/server", testbed.pod_ip("mesh/app"), 8080)
        assert (inbound["pod"], inbound["listener"]) == ("app", ports.INBOUND_PORT)
    finally:
        testbed.start_agent("n1")


def test_inbound_without_a_listener_in_the_map_is_refused_never_the_app(
    testbed: Testbed,
) -> None:
    """Fail closed: while the pod's inbound listener is not in sk_lookup's map (Envoy
    restarting, not yet steered), a connection to a captured port is refused, never handed to
    the app; the agent's start (its reconcile) puts the listener back."""
    if not ebpf(testbed):
        pytest.skip("nftables redirects to :15006 whatever listens there")
    app_ip = testbed.pod_ip("mesh/app")
    cookie = netns_cookie(Path("/run/netns") / testbed.pod_netns("mesh/app"))
    testbed.stop_agent("n1")  # nothing steers the listener back meanwhile
    try:
        with bpf_sys.pinned(bpf_map(testbed, "listeners")) as fd:
            assert bpf_sys.map_delete(fd, listener_key(cookie))
        for port in (8080, 9090):
            proc = testbed.exec("plain/server", [PY, PROBE, "connect", app_ip, str(port)])
            assert proc.returncode != 0 and "Connection refused" in proc.stderr, proc
        # not captured: the node's probes and the excluded pod's excluded port still pass
        excluded = landed(testbed, "plain/server", testbed.pod_ip("mesh/excluded"), 9090)
        assert excluded["listener"] == 9090
    finally:
        testbed.start_agent("n1")
    wait_for(lambda: steered(testbed, "mesh/app"), 5, "the inbound listener back")
    answer = landed(testbed, "plain/server", app_ip, 8080)
    assert (answer["pod"], answer["listener"]) == ("app", ports.INBOUND_PORT)


def test_two_pods_dialling_the_same_address_from_the_same_ports_each_get_theirs(
    testbed: Testbed,
) -> None:
    """The key-collision case: two pods on one node, 100 connections each at once, both from
    local ports 40000-40099 to the same address (every pod has its own 127.0.0.1, so eBPF's
    keys carry the netns): each lands on its own pod with exactly what it dialled."""
    procs = {
        pod: subprocess.Popen(
            testbed.exec_argv(pod, [PY, PROBE, "burst", "192.0.2.10", first, "100", "40000"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        for pod, first in (("mesh/app", "1000"), ("mesh/excluded", "2000"))
    }
    misrouted = []
    for pod, proc in procs.items():
        out, _ = proc.communicate(timeout=90)
        results = json.loads(out)
        assert len(results) == 100
        for r in results:
            answer = r.get("answer") or {}
            if (answer.get("pod"), answer.get("listener"), answer.get("original_dst")) != (
                pod.split("/")[1],
                ports.OUTBOUND_PORT,
                r["dialled"],
            ):
                misrouted.append((pod, r))
    assert misrouted == [], misrouted[:5]


def _conntrack(tb: Testbed, pod: str) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", tb.pod_netns(pod), "cat", "/proc/net/nf_conntrack"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ebpf_redirects_leave_no_conntrack_entry(testbed: Testbed) -> None:
    """nftables' REDIRECT is NAT: conntrack keeps the dialled address; eBPF rewrites the
    connect itself and steers inbound by socket lookup, so the pod's conntrack never sees
    either."""
    assert landed(testbed, "mesh/app", "198.51.100.7", 8443)["listener"] == ports.OUTBOUND_PORT
    app_ip, server_ip = testbed.pod_ip("mesh/app"), testbed.pod_ip("plain/server")
    assert landed(testbed, "plain/server", app_ip, 7777)["listener"] == ports.INBOUND_PORT
    table = _conntrack(testbed, "mesh/app").splitlines()
    entries = [line for line in table if "198.51.100.7" in line]
    inbound = [
        line for line in table if f"src={server_ip} dst={app_ip}" in line and "=7777" in line
    ]
    if ebpf(testbed):
        assert entries == [] and inbound == [], (entries, inbound)
    else:
        assert entries and "dport=8443" in entries[0] and "sport=15001" in entries[0], entries
        assert inbound and f"sport={ports.INBOUND_PORT}" in inbound[0], inbound


def test_a_pod_deleted_while_the_agent_is_down_leaves_no_pins_nor_entries(
    testbed: Testbed,
) -> None:
    """eBPF keeps per-pod state outside the pod (pins, map entries): the agent's reconcile at
    start drops that of a pod whose DEL it never saw."""
    if not ebpf(testbed):
        pytest.skip("nftables keeps nothing outside the pod's netns")
    gone = Pod("mesh", "gone", "n1", "default", {}, {}, Workload("sleep"))
    testbed.add_pod(gone)
    uid = testbed.state.pods[gone.key].uid
    cookie = netns_cookie(Path("/run/netns") / layout.pod_netns(testbed.name, gone))
    pods_map = str(layout.bpf_dir(testbed.name, "n1") / "maps" / "pods")
    address = addr_key(testbed.state.pods[gone.key].ip)
    with bpf_sys.pinned(pods_map) as fd:
        assert bpf_sys.map_lookup(fd, pod_key(cookie), 4) is not None
    with bpf_sys.pinned(bpf_map(testbed, "pod_addrs")) as fd:
        assert bpf_sys.map_lookup(fd, address, 8) == pod_key(cookie)
    assert pod_pins(testbed, "", uid) == POD_LINKS
    testbed.stop_agent("n1")
    try:
        testbed.remove_pod(gone)  # its DEL does not reach the agent (the plugin lets DEL pass)
    finally:
        testbed.start_agent("n1")
    assert pod_pins(testbed, "", uid) == []
    with bpf_sys.pinned(pods_map) as fd:
        assert bpf_sys.map_lookup(fd, pod_key(cookie), 4) is None
    with bpf_sys.pinned(bpf_map(testbed, "pod_addrs")) as fd:
        assert bpf_sys.map_lookup(fd, address, 8) is None


def test_agent_restart_reverifies_and_restores_a_deleted_table(testbed: Testbed) -> None:
    app_netns = testbed.pod_netns("mesh/app")
    if ebpf(testbed):  # a pod's connect4 link detached and unpinned
        pin = layout.bpf_dir(testbed.name, "n1") / "pods" / testbed.state.pods["mesh/app"].uid
        with bpf_sys.pinned(str(pin / "connect4")) as link:
            bpf_sys.link_detach(link, "test")
        (pin / "connect4").unlink()
    else:
        subprocess.run(
            ["ip", "netns", "exec", app_netns, "nft", "delete", "table", "inet", "nodeagent"],
            check=True,
        )
        assert ruleset(app_netns) == []
    testbed.restart_agent("n1")
    tables = [t["name"] for t in ruleset(app_netns)]
    assert tables == ([] if ebpf(testbed) else ["nodeagent"])
    assert pod_pins(testbed, "mesh/app") == (POD_LINKS if ebpf(testbed) else [])
    record = agent_pods(testbed.name, "n1")["mesh/app"]
    assert record["state"] == "captured" and "repaired" in record["reason"]
    assert "nodeagent_capture_repairs_total 1.0" in node_metrics(testbed.name, "n1")
    # The other pods were re-verified and kept their capture.
    assert agent_pods(testbed.name, "n1")["mesh/excluded"]["state"] == "captured"
    answer = landed(testbed, "mesh/app", "10.96.0.99", 80)
    assert answer["listener"] == ports.OUTBOUND_PORT
    inbound = landed(testbed, "plain/server", testbed.pod_ip("mesh/app"), 8080)
    assert inbound["listener"] == ports.INBOUND_PORT


@pytest.mark.parametrize(
    ("stdin", "env", "code", "words"),
    [
        ("{not json", {}, 6, "failed to decode"),
        ('{"cniVersion": "2.5.0", "name": "testbed", "type": "nodeagent-cni"}', {}, 1, "2.5.0"),
        ("NO-PREV", {}, 7, "prevResult is missing"),
        ("VALID", {"CNI_NETNS": "/run/netns/tb-tbcap.gone"}, 3, "does not exist"),
        ("VALID", {"CNI_NETNS": ""}, 4, "CNI_NETNS"),
    ],
)
def test_bad_cni_input_gets_a_spec_error_and_changes_nothing(
    testbed: Testbed, stdin: str, env: dict[str, str], code: int, words: str
) -> None:
    """The installed plugin binary, run as the runtime runs it, against the live agent."""
    conf_dir = layout.cni_conf_dir(testbed.name, "n1")
    conflist = json.loads(next(conf_dir.glob("*.conflist")).read_text())
    entry = {**conflist["plugins"][-1], "cniVersion": "1.0.0", "name": conflist["name"]}
    assert entry["type"] == "nodeagent-cni"
    victim = testbed.pod_netns("mesh/optout")  # a real pod netns with no capture
    valid = {**entry, "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.99/24"}]}}
    stdin = {"NO-PREV": json.dumps(entry), "VALID": json.dumps(valid)}.get(stdin, stdin)
    before = agent_pods(testbed.name, "n1")
    environment = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "bad-input-test",
        "CNI_NETNS": f"/run/netns/{victim}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=optout",
        "CNI_PATH": str(layout.cni_bin_dir(testbed.name, "n1")),
        **env,
    }
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            layout.node_netns(testbed.name, "n1"),
            "/usr/bin/env",
            "-i",
            *[f"{k}={v}" for k, v in environment.items()],
            str(layout.cni_bin_dir(testbed.name, "n1") / "nodeagent-cni"),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    error = json.loads(proc.stdout)
    assert error["code"] == code and words in error["msg"], error
    assert agent_pods(testbed.name, "n1") == before
    assert ruleset(victim) == []
