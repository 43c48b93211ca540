"""install-cni against a fake node: a CNI bin dir and a conf dir under tmp_path, no root."""

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import install
from nodeagent.cni.install import (
    BUNDLE_DIRNAME,
    PLUGIN_TYPE,
    CniInstaller,
    InstallError,
    holds_entry,
    insert_entry,
    install_binary,
    primary_config,
    remove_entry,
    serve_readiness,
    uninstall_binary,
)
from tests.waiting import wait_for

# Like a PyInstaller onedir executable: it finds its _internal/ next to its real path.
PLUGIN_SCRIPT = """#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
cat "$here/_internal/version"
"""

CALICO: dict[str, Any] = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}, "mtu": 1440},
        {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
    ],
    "disableCheck": False,
}
FLANNEL_CONF: dict[str, Any] = {
    "cniVersion": "0.3.1",
    "name": "cbr0",
    "type": "flannel",
    "delegate": {"hairpinMode": True, "isDefaultGateway": True},
}
ENTRY: dict[str, Any] = {"type": PLUGIN_TYPE, "log_level": "info"}


def make_bundle(root: Path, version: str, extra: str | None = None) -> Path:
    bundle = root / f"bundle-{version}"
    (bundle / "_internal").mkdir(parents=True)
    plugin = bundle / PLUGIN_TYPE
    plugin.write_text(PLUGIN_SCRIPT)
    plugin.chmod(0o755)
    (bundle / "_internal" / "version").write_text(version)
    if extra is not None:
        (bundle / "_internal" / extra).write_text(extra)
    return bundle


def write_json(path: Path, doc: Any, mode: int = 0o644) -> Path:
    path.write_text(json.dumps(doc, indent=4))
    path.chmod(mode)
    return path


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def types(path: Path) -> list[str]:
    return [plugin["type"] for plugin in load(path)["plugins"]]


def run_plugin(path: Path) -> str:
    return subprocess.run([path], capture_output=True, text=True, check=True, timeout=5).stdout


NO_PRIMARY = "CNI install check failed, retrying: no valid CNI network config"


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many of the installer's log lines hold TEXT (each one is a watch tick that saw it)."""
    return sum(text in m for m in caplog.messages)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "opt-cni-bin"
    path.mkdir()
    return path


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    path = tmp_path / "etc-cni-net.d"
    path.mkdir()
    return path


# --- binary --------------------------------------------------------------------------------------


def test_install_binary_links_the_plugin_into_the_bundle(tmp_path: Path, bin_dir: Path) -> None:
    link = install_binary(make_bundle(tmp_path, "v1"), bin_dir)

    assert link == bin_dir / PLUGIN_TYPE
    assert link.is_symlink()
    assert os.readlink(link) == f"{BUNDLE_DIRNAME}/{PLUGIN_TYPE}"
    assert (bin_dir / BUNDLE_DIRNAME / "_internal" / "version").read_text() == "v1"
    assert run_plugin(link) == "v1"
    assert sorted(os.listdir(bin_dir)) == [PLUGIN_TYPE, BUNDLE_DIRNAME]


def test_reinstall_swaps_in_the_changed_bundle(tmp_path: Path, bin_dir: Path) -> None:
    install_binary(make_bundle(tmp_path, "v1", extra="only-in-v1"), bin_dir)
    link = install_binary(make_bundle(tmp_path, "v2"), bin_dir)

    assert run_plugin(link) == "v2"
    # Replaced, not merged, and no staging or old copies left behind.
    assert not (bin_dir / BUNDLE_DIRNAME / "_internal" / "only-in-v1").exists()
    assert sorted(os.listdir(bin_dir)) == [PLUGIN_TYPE, BUNDLE_DIRNAME]


