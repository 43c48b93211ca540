"""The node's CNI side: `install-cni` (the plugin into the primary CNI config) and `uninstall`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nodeagent.cli.options import cni_socket_option, daemonset_option
from nodeagent.cni.wire import DEFAULT_SOCKET

if TYPE_CHECKING:
    from nodeagent.uninstall import DaemonSetRef


@click.command("install-cni")
@click.option("--cni-bin-dir", type=click.Path(path_type=Path), default=Path("/opt/cni/bin"))
@click.option("--cni-conf-dir", type=click.Path(path_type=Path), default=Path("/etc/cni/net.d"))
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="The nodeagent-cni bundle to install (default: the one built by make setup).",
)
@click.option("--agent-socket", default=DEFAULT_SOCKET, show_default=True)
@click.option("--log-file", default="/var/log/nodeagent-cni.log", show_default=True)
@click.option("--timeout", "timeout_seconds", type=float, default=30.0, show_default=True)
@click.option("--watch", is_flag=True, help="Keep our entry in the config when it is rewritten.")
@click.option("--readiness-port", type=int, default=0, help="Serve /readyz here (with --watch).")
@click.option("--uninstall", is_flag=True, help="Remove our entry and the plugin binary.")
@daemonset_option
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="With --daemonset: ask the API server this names (default: the pod's service account).",
)
def install_cni(
    cni_bin_dir: Path,
    cni_conf_dir: Path,
    bundle: Path | None,
    agent_socket: str,
    log_file: str,
    timeout_seconds: float,
    watch: bool,
    readiness_port: int,
    uninstall: bool,
    daemonset: DaemonSetRef | None,
    kubeconfig: Path | None,
) -> None:
    """Install nodeagent-cni as the last plugin of the node's primary CNI configuration."""
    import asyncio
    import logging
    import signal
    import threading

    from nodeagent import logs
    from nodeagent.cni.bundle import locate_bundle
    from nodeagent.cni.install import (
        CniInstaller,
        InstallError,
        remove_entries,
        serve_readiness,
        uninstall_binary,
    )

    if daemonset is not None and not watch:
        raise click.UsageError("--daemonset decides what happens when --watch stops: add --watch")
    logs.setup("info")
    if uninstall:
        try:
            remove_entries(cni_conf_dir)  # the entries first: none may outlive the binary
            uninstall_binary(cni_bin_dir)
        except (InstallError, OSError) as e:
            raise click.ClickException(str(e)) from None
        return
    if daemonset is not None:
        # Now rather than at SIGTERM: the API client is big and slow to import, and a
        # missing dependency must show at start.
        from nodeagent.uninstall import on_shutdown
    entry = {
        "type": "nodeagent-cni",
        "agentSocket": agent_socket,
        "logFile": log_file,
        "timeoutSeconds": timeout_seconds,
    }
    try:
        source = bundle or locate_bundle()
    except FileNotFoundError as e:  # a broken image: nothing to wait for
        raise click.ClickException(str(e)) from None
    installer = CniInstaller(bundle=source, bin_dir=cni_bin_dir, conf_dir=cni_conf_dir, entry=entry)
    stop = threading.Event()
    if watch:  # before anything is installed: a SIGTERM from then on gets its uninstall decision
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        installer.install()
    except (InstallError, FileNotFoundError) as e:
        if not watch:
            raise click.ClickException(str(e)) from None
        logging.getLogger("nodeagent.install_cni").warning("%s; waiting for it", e)
    if watch:
        if readiness_port:
            serve_readiness(installer, readiness_port)
        installer.watch(stop)
        if daemonset is None:
            logging.getLogger("nodeagent.install_cni").info(
                "install-cni stopping, keeping what it installed: not told its DaemonSet"
                " (--daemonset); `nodeagent uninstall` removes everything"
            )
        elif asyncio.run(on_shutdown("install-cni", daemonset, kubeconfig)).remove:
            installer.uninstall()


@click.command("uninstall")
@click.option("--cni-bin-dir", type=click.Path(path_type=Path), default=Path("/opt/cni/bin"))
@click.option("--cni-conf-dir", type=click.Path(path_type=Path), default=Path("/etc/cni/net.d"))
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/nodeagent"))
@click.option(
    "--bpf-dir",
    type=click.Path(path_type=Path),
    default=Path("/sys/fs/bpf/nodeagent"),
    help="The agent's --bpf-dir: eBPF capture's pins, all removed.",
)
@cni_socket_option
@click.option("--force", is_flag=True, help="Even while the node agent answers on --cni-socket.")
def uninstall_node(
    cni_bin_dir: Path,
    cni_conf_dir: Path,
    state_dir: Path,
    bpf_dir: Path,
    cni_socket: str,
    force: bool,
) -> None:
    """Remove nodeagent from this node: CNI entry and plugin, every pod's capture, probe SNAT.

    What the agent and install-cni do by themselves when their DaemonSet is deleted; run it on
    the node (as root, in its network namespace) after `kubectl delete --cascade=orphan`, or when
    the agent is gone and not coming back. Pods' traffic then flows directly, outside the mesh.
    """
    from nodeagent import logs
    from nodeagent.cni import wire
    from nodeagent.cni.install import InstallError
    from nodeagent.uninstall import remove_capture_offline, remove_cni

    logs.setup("warning")
    if not force:
        try:
            wire.request(cni_socket, {"command": "STATUS"}, 2.0)
        except (OSError, wire.ProtocolError):
            pass  # nobody answers: the agent is gone
        else:
            raise click.ClickException(
                f"the node agent is running (it answers on {cni_socket}) and would capture pods"
                " again: delete its DaemonSet or stop it first, or pass --force"
            )
    try:
        written = remove_cni(cni_conf_dir, cni_bin_dir)
    except (InstallError, OSError) as e:
        raise click.ClickException(f"removing nodeagent-cni: {e}") from None
    for path in written:
        click.echo(f"removed the nodeagent-cni entry from {path}")
    click.echo(f"removed the nodeagent-cni plugin from {cni_bin_dir} (if it was there)")
    try:
        summary = remove_capture_offline(state_dir, bpf_dir=bpf_dir)
    except (OSError, ValueError, TypeError) as e:  # no registry access, or a corrupt one
        raise click.ClickException(f"removing capture (registry in {state_dir}): {e}") from None
    click.echo(
        f"capture removed from {summary['removed']} pods"
        f" ({summary['netns_missing']} already gone, {summary['not_captured']} not in the mesh);"
        " the node's probe SNAT table and the pod registry removed"
        if not summary["failed"]
        else f"capture removed from {summary['removed']} pods; {summary['failed']} removals"
        f" FAILED (see the log above); the registry in {state_dir} keeps them for another try"
    )
    if summary["failed"]:
        sys.exit(1)
