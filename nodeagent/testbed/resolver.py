"""The testbed resolver: the cluster's DNS (kube-dns' role) and the outside world's, in one.

It answers A queries for every Service, ``<svc>.<ns>.svc.<domain>`` (its cluster IP), and for
the names of the topology's external servers (their address), NXDOMAIN for any other name,
NOERROR without answers (NODATA) for other record types of a known name. It runs in a netns of
its own on the underlay (``layout.resolver_netns``, at ``Network.resolver_ip``), on port 53,
UDP and TCP, and rereads its zone file (``layout.resolver_zone``) when the testbed rewrites it.

Every pod's ``/etc/netns/<pod netns>/resolv.conf`` names it with the search list and ndots
kubelet writes (``resolv_conf``; kubernetes pkg/kubelet/network/dns/dns.go, ClusterFirst), so a
pod's resolver library expands short names as it does on a cluster. ``/etc/hosts`` (hosts.py)
still lists the Services, and with nsswitch ``hosts: files dns`` it wins for those names (the
answers agree); names it does not hold (the externals', anything else) go to this resolver.

Wire format with dnspython. Run with ``python -m nodeagent.testbed.resolver``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

if TYPE_CHECKING:  # the resolver process itself needs none of the testbed's modules
    from nodeagent.testbed.topology import External, Service

PORT = 53
TTL = 5  # seconds: short, services change during tests
# RFC 1035 4.2.1: a UDP answer larger than this (without EDNS) is truncated (TC set).
UDP_PAYLOAD = 512
TCP_IDLE_TIMEOUT = 5.0
MAX_TCP_MESSAGE = 65535

Records = Mapping[str, tuple[str, ...]]  # lower-case name without the final dot -> IPv4s


def zone_records(
    services: Iterable[Service], externals: Iterable[External], domain: str
) -> dict[str, list[str]]:
    """The names the resolver answers: each Service's FQDN, each external's names."""
    records: dict[str, list[str]] = {}
    for svc in services:
        records[f"{svc.name}.{svc.namespace}.svc.{domain}".lower()] = [str(svc.cluster_ip)]
    for ext in externals:
        for name in ext.names:
            records[name.lower()] = [str(ext.ip)]
    return records


def resolv_conf(namespace: str, nameserver: str, domain: str) -> str:
    """A pod's resolv.conf as kubelet writes it for dnsPolicy ClusterFirst."""
    search = f"{namespace}.svc.{domain} svc.{domain} {domain}"
    return f"search {search}\nnameserver {nameserver}\noptions ndots:5\n"


def write_zone(path: Path, records: Mapping[str, list[str]]) -> None:
    """Replace the zone file atomically (the resolver may be reading it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"records": records}, sort_keys=True))
    os.replace(tmp, path)


def _error(query_id: int, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.Message(query_id)
    reply.flags = dns.flags.QR
    reply.set_rcode(rcode)
    return reply


def answer(wire: bytes, records: Records, max_size: int = MAX_TCP_MESSAGE) -> bytes | None:
    """The reply to one query in WIRE form, at most MAX_SIZE bytes (TC set when cut);
    None for what cannot be answered at all (shorter than a header, or itself a reply)."""
    if len(wire) < 12:
        return None
    query_id = int.from_bytes(wire[:2], "big")
    if wire[2] & 0x80:  # QR set: a reply, never answer one (no loops)
        return None
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return _error(query_id, dns.rcode.FORMERR).to_wire()
    if query.opcode() != dns.opcode.QUERY:
        return _error(query_id, dns.rcode.NOTIMP).to_wire()
    if len(query.question) != 1:
        return _error(query_id, dns.rcode.FORMERR).to_wire()
    question = query.question[0]
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA | dns.flags.RA
    name = question.name.to_text(omit_final_dot=True).lower()
    addresses = records.get(name)
    if question.rdclass != dns.rdataclass.IN:
        reply.set_rcode(dns.rcode.REFUSED)
    elif addresses is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        reply.answer.append(
            dns.rrset.from_text_list(question.name, TTL, "IN", "A", list(addresses))
        )
    try:
        return reply.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        reply.answer.clear()
        reply.flags |= dns.flags.TC
        return reply.to_wire()


class ZoneFile:
    """The zone file, reread when it changes (its mtime or size); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, tuple[str, ...]] = {}

    def records(self) -> Records:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                return self._records
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                try:
                    raw = json.loads(self.path.read_text())["records"]
                    self._records = {str(k): tuple(map(str, v)) for k, v in raw.items()}
                    self._stamp = (st.st_mtime_ns, st.st_size)
                except (OSError, ValueError, KeyError, AttributeError) as e:
                    _log(f"resolver: zone {self.path}: {e!r}; keeping the previous one")
            return self._records


def _udp_payload(wire: bytes) -> int:
    """The largest UDP reply the client takes: 512, or its EDNS payload size."""
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return UDP_PAYLOAD
    return max(UDP_PAYLOAD, query.payload) if query.edns >= 0 else UDP_PAYLOAD


class _TCPHandler(socketserver.BaseRequestHandler):
    """Length-prefixed queries (RFC 1035 4.2.2), several per connection until idle."""

    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TCP_IDLE_TIMEOUT)
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                wire = _recv_exact(sock, int.from_bytes(head, "big"))
                if wire is None:
                    return
                reply = answer(wire, self.server.zone.records())
                if reply is None:
                    return
                sock.sendall(len(reply).to_bytes(2, "big") + reply)
        except OSError:
            return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: ZoneFile) -> None:
        self.zone = zone
        super().__init__(address, _TCPHandler)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_udp(sock: socket.socket, zone: ZoneFile, stop: threading.Event) -> None:
    """Answer datagrams one at a time (each answer is a lookup: nothing waits)."""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            wire, peer = sock.recvfrom(MAX_TCP_MESSAGE)
        except TimeoutError:
            continue
        except OSError:
            return
        reply = answer(wire, zone.records(), _udp_payload(wire))
        if reply is not None:
            try:
                sock.sendto(reply, peer)
            except OSError as e:
                _log(f"resolver: reply to {peer}: {e!r}")


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _listen_address(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IPv4:PORT, got {raw!r}") from None
    return host, number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.testbed.resolver")
    parser.add_argument("--listen", type=_listen_address, required=True, help="IPv4:PORT")
    parser.add_argument("--zone", type=Path, required=True, help="the zone file (JSON)")
    args = parser.parse_args(argv)
    zone = ZoneFile(args.zone)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(args.listen)
    tcp = _TCPServer(args.listen, zone)  # listening last: the testbed waits on its TCP port
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    _log(f"resolver: serving {args.listen[0]}:{args.listen[1]} (UDP, TCP) from {args.zone}")
    serve_udp(udp, zone, stop)
    tcp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
