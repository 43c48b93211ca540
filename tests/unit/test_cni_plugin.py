"""nodeagent-cni as a container runtime meets it: CNI spec conformance against a stand-in agent.

The stand-in agent is a real UNIX socket server speaking the agent protocol; it records what the
plugin sent and answers what each test asks.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import plugin, wire
from nodeagent.cni.bundle import locate_bundle

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


class FakeAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.answer: dict[str, Any] = {"ok": True, "state": "captured"}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                conn.sendall(wire.encode(self.answer))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "cni.sock")
    yield fake
    fake.close()


def config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "nodeagent-cni",
        "agentSocket": str(tmp_path / "cni.sock"),
        "logFile": str(tmp_path / "cni.log"),
        "timeoutSeconds": 5,
        "prevResult": PREV,
    }
    conf.update(overrides)
    return {k: v for k, v in conf.items() if v is not None}


def invoke(
    monkeypatch: pytest.MonkeyPatch, command: str, stdin: str, netns: str = "/proc/self/ns/net"
) -> tuple[int, dict[str, Any] | None]:
    monkeypatch.setenv("CNI_COMMAND", command)
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_NETNS", netns)
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    return plugin.run(command, stdin)


def test_add_hands_the_pod_to_the_agent_and_passes_prev_result_through(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert code == 0
    assert out == PREV  # unchanged
    (request,) = agent.requests
    assert request["command"] == "ADD"
    assert request["pod"] == {
        "namespace": "shop",
        "name": "web-1",
        "uid": "",
        "containerId": "c0ffee",
        "netns": "/proc/self/ns/net",
        "ifname": "eth0",
        "ips": ["10.244.1.7"],
        "network": "k8s-pod-network",
    }


def test_add_fails_closed_when_the_agent_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert code == 1 and out is not None
    assert out["code"] == plugin.TRY_AGAIN_LATER
    assert str(tmp_path / "cni.sock") in out["msg"]


def test_add_fails_when_the_agent_cannot_capture(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.answer = {"ok": False, "reason": "annotation x: 'y' is not a port number"}
    code, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert code == 1 and out is not None
    assert out["code"] == plugin.CAPTURE_FAILED
    assert "shop/web-1" in out["msg"] and "not a port number" in out["msg"]


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        ("{not json", plugin.DECODE_FAILURE, "failed to decode"),
        ("[1, 2]", plugin.DECODE_FAILURE, "not a JSON object"),
        (json.dumps({"cniVersion": "9.9.9", "name": "x", "type": "nodeagent-cni"}), 1, "9.9.9"),
        ("PREV-MISSING", plugin.INVALID_CONFIG, "prevResult is missing"),
        ("BAD-TIMEOUT", plugin.INVALID_CONFIG, "timeoutSeconds"),
    ],
)
def test_bad_input_gets_a_spec_error_and_changes_nothing(
    agent: FakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stdin: str,
    code: int,
    words: str,
) -> None:
    if stdin == "PREV-MISSING":
        stdin = json.dumps(config(tmp_path, prevResult=None))
    elif stdin == "BAD-TIMEOUT":
        stdin = json.dumps(config(tmp_path, timeoutSeconds="soon"))
    rc, out = invoke(monkeypatch, "ADD", stdin)
    assert rc == 1 and out is not None
    assert out["code"] == code
    assert words in out["msg"]
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert agent.requests == []


def test_missing_netns_is_container_unknown(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns="/run/netns/gone")
    assert rc == 1 and out is not None
    assert out["code"] == 3 and "/run/netns/gone" in out["msg"]
    assert agent.requests == []


def test_missing_environment_is_named(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CNI_NETNS", raising=False)
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    rc, out = plugin.run("ADD", json.dumps(config(tmp_path)))
    assert rc == 1 and out is not None
    assert out["code"] == plugin.INVALID_ENV and "CNI_NETNS" in out["msg"]


def test_a_non_kubernetes_sandbox_passes_through(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_NETNS", "/proc/self/ns/net")
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1")
    assert plugin.run("ADD", json.dumps(config(tmp_path))) == (0, PREV)
    assert agent.requests == []


def test_older_config_versions_are_accepted(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prev = {**PREV, "cniVersion": "0.4.0"}
    code, out = invoke(
        monkeypatch, "ADD", json.dumps(config(tmp_path, cniVersion="0.4.0", prevResult=prev))
    )
    assert (code, out) == (0, prev)


def test_del_never_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke(monkeypatch, "DEL", json.dumps(config(tmp_path))) == (0, None)
    log = (tmp_path / "cni.log").read_text()
    assert "could not tell the agent about DEL" in log


def test_del_tells_the_agent(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke(monkeypatch, "DEL", json.dumps(config(tmp_path))) == (0, None)
    monkeypatch.setenv("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u-1")
    assert plugin.run("DEL", json.dumps(config(tmp_path))) == (0, None)
    assert agent.requests[0]["command"] == "DEL"
    assert agent.requests[0]["pod"]["containerId"] == "c0ffee"
    # The uid finds a pod the agent adopted without seeing its ADD (no sandbox id known).
    assert agent.requests[1]["pod"]["uid"] == "u-1"


def test_check_reports_capture_problems(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke(monkeypatch, "CHECK", json.dumps(config(tmp_path))) == (0, None)
    agent.answer = {"ok": False, "reason": "table inet nodeagent is missing"}
    rc, out = invoke(monkeypatch, "CHECK", json.dumps(config(tmp_path)))
    assert rc == 1 and out is not None
    assert out["code"] == plugin.CAPTURE_FAILED and "missing" in out["msg"]


def test_status_and_gc(agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = config(tmp_path, cniVersion="1.1.0", prevResult=None)
    assert invoke(monkeypatch, "STATUS", json.dumps(conf)) == (0, None)
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}
    assert invoke(monkeypatch, "GC", json.dumps(gc)) == (0, None)
    assert agent.requests[-1] == {
        "command": "GC",
        "validContainerIds": ["a"],
        "network": "k8s-pod-network",
    }
    agent.close()
    (tmp_path / "cni.sock").unlink()
    rc, out = invoke(monkeypatch, "STATUS", json.dumps(conf))
    assert rc == 1 and out is not None and out["code"] == plugin.PLUGIN_NOT_AVAILABLE


def test_logs_go_to_the_log_file(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    entry = json.loads((tmp_path / "cni.log").read_text().splitlines()[-1])
    assert entry["msg"] == "pod handed to agent" and entry["pod"] == "shop/web-1"


def test_the_plugin_imports_only_the_standard_library() -> None:
    root = Path(plugin.__file__).parent
    for module in ("plugin.py", "wire.py"):
        tree = ast.parse((root / module).read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name == "nodeagent.cni", (module, name)


def test_the_bundle_runs_without_any_host_python(tmp_path: Path) -> None:
    """The built plugin runs with an empty environment: its own runtime, no PATH, no venv."""
    binary = locate_bundle() / "nodeagent-cni"
    proc = subprocess.run(
        ["/usr/bin/env", "-i", "CNI_COMMAND=VERSION", str(binary)],
        input='{"cniVersion": "1.1.0"}',
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": plugin.SUPPORTED_VERSIONS,
    }
    assert os.path.realpath(binary).startswith(str(locate_bundle().resolve()))


@pytest.mark.parametrize(
    ("attachments", "words"),
    [
        (None, "GC without field 'cni.dev/valid-attachments'"),
        ({"containerID": "a"}, "'cni.dev/valid-attachments' must be a list"),
        ([{"containerID": "a"}, {"ifname": "eth0"}], "'cni.dev/valid-attachments'[1]"),
        (["a"], "'cni.dev/valid-attachments'[0]"),
        ([{"containerID": ""}], "non-empty string containerID"),
    ],
)
def test_gc_with_a_malformed_list_fails_and_tells_the_agent_nothing(
    agent: FakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    attachments: Any,
    words: str,
) -> None:
    """A GC whose valid-attachments the plugin cannot read must not reach the agent as "no pod
    is valid" (which removed every pod's capture): it fails with the field named."""
    conf = config(tmp_path, cniVersion="1.1.0", prevResult=None)
    conf["cni.dev/valid-attachments"] = attachments
    code, out = invoke(
        monkeypatch, "GC", json.dumps({k: v for k, v in conf.items() if v is not None})
    )
    assert code == 1 and out is not None
    assert out["code"] == plugin.INVALID_CONFIG and words in out["msg"], out
    assert "nothing removed" in out["msg"]
    assert agent.requests == []


def test_gc_reads_the_older_spelling_libcni_also_sends(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = config(tmp_path, cniVersion="1.1.0", prevResult=None)
    conf["cni.dev/attachments"] = [{"containerID": "b", "ifname": "eth0"}]
    assert invoke(monkeypatch, "GC", json.dumps(conf)) == (0, None)
    assert agent.requests[-1]["validContainerIds"] == ["b"]
