"""A pod's DNS client for tests/integration/test_dns_proxy.py, as an app's resolver library asks.

``resolve NAME TYPE TRANSPORT``: NAME through the pod's /etc/resolv.conf (its nameserver, search
list and ndots, which ``ip netns exec`` binds from /etc/netns/<pod netns>/), over ``udp`` or
``tcp``; prints one JSON line: ``rcode`` (NOERROR, NXDOMAIN...), ``addresses`` of TYPE, ``ttl``
(of the address records), ``name`` (the name that answered, after search expansion and CNAMEs).
``ask SERVER NAME [HOW]``: one A query for NAME (no search list) to SERVER port 53, whatever the
resolv.conf says, the way resolver libraries send it (HOW): ``sendto`` on an unconnected UDP
socket (musl, dig, dnspython), ``connected`` UDP (glibc: connect, send, recvfrom), or ``tcp``;
prints ``rcode``, ``addresses``, ``ttl``, the reply's ``source`` (recvfrom's address; TCP: the
peer) and the socket's ``peer`` (getpeername, connected sockets only) as [host, port]. A SERVER
with a colon is asked from an IPv6 socket (``::ffff:a.b.c.d``: IPv4 from a dual-stack one).
``asks NAME SERVERS HOWS``: ``ask`` for each of the comma-separated SERVERS and HOWS, in one
process (an interpreter start each would cost more than the queries); prints one JSON object,
"SERVER HOW" -> ``ask``'s answer.
``garbage``: sends bytes no DNS parser accepts to the pod's nameserver over UDP; prints the
rcode of the answer ("" when none came within 2 s).

Runs inside the pod's network namespace with the test's interpreter (dnspython).
"""

from __future__ import annotations

import json
import socket
import sys

import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver


def resolve(name: str, rdtype: str, transport: str) -> dict[str, object]:
    resolver = dns.resolver.Resolver()  # /etc/resolv.conf
    resolver.lifetime = 5.0
    try:
        answer = resolver.resolve(
            name, rdtype, tcp=transport == "tcp", search=True, raise_on_no_answer=False
        )
    except dns.resolver.NXDOMAIN:
        return {"rcode": "NXDOMAIN", "addresses": [], "ttl": None, "name": ""}
    rrset = answer.rrset
    return {
        "rcode": dns.rcode.to_text(answer.response.rcode()),
        "addresses": sorted(r.to_text() for r in rrset) if rrset is not None else [],
        "ttl": rrset.ttl if rrset is not None else None,
        "name": answer.canonical_name.to_text(omit_final_dot=True),
    }


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection mid-reply")
        data += chunk
    return data


def ask(server: str, name: str, how: str = "sendto") -> dict[str, object]:
    query = dns.message.make_query(name, "A")
    wire = query.to_wire()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    peer: list[object] | None = None
    with socket.socket(family, socket.SOCK_STREAM if how == "tcp" else socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)
        if how == "sendto":
            sock.sendto(wire, (server, 53))
        else:
            sock.connect((server, 53))
            peer = list(sock.getpeername()[:2])
        if how == "tcp":
            sock.sendall(len(wire).to_bytes(2, "big") + wire)
            data, source = _exactly(sock, int.from_bytes(_exactly(sock, 2), "big")), peer
        else:
            if how == "connected":
                sock.send(wire)
            data, address = sock.recvfrom(65535)
            source = list(address[:2])
    reply = dns.message.from_wire(data)
    if reply.id != query.id:
        raise SystemExit(f"reply id {reply.id}, query id {query.id}")
    rrsets = [r for r in reply.answer if r.rdtype == dns.rdatatype.A]
    return {
        "rcode": dns.rcode.to_text(reply.rcode()),
        "addresses": sorted(r.to_text() for rrset in rrsets for r in rrset),
        "ttl": rrsets[0].ttl if rrsets else None,
        "source": source,
        "peer": peer,
    }


def garbage() -> dict[str, object]:
    nameserver = dns.resolver.Resolver().nameservers[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.sendto(b"\x12\x34\x01\x00\xff", (str(nameserver), 53))
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return {"rcode": ""}
    return {"rcode": dns.rcode.to_text(dns.message.from_wire(data).rcode())}


if __name__ == "__main__":
    if sys.argv[1] == "resolve":
        print(json.dumps(resolve(*sys.argv[2:5])))
    elif sys.argv[1] == "ask":
        print(json.dumps(ask(*sys.argv[2:5])))
    elif sys.argv[1] == "asks":
        servers, hows = sys.argv[3].split(","), sys.argv[4].split(",")
        print(json.dumps({f"{s} {h}": ask(s, sys.argv[2], h) for s in servers for h in hows}))
    elif sys.argv[1] == "garbage":
        print(json.dumps(garbage()))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
