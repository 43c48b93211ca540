"""What the agent accepts in a CNI ADD before it touches anything: bounded names and a netns path
that is the namespace's own file.

The plugin (plugin.c) checks the same before it dials the agent; the agent checks again because
its socket is the boundary it owns. A refusal names the field, and the plugin turns it into the
pod's CNI error. Bounds are Kubernetes' and the CNI spec's; the netns rules keep a symbolic link
(to another pod's namespace, or the node's) from ever being captured or handed to Envoy.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

# Field -> the longest value accepted, in bytes.
MAX_BYTES = {
    "namespace": 63,  # a DNS-1123 label
    "name": 253,  # a DNS-1123 subdomain
    "uid": 256,  # a UUID (36)
    "containerId": 256,  # runtimes use 64 hex digits
    "ifname": 15,  # IFNAMSIZ - 1
    "network": 256,
    "netns": 4095,  # PATH_MAX - 1
}
MAX_IPS = 16  # a pod has one address per family; a CNI result with more is not a pod's

# The kernel's own link to a process's network namespace (also under a host /proc mounted
# elsewhere, e.g. /host/proc): followed; every other path must be the namespace's own file.
PROC_NETNS = re.compile(r"(?:/[^/]+)*/proc/[0-9]+(?:/task/[0-9]+)?/ns/net")


def add_problem(pod: dict[str, Any]) -> str:
    """Why the pod fields of an ADD are refused; empty when they are fine."""
    for field, limit in MAX_BYTES.items():
        value = pod.get(field, "")
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {type(value).__name__}"
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            return f"field {field!r} is {size} bytes long, more than {limit}"
    ips = pod.get("ips") or []
    if not isinstance(ips, list) or len(ips) > MAX_IPS:
        return f"field 'ips' must be a list of at most {MAX_IPS} addresses"
    return netns_problem(str(pod.get("netns", "")))


def netns_problem(path: str) -> str:
    """Why PATH is not accepted as a pod's network namespace; empty when it is.

    Accepted: an absolute, canonical path to the namespace's own file (a bind mount such as
    containerd's /var/run/netns/cni-<id>), or the kernel's /proc/<pid>/ns/net; /var/run may
    itself be a link (to /run, on FHS systems). Refused: relative or unclean paths, and any path
    that is or goes through a symbolic link. A path that does not exist is left to the capture,
    which reports it.
    """
    if not path.startswith("/"):
        return f"field 'netns': {path!r} is not an absolute path"
    if "\0" in path or path.startswith("//") or os.path.normpath(path) != path:
        return f"field 'netns': {path!r} is not a canonical path ('.', '..' or empty components)"
    if PROC_NETNS.fullmatch(path):
        return ""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISLNK(mode):
        return f"field 'netns': {path} is a symbolic link (to {os.readlink(path)}): refusing it"
    real = os.path.realpath(path)
    alias = os.path.realpath("/var/run") + path[len("/var/run") :]
    if real != path and not (path.startswith("/var/run/") and real == alias):
        return f"field 'netns': {path} goes through a symbolic link (it is {real}): refusing it"
    return ""
