"""nodeagent-cni as a container runtime meets it: CNI spec conformance against a stand-in agent.

The built plugin (nodeagent/cni/plugin.c, scripts/build-cni.sh) is executed as a runtime executes
it: CNI_* variables, the configuration on stdin, the result or error on stdout. The stand-in agent
is a real UNIX socket server speaking the agent protocol (nodeagent/cni/wire.py); it records what
the plugin sent and answers what each test asks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.cni import wire
from nodeagent.cni.bundle import locate_bundle

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
# CNI spec error codes (SPEC.md "Error"), and the plugin's own for a failed capture.
INCOMPATIBLE_VERSION = 1
INVALID_ENV = 4
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
CAPTURE_FAILED = 100

# This process's network namespace by the kernel's own path (/proc/self is a symlink: refused).
OWN_NETNS = f"/proc/{os.getpid()}/ns/net"

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


class FakeAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []  # decoded
        self.raw_requests: list[bytes] = []  # as they arrived
        self.answer: dict[str, Any] = {"ok": True, "state": "captured"}
        self.raw_answer: bytes | None = None  # sent instead of ``answer`` when set
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
                with contextlib.suppress(OSError):
                    while not data.endswith(b"\n") and len(data) <= wire.MAX_MESSAGE:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                self.raw_requests.append(data)  # what the fuzz target judges, decodable or not
                with contextlib.suppress(ValueError):
                    self.requests.append(json.loads(data))
                with contextlib.suppress(OSError):
                    conn.sendall(
                        wire.encode(self.answer) if self.raw_answer is None else self.raw_answer
                    )

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
    monkeypatch: pytest.MonkeyPatch, command: str, stdin: str, netns: str = OWN_NETNS
) -> tuple[int, dict[str, Any] | None]:
    monkeypatch.setenv("CNI_COMMAND", command)
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_NETNS", netns)
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    return run(command, stdin)


def run(command: str, stdin: str | bytes) -> tuple[int, dict[str, Any] | None]:
    """Executes the plugin with this process's CNI_* environment; (exit code, JSON printed)."""
    proc = subprocess.run(
        [str(locate_bundle() / "nodeagent-cni")],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        env={**os.environ, "CNI_COMMAND": command},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode in (0, 1), proc
    assert proc.stderr == b"", proc.stderr  # logs go to the log file
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else None


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
        "netns": OWN_NETNS,
        "ifname": "eth0",
        "ips": ["10.244.1.7"],
        "network": "k8s-pod-network",
    }


def test_add_fails_closed_when_the_agent_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert code == 1 and out is not None
    assert out["code"] == TRY_AGAIN_LATER
    assert str(tmp_path / "cni.sock") in out["msg"]


