"""Istio durations ("1.5s", "100ms", "1h30m") as Envoy's proto3 JSON durations (pure).

Istio reads a Duration field of its YAML with the Go protobuf JSON decoder, which accepts what
Go's time.ParseDuration does (a sequence of decimal numbers, each with a unit: ns, us, µs, ms, s,
m, h); Envoy's JSON form is seconds with up to nine decimals ("1.500s").
"""

from __future__ import annotations

import re
from decimal import Decimal

_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NANOS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def nanoseconds(value: object, where: str) -> int:
    """VALUE (Go duration syntax) in nanoseconds; ValueError naming WHERE if it is not one."""
    text = str(value).strip()
    if text == "0":
        return 0
    pos, total = 0, Decimal(0)
    while pos < len(text):
        part = _PART.match(text, pos)
        if part is None:
            break
        total += Decimal(part.group(1)) * _NANOS[part.group(2)]
        pos = part.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"{where}: {value!r} is not a duration (e.g. 1.5s, 100ms, 1h30m)")
    return int(total)


def proto_duration(value: object, where: str) -> str:
    """VALUE as a proto3 JSON Duration ("2s", "0.100s")."""
    seconds, nanos = divmod(nanoseconds(value, where), 1_000_000_000)
    if not nanos:
        return f"{seconds}s"
    return f"{seconds}.{nanos:09d}".rstrip("0") + "s"
