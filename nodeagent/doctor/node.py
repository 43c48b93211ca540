"""Gather the node's facts for ``nodeagent doctor`` and judge them (``verdicts``).

Capture is verified where it lives, not taken from the agent: each captured pod's network
namespace is entered and its nftables table (or its eBPF links and map entries) compared with
the spec the registry on disk holds, the same check the agent's reconcile makes. Everything but
the xDS state works with the agent down: the registry, the CNI config, the pods' namespaces,
Envoy's admin socket and the kernel are read directly. Nothing on the node is changed (the
kernel trial loads the capture rules in a scratch network namespace that dies with its thread).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodeagent.doctor import verdicts
from nodeagent.doctor.verdicts import NETNS_GONE, Finding
from nodeagent.envoy.supervisor import PIDFILE
from nodeagent.redirect.registry import CAPTURED, PodCapture, read_records

CLONE_NEWNET = 0x40000000
TRIAL_TIMEOUT = 10.0


@dataclass
class NodePaths:
    """Where the agent keeps what doctor reads (the agent's own options, same defaults)."""

    cni_socket: str = "/run/nodeagent/cni.sock"
    state_dir: Path = Path("/var/lib/nodeagent")
    run_dir: Path = Path("/run/nodeagent")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_bin_dir: Path = Path("/opt/cni/bin")
    bpf_dir: Path = Path("/sys/fs/bpf/nodeagent")
    cgroup_root: Path | None = None
    proxy_model: str = "node"
    host_proc: Path = Path("/proc")
    timeout: float = 5.0


@dataclass
class SourcePods:
    """The node's pods by the cluster (the agent's source): (uid, namespace/name, ips) of
    each pod in the mesh."""

    in_mesh: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)


def diagnose(paths: NodePaths, source: Callable[[], SourcePods] | None = None) -> list[Finding]:
    findings: list[Finding] = []
    answer, error = _ask_agent(paths)
    findings.append(verdicts.agent(paths.cni_socket, answer, error, paths.timeout))
    records = read_records(paths.state_dir / "pods")
    modes = {r.backend or "nftables" for r in records if r.state == CAPTURED}
    if (paths.bpf_dir / "progs").is_dir():
        modes.add("ebpf")
    modes = modes or {"nftables"}
    findings.append(verdicts.kernel("nftables", "nftables" in modes, nftables_trial()))
    findings.append(
        verdicts.kernel("ebpf", "ebpf" in modes, _ebpf_problems(paths, "ebpf" in modes))
    )
    findings.append(_cni_chain(paths))
    checks = verify_pods(records, paths)
    agent_states = None
    if answer is not None:
        agent_states = {p["container_id"]: p["state"] for p in answer.get("pods", [])}
    findings += verdicts.pods(records, checks, agent_states)
    if source is not None:
        findings += _unknown_pods(records, source(), paths)
    else:
        findings.append(
            Finding(
                verdicts.SKIP,
                "pods of this node",
                "pods the agent never saw are not looked for: give --node and the agent's"
                " source (--source-dir or --kubeconfig)",
            )
        )
    proxy = (answer or {}).get("proxy")
    captured = [r.key for r in records if r.state == CAPTURED and not checks.get(r.container_id)]
    no_proxy = (answer or {}).get("no_proxy", "")
    if no_proxy:
        findings.append(Finding(verdicts.SKIP, "envoy", no_proxy))
    else:
        recorded = {r.key for r in records if r.state == CAPTURED}
        findings += _envoy(paths, proxy, (answer or {}).get("identity"), captured, recorded)
    findings += verdicts.xds(proxy if answer is not None else None, no_proxy)
    return findings


# -- the agent ------------------------------------------------------------------------------------