def test_add_fails_when_the_agent_cannot_capture(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.answer = {"ok": False, "reason": "annotation x: 'y' is not a port number"}
    code, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert code == 1 and out is not None
    assert out["code"] == CAPTURE_FAILED
    assert "shop/web-1" in out["msg"] and "not a port number" in out["msg"]


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        ("{not json", DECODE_FAILURE, "failed to decode"),
        ("[1, 2]", DECODE_FAILURE, "not a JSON object"),
        (json.dumps({"cniVersion": "9.9.9", "name": "x", "type": "nodeagent-cni"}), 1, "9.9.9"),
        ("PREV-MISSING", INVALID_CONFIG, "prevResult is missing"),
        ("BAD-TIMEOUT", INVALID_CONFIG, "timeoutSeconds"),
        ("HUGE-TIMEOUT", INVALID_CONFIG, "timeoutSeconds"),
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
    elif stdin == "HUGE-TIMEOUT":  # beyond a double: no "inf" may reach the agent
        stdin = json.dumps(config(tmp_path, timeoutSeconds=1)).replace(
            '"timeoutSeconds": 1', '"timeoutSeconds": 1e999'
        )
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
    rc, out = run("ADD", json.dumps(config(tmp_path)))
    assert rc == 1 and out is not None
    assert out["code"] == INVALID_ENV and "CNI_NETNS" in out["msg"]


def test_a_non_kubernetes_sandbox_passes_through(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_NETNS", OWN_NETNS)
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", "IgnoreUnknown=1")
    assert run("ADD", json.dumps(config(tmp_path))) == (0, PREV)
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
    assert run("DEL", json.dumps(config(tmp_path))) == (0, None)
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
    assert out["code"] == CAPTURE_FAILED and "missing" in out["msg"]


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
    assert rc == 1 and out is not None and out["code"] == PLUGIN_NOT_AVAILABLE


def test_logs_go_to_the_log_file(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    entry = json.loads((tmp_path / "cni.log").read_text().splitlines()[-1])
    assert entry["msg"] == "pod handed to agent" and entry["pod"] == "shop/web-1"


def test_the_bundle_runs_without_anything_from_the_host(tmp_path: Path) -> None:
    """The built plugin runs with an empty environment (no PATH, no Python) and is linked
    statically: no program interpreter, so no shared library of the host is loaded."""
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
        "supportedVersions": SUPPORTED_VERSIONS,
    }
    assert os.path.realpath(binary).startswith(str(locate_bundle().resolve()))
    assert PT_INTERP not in elf_segment_types(binary)


PT_INTERP = 3  # the ELF program header naming the dynamic loader (System V ABI)


def elf_segment_types(path: Path) -> list[int]:
    """The p_type of each program header of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    phoff, phentsize, phnum = (
        int.from_bytes(data[0x20:0x28], "little"),
        int.from_bytes(data[0x36:0x38], "little"),
        int.from_bytes(data[0x38:0x3A], "little"),
    )
    offsets = (phoff + i * phentsize for i in range(phnum))
    return [int.from_bytes(data[o : o + 4], "little") for o in offsets]


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
    assert out["code"] == INVALID_CONFIG and words in out["msg"], out
    assert "nothing removed" in out["msg"]
    assert agent.requests == []


def test_gc_reads_the_older_spelling_libcni_also_sends(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = config(tmp_path, cniVersion="1.1.0", prevResult=None)
    conf["cni.dev/attachments"] = [{"containerID": "b", "ifname": "eth0"}]
    assert invoke(monkeypatch, "GC", json.dumps(conf)) == (0, None)
    assert agent.requests[-1]["validContainerIds"] == ["b"]


def test_pod_fields_reach_the_agent_exactly(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quotes, backslashes, control characters and non-ASCII in the pod's fields and in the
    answer's reason arrive unchanged; ips keep every address, without the prefix length."""
    prev = {**PREV, "ips": [{"address": "10.244.1.7/24"}, {"gateway": "x"}, {"address": "fd00::7"}]}
    conf = config(tmp_path, name='net "é" \\ \t', prevResult=prev)
    monkeypatch.setenv("CNI_CONTAINERID", 'c"0\\ffee\u00e9')
    monkeypatch.setenv("CNI_NETNS", OWN_NETNS)
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", ' K8S_POD_NAMESPACE = shop ;K8S_POD_NAME=wéb-1;K8S_POD_UID=u"1')
    assert run("ADD", json.dumps(conf)) == (0, prev)
    (request,) = agent.requests
    assert request["pod"]["containerId"] == 'c"0\\ffee\u00e9'
    assert request["pod"]["network"] == 'net "é" \\ \t'
    assert (request["pod"]["namespace"], request["pod"]["name"]) == ("shop", "wéb-1")
    assert request["pod"]["uid"] == 'u"1'
    assert request["pod"]["ips"] == ["10.244.1.7", "fd00::7"]
    assert request["timeout"] == 5
    agent.answer = {"ok": False, "reason": 'bad "annotation"\n\u2603'}
    rc, out = run("ADD", json.dumps(conf))
    assert rc == 1 and out is not None and out["msg"].endswith('bad "annotation"\n\u2603')


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"", "closed the connection without answering"),
        (b"{not json\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
        (b" " * (wire.MAX_MESSAGE + 10), f"exceeds {wire.MAX_MESSAGE} bytes"),
    ],
)
def test_a_broken_answer_fails_the_add_with_an_io_error(
    agent: FakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: bytes,
    words: str,
) -> None:
    agent.raw_answer = answer
    rc, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)))
    assert rc == 1 and out is not None
    assert out["code"] == 5 and str(tmp_path / "cni.sock") in out["msg"] and words in out["msg"]


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"cniVersion": "1.0.0", "x": "' + b"a" * (9 << 20) + b'"}', "bytes on stdin"),
        (b'{"cniVersion": "1.0.0", "x": "\xff"}', "not UTF-8"),
        (b'{"cniVersion": "1.0.0", "x": "\\ud800"}', "unpaired surrogate"),
        (b'{"cniVersion": "1.0.0", "x": "a\\u0000b"}', "\\u0000"),
        (b'{"cniVersion": "1.0.0"} {}', "extra data"),
        (b'{"cniVersion": "1.0.0", "x": 01}', "expected ',' or '}'"),
        (b"", "expected a value"),
    ],
)
def test_malformed_configuration_is_a_decode_error(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdin: bytes, words: str
) -> None:
    rc, out = invoke(monkeypatch, "ADD", stdin)  # type: ignore[arg-type]
    assert rc == 1 and out is not None
    assert out["code"] == DECODE_FAILURE and words in out["details"], out
    assert agent.requests == []


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=15,
)
FIELDS = ["prevResult", "name", "timeoutSeconds", "cni.dev/valid-attachments", "x"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]),
    raw=st.binary(max_size=300),
    doc=st.dictionaries(
        st.sampled_from(FIELDS),
        JSON_VALUES
        | st.fixed_dictionaries(
            {
                "ips": st.lists(JSON_VALUES | st.fixed_dictionaries({"address": JSON_VALUES})),
                "cniVersion": JSON_VALUES,
            }
        ),
    ),
    version=st.sampled_from([*SUPPORTED_VERSIONS, "9.9"]),
    use_raw=st.booleans(),
)
def test_any_input_gets_a_cni_answer(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    raw: bytes,
    doc: dict[str, Any],
    version: str,
    use_raw: bool,
) -> None:
    """Whatever arrives on stdin (random bytes, or a configuration with random fields), the
    plugin exits 0 or 1 with JSON (or nothing) on stdout and never writes to stderr: no crash,
    no hang. Its socket and log file are always this test's (no agent listens there)."""
    own = {"agentSocket": str(tmp_path / "none.sock"), "logFile": str(tmp_path / "cni.log")}
    stdin = raw if use_raw else json.dumps({**doc, "cniVersion": version, **own}).encode()
    code, out = invoke(monkeypatch, command, stdin)  # type: ignore[arg-type]
    if code == 1:
        assert out is not None and isinstance(out["code"], int) and isinstance(out["msg"], str)


