"""The testbed's namespaces, links, addresses and routes, over netlink (pyroute2), without forks.

iproute2 would cost one ``ip`` process per step; here each step is one netlink request on a socket
that lives in the namespace it changes. Such a socket is opened on the calling thread while that
thread alone is inside the namespace (``setns(2)`` is per thread, see nodeagent.redirect.netns), so
neither the process nor any other thread ever leaves the root namespace, and nothing forks
(pyroute2's own ``IPRoute(netns=...)`` and ``netns.create`` fork a helper child for that).

Namespaces are made as ``ip netns add`` makes them (iproute2 ip/ipnetns.c, which pyroute2's
``netns.attach`` ports): a fresh namespace bind-mounted at /run/netns/NAME, so ``ip netns list``,
``ip netns exec`` and the CNI plugins (given that path) see it as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# pyroute2 ships no type information.
from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from nodeagent.redirect.netns import NetnsNotFound, entered
from nodeagent.testbed.netns import CommandError, netns_path

CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"

# Serializes the first-use setup of /run/netns (made a shared mount) among this process's threads.
_create_lock = threading.Lock()

# Handed to pyroute2's netns helpers: their own libc lookup (ctypes.util.find_library) forks
# `ldconfig -p`.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetlinkFailure(CommandError):
    """A netlink step failed; the message names the namespace, the step and the kernel's answer."""


def create_netns(name: str) -> None:
    """``ip netns add NAME`` then ``ip -n NAME link set lo up``, in this process and thread.

    The calling thread unshares a new namespace, bind-mounts it at /run/netns/NAME and goes back
    to the namespace it came from; a half-made mount point is removed on failure.
    """
    if netns_path(name).exists():
        raise NetlinkFailure(f"network namespace {name}: already exists ({netns_path(name)})")
    home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise NetlinkFailure(f"network namespace {name}: unshare: {_errno_text()}")
        try:
            # Binds /proc/thread-self/ns/net (this thread's new namespace) at /run/netns/NAME.
            with _create_lock:
                pyroute2_netns.attach(str(netns_path(name)), "thread-self", libc=_libc)
        except OSError as e:
            with contextlib.suppress(OSError):
                remove_netns(name)
            raise NetlinkFailure(f"network namespace {name}: cannot bind it: {e}") from None
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                # Never let the caller run on inside the new namespace.
                raise RuntimeError(
                    f"cannot return from network namespace {name}: {_errno_text()};"
                    " this thread is unusable"
                )
    finally:
        os.close(home)
    with session(name) as nl:
        nl.up("lo")


def remove_netns(name: str) -> None:
    """``ip netns delete NAME``: detach the bind mount and remove it; its links go with it."""
    path = netns_path(name)
    if not path.exists():
        return
    try:
        # umount2(MNT_DETACH) + unlink, as iproute2 does.
        pyroute2_netns.remove(str(path), libc=_libc)
    except OSError as e:
        raise NetlinkFailure(f"network namespace {name}: cannot delete {path}: {e}") from None


def sysctl(name: str, settings: Mapping[str, str]) -> None:
    """``sysctl -w`` inside NAME (/proc/sys/net is that of the thread that opens the file)."""
    with _inside(name):
        for key, value in settings.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value)
            except OSError as e:
                problem = f"network namespace {name}: sysctl {key}={value}: {e}"
                raise NetlinkFailure(problem) from None


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    try:
        with entered(netns_path(name)):
            yield
    except NetnsNotFound as e:
        raise NetlinkFailure(f"network namespace {name}: {e}") from None


class Session:
    """Netlink requests confined to one namespace (its socket was opened inside it)."""

    def __init__(self, netns: str, ipr: Any) -> None:
        self.netns = netns
        self._ipr = ipr

    def _index(self, dev: str) -> int:
        found = self._ipr.link_lookup(ifname=dev)
        if not found:
            raise NetlinkFailure(f"network namespace {self.netns}: no link {dev!r}")
        return int(found[0])

    def _call(self, what: str, request: Any, *args: Any, **kwargs: Any) -> None:
        try:
            request(*args, **kwargs)
        except NetlinkError as e:
            raise NetlinkFailure(f"network namespace {self.netns}: {what}: {e}") from None

    def up(self, dev: str) -> None:
        """``ip link set DEV up``."""
        self._call(f"link set {dev} up", self._ipr.link, "set", index=self._index(dev), state="up")

    def add_bridge(self, dev: str) -> None:
        """``ip link add DEV type bridge`` (left down)."""
        self._call(f"link add {dev} type bridge", self._ipr.link, "add", ifname=dev, kind="bridge")

    def add_veth(self, dev: str, peer: str, peer_netns: str) -> None:
        """``ip link add DEV type veth peer name PEER netns PEER_NETNS``: the pair is born split."""
        self._call(
            f"link add {dev} type veth peer name {peer} netns {peer_netns}",
            self._ipr.link,
            "add",
            ifname=dev,
            kind="veth",
            peer={"ifname": peer, "net_ns_fd": str(netns_path(peer_netns))},
        )

    def enslave(self, dev: str, bridge: str) -> None:
        """``ip link set DEV master BRIDGE up``."""
        self._call(
            f"link set {dev} master {bridge} up",
            self._ipr.link,
            "set",
            index=self._index(dev),
            master=self._index(bridge),
            state="up",
        )

    def add_address(self, dev: str, cidr: str) -> None:
        """``ip addr add CIDR dev DEV`` (CIDR: address/prefix length)."""
        address, _, prefix = cidr.partition("/")
        if not prefix.isdigit():
            raise NetlinkFailure(f"network namespace {self.netns}: {cidr!r} is not address/prefix")
        self._call(
            f"addr add {cidr} dev {dev}",
            self._ipr.addr,
            "add",
            index=self._index(dev),
            address=address,
            prefixlen=int(prefix),
        )

    def add_route(self, dst: str, gateway: str) -> None:
        """``ip route add DST via GATEWAY``."""
        what = f"route add {dst} via {gateway}"
        self._call(what, self._ipr.route, "add", dst=dst, gateway=gateway)


@contextlib.contextmanager
def session(netns: str) -> Iterator[Session]:
    """A netlink session inside NETNS: its socket is opened in there, on this thread only."""
    with _inside(netns):
        ipr = IPRoute()
    try:
        yield Session(netns, ipr)
    finally:
        ipr.close()


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())