def _ask_agent(paths: NodePaths) -> tuple[dict[str, Any] | None, str]:
    from nodeagent.cni import wire

    try:
        answer = wire.request(paths.cni_socket, {"command": "PROXY_STATUS"}, paths.timeout)
        if not answer.get("ok"):  # --no-proxy: no proxy status, the pods still
            reason = str(answer.get("reason"))
            answer = wire.request(paths.cni_socket, {"command": "STATUS"}, paths.timeout)
            answer["no_proxy"] = reason
    except (OSError, wire.ProtocolError) as e:
        return None, str(e) or type(e).__name__
    if not answer.get("ok"):
        return None, f"it answered: {answer.get('reason')}"
    return answer, ""


# -- the kernel -----------------------------------------------------------------------------------


def nftables_trial() -> list[str]:
    """Load a pod's capture table and the node's probe-SNAT table into a scratch network
    namespace of a thread of its own (gone with the thread): what the kernel refuses."""
    from nodeagent.redirect import host, nftables
    from nodeagent.redirect.capture import CaptureSpec

    problems: list[str] = []

    def trial() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            problems.append(
                f"cannot make a scratch network namespace: {os.strerror(ctypes.get_errno())}"
            )
            return
        try:
            nftables.run_nft(nftables.render_new(CaptureSpec(dns=True)), "a scratch netns")
            nftables.run_nft(host.render(["10.0.0.1"]), "a scratch netns")
        except Exception as e:  # libnftables' errors, or no libnftables at all
            problems.append(str(e))

    thread = threading.Thread(target=trial, name="doctor-nft-trial", daemon=True)
    thread.start()
    thread.join(TRIAL_TIMEOUT)
    if thread.is_alive():
        problems.append(f"loading the rules took over {TRIAL_TIMEOUT:g}s")
    return problems


def _ebpf_problems(paths: NodePaths, in_use: bool) -> list[str]:
    from nodeagent.redirect.ebpf import missing_requirements

    problems = missing_requirements(cgroup_root=paths.cgroup_root)
    if in_use and not problems:
        for name in ("progs", "maps", "node"):
            if not (paths.bpf_dir / name).is_dir():
                problems.append(f"nothing pinned at {paths.bpf_dir / name}")
    return problems


# -- the CNI chain --------------------------------------------------------------------------------


def _cni_chain(paths: NodePaths) -> Finding:
    from nodeagent.cni.install import PLUGIN_TYPE, plugin_chain

    chain = plugin_chain(paths.cni_conf_dir)
    binary = paths.cni_bin_dir / PLUGIN_TYPE
    problem = ""
    if not binary.exists():
        problem = f"{binary} does not exist"
    elif not os.access(binary, os.X_OK):
        problem = f"{binary} is not executable"
    shown = None if chain is None else (chain[0].name, chain[1])
    return verdicts.cni_chain(str(paths.cni_conf_dir), shown, problem)


# -- pods -----------------------------------------------------------------------------------------


def verify_pods(records: list[PodCapture], paths: NodePaths) -> dict[str, str]:
    """For each captured record: "" when its netns holds exactly its capture, else why not."""
    from nodeagent.redirect.capture import CaptureSpec
    from nodeagent.redirect.netns import NetnsNotFound
    from nodeagent.redirect.nftables import NftablesBackend

    nft = NftablesBackend(paths.proxy_model)
    ebpf: Any = None
    checks: dict[str, str] = {}
    for record in records:
        if record.state != CAPTURED:
            continue
        netns = Path(record.netns)
        if not record.netns or not netns.exists():
            checks[record.container_id] = NETNS_GONE + record.netns
            continue
        spec = CaptureSpec.from_json(record.spec or {})
        try:
            if record.backend == "ebpf":
                ebpf = ebpf or _ebpf_backend(paths)
                result = ebpf.verify(netns, spec, record.uid)
            else:
                result = nft.verify(netns, spec, record.uid)
            checks[record.container_id] = "" if result.ok else result.reason
        except NetnsNotFound:
            checks[record.container_id] = NETNS_GONE + record.netns
        except Exception as e:  # a pin, cgroup or netns that cannot be read: say which
            checks[record.container_id] = f"cannot verify: {e}"
    return checks


