"""`nodeagent doctor`: each check's verdict on fake facts, and the command on a fake node."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nodeagent.cli import cli
from nodeagent.doctor import node, verdicts
from nodeagent.doctor.verdicts import FAIL, NETNS_GONE, OK, SKIP, WARN, Finding
from nodeagent.redirect.registry import (
    CAPTURED,
    FAILED,
    NETNS_MISSING,
    NOT_IN_MESH,
    PodCapture,
    read_records,
)

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def record(name: str, state: str = CAPTURED, **kw: Any) -> PodCapture:
    return PodCapture("shop", name, f"sandbox-{name}", f"/run/netns/{name}", state=state, **kw)


def statuses(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.status, f.what) for f in findings]


# -- lines and exit code ---------------------------------------------------------------------------


def test_a_line_says_what_is_wrong_and_what_to_do() -> None:
    finding = Finding(FAIL, "CNI chain", "nodeagent-cni is missing", "restart install-cni")
    assert finding.line() == "FAIL CNI chain: nodeagent-cni is missing; restart install-cni"
    assert Finding(OK, "agent").line() == "OK   agent"
    assert verdicts.exit_code([Finding(OK, "a"), Finding(WARN, "b"), Finding(SKIP, "c")]) == 0
    assert verdicts.exit_code([Finding(OK, "a"), Finding(FAIL, "b")]) == 1


# -- the agent -------------------------------------------------------------------------------------


def test_agent_that_answers_is_ok() -> None:
    finding = verdicts.agent("/run/x.sock", {"ok": True, "pods": [{}, {}]}, "", 5)
    assert (finding.status, finding.detail) == (
        OK,
        "answers on /run/x.sock (2 pods in its registry)",
    )


def test_agent_killed_or_stopped_is_named_with_its_effect() -> None:
    gone = verdicts.agent("/s", None, "nodeagent is unreachable at /s: Connection refused", 5)
    assert gone.status == FAIL and "not running" in gone.detail
    assert "Connection refused" in gone.detail and "fail closed" in gone.detail
    hung = verdicts.agent("/s", None, "timed out", 2)
    assert hung.status == FAIL and "within 2s (stopped or hung)" in hung.detail


# -- the kernel ------------------------------------------------------------------------------------


def test_kernel_fails_only_for_the_mode_in_use() -> None:
    assert verdicts.kernel("nftables", True, []).status == OK
    missing = verdicts.kernel("nftables", True, ["nft in a scratch netns: No such file"])
    assert missing.status == FAIL and "modprobe" in missing.action
    unused = verdicts.kernel("ebpf", False, ["kernel 5.10 is older than 5.17"])
    assert unused.status == SKIP and "not used on this node" in unused.detail


# -- the CNI chain ---------------------------------------------------------------------------------


def test_cni_chain_verdicts() -> None:
    ok = verdicts.cni_chain(
        "/etc/cni/net.d", ("10-calico.conflist", ["calico", "nodeagent-cni"]), ""
    )
    assert ok.status == OK and "calico -> nodeagent-cni" in ok.detail
    rewritten = verdicts.cni_chain("/d", ("10-calico.conflist", ["calico", "portmap"]), "")
    assert rewritten.status == FAIL
    assert "10-calico.conflist runs calico -> portmap: nodeagent-cni is missing" in rewritten.detail
    assert "install-cni" in rewritten.action
    not_last = verdicts.cni_chain("/d", ("10.conflist", ["calico", "nodeagent-cni", "x"]), "")
    assert not_last.status == FAIL and "not last" in not_last.detail
    none = verdicts.cni_chain("/d", None, "")
    assert none.status == FAIL and "no valid CNI network config in /d" in none.detail
    no_binary = verdicts.cni_chain("/d", ("a.conflist", ["b", "nodeagent-cni"]), "/x is missing")
    assert no_binary.status == FAIL and "/x is missing" in no_binary.detail


# -- pods ------------------------------------------------------------------------------------------


def test_pods_verified_in_their_netns_are_summed_up() -> None:
    records = [record("a"), record("b", backend="ebpf"), record("c", NOT_IN_MESH)]
    found = verdicts.pods(records, {"sandbox-a": "", "sandbox-b": ""}, None)
    assert statuses(found) == [(OK, "pods")]
    assert found[0].detail.startswith("2 captured, each verified")
    assert "1 ebpf, 1 nftables" in found[0].detail and "1 not in the mesh" in found[0].detail


def test_a_flushed_capture_table_fails_that_pod() -> None:
    found = verdicts.pods(
        [record("a"), record("b")], {"sandbox-a": "table inet nodeagent is missing"}, None
    )
    assert statuses(found) == [(FAIL, "pod shop/a")]
    assert "but that capture is not in place: table inet nodeagent is missing" in found[0].detail
    assert "restart the agent" in found[0].action


def test_a_removed_netns_fails_that_pod() -> None:
    found = verdicts.pods([record("a")], {"sandbox-a": NETNS_GONE + "/run/netns/a"}, None)
    assert statuses(found) == [(FAIL, "pod shop/a")]
    assert "network namespace /run/netns/a is gone" in found[0].detail
    assert "delete the pod" in found[0].action
    missing = verdicts.pods([record("a", NETNS_MISSING)], {}, None)
    assert statuses(missing) == [(FAIL, "pod shop/a")]


def test_a_failed_capture_carries_its_reason() -> None:
    found = verdicts.pods([record("a", FAILED, reason="annotation x: 'y' is not a port")], {}, None)
    assert statuses(found) == [(FAIL, "pod shop/a")]
    assert "capture failed: annotation x" in found[0].detail


def test_a_record_the_running_agent_does_not_list_is_a_warning() -> None:
    found = verdicts.pods([record("a")], {"sandbox-a": ""}, {})
    assert statuses(found) == [(OK, "pods"), (WARN, "pod shop/a")]


def test_a_mesh_pod_running_uncaptured_and_unknown_fails() -> None:
    """The node-reboot race: a pod started before the agent with no CNI entry to stop it."""
    mesh = [("u1", "shop/a"), ("u2", "shop/b"), ("u3", "shop/c"), ("u4", "shop/d")]
    running = {"u2": "/proc/7/ns/net", "u3": "/proc/8/ns/net", "u4": "/proc/9/ns/net"}
    # u1 recorded, u2 unknown and uncaptured, u3 unknown but captured, u4 not running (yet)
    found = verdicts.unknown_pods(
        mesh, {"u1", "shop/a", "u4x"}, {k: v for k, v in running.items() if k != "u4"}, {"u3": True}
    )
    assert statuses(found) == [(FAIL, "pod shop/b")]
    assert "runs uncaptured in /proc/7/ns/net" in found[0].detail
    assert "bypasses the mesh" in found[0].detail
    assert statuses(verdicts.unknown_pods(mesh[:1], {"u1"}, {}, {})) == [(OK, "pods of this node")]


# -- Envoy -----------------------------------------------------------------------------------------


def test_envoy_verdicts() -> None:
    killed = verdicts.envoy("unix:/run/a.sock", "", "Connection refused", None, None)
    assert killed.status == FAIL and "unix:/run/a.sock does not answer" in killed.detail
    assert "the agent must be running" in killed.action
    external = verdicts.envoy("unix:/a", "", "refused", None, {"envoy_mode": "external"})
    assert "its container restarts it" in external.action
    starting = verdicts.envoy("unix:/a", "INITIALIZING", "", None, {})
    assert starting.status == FAIL and "INITIALIZING" in starting.detail
    live = verdicts.envoy("unix:/a", "LIVE", "", {"uptime_current_epoch": "5s"}, {"envoy_pid": 9})
    assert (live.status, live.detail) == (OK, "LIVE, uptime 5s, pid 9")
    restarted = verdicts.envoy(
        "unix:/a", "LIVE", "", None, {"envoy_restarts": 1, "envoy_last_exit": "-9"}
    )
    assert restarted.status == WARN and "last exit: killed by signal 9" in restarted.detail


def test_listener_verdicts() -> None:
    assert statuses(verdicts.listeners(["shop/a"], {"shop/a"})) == [(OK, "envoy listeners")]
    missing = verdicts.listeners(["shop/a", "shop/b"], {"shop/a"})
    assert statuses(missing) == [(FAIL, "pod shop/b")]
    stale = verdicts.listeners(["shop/a"], {"shop/a", "shop/gone"}, {"shop/a"})
    assert statuses(stale) == [(WARN, "envoy listeners")] and "shop/gone" in stale[0].detail


# -- xDS -------------------------------------------------------------------------------------------


def synced(**changes: dict[str, Any]) -> dict[str, Any]:
    types = {k: {"state": "SYNCED", "connected": True} for k in verdicts.XDS_KINDS}
    return {"version": "7", "types": {**types, **changes}}


def test_xds_verdicts() -> None:
    assert statuses(verdicts.xds(synced())) == [(OK, "xDS")]
    nacked = verdicts.xds(synced(LDS={"state": "NACKED", "last_nack": "bad filter"}))
    assert (
        statuses(nacked) == [(FAIL, "xDS LDS")]
        and "NACKED by Envoy: bad filter" in nacked[0].detail
    )
    stale = verdicts.xds(synced(EDS={"state": "STALE", "connected": True}))
    assert statuses(stale) == [(WARN, "xDS EDS")]
    unsubscribed = synced()
    del unsubscribed["types"]["CDS"]
    assert statuses(verdicts.xds(unsubscribed)) == [(FAIL, "xDS CDS")]
    no_routes = synced()  # no service on the node's view: Envoy asks for no EDS, no RDS
    del no_routes["types"]["EDS"], no_routes["types"]["RDS"]
    assert verdicts.xds(no_routes) == [Finding(OK, "xDS", "CDS, LDS synced, version 7")]
    assert statuses(verdicts.xds({**synced(), "error": "boom"})) == [(FAIL, "xDS push")]
    assert statuses(verdicts.xds(None)) == [(SKIP, "xDS")]


# -- certificates ----------------------------------------------------------------------------------


def cert(name: str, start: timedelta, end: timedelta) -> dict[str, str]:
    return {
        "name": name,
        "not_before": (NOW + start).isoformat(),
        "not_after": (NOW + end).isoformat(),
    }


def test_certificate_verdicts() -> None:
    fresh = cert("spiffe://td/ns/a/sa/b", timedelta(hours=-1), timedelta(hours=23))
    ok = verdicts.certificates(
        [fresh, cert("ROOTCA", -timedelta(days=1), timedelta(days=9))], {}, NOW
    )
    assert statuses(ok) == [(OK, "certificates")] and "spiffe://td/ns/a/sa/b" in ok[0].detail
    expired = verdicts.certificates(
        [cert("x", -timedelta(hours=25), -timedelta(hours=1))], None, NOW
    )
    assert statuses(expired) == [(FAIL, "certificate x")] and "expired" in expired[0].detail
    late = verdicts.certificates([cert("x", -timedelta(hours=20), timedelta(hours=4))], None, NOW)
    assert statuses(late) == [(WARN, "certificate x")]
    issuer = {"issuer": "the CA service", "identities": {"spiffe://a": {"error": "refused"}}}
    assert statuses(verdicts.certificates([fresh], issuer, NOW)) == [
        (FAIL, "certificate spiffe://a")
    ]
    unknown = verdicts.certificates(None, None, NOW, "Connection refused")
    assert statuses(unknown) == [(SKIP, "certificates")]


# -- the registry, read only ----------------------------------------------------------------------


def test_read_records_leaves_a_record_being_written_alone(tmp_path: Path) -> None:
    (tmp_path / "sandbox-a.json").write_text(json.dumps(asdict(record("a"))))
    (tmp_path / "sandbox-b.json.tmp").write_text("{half")
    (tmp_path / "sandbox-c.json").write_text("not json")
    assert [r.key for r in read_records(tmp_path)] == ["shop/a"]
    assert (tmp_path / "sandbox-b.json.tmp").exists()
    assert read_records(tmp_path / "none") == []


# -- the command, on a fake node (no privileges: the kernel trial is faked) ------------------------


@pytest.fixture
def broken_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No agent, no Envoy, a conflist without our plugin, a pod whose netns is gone."""
    monkeypatch.setattr(node, "nftables_trial", lambda: [])
    monkeypatch.setattr(node, "_ebpf_problems", lambda paths, in_use: [])
    conf, bins, pods = tmp_path / "net.d", tmp_path / "bin", tmp_path / "state" / "pods"
    for folder in (conf, bins, pods):
        folder.mkdir(parents=True)
    chain = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}
    (conf / "10-bridge.conflist").write_text(json.dumps(chain))
    gone = PodCapture("shop", "a", "sandbox-a", str(tmp_path / "no-netns"), state=CAPTURED)
    (pods / "sandbox-a.json").write_text(json.dumps(asdict(gone)))
    return [
        "doctor",
        "--cni-socket", str(tmp_path / "cni.sock"),
        "--state-dir", str(tmp_path / "state"),
        "--run-dir", str(tmp_path / "run"),
        "--cni-conf-dir", str(conf),
        "--cni-bin-dir", str(bins),
        "--bpf-dir", str(tmp_path / "bpf"),
        "--timeout", "1",
    ]  # fmt: skip


