"""The runtime side of the CNI spec, against plugin executables that record what they are given.

The integration tests run the real bridge/host-local/loopback plugins; here each stand-in plugin
logs its environment and stdin, so the contract itself (order, prevResult, env, errors, cache) is
checked exactly.
"""

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from nodeagent.testbed.cni_runtime import CNIError, Runtime, Sandbox, load_conflist, pod_ipv4

PLUGIN = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open({log!r}, "a") as f:
    f.write(json.dumps({{"plugin": {name!r}, "env": env, "conf": conf}}) + "\\n")
fail = conf.get("failOn")
if fail == os.environ["CNI_COMMAND"]:
    print(json.dumps({{"cniVersion": "1.0.0", "code": 11, "msg": "try later", "details": "busy"}}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    prev = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "ips": []}}
    prev.setdefault("trail", []).append({name!r})
    if {name!r} == "ipam-ish":
        prev["ips"].append({{"address": "10.244.1.7/24", "gateway": "10.244.1.1"}})
    print(json.dumps(prev))
"""


@pytest.fixture
def plugins(tmp_path: Path) -> tuple[Path, Path]:
    import sys

    folder, log = tmp_path / "bin", tmp_path / "calls.log"
    folder.mkdir()
    for name in ("ipam-ish", "chained", "broken"):
        path = folder / name
        path.write_text(PLUGIN.format(python=sys.executable, log=str(log), name=name))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder, log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


SANDBOX = Sandbox("c0ffee", Path("/run/netns/pod-x"), "shop", "web-1", "uid-1")
CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "testnet",
    "plugins": [{"type": "ipam-ish", "x": 1}, {"type": "chained"}],
}


def test_add_runs_in_order_and_hands_on_prev_result(
    plugins: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, log = plugins
    result = Runtime([folder], tmp_path / "cache").add(CONFLIST, SANDBOX)
    assert result["trail"] == ["ipam-ish", "chained"]
    assert pod_ipv4(result) == "10.244.1.7"
    first, second = calls(log)
    assert [first["plugin"], second["plugin"]] == ["ipam-ish", "chained"]
    assert "prevResult" not in first["conf"]
    assert second["conf"]["prevResult"]["trail"] == ["ipam-ish"]
    # Each plugin gets the list's name and version injected, and its own fields untouched.
    assert first["conf"] == {"type": "ipam-ish", "x": 1, "cniVersion": "1.0.0", "name": "testnet"}


def test_environment_is_what_a_kubernetes_runtime_passes(
    plugins: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, log = plugins
    Runtime([folder], tmp_path / "cache").add(CONFLIST, SANDBOX)
    env = calls(log)[0]["env"]
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == "c0ffee"
    assert env["CNI_NETNS"] == "/run/netns/pod-x"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == str(folder)
    args = dict(kv.split("=", 1) for kv in env["CNI_ARGS"].split(";"))
    assert args["K8S_POD_NAMESPACE"] == "shop"
    assert args["K8S_POD_NAME"] == "web-1"
    assert args["K8S_POD_INFRA_CONTAINER_ID"] == "c0ffee"
    assert args["IgnoreUnknown"] == "1"


def test_del_runs_in_reverse_with_the_cached_result(
    plugins: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, log = plugins
    runtime = Runtime([folder], tmp_path / "cache")
    added = runtime.add(CONFLIST, SANDBOX)
    assert runtime.cached_result(CONFLIST, SANDBOX) == added
    assert runtime.delete(CONFLIST, SANDBOX) == []
    dels = [c for c in calls(log) if c["env"]["CNI_COMMAND"] == "DEL"]
    assert [c["plugin"] for c in dels] == ["chained", "ipam-ish"]
    assert all(c["conf"]["prevResult"] == added for c in dels)
    assert runtime.cached_result(CONFLIST, SANDBOX) is None


def test_check_uses_the_cached_result(plugins: tuple[Path, Path], tmp_path: Path) -> None:
    folder, log = plugins
    runtime = Runtime([folder], tmp_path / "cache")
    with pytest.raises(CNIError, match="no cached ADD result"):
        runtime.check(CONFLIST, SANDBOX)
    added = runtime.add(CONFLIST, SANDBOX)
    runtime.check(CONFLIST, SANDBOX)
    checks = [c for c in calls(log) if c["env"]["CNI_COMMAND"] == "CHECK"]
    assert [c["plugin"] for c in checks] == ["ipam-ish", "chained"]
    assert checks[0]["conf"]["prevResult"] == added


def test_failed_add_reports_the_plugin_error_and_cleans_up(
    plugins: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, log = plugins
    conflist = {**CONFLIST, "plugins": [{"type": "ipam-ish"}, {"type": "broken", "failOn": "ADD"}]}
    runtime = Runtime([folder], tmp_path / "cache")
    with pytest.raises(CNIError) as err:
        runtime.add(conflist, SANDBOX)
    assert (err.value.plugin, err.value.code, err.value.msg, err.value.details) == (
        "broken",
        11,
        "try later",
        "busy",
    )
    commands = [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls(log)]
    assert commands == [
        ("ipam-ish", "ADD"),
        ("broken", "ADD"),
        ("broken", "DEL"),
        ("ipam-ish", "DEL"),
    ]
    assert runtime.cached_result(conflist, SANDBOX) is None


def test_missing_plugin_binary_is_named(plugins: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = plugins
    conflist = {**CONFLIST, "plugins": [{"type": "nonexistent"}]}
    with pytest.raises(CNIError, match="plugin binary 'nonexistent' not found"):
        Runtime([folder], tmp_path / "cache").add(conflist, SANDBOX)


def test_conflist_is_the_first_valid_file_by_name(tmp_path: Path) -> None:
    (tmp_path / "00-broken.conflist").write_text("{not json")
    (tmp_path / "05-empty.conflist").write_text(json.dumps({"name": "x", "plugins": []}))
    (tmp_path / "10-net.conflist").write_text(json.dumps(CONFLIST))
    (tmp_path / "20-later.conflist").write_text(json.dumps({**CONFLIST, "name": "later"}))
    assert load_conflist(tmp_path)["name"] == "testnet"


def test_single_plugin_conf_becomes_a_list(tmp_path: Path) -> None:
    (tmp_path / "10-one.conf").write_text(
        json.dumps({"cniVersion": "0.4.0", "name": "one", "type": "bridge", "bridge": "cni0"})
    )
    conf = load_conflist(tmp_path)
    assert conf == {
        "cniVersion": "0.4.0",
        "name": "one",
        "plugins": [{"type": "bridge", "bridge": "cni0"}],
    }


def test_no_configuration_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CNIError, match="no valid network configuration"):
        load_conflist(tmp_path)
