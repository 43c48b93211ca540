"""One DNS query in, what the proxy does with it out (pure: dnspython wire format, no I/O).

Istio's DNS proxy (pkg/dns/client/dns.go): A and AAAA questions for names in the table are
answered locally (TTL 30 s, as Istio's); everything else goes to the pod's upstream resolver
unchanged. A query dnspython cannot parse gets FORMERR. An answer too big for the client's
UDP payload (512 bytes, or its EDNS size) is sent truncated (TC), so the client asks again
over TCP (RFC 1035 4.2.1, RFC 6891 6.2.3).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from nodeagent.dns.names import Admits, NameTable

TTL = 30
UDP_DEFAULT_SIZE = 512
TCP_MAX_SIZE = 65535


@dataclass(frozen=True)
class Reply:
    """Send WIRE back to the client (None: drop the query silently)."""

    wire: bytes | None


@dataclass(frozen=True)
class Forward:
    """Send the query upstream; its parsed id, to match the upstream's reply."""

    query_id: int


def handle(
    wire: bytes,
    table: NameTable,
    namespace: str,
    search: Iterable[str],
    auto_allocate: bool,
    tcp: bool,
    admits: Admits | None = None,
) -> Reply | Forward:
    """ADMITS: the asking pod's Sidecar scope (names.NameTable.lookup)."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # any parse failure, dnspython raises several kinds
        return Reply(formerr(wire))
    if query.flags & dns.flags.QR:
        return Reply(None)  # a response sent to us: nothing to answer
    if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
        return Forward(query.id)
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN or question.rdtype not in (
        dns.rdatatype.A,
        dns.rdatatype.AAAA,
    ):
        return Forward(query.id)
    found = table.lookup(question.name.to_text(), namespace, search, auto_allocate, admits)
    if found is None:
        return Forward(query.id)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA | dns.flags.RA
    target = question.name
    if found.cname:
        target = dns.name.from_text(found.host)
        response.answer.append(
            dns.rrset.from_text(question.name, TTL, "IN", "CNAME", target.to_text())
        )
    addresses = found.ipv4 if question.rdtype == dns.rdatatype.A else found.ipv6
    if addresses:  # a known host without addresses of this family: NOERROR, no records
        kind = dns.rdatatype.to_text(question.rdtype)
        response.answer.append(dns.rrset.from_text(target, TTL, "IN", kind, *addresses))
    return Reply(_to_wire(response, query, tcp))


def _to_wire(response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
    limit = TCP_MAX_SIZE if tcp else max(UDP_DEFAULT_SIZE, query.payload if query.edns >= 0 else 0)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def formerr(wire: bytes) -> bytes | None:
    """FORMERR for a query that cannot be parsed, when it has at least an id (and is not
    itself a response); None: drop it."""
    if len(wire) < 3 or wire[2] & 0x80:
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR | dns.flags.RA
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()


def servfail(wire: bytes) -> bytes | None:
    """SERVFAIL for a forwarded query no upstream answered in time."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return formerr(wire)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()
