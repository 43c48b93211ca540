"""The bpf(2) calls the eBPF capture backend makes, through ctypes: pinned objects, cgroup and
netns links, map elements, object info; and pidfd_getfd(2), which takes a copy of another
process's socket (Envoy's listener) for a sockhash. No LLVM and no bcc here: programs are compiled
and pinned by a short-lived loader process (ebpf_load), so the agent only handles file
descriptors.

Layouts are those of ``union bpf_attr`` and ``struct bpf_{prog,map,link}_info`` in linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# enum bpf_cmd
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 6, 7, 13, 15
LINK_CREATE, LINK_UPDATE, LINK_DETACH = 28, 29, 34
# enum bpf_attach_type
CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT, CGROUP_GETSOCKOPT = 3, 10, 11, 21
SK_LOOKUP = 36
CGROUP_UDP4_SENDMSG, CGROUP_UDP6_SENDMSG, CGROUP_UDP4_RECVMSG, CGROUP_UDP6_RECVMSG = 14, 15, 19, 20
CGROUP_INET4_GETPEERNAME, CGROUP_INET6_GETPEERNAME = 29, 30
LINK_TYPE_CGROUP, LINK_TYPE_NETNS = 3, 5  # enum bpf_link_type
# enum bpf_map_type: the names bpf/capture.h declares its maps with (bcc's)
MAP_TYPES = {1: "hash", 2: "array", 9: "lru_hash", 11: "lpm_trie", 15: "sockmap", 18: "sockhash"}
SO_COOKIE = 57


class BpfError(OSError):
    """A bpf(2) call failed; the message names the call and what it was about."""


def _call(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 64))
    result = _libc.syscall(_SYS_BPF, cmd, buf, ctypes.sizeof(buf))
    if result < 0:
        code = ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return int(result)


def _ptr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: str) -> int:
    """A file descriptor of the object pinned at PATH (FileNotFoundError when there is none)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        return _call(OBJ_GET, struct.pack("=QII", _ptr(name), 0, 0), f"open pinned {path}")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"nothing pinned at {path}") from None
        raise


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _call(OBJ_PIN, struct.pack("=QII", _ptr(name), fd, 0), f"pin at {path}")


@contextmanager
def pinned(path: str) -> Iterator[int]:
    fd = obj_get(path)
    try:
        yield fd
    finally:
        os.close(fd)


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    return _call(LINK_CREATE, struct.pack("=IIII", prog_fd, target_fd, attach_type, 0), what)


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    _call(LINK_UPDATE, struct.pack("=III", link_fd, prog_fd, 0), what)


def link_detach(link_fd: int, what: str) -> None:
    _call(LINK_DETACH, struct.pack("=I", link_fd), what)


def _info(fd: int, what: str, asked: bytes = b"") -> bytes:
    """The object's info struct; ASKED fills its start first (the counts and buffers of what
    the kernel should copy out as well)."""
    buf = ctypes.create_string_buffer(asked, 256)
    _call(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 256, _ptr(buf)), what)
    return buf.raw


MAX_PROG_MAPS = 64  # map ids asked per program: more than any of ours uses


@dataclass(frozen=True)
class ProgInfo:
    id: int
    tag: bytes  # the kernel's hash of the instructions (map references masked): same code
    map_ids: frozenset[int]  # the maps it uses (a program holds them while it lives)


def prog_info(fd: int) -> ProgInfo:
    ids = (ctypes.c_uint32 * MAX_PROG_MAPS)()
    # struct bpf_prog_info up to map_ids: nr_map_ids at 52, the ids' buffer at 56
    asked = bytes(52) + struct.pack("=IQ", MAX_PROG_MAPS, ctypes.addressof(ids))
    raw = _info(fd, "program info", asked)
    count = min(struct.unpack_from("=I", raw, 52)[0], MAX_PROG_MAPS)
    return ProgInfo(struct.unpack_from("=I", raw, 4)[0], raw[8:16], frozenset(ids[:count]))


def prog_info_by_id(prog_id: int) -> ProgInfo:
    fd = _call(PROG_GET_FD_BY_ID, struct.pack("=I", prog_id), f"program {prog_id}")
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MapLayout:
    """What a map is made as, which a pinned map keeps for its life: another layout is another
    map."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    def __str__(self) -> str:
        kind = MAP_TYPES.get(self.type, f"type {self.type}")
        return (
            f"{kind} key {self.key_size} value {self.value_size} max_entries {self.max_entries}"
            f" flags {self.flags:#x}"
        )


@dataclass(frozen=True)
class MapInfo:
    id: int
    layout: MapLayout


def map_info(fd: int) -> MapInfo:
    """A map's id and layout (struct bpf_map_info: type, id, key_size, value_size, max_entries,
    map_flags)."""
    kind, map_id, key, value, entries, flags = struct.unpack_from("=6I", _info(fd, "map info"))
    return MapInfo(map_id, MapLayout(kind, key, value, entries, flags))


@dataclass(frozen=True)
class Link:
    type: int
    prog_id: int
    # what it is linked to: a cgroup's id (its directory's inode number), a netns's inode
    # number; 0 once that is gone (the link is then defunct)
    target: int
    attach_type: int


def link_info(fd: int) -> Link:
    """A cgroup or netns link's program and target (other link types: target 0)."""
    raw = _info(fd, "link info")
    kind, _id, prog_id = struct.unpack_from("=III", raw, 0)
    if kind == LINK_TYPE_NETNS:
        target, attach_type = struct.unpack_from("=II", raw, 16)
    elif kind == LINK_TYPE_CGROUP:
        target, attach_type = struct.unpack_from("=QI", raw, 16)
    else:
        target, attach_type = 0, -1
    return Link(kind, prog_id, target, attach_type)


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k, v = (
        ctypes.create_string_buffer(key, len(key)),
        ctypes.create_string_buffer(value, len(value)),
    )
    _call(MAP_UPDATE_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), _ptr(v), 0), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete KEY; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), 0, 0), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), _ptr(v), 0), "map lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of the map (get-next-key from none; hash and LPM maps alike)."""
    keys: list[bytes] = []
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        attr = struct.pack("=IIQQQ", fd, 0, _ptr(current) if current else 0, _ptr(nxt), 0)
        try:
            _call(MAP_GET_NEXT_KEY, attr, "map keys")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt.raw)
        current = nxt


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A file descriptor of ours for file descriptor FD of the process PIDFD names (root: the
    ptrace access it needs). The file (a socket) is shared, as after SCM_RIGHTS."""
    result = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"pidfd_getfd of fd {fd}: {os.strerror(code)}")
    return int(result)


def socket_cookie(fd: int) -> int:
    """The kernel's cookie of the socket FD (SO_COOKIE): what a sockmap lookup answers."""
    value = ctypes.c_uint64()
    size = ctypes.c_uint32(8)
    if _libc.getsockopt(fd, 1, SO_COOKIE, ctypes.byref(value), ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"SO_COOKIE: {os.strerror(code)}")
    return int(value.value)
