"""Name resolution for testbed pods: ``/etc/netns/<pod netns>/hosts``.

``ip netns exec`` binds that file over /etc/hosts for everything run in the pod, so the pod resolves
service names the way cluster DNS would answer them: ``name.namespace.svc.<domain>`` and
``name.namespace`` everywhere, the bare ``name`` only inside the service's own namespace.
Its ``resolv.conf`` names the testbed resolver (nodeagent.testbed.resolver) for every other name;
with nsswitch ``hosts: files dns`` this file wins for the names it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nodeagent.testbed.topology import Pod, Service

ETC_NETNS = Path("/etc/netns")


def render_hosts(pod: Pod, pod_ip: str, services: Sequence[Service], domain: str) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{pod.name}",
    ]
    for svc in services:
        names = [
            f"{svc.name}.{svc.namespace}.svc.{domain}",
            f"{svc.name}.{svc.namespace}.svc",
            f"{svc.name}.{svc.namespace}",
        ]
        if svc.namespace == pod.namespace:
            names.append(svc.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def write_hosts(netns_name: str, content: str) -> Path:
    folder = ETC_NETNS / netns_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text(content)
    return folder


def write_resolv_conf(netns_name: str, content: str) -> Path:
    """The pod's resolv.conf (``ip netns exec`` binds it over /etc/resolv.conf, as it does
    hosts): the testbed resolver, see nodeagent.testbed.resolver.resolv_conf."""
    folder = ETC_NETNS / netns_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolv.conf").write_text(content)
    return folder
