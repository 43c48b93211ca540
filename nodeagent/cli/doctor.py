"""`nodeagent doctor`: is this node's mesh working, and if not, what to do (exit code 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nodeagent.cli.options import cni_socket_option, output_option

if TYPE_CHECKING:
    from nodeagent.doctor.node import SourcePods

_path = click.Path(path_type=Path)


@click.command()
@cni_socket_option
@click.option("--state-dir", type=_path, default=Path("/var/lib/nodeagent"), show_default=True)
@click.option("--run-dir", type=_path, default=Path("/run/nodeagent"), show_default=True)
@click.option("--cni-conf-dir", type=_path, default=Path("/etc/cni/net.d"), show_default=True)
@click.option("--cni-bin-dir", type=_path, default=Path("/opt/cni/bin"), show_default=True)
@click.option("--bpf-dir", type=_path, default=Path("/sys/fs/bpf/nodeagent"), show_default=True)
@click.option("--cgroup-root", type=_path, default=None, help="As the agent's (eBPF capture).")
@click.option("--proxy-model", type=click.Choice(["node", "sidecar"]), default="node")
@click.option("--host-proc", type=_path, default=Path("/proc"), show_default=True)
@click.option(
    "--node",
    "node_name",
    default=None,
    help="This node's name: with a source, pods"
    " the cluster runs here are looked for too, also those the agent never saw.",
)
@click.option("--source-dir", type=_path, default=None, help="The agent's --source-dir.")
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="The API server the agent watches (one LIST of pods and namespaces).",
)
@click.option("--mesh-config", type=_path, default=None, help="The agent's --mesh-config.")
@click.option(
    "--exclude-namespace",
    "excluded",
    multiple=True,
    default=("kube-system",),
    show_default=True,
    help="As the agent's.",
)
@click.option(
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the agent's and Envoy's answers.",
)
@output_option
def doctor(
    cni_socket: str,
    state_dir: Path,
    run_dir: Path,
    cni_conf_dir: Path,
    cni_bin_dir: Path,
    bpf_dir: Path,
    cgroup_root: Path | None,
    proxy_model: str,
    host_proc: Path,
    node_name: str | None,
    source_dir: Path | None,
    kubeconfig: Path | None,
    mesh_config: Path | None,
    excluded: tuple[str, ...],
    timeout: float,
    output: str,
) -> None:
    """Diagnose this node (root): the agent, the kernel each capture mode needs, the CNI chain,
    every pod's capture verified in its network namespace, Envoy, its listeners and
    certificates, xDS sync and NACKs. One line per check: OK, WARN, SKIP (not checked, why) or
    FAIL with what is wrong and what to do. Works with the agent down. Exit code: 0 when
    nothing FAILs, 1 when something does, 2 on bad usage. Options default to the agent's."""
    from nodeagent.doctor import verdicts
    from nodeagent.doctor.node import NodePaths, diagnose

    if source_dir is not None and kubeconfig is not None:
        raise click.UsageError("give at most one source: --source-dir or --kubeconfig")
    if (source_dir is not None or kubeconfig is not None) != (node_name is not None):
        raise click.UsageError("--node and a source (--source-dir or --kubeconfig) go together")
    paths = NodePaths(
        cni_socket=cni_socket,
        state_dir=state_dir,
        run_dir=run_dir,
        cni_conf_dir=cni_conf_dir,
        cni_bin_dir=cni_bin_dir,
        bpf_dir=bpf_dir,
        cgroup_root=cgroup_root,
        proxy_model=proxy_model,
        host_proc=host_proc,
        timeout=timeout,
    )

    def source() -> SourcePods:
        assert node_name is not None
        return _source_pods(node_name, source_dir, kubeconfig, mesh_config, excluded)

    findings = diagnose(paths, source if node_name is not None else None)
    if output == "json":
        click.echo(json.dumps([f.as_json() for f in findings], indent=2))
    else:
        for finding in findings:
            click.echo(finding.line())
    raise SystemExit(verdicts.exit_code(findings))


def _source_pods(
    node: str,
    source_dir: Path | None,
    kubeconfig: Path | None,
    mesh_config: Path | None,
    excluded: tuple[str, ...],
) -> SourcePods:
    """The node's mesh pods as the agent's source has them (read once, as `analyze` does)."""
    import asyncio

    from nodeagent.cli.debug import _quiet_sources
    from nodeagent.doctor.node import SourcePods
    from nodeagent.mesh.membership import decide
    from nodeagent.mesh.store import MeshStore
    from nodeagent.mesh.validation import IstioSchemas
    from nodeagent.sources.directory import DirectorySource, MeshConfigFile

    store = MeshStore(node)
    with _quiet_sources():
        if source_dir is not None:
            # Only pods and namespaces matter here: no Istio schemas (a second of CRD parsing)
            empty = IstioSchemas({})
            DirectorySource(source_dir, store, mesh_config, schemas=empty).scan()
        else:
            from nodeagent.sources.kubernetes import KubernetesSource

            if mesh_config is not None:
                MeshConfigFile(mesh_config, store).scan()
            try:
                asyncio.run(KubernetesSource(store, node, kubeconfig=kubeconfig).list_once())
            except Exception as e:  # the client's errors have no common base
                click.echo(f"Error: cannot list the cluster of {kubeconfig}: {e}", err=True)
                raise SystemExit(2) from None
    return SourcePods(
        [
            (p.uid, p.key, p.pod_ips)
            for p in store.pods.values()
            if p.node_name == node
            and p.uid
            and decide(p, store.namespaces.get(p.namespace), excluded).in_mesh
        ]
    )