# -- what the runtime hands over: the netns path and sizes (issue #20, attack surface) ---------


def _refused(out: dict[str, Any] | None, code: int, *words: str) -> None:
    assert out is not None and out["code"] == code, out
    for word in words:
        assert word in out["msg"], out


@pytest.mark.parametrize(
    ("netns", "words"),
    [
        ("run/netns/pod", "not an absolute path"),
        ("./pod", "not an absolute path"),
        ("/run/netns/../netns/pod", "not a canonical path"),
        ("/run//netns/pod", "not a canonical path"),
        ("/run/netns/pod/", "not a canonical path"),
        ("/run/netns/.", "not a canonical path"),
        ("/proc/self/ns/net", "symbolic link"),  # /proc/self: the plugin's own, never a pod's
    ],
)
def test_a_relative_or_unclean_netns_path_is_refused(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, netns: str, words: str
) -> None:
    rc, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns=netns)
    assert rc == 1
    _refused(out, INVALID_ENV, "CNI_NETNS", words)
    assert agent.requests == []


def test_a_symlinked_netns_is_refused(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to another namespace (here: to the node's, as a link to any process's ns/net) is
    never handed to the agent, nor is a path through a linked directory."""
    link = tmp_path / "pod-netns"
    link.symlink_to("/proc/1/ns/net")
    rc, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns=str(link))
    assert rc == 1
    _refused(out, INVALID_ENV, "CNI_NETNS", "symbolic link", "/proc/1/ns/net")
    real = tmp_path / "real"
    real.mkdir()
    (real / "pod").touch()  # stands for a namespace's bind mount
    (tmp_path / "linked").symlink_to(real)
    through = str(tmp_path / "linked" / "pod")
    rc, out = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns=through)
    assert rc == 1
    _refused(out, INVALID_ENV, "CNI_NETNS", "goes through a symbolic link", str(real / "pod"))
    assert agent.requests == []


def test_a_namespace_file_and_the_kernels_proc_path_are_accepted(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bind_mount = tmp_path / "cni-1234"  # what containerd's /var/run/netns/cni-<id> is
    bind_mount.touch()
    for netns in (str(bind_mount), OWN_NETNS, f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net"):
        rc, _ = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns=netns)
        assert rc == 0
        assert agent.requests[-1]["pod"]["netns"] == netns


def test_var_run_is_the_one_link_followed(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd names namespaces /var/run/netns/cni-<id>, and /var/run links to /run."""
    if not Path("/var/run").is_symlink():
        pytest.skip("/var/run is not a link here")
    entries = sorted(os.listdir("/var/run"))
    entry = next((e for e in entries if not Path("/var/run", e).is_symlink()), None)
    if entry is None:
        pytest.skip("nothing under /var/run")
    rc, _ = invoke(monkeypatch, "ADD", json.dumps(config(tmp_path)), netns=f"/var/run/{entry}")
    assert rc == 0
    assert agent.requests[-1]["pod"]["netns"] == f"/var/run/{entry}"


def _pod_args(**fields: str) -> str:
    args = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-1", "K8S_POD_UID": "u-1", **fields}
    return "IgnoreUnknown=1;" + ";".join(f"{k}={v}" for k, v in args.items())


@pytest.mark.parametrize(
    ("variable", "value", "code", "field"),
    [
        ("CNI_ARGS", _pod_args(PADDING="x" * 20000), INVALID_ENV, "CNI_ARGS is"),
        ("CNI_ARGS", _pod_args(K8S_POD_NAMESPACE="n" * 64), INVALID_ENV, "K8S_POD_NAMESPACE"),
        ("CNI_ARGS", _pod_args(K8S_POD_NAME="p" * 254), INVALID_ENV, "K8S_POD_NAME"),
        ("CNI_ARGS", _pod_args(K8S_POD_UID="u" * 257), INVALID_ENV, "K8S_POD_UID"),
        ("CNI_CONTAINERID", "c" * 257, INVALID_ENV, "CNI_CONTAINERID"),
        ("CNI_IFNAME", "eth" * 6, INVALID_ENV, "CNI_IFNAME"),
        ("CNI_NETNS", "/" + "n" * 5000, INVALID_ENV, "CNI_NETNS"),
        ("name", "k" * 257, INVALID_CONFIG, "field 'name'"),
    ],
)
@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_an_oversized_input_is_refused_with_its_field_named(
    agent: FakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    variable: str,
    value: str,
    code: int,
    field: str,
) -> None:
    conf = config(tmp_path, **({"name": value} if variable == "name" else {}))
    monkeypatch.setenv("CNI_COMMAND", command)
    monkeypatch.setenv("CNI_CONTAINERID", "c0ffee")
    monkeypatch.setenv("CNI_NETNS", OWN_NETNS)
    monkeypatch.setenv("CNI_IFNAME", "eth0")
    monkeypatch.setenv("CNI_ARGS", _pod_args())
    if variable != "name":
        monkeypatch.setenv(variable, value)
    rc, out = run(command, json.dumps(conf))
    assert rc == 1
    _refused(out, code, field, "more than")
    assert agent.requests == []
    # DEL still succeeds (the spec wants it to), and tells the agent nothing.
    assert run("DEL", json.dumps(conf)) == (0, None)
    assert agent.requests == []
    assert "oversized" in (tmp_path / "cni.log").read_text()


def test_inputs_at_their_bounds_are_accepted(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_CONTAINERID", "c" * 256)
    monkeypatch.setenv("CNI_NETNS", OWN_NETNS)
    monkeypatch.setenv("CNI_IFNAME", "e" * 15)
    monkeypatch.setenv("CNI_ARGS", _pod_args(K8S_POD_NAMESPACE="n" * 63, K8S_POD_NAME="p" * 253))
    assert run("ADD", json.dumps(config(tmp_path, name="k" * 256))) == (0, PREV)
    assert agent.requests[-1]["pod"]["name"] == "p" * 253


def test_oversized_stdin_is_refused(
    agent: FakeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = json.dumps(config(tmp_path, padding="x" * (8 << 20)))
    rc, out = invoke(monkeypatch, "ADD", conf)
    assert rc == 1
    _refused(out, DECODE_FAILURE, "failed to decode")
    assert out is not None and out["details"] == f"more than {8 << 20} bytes on stdin"
    assert agent.requests == []
