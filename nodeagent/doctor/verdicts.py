"""What each fact about the node means: OK, or what is wrong and what to do (pure, no I/O).

Every function takes facts gathered by ``nodeagent.doctor.node`` (or a test's fake ones) and
returns findings; none of them reads the node. Each FAIL says what is wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nodeagent.redirect.registry import FAILED, NETNS_MISSING, NOT_IN_MESH, PodCapture

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
PLUGIN = "nodeagent-cni"
XDS_KINDS = ("CDS", "LDS", "EDS", "RDS")
ROTATE_BY = 0.25  # a certificate with less than this share of its lifetime left missed rotation

AGENT_DOWN_EFFECT = (
    "new pods fail their CNI ADD until it answers (fail closed), captured pods keep their"
    " capture but nothing repairs it, and Envoy gets no config"
)


@dataclass(frozen=True)
class Finding:
    status: str  # OK, WARN, FAIL, SKIP (not checked, and why)
    what: str
    detail: str = ""  # what is wrong (or, for OK, what was seen)
    action: str = ""  # what to do

    def line(self) -> str:
        text = f"{self.status:<4} {self.what}"
        if self.detail:
            text += f": {self.detail}"
        if self.action:
            text += f"; {self.action}"
        return text

    def as_json(self) -> dict[str, str]:
        return {
            "status": self.status,
            "check": self.what,
            "detail": self.detail,
            "action": self.action,
        }


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


# -- the agent ------------------------------------------------------------------------------------


def agent(socket: str, answer: Mapping[str, Any] | None, error: str, timeout: float) -> Finding:
    """ANSWER: the agent's PROXY_STATUS (or STATUS) answer; ERROR: why there is none."""
    if answer is not None:
        pods = answer.get("pods", [])
        return Finding(OK, "agent", f"answers on {socket} ({len(pods)} pods in its registry)")
    if "timed out" in error:
        return Finding(
            FAIL,
            "agent",
            f"does not answer on {socket} within {timeout:g}s (stopped or hung): "
            + AGENT_DOWN_EFFECT,
            "look at the agent's log; restart its pod (kubectl delete pod) if it stays hung",
        )
    return Finding(
        FAIL,
        "agent",
        f"not running ({error}): {AGENT_DOWN_EFFECT}",
        "start it (its DaemonSet pod: kubectl -n <ns> get pods -l app=nodeagent) and read its log",
    )


# -- the kernel -----------------------------------------------------------------------------------


def kernel(mode: str, in_use: bool, problems: Sequence[str]) -> Finding:
    """What MODE's capture needs of the kernel: PROBLEMS is what a trial or check found missing."""
    what = f"kernel for {mode} capture"
    if not problems:
        seen = {
            "nftables": "the capture and probe-SNAT tables load in a scratch network namespace",
            "ebpf": "kernel version, cgroup v2 and bpffs in place",
        }.get(mode, "in place")
        if mode == "ebpf" and in_use:
            seen += ", the programs pinned"
        return Finding(OK, what, seen + ("" if in_use else " (not used on this node)"))
    if not in_use:
        return Finding(SKIP, what, f"not available ({'; '.join(problems)}); not used on this node")
    fix = {
        "nftables": "load the nf_tables, nft_nat/nft_redirect and nft_fib modules (modprobe)",
        "ebpf": "run --capture-mode nftables (or auto) on this node, or give it the missing piece",
    }.get(mode, "")
    return Finding(FAIL, what, "; ".join(problems), fix)


# -- the CNI chain --------------------------------------------------------------------------------