def _ebpf_backend(paths: NodePaths) -> Any:
    from nodeagent.redirect.ebpf import EbpfBackend

    backend = EbpfBackend(paths.bpf_dir, paths.cgroup_root)
    backend.open_pinned()
    return backend


def _unknown_pods(records: list[PodCapture], source: SourcePods, paths: NodePaths) -> list[Finding]:
    from nodeagent.redirect.discovery import find_pod_netns
    from nodeagent.redirect.nftables import NftablesBackend

    known = {r.uid for r in records if r.uid} | {r.key for r in records}
    unknown = [(uid, key, ips) for uid, key, ips in source.in_mesh if uid not in known]
    running: dict[str, str] = {}
    captured: dict[str, bool] = {}
    if unknown:
        found = find_pod_netns({uid: ips for uid, _, ips in unknown if ips}, proc=paths.host_proc)
        nft = NftablesBackend(paths.proxy_model)
        for uid, where in found.items():
            running[uid] = where.path
            try:
                captured[uid] = nft.holds_table(Path(where.path))
            except OSError:
                captured[uid] = False
    return verdicts.unknown_pods(
        [(uid, key) for uid, key, _ in source.in_mesh], known, running, captured
    )


# -- Envoy ----------------------------------------------------------------------------------------


def _envoy(
    paths: NodePaths,
    proxy: dict[str, Any] | None,
    identity: dict[str, Any] | None,
    captured: list[str],
    recorded: set[str],
) -> list[Finding]:
    from nodeagent.envoy.admin import EnvoyAdmin, EnvoyAdminError
    from nodeagent.identity.secrets import describe_secrets

    if proxy is not None and proxy.get("sidecars") is not None:
        return [Finding(verdicts.SKIP, "envoy", "sidecar model: one Envoy per pod")]
    socket = paths.run_dir / "envoy-admin.sock"
    admin = EnvoyAdmin(socket, timeout=paths.timeout)
    state, error, info, dump = "", "", None, None
    try:
        state = admin.server_state()
        info = admin.server_info()
        dump = admin.config_dump()
    except EnvoyAdminError as e:
        error = str(e).split(": ", 1)[-1].split("; is Envoy running")[0]
        error += _pidfile_note(paths.run_dir / PIDFILE)
    findings = [verdicts.envoy(admin.address, state, error, info, proxy)]
    if dump is not None:
        findings += verdicts.listeners(captured, _served(dump), recorded)
    secrets = describe_secrets(dump) if dump is not None else None
    findings += verdicts.certificates(secrets, identity, datetime.now(UTC), error)
    return findings


def _pidfile_note(pidfile: Path, proc: Path = Path("/proc")) -> str:
    """What the Envoy pidfile (managed mode) says of the Envoy last started."""
    try:
        record = json.loads(pidfile.read_text())
        pid, started = int(record["pid"]), record.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    try:
        # after the command's parentheses: state is the 1st field, start time the 20th
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return f"; Envoy pid {pid} of {pidfile.name} is not running"
    if started is not None and fields[19] != str(started):
        return f"; Envoy pid {pid} of {pidfile.name} is not running (the pid is another's now)"
    if fields[0] == "Z":
        return f"; Envoy pid {pid} of {pidfile.name} is not running (exited, not yet reaped)"
    return f"; Envoy pid {pid} of {pidfile.name} runs"


def _served(dump: dict[str, Any]) -> set[str]:
    """namespace/name of the pods whose outbound and inbound listeners the Envoy holds."""
    from nodeagent.translate import pod_listener_names

    names = {
        str(entry.get("name", ""))
        for config in dump.get("configs", [])
        for entry in config.get("dynamic_listeners", [])
    }
    pods = {n.split("/", 1)[1] for n in names if n.count("/") == 2}
    return {key for key in pods if all(n in names for n in pod_listener_names(*key.split("/")))}
