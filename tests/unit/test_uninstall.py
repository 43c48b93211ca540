"""Uninstall or upgrade (Istio's rule, nodeagent.uninstall) against the stand-in API server, and
what follows it: install-cni and the node agent on SIGTERM, ``install-cni --uninstall``,
``CaptureManager.remove_all``. No root: the agent's capture here is a recording backend or pods
without a network namespace; tests/integration/test_uninstall.py removes real nftables tables.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from apiserver_standin import APIServerStandIn
from click.testing import CliRunner

from nodeagent import agent, uninstall
from nodeagent.cli import cli
from nodeagent.cni import wire
from nodeagent.cni.install import PLUGIN_TYPE, holds_entry
from nodeagent.mesh.store import MeshStore
from nodeagent.metrics import AgentMetrics
from nodeagent.redirect import CaptureCheck
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.manager import CaptureManager
from nodeagent.redirect.registry import CAPTURED, FAILED, NOT_IN_MESH, PodCapture, PodRegistry
from nodeagent.uninstall import DaemonSetRef, Decision, decide
from tests.waiting import wait_for_async

DS = DaemonSetRef("nodeagent-system", "nodeagent")
GET = "GET /apis/apps/v1/namespaces/nodeagent-system/daemonsets/nodeagent"
DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"namespace": "nodeagent-system", "name": "nodeagent", "uid": "ds-1"},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "nodeagent"}}},
}
DELETING: dict[str, Any] = copy.deepcopy(DAEMONSET)
DELETING["metadata"] |= {
    "deletionTimestamp": "2025-01-02T03:04:05Z",
    "finalizers": ["foregroundDeletion"],
}
CALICO: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [{"type": "calico", "ipam": {"type": "calico-ipam"}}, {"type": "portmap"}],
}
WAIT = 20.0


@asynccontextmanager
async def standin(tmp_path: Path) -> AsyncIterator[tuple[APIServerStandIn, Path]]:
    server = APIServerStandIn()
    await server.start()
    try:
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")
    finally:
        await server.stop()


def decided(
    tmp_path: Path, setup: Callable[[APIServerStandIn], object]
) -> tuple[Decision, list[str]]:
    """The decision against a stand-in prepared by SETUP, and the GETs it took."""

    async def scenario() -> tuple[Decision, list[str]]:
        async with standin(tmp_path) as (server, kubeconfig):
            setup(server)
            decision = await decide(DS, kubeconfig, retry_delay=0.01, request_timeout=2)
            return decision, [r for r in server.requests if r.startswith("GET ")]

    return asyncio.run(scenario())


# -- the decision ---------------------------------------------------------------------------------


def test_a_daemonset_that_exists_means_upgrade_or_restart_keep_everything(tmp_path: Path) -> None:
    decision, gets = decided(tmp_path, lambda s: s.add(DAEMONSET))
    assert (decision.remove, decision.certain) == (False, True)
    assert "exists and is not being deleted" in decision.reason
    assert gets == [GET]


def test_a_daemonset_that_is_gone_means_uninstall(tmp_path: Path) -> None:
    def gone(server: APIServerStandIn) -> None:
        server.add(DAEMONSET)
        server.delete(DAEMONSET)

    decision, gets = decided(tmp_path, gone)
    assert (decision.remove, decision.certain) == (True, True)
    assert "gone (404" in decision.reason
    assert gets == [GET]


def test_a_daemonset_being_deleted_means_uninstall(tmp_path: Path) -> None:
    decision, _ = decided(tmp_path, lambda s: s.add(DELETING))
    assert (decision.remove, decision.certain) == (True, True)
    assert "being deleted (since 2025-01-02T03:04:05Z)" in decision.reason


def test_another_daemonset_of_the_same_name_elsewhere_does_not_count(tmp_path: Path) -> None:
    other = copy.deepcopy(DAEMONSET)
    other["metadata"]["namespace"] = "kube-system"
    decision, _ = decided(tmp_path, lambda s: s.add(other))
    assert decision.remove and "gone (404" in decision.reason


def test_revoked_credentials_mean_uninstall_at_once(tmp_path: Path) -> None:
    decision, gets = decided(tmp_path, lambda s: s.failures.append(401))
    assert (decision.remove, decision.certain) == (True, True)
    assert "401" in decision.reason
    assert gets == [GET]


def test_errors_are_retried_and_a_later_answer_decides(tmp_path: Path) -> None:
    def flaky(server: APIServerStandIn) -> None:
        server.add(DAEMONSET)
        server.failures += [500, 0]  # an error status, then a connection closed unanswered

    decision, gets = decided(tmp_path, flaky)
    assert (decision.remove, decision.certain) == (False, True)
    assert gets == [GET] * 3


def test_an_api_server_that_keeps_failing_means_remove_as_istio_does(tmp_path: Path) -> None:
    def broken(server: APIServerStandIn) -> None:
        server.add(DAEMONSET)  # there, but never shown
        server.failures += [500, 503, 500]

    decision, gets = decided(tmp_path, broken)
    assert (decision.remove, decision.certain) == (True, False)
    assert "could not tell" in decision.reason and "HTTP 500" in decision.reason
    assert gets == [GET] * 3


def test_forbidden_is_not_taken_for_an_uninstall_but_ends_in_removal(tmp_path: Path) -> None:
    def forbidden(server: APIServerStandIn) -> None:
        server.add(DAEMONSET)
        server.failures += [403, 403, 403]

    decision, gets = decided(tmp_path, forbidden)
    assert (decision.remove, decision.certain) == (True, False)
    assert "Role" in decision.reason
    assert gets == [GET] * 3


def test_an_unreachable_api_server_means_remove_after_the_retries(tmp_path: Path) -> None:
    async def scenario() -> Decision:
        async with standin(tmp_path) as (_, kubeconfig):
            pass  # stopped: nothing listens on its port any more
        return await decide(DS, kubeconfig, retry_delay=0.01, request_timeout=2)

    decision = asyncio.run(scenario())
    assert (decision.remove, decision.certain) == (True, False)
    assert "could not tell" in decision.reason


def test_shutdown_logs_which_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uninstall, "RETRY_DELAY", 0.01)

    async def scenario() -> list[Decision]:
        async with standin(tmp_path) as (server, kubeconfig):
            server.add(DAEMONSET)
            kept = await uninstall.on_shutdown("node agent", DS, kubeconfig)
            server.failures += [500] * uninstall.ATTEMPTS
            failed = await uninstall.on_shutdown("install-cni", DS, kubeconfig)
            server.delete(DAEMONSET)
            removed = await uninstall.on_shutdown("node agent", DS, kubeconfig)
        untold = await uninstall.on_shutdown("node agent", None, None)
        return [kept, failed, removed, untold]

    with caplog.at_level(logging.INFO, logger="nodeagent.uninstall"):
        kept, failed, removed, untold = asyncio.run(scenario())
    assert [d.remove for d in (kept, failed, removed, untold)] == [False, True, True, False]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "stopping" in r.getMessage()]
    assert lines == [
        ("INFO", f"node agent stopping, keeping what it installed: {kept.reason}"),
        ("ERROR", f"install-cni stopping, removing what it installed: {failed.reason}"),
        ("WARNING", f"node agent stopping, removing what it installed: {removed.reason}"),
        ("INFO", f"node agent stopping, keeping what it installed: {untold.reason}"),
    ]
    assert "--daemonset" in untold.reason


@pytest.mark.parametrize(
    "text", ["nodeagent", "/nodeagent", "nodeagent-system/", "a/b/c", "Kube/Agent", "a b/c"]
)
def test_daemonset_reference_must_be_namespace_slash_name(text: str) -> None:
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        DaemonSetRef.parse(text)
    assert DaemonSetRef.parse("nodeagent-system/nodeagent") == DS
    result = CliRunner().invoke(cli, ["install-cni", "--watch", "--daemonset", text])
    assert result.exit_code == 2 and "NAMESPACE/NAME" in result.output


def test_daemonset_needs_the_api_server_credentials() -> None:
    result = CliRunner().invoke(
        cli, ["run", "--node", "n1", "--source-dir", "/nowhere", "--daemonset", str(DS)]
    )
    assert result.exit_code == 2
    assert "--daemonset asks the API server" in result.output
    result = CliRunner().invoke(cli, ["install-cni", "--daemonset", str(DS)])
    assert result.exit_code == 2 and "add --watch" in result.output


# -- install-cni ----------------------------------------------------------------------------------


def make_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    bundle.mkdir()
    plugin = bundle / PLUGIN_TYPE
    plugin.write_text("#!/bin/sh\necho '{}'\n")
    plugin.chmod(0o755)
    return bundle


def test_install_cni_uninstall_removes_entries_and_the_binary(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (conf_dir / "10-calico.conflist").write_text(json.dumps(CALICO))
    (bin_dir / "bridge").write_text("not ours")
    args = ["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir)]
    installed = CliRunner().invoke(
        cli, ["install-cni", *args, "--bundle", str(make_bundle(tmp_path))]
    )
    assert installed.exit_code == 0, installed.output
    assert holds_entry(conf_dir) and (bin_dir / PLUGIN_TYPE).is_file()

    removed = CliRunner().invoke(cli, ["install-cni", *args, "--uninstall"])

    assert removed.exit_code == 0, removed.output
    assert json.loads((conf_dir / "10-calico.conflist").read_text()) == CALICO
    assert sorted(os.listdir(bin_dir)) == ["bridge"]


@pytest.mark.parametrize(
    ("daemonset", "removed"), [(DAEMONSET, False), (DELETING, True), (None, True)]
)
def test_install_cni_on_sigterm_keeps_on_upgrade_removes_on_uninstall(
    tmp_path: Path, daemonset: dict[str, Any] | None, removed: bool
) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (conf_dir / "10-calico.conflist").write_text(json.dumps(CALICO))
    bundle = make_bundle(tmp_path)

    async def scenario() -> str:
        async with standin(tmp_path) as (server, kubeconfig):
            if daemonset is not None:
                server.add(daemonset)
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "nodeagent", "install-cni", "--watch"],
                *["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir)],
                *["--bundle", str(bundle), "--agent-socket", str(tmp_path / "cni.sock")],
                *["--daemonset", str(DS), "--kubeconfig", str(kubeconfig)],
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await wait_for_async(
                    lambda: holds_entry(conf_dir) and (bin_dir / PLUGIN_TYPE).is_file(),
                    WAIT,
                    "install-cni installed the plugin",
                    step=0.05,
                )
                proc.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(proc.communicate(), WAIT)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, stderr.decode()
            assert server.requests.count(GET) == 1
            return stderr.decode()

    log = asyncio.run(scenario())
    verdict = "removing" if removed else "keeping"
    assert f"install-cni stopping, {verdict} what it installed" in log
    if removed:
        assert json.loads((conf_dir / "10-calico.conflist").read_text()) == CALICO
        assert os.listdir(bin_dir) == []
    else:
        assert holds_entry(conf_dir)
        assert (bin_dir / PLUGIN_TYPE).is_file()


# -- the node agent -------------------------------------------------------------------------------


class RecordingBackend:
    name = "recording"

    def __init__(self, fail: set[str] | None = None) -> None:
        self.removed: list[str] = []
        self.fail = fail or set()

    def apply(self, netns: Path, spec: CaptureSpec, uid: str = "") -> None:
        raise AssertionError("nothing is applied during removal")

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        raise AssertionError("nothing is verified during removal")

    def remove(self, netns: Path, uid: str = "") -> None:
        if str(netns) in self.fail:
            raise RuntimeError("nft: Operation not permitted")
        self.removed.append(str(netns))


class ProbeRecorder:
    def __init__(self) -> None:
        self.removed = 0

    def sync(self, pod_ips: Any, whole: bool = False) -> None:
        raise AssertionError("the probe set is not synced during removal")

    def remove(self) -> None:
        self.removed += 1


def registry_with_pods(tmp_path: Path) -> tuple[PodRegistry, dict[str, str]]:
    """A captured pod, one whose capture failed after apply, one outside the mesh, one whose
    netns is gone; netns: a file per pod that still has one."""
    netns = {}
    for name in ("web", "broken", "plain"):
        path = tmp_path / f"netns-{name}"
        path.touch()
        netns[name] = str(path)
    netns["gone"] = str(tmp_path / "netns-gone")
    registry = PodRegistry(tmp_path / "state" / "pods")
    states = {"web": CAPTURED, "broken": FAILED, "plain": NOT_IN_MESH, "gone": CAPTURED}
    for name, state in states.items():
        registry.put(
            PodCapture("shop", name, f"id-{name}", netns[name], ips=["10.244.1.7"], state=state)
        )
    return registry, netns


def test_remove_all_takes_capture_out_of_every_pod_then_probe_snat_and_registry(
    tmp_path: Path,
) -> None:
    registry, netns = registry_with_pods(tmp_path)
    backend, probes, metrics = RecordingBackend(), ProbeRecorder(), AgentMetrics()
    metrics.set_pod_state("shop", "web", CAPTURED)
    manager = CaptureManager(MeshStore(), backend, registry, metrics, (), probe_snat=probes)

    summary = asyncio.run(manager.remove_all())

    assert summary == {"removed": 2, "not_captured": 1, "netns_missing": 1, "failed": 0}
    assert sorted(backend.removed) == sorted([netns["web"], netns["broken"]])
    assert probes.removed == 1
    assert not registry.exists()
    assert registry.pods == {}
    assert metrics.registry.get_sample_value("nodeagent_pods", {"state": CAPTURED}) == 0


def test_remove_all_keeps_what_it_could_not_remove_for_another_try(tmp_path: Path) -> None:
    registry, netns = registry_with_pods(tmp_path)
    backend = RecordingBackend(fail={netns["web"]})
    manager = CaptureManager(
        MeshStore(), backend, registry, AgentMetrics(), (), probe_snat=ProbeRecorder()
    )

    summary = asyncio.run(manager.remove_all())

    assert summary["failed"] == 1 and summary["removed"] == 1
    left = PodRegistry(registry.directory)
    left.load()
    assert list(left.pods) == ["id-web"]


def _on_disk(registry: PodRegistry) -> set[str]:
    """The sandbox ids whose records an agent starting now would read."""
    again = PodRegistry(registry.directory)
    again.load()
    return set(again.pods)


def _agent_config(tmp_path: Path, kubeconfig: Path) -> agent.AgentConfig:
    return agent.AgentConfig(
        node_name="node1",
        kubeconfig=kubeconfig,
        cni_socket=tmp_path / "run" / "cni.sock",
        state_dir=tmp_path / "state",
        metrics_port=0,
        readiness_port=0,
        probe_snat=False,  # the node's nftables: integration tests
        proxy=False,
        daemonset=DS,
    )


@pytest.mark.parametrize(("daemonset", "removed"), [(DAEMONSET, False), (DELETING, True)])
def test_agent_on_stop_keeps_on_upgrade_and_removes_on_uninstall(
    tmp_path: Path, daemonset: dict[str, Any], removed: bool
) -> None:
    # Pods that need no network namespace entered: one outside the mesh, one whose netns is gone.
    registry = PodRegistry(tmp_path / "state" / "pods")
    for name, state in (("plain", NOT_IN_MESH), ("gone", CAPTURED)):
        registry.put(PodCapture("shop", name, f"id-{name}", str(tmp_path / name), state=state))
    before = _on_disk(registry)

    async def scenario() -> None:
        async with standin(tmp_path) as (server, kubeconfig):
            server.add(daemonset)
            config = _agent_config(tmp_path, kubeconfig)
            stop = asyncio.Event()
            running = asyncio.create_task(agent.run(config, stop))

            def answering() -> bool:
                try:
                    return bool(wire.request(str(config.cni_socket), {"command": "STATUS"}, 1))
                except (OSError, wire.ProtocolError):
                    return False

            async def serving() -> bool:
                assert not running.done(), running
                return await asyncio.to_thread(answering)

            try:
                await wait_for_async(serving, WAIT, "the agent serving CNI", step=0.05)
                stop.set()  # what SIGTERM does
                await asyncio.wait_for(running, WAIT)
            finally:
                running.cancel()
            assert server.requests.count(GET) == 1

    asyncio.run(scenario())
    if removed:
        assert not registry.exists()
    else:
        assert _on_disk(registry) == before == {"id-plain", "id-gone"}
