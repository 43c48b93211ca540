"""`nodeagent doctor` on a real testbed node: all OK when healthy, and each broken state the
chaos suite creates named by its own FAIL line (exit code 1), one after the other:

- a pod's capture table flushed inside its netns (restored as the agent's repair would);
- the agent stopped (SIGSTOP: it holds its socket but answers nothing);
- the node Envoy killed while the agent cannot restart it;
- the primary CNI's conflist rewritten without our plugin (install-cni held stopped) and a mesh
  pod created meanwhile: it runs uncaptured (the node-reboot race);
- once the agent runs again it restarts Envoy and adopts that pod: healthy again (exit 0), the
  Envoy restart shown as a WARN;
- a pod's netns removed behind the agent's back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cli.testbed import doctor_argv
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.nftables import NftablesBackend
from nodeagent.testbed import daemons, layout
from nodeagent.testbed.cluster import Testbed
from nodeagent.testbed.topology import Pod, Workload
from tests.integration.helpers import running_testbed, wait_for

pytestmark = pytest.mark.integration

NAME = "doctor"
TOPOLOGY = f"""
name: {NAME}
ca: plugin
source: directory
nodes: [{{name: n1}}]
namespaces:
  - {{name: mesh, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: client, namespace: mesh, node: n1, labels: {{app: client}}}}
  - name: server
    namespace: mesh
    node: n1
    labels: {{app: server}}
    workload: {{type: fake-service}}
"""
LATE = Pod("mesh", "late", "n1", "default", {"app": "late"}, {}, Workload("fake-service", 8080))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(TOPOLOGY, "test_doctor") as testbed:
        yield testbed


def doctor(tb: Testbed, timeout: float = 2.0) -> tuple[int, list[dict[str, str]]]:
    proc = subprocess.run(
        doctor_argv(tb, "n1", "-o", "json", "--timeout", str(timeout)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def not_ok(findings: list[dict[str, str]]) -> list[str]:
    """What a failed assertion shows: the lines that are not OK."""
    return [f"{f['status']} {f['check']}: {f['detail']}" for f in findings if f["status"] != "OK"]


def failing(findings: list[dict[str, str]]) -> dict[str, str]:
    return {f["check"]: f["detail"] for f in findings if f["status"] == "FAIL"}


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """PIDS held stopped (SIGSTOP) for the body; always continued after, also on failure."""
    held = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            held.append(pid)
        yield
    finally:
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def envoy_pid(tb: Testbed) -> int:
    pidfile = layout.agent_socket(tb.name, "n1").parent / "envoy.pid"
    return int(json.loads(pidfile.read_text())["pid"])


def test_doctor_names_each_broken_state(tb: Testbed) -> None:
    # Healthy: every check OK (eBPF capture, not used here, may be unavailable: SKIP).
    code, findings = doctor(tb)
    assert code == 0, not_ok(findings)
    assert {f["status"] for f in findings if f["check"] != "kernel for ebpf capture"} == {"OK"}

    # A pod's capture table flushed (a process with CAP_NET_ADMIN in the pod, say).
    server_ns = Path("/run/netns") / tb.pod_netns("mesh/server")
    NftablesBackend().remove(server_ns)
    code, findings = doctor(tb)
    assert (code, list(failing(findings))) == (1, ["pod mesh/server"]), not_ok(findings)
    assert "table inet nodeagent is missing" in failing(findings)["pod mesh/server"]
    NftablesBackend().apply(server_ns, CaptureSpec())  # as the agent's repair puts it back
    assert doctor(tb)[0] == 0

    agent = tb.daemon("n1", daemons.AGENT).pid
    install_cni = tb.daemon("n1", daemons.INSTALL_CNI).pid
    conflist = next(layout.cni_conf_dir(NAME, "n1").glob("*.conflist"))
    chained = conflist.read_text()
    with stopped(agent):
        # The agent stopped: it keeps its socket but answers nothing.
        code, findings = doctor(tb, timeout=1.0)
        assert (code, list(failing(findings))) == (1, ["agent"]), not_ok(findings)
        assert "(stopped or hung)" in failing(findings)["agent"]

        # The node Envoy killed, and no agent to restart it.
        os.kill(envoy_pid(tb), signal.SIGKILL)
        code, findings = doctor(tb, timeout=1.0)
        assert (code, sorted(failing(findings))) == (1, ["agent", "envoy"]), not_ok(findings)
        assert "is not running" in failing(findings)["envoy"]

        # The primary CNI rewrote its conflist without our plugin, install-cni cannot put it
        # back, and a mesh pod is created meanwhile: it runs uncaptured.
        with stopped(install_cni):
            doc = json.loads(chained)
            doc["plugins"] = [p for p in doc["plugins"] if p["type"] != "nodeagent-cni"]
            conflist.write_text(json.dumps(doc))
            tb.add_pod(LATE, publish_lead=0.3)
            code, findings = doctor(tb, timeout=1.0)
            fails = failing(findings)
            assert sorted(fails) == ["CNI chain", "agent", "envoy", "pod mesh/late"], not_ok(
                findings
            )
            assert "nodeagent-cni is missing" in fails["CNI chain"]
            assert "runs uncaptured" in fails["pod mesh/late"]
            conflist.write_text(chained)

    # The agent runs again: it restarts Envoy and adopts the pod that started without it.
    wait_for(lambda: adopted(tb), timeout=30, what="the agent adopting mesh/late, Envoy LIVE")
    code, findings = doctor(tb)
    assert code == 0, not_ok(findings)
    warned = {f["check"]: f["detail"] for f in findings if f["status"] == "WARN"}
    assert "restarted 1 time(s)" in warned.get("envoy", ""), not_ok(findings)

    # A pod's netns removed behind the runtime's and the agent's back.
    subprocess.run(
        ["ip", "netns", "delete", tb.pod_netns("mesh/client")],
        check=True,
    )
    code, findings = doctor(tb)
    assert (code, list(failing(findings))) == (1, ["pod mesh/client"]), not_ok(findings)
    assert "is gone" in failing(findings)["pod mesh/client"]


def adopted(tb: Testbed) -> bool:
    """The agent holds mesh/late captured, and a new Envoy of its answers LIVE."""
    from nodeagent.cni import wire
    from nodeagent.envoy.admin import EnvoyAdmin

    try:
        answer: dict[str, Any] = wire.request(
            str(layout.agent_socket(NAME, "n1")), {"command": "PROXY_STATUS"}, 2.0
        )
    except (OSError, wire.ProtocolError):
        return False
    states = {f"{p['namespace']}/{p['name']}": p["state"] for p in answer.get("pods", [])}
    proxy = answer.get("proxy") or {}
    admin = EnvoyAdmin(layout.envoy_admin_socket(NAME, "n1"))
    return (
        states.get("mesh/late") == "captured"
        and proxy.get("envoy_restarts", 0) >= 1
        and admin.ready()
    )