def cni_chain(
    conf_dir: str, chain: tuple[str, Sequence[str]] | None, binary_problem: str
) -> Finding:
    """CHAIN: the primary config's file name and its plugin types in order (None: none)."""
    what = "CNI chain"
    if chain is None:
        return Finding(
            FAIL,
            what,
            f"no valid CNI network config in {conf_dir}: the runtime cannot create pods",
            "check the primary CNI (its DaemonSet writes the config); install-cni chains us"
            " into it once it is there",
        )
    name, plugins = chain
    shown = " -> ".join(plugins)
    if PLUGIN not in plugins:
        return Finding(
            FAIL,
            what,
            f"{name} runs {shown}: {PLUGIN} is missing, so pods created now start outside the"
            " mesh (the primary CNI rewrote its config?)",
            "check that install-cni --watch runs (it puts the entry back); pods created"
            " meanwhile are adopted when the agent restarts, or delete them",
        )
    if plugins[-1] != PLUGIN:
        return Finding(
            FAIL,
            what,
            f"{name} runs {shown}: {PLUGIN} is not last, so plugins after it change the pod"
            " after its capture was set up",
            "restart install-cni (it moves the entry last)",
        )
    if binary_problem:
        return Finding(
            FAIL,
            what,
            f"{name} chains {PLUGIN} but {binary_problem}: every pod's CNI ADD fails",
            "restart install-cni (it reinstalls the plugin)",
        )
    return Finding(OK, what, f"{name}: {shown} (last)")


# -- pods: what the registry says, verified in each pod's network namespace ------------------------


def pods(
    records: Sequence[PodCapture],
    checks: Mapping[str, str],
    agent_states: Mapping[str, str] | None,
) -> list[Finding]:
    """RECORDS: the registry on disk; CHECKS: by sandbox id, for each captured record, what its
    netns holds against its spec ("" verified, else what is wrong; NETNS_GONE... as below);
    AGENT_STATES: the running agent's state of each sandbox (None: the agent does not answer)."""
    found: list[Finding] = []
    verified: dict[str, int] = {}
    outside = 0
    for record in records:
        what = f"pod {record.key}"
        if record.state == NOT_IN_MESH:
            outside += 1
            continue
        if record.state == FAILED:
            found.append(
                Finding(
                    FAIL,
                    what,
                    f"capture failed: {record.reason}",
                    "fix what the reason names, then delete the pod (the runtime re-creates it"
                    " through the CNI chain) or restart the agent (it retries)",
                )
            )
            continue
        if record.state == NETNS_MISSING:
            found.append(_netns_gone(what, record.netns, "the agent found it gone"))
            continue
        problem = checks.get(record.container_id, "")
        if problem.startswith(NETNS_GONE):
            found.append(_netns_gone(what, record.netns, "the agent still records it captured"))
        elif problem:
            backend = record.backend or "nftables"
            who = (
                "something in the pod (CAP_NET_ADMIN) changes its table"
                if backend == "nftables"
                else "something on the node (CAP_BPF/CAP_SYS_ADMIN) removes its links or entries"
            )
            found.append(
                Finding(
                    FAIL,
                    what,
                    f"recorded captured ({backend}) in {record.netns}, but that capture is not"
                    f" in place: {problem}",
                    "restart the agent (it re-verifies and repairs every pod at start) or wait"
                    f" for its reconcile; if it recurs, {who}",
                )
            )
        else:
            backend = record.backend or "nftables"
            verified[backend] = verified.get(backend, 0) + 1
        if agent_states is not None and record.container_id not in agent_states:
            found.append(
                Finding(
                    WARN,
                    what,
                    "on disk in the registry, but the running agent does not list it",
                    "restart the agent (it reloads the registry)",
                )
            )
    if not any(f.status == FAIL for f in found):
        by = ", ".join(f"{n} {b}" for b, n in sorted(verified.items())) or "none"
        found.insert(
            0,
            Finding(
                OK,
                "pods",
                f"{sum(verified.values())} captured, each verified in its network namespace"
                f" ({by}); {outside} not in the mesh",
            ),
        )
    return found


NETNS_GONE = "netns gone: "


def _netns_gone(what: str, netns: str, who: str) -> Finding:
    return Finding(
        FAIL,
        what,
        f"its network namespace {netns or '(none recorded)'} is gone ({who}): the pod has no"
        " network, and Envoy's listeners in it are dead",
        "delete the pod so the runtime re-creates its sandbox (CNI DEL then drops the record)",
    )


