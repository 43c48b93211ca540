"""The agent's DNS proxy: a UDP and a TCP socket at 127.0.0.1:15053 (and [::1]:15053 when the
pod has IPv6) inside each pod whose DNS is captured, all served by the agent's event loop.

The sockets are made inside the pod's network namespace (as Envoy's listeners are), so the
pod's own REDIRECT of port 53 reaches them and the pod is known by the socket it asked on.
Queries the proxy does not answer itself go to the pod's original resolver (its resolv.conf)
from a socket also made inside the pod, marked 0x539 so capture lets it out: the upstream sees
the pod's own address, and the pod's network policy applies, as with Istio's proxy in the pod.
Bounded: at most MAX_IN_FLIGHT queries at once on the node (more are dropped: the client
retries), each upstream try limited to UPSTREAM_TIMEOUT, a TCP client to TCP_IDLE between
queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from nodeagent.dns import answer
from nodeagent.dns.names import NameTable, build
from nodeagent.dns.resolvconf import Locate, PodResolvConf, kubernetes_search, locate
from nodeagent.mesh import sidecar_scope
from nodeagent.mesh.model import Service
from nodeagent.mesh.store import MESH_CONFIG, SERVICE, MeshStore
from nodeagent.ports import DNS_CAPTURED_PORT, DNS_PORT, MESH_MARK
from nodeagent.redirect.netns import entered

log = logging.getLogger("nodeagent.dns")

LISTEN_ADDRESS = "127.0.0.1"  # REDIRECT of a pod's own packets lands on its loopback
LISTEN_ADDRESS6 = "::1"
MAX_IN_FLIGHT = 256
UPSTREAM_TIMEOUT = 2.0  # per upstream resolver tried
TCP_IDLE = 10.0


@dataclass
class PodDns:
    """One pod's DNS proxy: where it listens, whom it asks, what it answers."""

    key: str  # namespace/name
    namespace: str
    netns: Path
    auto_allocate: bool
    resolv_conf: PodResolvConf
    udp: list[asyncio.DatagramTransport] = field(default_factory=list)  # IPv4, IPv6 loopback
    tcp: list[asyncio.Server] = field(default_factory=list)
    clients: set[asyncio.Task[None]] = field(default_factory=set)

    def search(self, domain: str) -> tuple[str, ...]:
        """The pod's own search list; kubelet's for its namespace when the file read is the
        agent's (whose list is the agent's namespace's)."""
        conf = self.resolv_conf.current()
        if self.resolv_conf.own and conf.search:
            return conf.search
        return kubernetes_search(self.namespace, domain)