def test_doctor_names_each_problem_of_a_node_and_exits_1(broken_node: list[str]) -> None:
    result = CliRunner().invoke(cli, broken_node)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    fails = [line.split(":")[0] for line in lines if line.startswith("FAIL")]
    assert fails == ["FAIL agent", "FAIL CNI chain", "FAIL pod shop/a", "FAIL envoy"], lines
    assert any(line.startswith("OK   kernel for nftables capture") for line in lines)
    assert "SKIP xDS: not known: the agent does not answer" in lines


def test_doctor_json_output(broken_node: list[str]) -> None:
    result = CliRunner().invoke(cli, [*broken_node, "-o", "json"])
    assert result.exit_code == 1
    findings = json.loads(result.output)
    assert {f["check"] for f in findings if f["status"] == FAIL} == {
        "agent",
        "CNI chain",
        "pod shop/a",
        "envoy",
    }
    assert all(set(f) == {"status", "check", "detail", "action"} for f in findings)


def test_doctor_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--node", "n1"])
    assert result.exit_code == 2 and "go together" in result.output
    both = CliRunner().invoke(cli, ["doctor", "--source-dir", "/a", "--kubeconfig", __file__])
    assert both.exit_code == 2


def test_envoy_pidfile_says_whether_that_envoy_runs(tmp_path: Path) -> None:
    pidfile, proc = tmp_path / "envoy.pid", tmp_path / "proc"
    pidfile.write_text(json.dumps({"pid": 42, "start_time": 1000}))
    stat = proc / "42" / "stat"
    stat.parent.mkdir(parents=True)
    rest = " ".join(["0"] * 18)

    def state(letter: str, started: int) -> str:
        stat.write_text(f"42 (envoy) {letter} {rest} {started} 0 0\n")
        return node._pidfile_note(pidfile, proc)

    assert state("S", 1000) == "; Envoy pid 42 of envoy.pid runs"
    assert "not running (exited, not yet reaped)" in state("Z", 1000)
    assert "another's now" in state("S", 2000)
    stat.unlink()
    assert "is not running" in node._pidfile_note(pidfile, proc)