def test_plugin_runs_old_or_new_bundle_throughout_reinstalls(tmp_path: Path, bin_dir: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not install._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no atomic directory exchange on this filesystem")
    bundles = [make_bundle(tmp_path, "v1"), make_bundle(tmp_path, "v2")]
    link = install_binary(bundles[0], bin_dir)
    outputs: list[str] = []
    stop = threading.Event()

    def exec_in_a_loop() -> None:
        while not stop.is_set():
            try:
                outputs.append(run_plugin(link))
            except subprocess.CalledProcessError as err:
                outputs.append(f"failed: {err.stderr}")

    runtime = threading.Thread(target=exec_in_a_loop, daemon=True)
    runtime.start()
    try:
        for i in range(20):
            install_binary(bundles[i % 2], bin_dir)
            # Every swap races at least one exec of the plugin.
            ran = len(outputs)
            wait_for(lambda ran=ran: len(outputs) > ran, 5, "the runtime to run the plugin")
    finally:
        stop.set()
        runtime.join(timeout=5)

    assert outputs
    assert set(outputs) <= {"v1", "v2"}
    assert sorted(os.listdir(bin_dir)) == [PLUGIN_TYPE, BUNDLE_DIRNAME]


def test_reinstall_without_atomic_exchange_still_swaps(
    tmp_path: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install, "_exchange", lambda a, b: False)
    install_binary(make_bundle(tmp_path, "v1"), bin_dir)

    link = install_binary(make_bundle(tmp_path, "v2"), bin_dir)

    assert run_plugin(link) == "v2"
    assert sorted(os.listdir(bin_dir)) == [PLUGIN_TYPE, BUNDLE_DIRNAME]


def test_unchanged_bundle_is_not_copied_again(tmp_path: Path, bin_dir: Path) -> None:
    bundle = make_bundle(tmp_path, "v1")
    install_binary(bundle, bin_dir)
    installed = bin_dir / BUNDLE_DIRNAME
    before = (installed.stat().st_ino, (installed / PLUGIN_TYPE).stat().st_ino)

    install_binary(bundle, bin_dir)

    assert (installed.stat().st_ino, (installed / PLUGIN_TYPE).stat().st_ino) == before


def test_mode_change_counts_as_a_changed_bundle(tmp_path: Path, bin_dir: Path) -> None:
    bundle = make_bundle(tmp_path, "v1")
    install_binary(bundle, bin_dir)
    (bundle / PLUGIN_TYPE).chmod(0o700)

    install_binary(bundle, bin_dir)

    assert (bin_dir / BUNDLE_DIRNAME / PLUGIN_TYPE).stat().st_mode & 0o777 == 0o700


def test_install_binary_replaces_a_plain_file_and_cleans_leftovers(
    tmp_path: Path, bin_dir: Path
) -> None:
    (bin_dir / PLUGIN_TYPE).write_text("old single-file plugin")
    (bin_dir / f".{PLUGIN_TYPE}.staging-crashed").mkdir()
    (bin_dir / "bridge").write_text("someone else's plugin")

    link = install_binary(make_bundle(tmp_path, "v1"), bin_dir)

    assert link.is_symlink()
    assert run_plugin(link) == "v1"
    assert sorted(os.listdir(bin_dir)) == ["bridge", PLUGIN_TYPE, BUNDLE_DIRNAME]


def test_install_binary_rejects_a_bundle_without_the_executable(
    tmp_path: Path, bin_dir: Path
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InstallError, match="no nodeagent-cni executable"):
        install_binary(tmp_path / "empty", bin_dir)


def test_uninstall_binary_removes_link_and_bundle_only(tmp_path: Path, bin_dir: Path) -> None:
    (bin_dir / "bridge").write_text("someone else's plugin")
    install_binary(make_bundle(tmp_path, "v1"), bin_dir)

    uninstall_binary(bin_dir)
    uninstall_binary(bin_dir)

    assert os.listdir(bin_dir) == ["bridge"]


# --- choosing the primary config -----------------------------------------------------------------


def test_primary_is_the_first_valid_file_by_name(conf_dir: Path) -> None:
    write_json(conf_dir / "20-later.conflist", CALICO)
    write_json(conf_dir / "10-calico.conflist", CALICO)
    (conf_dir / "00-notes.txt").write_text("not a config")

    assert primary_config(conf_dir) == conf_dir / "10-calico.conflist"


def test_primary_skips_invalid_files_with_a_warning(
    conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (conf_dir / "01-broken.conflist").write_text('{"name": "x", "plugins": [')
    write_json(conf_dir / "02-empty.conflist", {"name": "x", "plugins": []})
    write_json(conf_dir / "03-untyped.conflist", {"name": "x", "plugins": [{"mtu": 1}]})
    write_json(conf_dir / "04-list.conf", CALICO)  # a conflist in a .conf: no type
    write_json(conf_dir / "05-array.conf", [FLANNEL_CONF])
    write_json(conf_dir / "10-calico.conflist", CALICO)

    with caplog.at_level(logging.WARNING, logger="nodeagent.install_cni"):
        assert primary_config(conf_dir) == conf_dir / "10-calico.conflist"

    warned = "\n".join(caplog.messages)
    for name in ("01-broken", "02-empty", "03-untyped", "04-list", "05-array"):
        assert name in warned
    assert "invalid JSON" in warned
    assert "no plugins" in warned


def test_primary_accepts_json_and_reports_none_when_nothing_is_valid(conf_dir: Path) -> None:
    assert primary_config(conf_dir) is None
    write_json(conf_dir / "10-flannel.json", FLANNEL_CONF)

    assert primary_config(conf_dir) == conf_dir / "10-flannel.json"


# --- inserting and removing our entry ------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_insert_appends_last_and_leaves_the_rest_alone(conf_dir: Path, mode: int) -> None:
    path = write_json(conf_dir / "10-calico.conflist", CALICO, mode)

    assert insert_entry(conf_dir, ENTRY) == path

    doc = load(path)
    assert doc["plugins"] == [*CALICO["plugins"], ENTRY]
    assert {k: v for k, v in doc.items() if k != "plugins"} == {
        k: v for k, v in CALICO.items() if k != "plugins"
    }
    assert list(doc) == list(CALICO)  # key order kept
    assert path.stat().st_mode & 0o777 == mode
    assert holds_entry(conf_dir)
    assert [p.name for p in conf_dir.iterdir()] == [path.name]  # no temp files


@pytest.mark.parametrize("suffix", [".conf", ".json"])
def test_insert_wraps_a_single_plugin_file_into_a_conflist(conf_dir: Path, suffix: str) -> None:
    old = write_json(conf_dir / f"10-flannel{suffix}", FLANNEL_CONF, 0o600)

    path = insert_entry(conf_dir, ENTRY)

    assert path == conf_dir / "10-flannel.conflist"
    assert not old.exists()
    assert load(path) == {
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "plugins": [{"type": "flannel", "delegate": FLANNEL_CONF["delegate"]}, ENTRY],
    }
    assert path.stat().st_mode & 0o777 == 0o600
    assert primary_config(conf_dir) == path
    assert holds_entry(conf_dir)


def test_second_insert_changes_nothing(conf_dir: Path) -> None:
    path = write_json(conf_dir / "10-calico.conflist", CALICO)
    insert_entry(conf_dir, ENTRY)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # coarse clocks cannot hide a rewrite
    before = (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns)

    assert insert_entry(conf_dir, dict(ENTRY)) == path

    assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == before


def test_our_old_entry_in_the_middle_moves_to_the_end_updated(conf_dir: Path) -> None:
    calico, portmap = CALICO["plugins"]
    stale = {"type": PLUGIN_TYPE, "log_level": "debug", "removed_option": 1}
    path = write_json(
        conf_dir / "10-calico.conflist", {**CALICO, "plugins": [calico, stale, portmap]}
    )
    assert not holds_entry(conf_dir)

    insert_entry(conf_dir, ENTRY)

    assert load(path)["plugins"] == [calico, portmap, ENTRY]


def test_remove_entry_restores_the_primary_config(conf_dir: Path) -> None:
    path = write_json(conf_dir / "10-calico.conflist", CALICO, 0o600)
    insert_entry(conf_dir, ENTRY)

    assert remove_entry(conf_dir) == path

    assert load(path) == CALICO
    assert list(load(path)) == list(CALICO)
    assert path.stat().st_mode & 0o777 == 0o600
    assert remove_entry(conf_dir) is None


def test_remove_entry_keeps_a_wrapped_conf_as_a_conflist(conf_dir: Path) -> None:
    write_json(conf_dir / "10-flannel.conf", FLANNEL_CONF)
    path = insert_entry(conf_dir, ENTRY)

    assert remove_entry(conf_dir) == path

    assert types(path) == ["flannel"]


def test_holds_entry_only_when_ours_is_last(conf_dir: Path) -> None:
    assert not holds_entry(conf_dir)
    plugins = [{"type": PLUGIN_TYPE}, *CALICO["plugins"]]
    write_json(conf_dir / "10-calico.conflist", {**CALICO, "plugins": plugins})
    assert not holds_entry(conf_dir)

    insert_entry(conf_dir, ENTRY)

    assert holds_entry(conf_dir)


def test_insert_without_a_valid_config_names_the_dir(conf_dir: Path) -> None:
    (conf_dir / "10-broken.conflist").write_text("{")

    with pytest.raises(InstallError, match=str(conf_dir)):
        insert_entry(conf_dir, ENTRY)


def test_insert_refuses_an_entry_of_another_type(conf_dir: Path) -> None:
    write_json(conf_dir / "10-calico.conflist", CALICO)
    with pytest.raises(ValueError, match=PLUGIN_TYPE):
        insert_entry(conf_dir, {"type": "istio-cni"})


# --- the installer -------------------------------------------------------------------------------


def test_installer_install_and_uninstall(tmp_path: Path, bin_dir: Path, conf_dir: Path) -> None:
    path = write_json(conf_dir / "10-calico.conflist", CALICO)
    # An older primary that a newer file now shadows, holding an entry from earlier.
    shadowed = write_json(
        conf_dir / "20-old.conflist", {**CALICO, "plugins": [{"type": "x"}, ENTRY]}
    )
    installer = CniInstaller(make_bundle(tmp_path, "v1"), bin_dir, conf_dir, ENTRY)

    assert installer.install() == path
    assert installer.ready()
    assert run_plugin(bin_dir / PLUGIN_TYPE) == "v1"

    installer.uninstall()

    assert not installer.ready()
    assert load(path) == CALICO
    assert types(shadowed) == ["x"]
    assert os.listdir(bin_dir) == []


@pytest.fixture
def watching(bin_dir: Path, conf_dir: Path) -> Iterator[CniInstaller]:
    write_json(conf_dir / "10-calico.conflist", CALICO)
    installer = CniInstaller(None, bin_dir, conf_dir, ENTRY)
    installer.install()
    stop = threading.Event()
    thread = threading.Thread(target=installer.watch, args=(stop,), daemon=True)
    thread.start()
    yield installer
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_watch_reinserts_after_the_primary_cni_rewrites_its_file(
    watching: CniInstaller, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.install_cni")
    path = conf_dir / "10-calico.conflist"
    write_json(path, {**CALICO, "mtu": 9000})  # the primary CNI restarted and wrote its own

    wait_for(lambda: types(path)[-1] == PLUGIN_TYPE, 1, "the entry back in the rewritten file")
    assert load(path)["mtu"] == 9000
    assert types(path) == ["calico", "portmap", PLUGIN_TYPE]
    wait_for(
        lambda: any("inserted" in m and path.name in m for m in caplog.messages), 1, "the log line"
    )


def test_watch_follows_a_new_primary_that_sorts_first(
    watching: CniInstaller, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.install_cni")
    first = write_json(conf_dir / "05-cilium.conflist", {**CALICO, "plugins": [{"type": "cilium"}]})

    wait_for(lambda: types(first) == ["cilium", PLUGIN_TYPE], 1, "the entry in the new primary")
    assert watching.ready()
    wait_for(
        lambda: any("inserted" in m and first.name in m for m in caplog.messages), 1, "the log line"
    )


def test_watch_survives_missing_and_half_written_files(
    watching: CniInstaller, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = conf_dir / "10-calico.conflist"
    path.unlink()
    wait_for(lambda: logged(caplog, NO_PRIMARY), 2, "the watch to see no primary config")
    path.write_text('{"name": "k8s-pod-network", "plugins": [')
    half = f"skipping CNI config {path}: invalid JSON"
    wait_for(lambda: logged(caplog, half), 2, "the watch to skip the half-written file")
    assert not watching.ready()

    write_json(path, CALICO)

    wait_for(lambda: holds_entry(conf_dir), 1, "the entry in the completed file")
    assert types(path) == ["calico", "portmap", PLUGIN_TYPE]


def test_watch_inserts_once_a_primary_config_appears(
    bin_dir: Path, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installer = CniInstaller(None, bin_dir, conf_dir, ENTRY)
    with pytest.raises(InstallError, match=str(conf_dir)):
        installer.install()
    stop = threading.Event()
    thread = threading.Thread(target=installer.watch, args=(stop, 0.05), daemon=True)
    thread.start()
    try:
        wait_for(lambda: logged(caplog, NO_PRIMARY), 2, "the watch to see no primary config")
        write_json(conf_dir / "10-flannel.conf", FLANNEL_CONF)

        wait_for(installer.ready, 1, "the entry in the new primary")
        assert types(conf_dir / "10-flannel.conflist") == ["flannel", PLUGIN_TYPE]
        assert not (conf_dir / "10-flannel.conf").exists()
    finally:
        stop.set()
        thread.join(timeout=2)
    assert not thread.is_alive()


def test_watch_leaves_the_config_alone_after_uninstall(
    watching: CniInstaller, conf_dir: Path
) -> None:
    watching.uninstall()
    time.sleep(0.5)  # a few watch ticks (0.2 s each) that must leave the file alone

    assert load(conf_dir / "10-calico.conflist") == CALICO


def test_readiness_endpoint(conf_dir: Path, bin_dir: Path) -> None:
    write_json(conf_dir / "10-calico.conflist", CALICO)
    installer = CniInstaller(None, bin_dir, conf_dir, ENTRY)
    installer.install()
    server = serve_readiness(installer, 0, "127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read().decode()

    try:
        assert get("/readyz") == (200, "ok")
        remove_entry(conf_dir)
        code, reason = get("/readyz")
        assert code == 503
        assert "10-calico.conflist" in reason
        assert get("/healthz")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_watch_inserts_no_entry_while_the_binary_cannot_be_installed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry without its binary would fail every pod: the binary must come first."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-net.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]})
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "nodeagent-cni").write_text("#!/bin/sh\n")
    installer = CniInstaller(bundle, tmp_path / "missing-bin", conf_dir)
    stop = threading.Event()
    watcher = threading.Thread(target=installer.watch, args=(stop, 0.02), daemon=True)
    watcher.start()
    try:
        # Each watch tick starts by trying the binary (and says so); the second tick finds the
        # directory unchanged and would insert the entry, so let it finish: three ticks begun.
        gone = f"{PLUGIN_TYPE} is gone from"
        wait_for(lambda: logged(caplog, gone) >= 3, 2, "three watch ticks with the binary failing")
        assert not holds_entry(conf_dir)
        assert "not installed" in (installer.unready_reason() or "")
        (tmp_path / "missing-bin").mkdir()
        wait_for(installer.ready, 2, "the binary and the entry installed")
        assert holds_entry(conf_dir)
    finally:
        stop.set()
        watcher.join(timeout=5)