def unknown_pods(
    in_mesh: Sequence[tuple[str, str]],
    known: set[str],
    running: Mapping[str, str],
    captured: Mapping[str, bool],
) -> list[Finding]:
    """Pods the source puts on this node and in the mesh that the agent never recorded.

    IN_MESH: (uid, namespace/name) of the node's mesh pods by the source; KNOWN: uids and keys
    the registry holds; RUNNING: uid -> the netns found running it (/proc); CAPTURED: uid ->
    whether that netns holds our capture anyway."""
    found = []
    for uid, key in in_mesh:
        if uid in known or key in known or uid not in running:
            continue  # recorded, or not running (yet): nothing bypasses the mesh
        if captured.get(uid):
            continue
        found.append(
            Finding(
                FAIL,
                f"pod {key}",
                f"runs uncaptured in {running[uid]}: no CNI ADD reached the agent and it was"
                " not adopted (started before the agent, or while the CNI chain lacked"
                f" {PLUGIN}): its traffic bypasses the mesh",
                "restart the agent (it adopts running pods at start) or delete the pod",
            )
        )
    if not found:
        found.append(
            Finding(OK, "pods of this node", f"all {len(in_mesh)} mesh pods known to the agent")
        )
    return found


# -- Envoy ----------------------------------------------------------------------------------------


def envoy(
    admin: str,
    state: str,
    error: str,
    info: Mapping[str, Any] | None,
    proxy: Mapping[str, Any] | None,
) -> Finding:
    """STATE: /ready's answer ("" with ERROR when the admin does not answer); INFO: its
    /server_info; PROXY: the agent's view of it (None: the agent does not answer)."""
    what = "envoy"
    if error:
        managed = proxy is None or proxy.get("envoy_mode") != "external"
        who = (
            "the agent restarts it in managed mode, but the agent must be running"
            if managed
            else "its container restarts it"
        )
        return Finding(
            FAIL,
            what,
            f"its admin at {admin} does not answer ({error}): captured pods' connections are"
            " refused",
            f"{who}; read its log",
        )
    if state != "LIVE":
        return Finding(
            FAIL,
            what,
            f"server state {state} (not LIVE): it does not serve the pods' listeners yet",
            "wait for it; if it stays, read its log (a listener or cluster it cannot load?)",
        )
    uptime = (info or {}).get("uptime_current_epoch", "")
    seen = f"LIVE, uptime {uptime}" if uptime else "LIVE"
    if proxy and proxy.get("envoy_pid"):
        seen += f", pid {proxy['envoy_pid']}"
    restarts = int((proxy or {}).get("envoy_restarts") or 0)
    if restarts:
        last = str((proxy or {}).get("envoy_last_exit") or "unknown")
        if last.startswith("-") and last[1:].isdigit():  # Popen's returncode: killed by a signal
            last = f"killed by signal {last[1:]}"
        return Finding(
            WARN,
            what,
            f"{seen}, but restarted {restarts} time(s) since the agent started (last exit: {last})",
            "read its log for why it died",
        )
    return Finding(OK, what, seen)


def listeners(
    captured: Iterable[str], with_listeners: set[str], recorded: set[str] | None = None
) -> list[Finding]:
    """CAPTURED: namespace/name of the pods verified captured; WITH_LISTENERS: the pods Envoy
    holds listeners for; RECORDED: every pod the registry records captured (verified or not)."""
    missing = sorted(set(captured) - with_listeners)
    found = [
        Finding(
            FAIL,
            f"pod {key}",
            "captured, but the node's Envoy holds no listener for it: its connections are refused",
            "see `nodeagent proxy-status` (identity unknown? config NACKed?)",
        )
        for key in missing
    ]
    stale = sorted(with_listeners - (set(captured) if recorded is None else recorded))
    if stale:
        found.append(
            Finding(
                WARN,
                "envoy listeners",
                f"held for {len(stale)} pods no longer captured ({', '.join(stale[:3])}):"
                " the agent has not pushed since they went",
                "run doctor again; if they stay, see `nodeagent proxy-status`",
            )
        )
    if not found:
        count = len(set(captured))
        found.append(Finding(OK, "envoy listeners", f"every captured pod has them ({count})"))
    return found


# -- xDS ------------------------------------------------------------------------------------------