class DnsProxy:
    def __init__(
        self,
        store: MeshStore,
        find_resolv_conf: Locate = locate,
        listen_port: int = DNS_PORT,
        upstream_port: int = DNS_CAPTURED_PORT,
        listening_sockets: Callable[[Path, int], list[tuple[socket.socket, socket.socket]]]
        | None = None,
        upstream_socket: Callable[[Path, int, int], socket.socket] | None = None,
    ) -> None:
        """LISTENING_SOCKETS and UPSTREAM_SOCKET make the sockets (default: inside the pod's
        netns; tests without privileges pass their own)."""
        self.store = store
        self._listening_sockets = listening_sockets or _listening_sockets
        self._upstream_socket = upstream_socket or _upstream_socket
        self.find_resolv_conf = find_resolv_conf
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.pods: dict[str, PodDns] = {}
        self._in_flight = 0
        self._table: NameTable | None = None
        self._table_generation = -1
        self._scopes = sidecar_scope.Scopes(store)  # pods' Sidecar scopes, per generation
        self._scopes_generation = -1
        # Entering a pod's netns to make a socket: threads of its own, never the loop's.
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="dns")

    # -- pods -------------------------------------------------------------------------------------

    async def serve(
        self, key: str, namespace: str, netns: Path, auto_allocate: bool, sandbox: str = ""
    ) -> None:
        """Listen in the pod's netns (again after a restart; a no-op when already listening).
        SANDBOX: the pod sandbox's id (CNI_CONTAINERID), where the runtime keeps its
        resolv.conf ("" when unknown: see dns/resolvconf.py)."""
        pod = self.pods.get(key)
        if pod is not None and pod.netns == netns and pod.udp:
            pod.auto_allocate = auto_allocate
            return
        if pod is not None:
            await self.stop(key)
        loop = asyncio.get_running_loop()
        pairs = await loop.run_in_executor(
            self._executor, self._listening_sockets, netns, self.listen_port
        )
        resolv_conf = PodResolvConf(netns, sandbox, self.find_resolv_conf)
        pod = PodDns(key, namespace, netns, auto_allocate, resolv_conf)
        try:
            for udp_sock, tcp_sock in pairs:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self, pod), sock=udp_sock
                )
                pod.udp.append(transport)
                server = await asyncio.start_server(
                    lambda r, w: self._tcp_client(pod, r, w), sock=tcp_sock
                )
                pod.tcp.append(server)
        except BaseException:
            for pair in pairs:
                for sock in pair:
                    sock.close()
            raise
        self.pods[key] = pod
        log.info(
            "pod %s: DNS proxy on %s port %d (upstream %s)",
            key,
            ", ".join(sock.getsockname()[0] for sock, _ in pairs),
            self.listen_port,
            ", ".join(resolv_conf.current().nameservers) or "none yet",
        )

    async def stop(self, key: str) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        for transport in pod.udp:
            transport.close()
        for server in pod.tcp:
            server.close()
        for task in list(pod.clients):
            task.cancel()
        log.info("pod %s: DNS proxy stopped", key)

    async def close(self) -> None:
        for key in list(self.pods):
            await self.stop(key)
        self._executor.shutdown(wait=False)

    # -- queries ----------------------------------------------------------------------------------

    def table(self) -> NameTable:
        """The name table, rebuilt only when a Service, ServiceEntry or the mesh config changed."""
        generation = self.store.generation
        if self._table is not None and generation == self._table_generation:
            return self._table
        changed = self.store.changes_since(self._table_generation)
        # ServiceEntry hosts are services of the store too (mesh/service_entries.py)
        relevant = changed is None or any(kind in (SERVICE, MESH_CONFIG) for kind, _ in changed)
        if self._table is None or relevant:
            services: list[Service] = list(self.store.services.values())
            self._table = build(services, self.store.mesh_config.cluster_domain)
        self._table_generation = generation
        return self._table

    def scope(self, pod: PodDns) -> sidecar_scope.Scope | None:
        """POD's Sidecar scope (None: every host), computed once per namespace and Sidecar
        until the store changes."""
        if self._scopes_generation != self.store.generation:
            self._scopes = sidecar_scope.Scopes(self.store)
            self._scopes_generation = self.store.generation
        known = self.store.pods.get(pod.key)
        return self._scopes.of_pod(pod.namespace, known.labels if known is not None else {})

    async def respond(self, pod: PodDns, wire: bytes, tcp: bool) -> bytes | None:
        """The bytes to send back for one query (None: nothing). Only hosts in the pod's
        Sidecar scope are answered here (names.py)."""
        table = self.table()
        scope = self.scope(pod)
        outcome = answer.handle(
            wire,
            table,
            pod.namespace,
            pod.search(table.domain),
            pod.auto_allocate,
            tcp,
            scope.admits_host if scope is not None else None,
        )
        if isinstance(outcome, answer.Reply):
            return outcome.wire
        for nameserver in pod.resolv_conf.current().nameservers:
            try:
                async with asyncio.timeout(UPSTREAM_TIMEOUT):
                    reply = await self._forward(pod, nameserver, wire, tcp)
            except (TimeoutError, OSError) as e:
                log.debug("pod %s: upstream %s: %s", pod.key, nameserver, e or "timed out")
                continue
            if len(reply) >= 2 and int.from_bytes(reply[:2], "big") == outcome.query_id:
                return reply
        return answer.servfail(wire)

    async def _forward(self, pod: PodDns, nameserver: str, wire: bytes, tcp: bool) -> bytes:
        """The upstream's reply, as it sent it (a truncated UDP reply stays truncated: the
        client then asks over TCP, which is captured and forwarded over TCP)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in nameserver else socket.AF_INET
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        sock = await loop.run_in_executor(
            self._executor, self._upstream_socket, pod.netns, family, kind
        )
        with sock:
            address = (nameserver, self.upstream_port)
            if tcp:
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
                size = struct.unpack("!H", await _receive(loop, sock, 2))[0]
                return await _receive(loop, sock, size)
            await loop.sock_sendto(sock, wire, address)
            while True:
                data, source = await loop.sock_recvfrom(sock, answer.TCP_MAX_SIZE)
                if source[0] == nameserver:  # only the resolver asked may answer
                    return data

    def _admit(self) -> bool:
        if self._in_flight >= MAX_IN_FLIGHT:
            return False
        self._in_flight += 1
        return True

    async def _udp_query(
        self,
        pod: PodDns,
        transport: asyncio.DatagramTransport,
        wire: bytes,
        client: tuple[str | Any, int],
    ) -> None:
        try:
            reply = await self.respond(pod, wire, tcp=False)
            if reply is not None and not transport.is_closing():
                transport.sendto(reply, client)
        except Exception:  # one bad query must never stop the proxy
            log.exception("pod %s: DNS query failed", pod.key)
        finally:
            self._in_flight -= 1

    async def _tcp_client(
        self, pod: PodDns, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            pod.clients.add(task)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    wire = await reader.readexactly(size)
                if not self._admit():
                    break
                try:
                    reply = await self.respond(pod, wire, tcp=True)
                finally:
                    self._in_flight -= 1
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("pod %s: DNS over TCP failed", pod.key)
        finally:
            if task is not None:
                pod.clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy, pod: PodDns) -> None:
        self.proxy, self.pod = proxy, pod
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is None or not self.proxy._admit():
            return  # too many at once: dropped, the client's resolver retries
        query = self.proxy._udp_query(self.pod, self.transport, data, addr)
        task = asyncio.ensure_future(query)
        self.pod.clients.add(task)
        task.add_done_callback(self.pod.clients.discard)


async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ConnectionResetError("upstream closed the connection mid-reply")
        data += chunk
    return data


def _listening_sockets(netns: Path, port: int) -> list[tuple[socket.socket, socket.socket]]:
    """UDP and TCP sockets bound to PORT on the loopback inside NETNS: 127.0.0.1, and ::1 when
    the pod has IPv6 (capture's REDIRECT lands an IPv6 query there). Blocking: a worker thread."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    for family, address in ((socket.AF_INET, LISTEN_ADDRESS), (socket.AF_INET6, LISTEN_ADDRESS6)):
        with entered(netns):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            for sock in (udp, tcp):
                sock.bind((address, port))
                sock.setblocking(False)
            tcp.listen(64)
        except BaseException as e:
            udp.close()
            tcp.close()
            if family == socket.AF_INET6 and isinstance(e, OSError):
                break  # no IPv6 in the pod: nothing can reach ::1 there either
            for pair in pairs:
                for sock in pair:
                    sock.close()
            raise
        pairs.append((udp, tcp))
    return pairs


def _upstream_socket(netns: Path, family: int, kind: int) -> socket.socket:
    """A socket inside NETNS that capture lets out (marked as the mesh's own)."""
    with entered(netns):
        sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MESH_MARK)
    sock.setblocking(False)
    return sock
