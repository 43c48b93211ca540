"""Uninstall or upgrade? What the node's processes do with what they installed when they stop.

Istio's rule (istio-cni's node agent, ``ShouldStopCleanup`` in cni/pkg/nodeagent/server.go, from
istio/istio#54180): on SIGTERM, ask the API server for our own DaemonSet.

- It exists and has no ``deletionTimestamp``: this is an upgrade, a restart or a node reboot.
  **Keep everything**: the CNI entry and binary stay, so pods created meanwhile wait (fail closed)
  for the replacement agent instead of starting outside the mesh, and running pods keep their
  capture.
- 404, or ``deletionTimestamp`` set: the DaemonSet is gone for good. **Remove**: our CNI entry and
  binary (install-cni), every pod's capture, the node's probe SNAT table and the pod registry (the
  agent).
- 401: our credentials were revoked, as deleting the whole install deletes the ServiceAccount
  with the DaemonSet. Remove.
- Anything else (the API server unreachable, 403, 5xx, a timeout): retried ``ATTEMPTS`` times,
  then **remove**, logged as an error. That is Istio's default for a plugin chained into a CNI
  config it does not own, which ours is: a node whose agent is gone for good but whose entry
  stayed would fail every new pod. If it was an upgrade after all, pods created before the new
  agent is up start outside the mesh, and the new agent captures running pods again only through
  its discovery of pods running before it.

Only processes told their DaemonSet (``--daemonset NAMESPACE/NAME``) ask; without it they keep
everything, as before. ``nodeagent uninstall`` does the removal unconditionally (after
``kubectl delete --cascade=orphan``, or when the agent died and will not come back).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from nodeagent.cni.install import remove_entries, uninstall_binary

log = logging.getLogger("nodeagent.uninstall")

# Worst case ATTEMPTS * REQUEST_TIMEOUT + (ATTEMPTS - 1) * RETRY_DELAY = 11 s, well inside the
# DaemonSet's 30 s grace period, leaving time for the removal itself.
ATTEMPTS = 3
RETRY_DELAY = 1.0
REQUEST_TIMEOUT = 3.0

# A DNS-1123 subdomain (DaemonSet names) / label (namespaces).
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class DaemonSetRef:
    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> DaemonSetRef:
        namespace, slash, name = text.partition("/")
        if not (slash and _NAME.fullmatch(namespace) and _NAME.fullmatch(name)):
            raise ValueError(
                f"{text!r} is not NAMESPACE/NAME of a DaemonSet (e.g. nodeagent-system/nodeagent)"
            )
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Decision:
    remove: bool  # True: final removal; False: keep everything (upgrade or restart)
    reason: str
    certain: bool = True  # False: the API server could not tell, Istio's default applied

    def describe(self) -> str:
        verdict = "removing what it installed" if self.remove else "keeping what it installed"
        return f"{verdict}: {self.reason}"


class _Unanswered(Exception):
    """The API server's answer says nothing about the DaemonSet (5xx, 403, ...)."""


async def decide(
    daemonset: DaemonSetRef,
    kubeconfig: Path | None,
    *,
    attempts: int = ATTEMPTS,
    retry_delay: float = RETRY_DELAY,
    request_timeout: float = REQUEST_TIMEOUT,
) -> Decision:
    """Istio's rule: remove when DAEMONSET is gone or being deleted, keep while it stays.

    KUBECONFIG None: the pod's in-cluster service account.
    """
    # The API client is imported only when asked: it is slow to import, and a node agent with a
    # directory source never needs it.
    import aiohttp
    from kubernetes_asyncio.config.config_exception import ConfigException

    last = ""
    for attempt in range(1, attempts + 1):
        try:
            return await _ask(daemonset, kubeconfig, request_timeout)
        except Exception as e:  # whatever it is, the rule for "could not tell" applies
            expected = (aiohttp.ClientError, OSError, TimeoutError, ConfigException, _Unanswered)
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.warning(
                "could not read DaemonSet %s (attempt %d of %d): %s",
                daemonset,
                attempt,
                attempts,
                last,
                exc_info=not isinstance(e, expected),  # a bug: show where
            )
        if attempt < attempts:
            await asyncio.sleep(retry_delay)
    return Decision(
        True,
        f"could not tell whether DaemonSet {daemonset} still exists ({last}); removing anyway, "
        "as Istio does for a plugin chained into a CNI config it does not own. If this was an "
        "upgrade, pods created until the new agent is ready start outside the mesh",
        certain=False,
    )


