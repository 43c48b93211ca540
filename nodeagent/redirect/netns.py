"""Enter a pod's network namespace on the calling thread only, and always come back.

Namespaces are per thread in Linux: ``setns(2)`` moves just the caller, so worker threads of the
agent can each work in a different pod while the event loop's thread stays in the node's netns.
Python 3.11 has no ``os.setns``; libc's is called through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"
# The kernel's link to a process's namespace (also under a host /proc mounted elsewhere).
_PROC_NETNS = re.compile(r"(?:/[^/]+)*/proc/[0-9]+(?:/task/[0-9]+)?/ns/net")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsNotFound(FileNotFoundError):
    """The pod's network namespace is gone (pod deleted, or a stale path)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _enter(fd: int, netns: Path) -> None:
    try:
        _setns(fd)
    except OSError as e:
        if e.errno == errno.EINVAL:  # e.g. /run/netns/x left behind after its mount went away
            raise NetnsNotFound(errno.ENOENT, f"{netns} is not a network namespace") from None
        raise OSError(e.errno, f"cannot enter network namespace {netns}: {e}") from None


def _leave(home: int, netns: Path) -> None:
    try:
        _setns(home)
    except OSError as e:
        # Never hand a thread that is still inside a pod back to a pool as if it were not.
        raise RuntimeError(
            f"cannot return from network namespace {netns} to the thread's own: {e};"
            " this thread is unusable"
        ) from e


@contextmanager
def entered(netns: Path) -> Iterator[None]:
    """Run the body with the calling thread inside the network namespace at ``netns``.

    Sockets (netlink ones too) created in the body belong to that namespace for their lifetime.
    """
    # Never through a symbolic link made since the path was checked (a swap to another pod's
    # namespace, or the node's), but the kernel's own /proc/<pid>/ns/net.
    follow = 0 if _PROC_NETNS.fullmatch(str(netns)) else os.O_NOFOLLOW
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC | follow)
    except FileNotFoundError:
        raise NetnsNotFound(errno.ENOENT, f"network namespace {netns} does not exist") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise OSError(e.errno, f"{netns} is a symbolic link: refusing to enter it") from None
    with _closing(target), _closing(os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)) as home:
        _enter(target, netns)
        try:
            yield
        finally:
            _leave(home, netns)