def xds(proxy: Mapping[str, Any] | None, no_proxy_reason: str = "") -> list[Finding]:
    """PROXY: the agent's proxy status (types, push error, rejected objects)."""
    what = "xDS"
    if proxy is None:
        return [Finding(SKIP, what, no_proxy_reason or "not known: the agent does not answer")]
    types: Mapping[str, Any] = proxy.get("types", {})
    subscribed = [kind for kind in XDS_KINDS if kind in types]
    found = []
    for kind in XDS_KINDS:
        info = types.get(kind)
        if info is None and kind in ("EDS", "RDS"):
            continue  # Envoy asks for these only once a cluster or listener names some
        if info is None:
            found.append(
                Finding(
                    FAIL,
                    f"{what} {kind}",
                    "Envoy has not subscribed (not connected to the agent's xDS socket)",
                    "check Envoy's log and its bootstrap's xDS socket",
                )
            )
        elif info.get("state") == "NACKED":
            found.append(
                Finding(
                    FAIL,
                    f"{what} {kind}",
                    f"NACKED by Envoy: {info.get('last_nack')}",
                    "see `nodeagent proxy-status` for the object left out, and fix it",
                )
            )
        elif not info.get("connected", True):
            found.append(
                Finding(FAIL, f"{what} {kind}", "Envoy is not connected", "check Envoy's log")
            )
        elif info.get("state") != "SYNCED":
            found.append(
                Finding(
                    WARN,
                    f"{what} {kind}",
                    f"{info.get('state')}: Envoy has version {info.get('version_acked')!r}, the"
                    f" agent sent {info.get('version_sent')!r}",
                    "run doctor again: under churn this settles within a push",
                )
            )
    if proxy.get("error"):
        found.append(
            Finding(FAIL, f"{what} push", f"last push failed: {proxy['error']}", "read the log")
        )
    rejected = proxy.get("rejected") or []
    if rejected:
        names = ", ".join(f"{r['kind']} {r['namespace']}/{r['name']}" for r in rejected[:3])
        found.append(
            Finding(
                WARN,
                f"{what} config",
                f"{len(rejected)} objects left out ({names})",
                "see `nodeagent proxy-status` for why each was rejected",
            )
        )
    if proxy.get("unattributed_nack"):
        found.append(
            Finding(FAIL, f"{what} NACK", str(proxy["unattributed_nack"]), "see proxy-status")
        )
    if not found:
        found.append(
            Finding(OK, what, f"{', '.join(subscribed)} synced, version {proxy.get('version')}")
        )
    return found


# -- certificates ---------------------------------------------------------------------------------


def certificates(
    secrets: Sequence[Mapping[str, str]] | None,
    identity: Mapping[str, Any] | None,
    now: datetime,
    error: str = "",
) -> list[Finding]:
    """SECRETS: Envoy's SDS secrets (identity.secrets.describe_secrets rows; None: Envoy did not
    answer, ERROR says why); IDENTITY: the agent's issuer status (None: agent down)."""
    what = "certificates"
    found = []
    if secrets is None:
        found.append(Finding(SKIP, what, f"not known: {error or 'Envoy does not answer'}"))
        secrets = []
    soonest: tuple[datetime, str] | None = None
    for row in secrets:
        name = row.get("name", "")
        if row.get("error"):
            found.append(Finding(FAIL, f"certificate {name}", row["error"], "see proxy-status"))
            continue
        if not row.get("not_after"):
            continue
        start = datetime.fromisoformat(row["not_before"])
        end = datetime.fromisoformat(row["not_after"])
        if end <= now:
            found.append(
                Finding(
                    FAIL,
                    f"certificate {name}",
                    f"expired at {row['not_after']}: mTLS to and from its pods fails",
                    "see `nodeagent proxy-status` for why the issuer did not renew it",
                )
            )
        elif (end - now) < (end - start) * ROTATE_BY:
            found.append(
                Finding(
                    WARN,
                    f"certificate {name}",
                    f"expires at {row['not_after']}: it was not rotated at half its lifetime",
                    "see `nodeagent proxy-status` (the CA may be unreachable)",
                )
            )
        if soonest is None or end < soonest[0]:
            soonest = (end, name)
    issuer = (identity or {}).get("issuer", "the issuer")
    for sid, state in ((identity or {}).get("identities") or {}).items():
        if state.get("error"):
            found.append(
                Finding(
                    FAIL,
                    f"certificate {sid}",
                    f"not issued by {issuer}: {state['error']}",
                    "check the CA (its address, token, and that it runs)",
                )
            )
    if not found:
        left = f", next expiry {soonest[0].isoformat()} ({soonest[1]})" if soonest else ""
        found.append(Finding(OK, what, f"{len(secrets)} in Envoy, none near expiry{left}"))
    return found