async def _ask(daemonset: DaemonSetRef, kubeconfig: Path | None, timeout: float) -> Decision:
    from nodeagent.sources.kubernetes import api_client, k8s

    api = await api_client(kubeconfig)
    try:
        resp = await k8s.AppsV1Api(api).read_namespaced_daemon_set(
            daemonset.name, daemonset.namespace, _preload_content=False, _request_timeout=timeout
        )
        try:
            status, body = resp.status, await resp.read()
        finally:
            resp.release()
    finally:
        await api.close()
    if status == 404:
        return Decision(True, f"DaemonSet {daemonset} is gone (404 Not Found): an uninstall")
    if status == 401:
        return Decision(
            True,
            f"the API server no longer accepts our credentials (401) to read DaemonSet "
            f"{daemonset}: its service account was deleted with it, an uninstall",
        )
    if status == 403:
        # Not a sign of an uninstall by itself: a Role missing from the install looks the same.
        raise _Unanswered(
            f"403 Forbidden reading DaemonSet {daemonset}: is the Role granting `get` on it "
            f"applied? ({_text(body)})"
        )
    if status != 200:
        raise _Unanswered(f"HTTP {status}: {_text(body)}")
    try:
        doc = json.loads(body)
        meta = doc.get("metadata") or {}
        deleting = meta.get("deletionTimestamp")
    except (ValueError, AttributeError) as e:
        raise _Unanswered(f"unreadable DaemonSet {daemonset}: {e}") from None
    if deleting:
        return Decision(
            True, f"DaemonSet {daemonset} is being deleted (since {deleting}): an uninstall"
        )
    return Decision(
        False,
        f"DaemonSet {daemonset} exists and is not being deleted: an upgrade or a restart",
    )


def _text(body: bytes) -> str:
    return body[:200].decode(errors="replace").strip()


async def on_shutdown(
    component: str, daemonset: DaemonSetRef | None, kubeconfig: Path | None
) -> Decision:
    """The decision for a stopping COMPONENT, logged with its reason."""
    if daemonset is None:
        decision = Decision(
            False,
            "not told its DaemonSet (--daemonset), so it cannot tell an uninstall from a "
            "restart; `nodeagent uninstall` removes everything",
        )
    else:
        decision = await decide(
            daemonset,
            kubeconfig,
            attempts=ATTEMPTS,
            retry_delay=RETRY_DELAY,
            request_timeout=REQUEST_TIMEOUT,
        )
    level = logging.INFO
    if decision.remove:
        level = logging.WARNING if decision.certain else logging.ERROR
    log.log(level, "%s stopping, %s", component, decision.describe())
    return decision


# -- the actions ----------------------------------------------------------------------------------


def remove_cni(conf_dir: Path, bin_dir: Path) -> list[Path]:
    """install-cni's part: our entry out of every CNI config, then the plugin out of bin_dir.

    In that order, so that no runtime meets an entry without its binary. Returns the configs
    written.
    """
    written = remove_entries(conf_dir)
    uninstall_binary(bin_dir)
    return written


def remove_capture_offline(
    state_dir: Path, probe_snat: bool = True, bpf_dir: Path | None = None
) -> dict[str, int]:
    """The agent's part without an agent (``nodeagent uninstall``), from its registry on disk.

    Runs in the calling process's network namespace, which holds the probe SNAT table: the
    node's (host) network namespace. Pods captured in eBPF mode lose any nftables table an older
    agent left them here (DNS capture was nftables' then) and their links with every other pin
    under BPF_DIR (the agent's --bpf-dir).
    """
    from nodeagent.mesh.store import MeshStore
    from nodeagent.metrics import AgentMetrics
    from nodeagent.redirect.host import ProbeSnat
    from nodeagent.redirect.manager import CaptureManager
    from nodeagent.redirect.nftables import NftablesBackend
    from nodeagent.redirect.registry import PodRegistry

    registry = PodRegistry(state_dir / "pods")
    registry.load()
    manager = CaptureManager(
        MeshStore(),
        NftablesBackend(),
        registry,
        AgentMetrics(),
        (),
        probe_snat=ProbeSnat() if probe_snat else None,
    )
    summary = asyncio.run(manager.remove_all())
    from nodeagent.redirect.ebpf import DEFAULT_PIN_DIR, remove_pins

    pins = bpf_dir or DEFAULT_PIN_DIR
    if pins.exists():
        remove_pins(pins)
    return summary
