"""What to capture in one pod: Istio's defaults and its traffic annotations (pure, no I/O).

Honors the ``traffic.sidecar.istio.io/*`` annotations that istio-init honors, so pods migrate from
sidecars unchanged. A bad value is an error naming the annotation and the value: the pod's CNI ADD
fails rather than starting with capture other than what its owner asked for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from nodeagent.mesh.proxy_metadata import DNS_CAPTURE, ProxyMetadataError, flag

ANNOTATION_PREFIX = "traffic.sidecar.istio.io/"
EXCLUDE_OUTBOUND_PORTS = ANNOTATION_PREFIX + "excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "excludeInboundPorts"
INCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "includeInboundPorts"
EXCLUDE_OUTBOUND_RANGES = ANNOTATION_PREFIX + "excludeOutboundIPRanges"
INCLUDE_OUTBOUND_RANGES = ANNOTATION_PREFIX + "includeOutboundIPRanges"
# Ours, not Istio's: which capture backend a pod asks for over its node's --capture-mode.
CAPTURE_MODE = "nodeagent.io/capture-mode"
CAPTURE_MODES = ("nftables", "ebpf")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CaptureSpecError(ValueError):
    """An annotation value that cannot be honored; the message names annotation and value."""


@dataclass(frozen=True)
class CaptureSpec:
    """Exclusions and inclusions for one pod's capture. ``None`` inclusions mean "*" (all)."""

    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_outbound_ranges: tuple[Network, ...] = ()
    include_outbound_ranges: tuple[Network, ...] | None = None
    # DNS capture (Istio's ISTIO_META_DNS_CAPTURE): UDP and TCP port 53 to the agent's DNS proxy
    dns: bool = False
    # The backend the pod asks for (CAPTURE_MODE); "": its node's --capture-mode
    mode: str = ""

    @classmethod
    def from_annotations(
        cls, annotations: Mapping[str, str], mesh_metadata: Mapping[str, str] | None = None
    ) -> CaptureSpec:
        """The pod's capture; MESH_METADATA is the mesh's defaultConfig.proxyMetadata, which
        the pod's ``proxy.istio.io/config`` overrides (DNS capture)."""
        try:
            dns = flag(DNS_CAPTURE, mesh_metadata or {}, annotations)
        except ProxyMetadataError as e:
            raise CaptureSpecError(str(e)) from None
        mode = annotations.get(CAPTURE_MODE, "").strip()
        if mode and mode not in CAPTURE_MODES:
            raise CaptureSpecError(
                f"annotation {CAPTURE_MODE}: {mode!r} is not one of {', '.join(CAPTURE_MODES)}"
            )
        return cls(
            dns=dns,
            mode=mode,
            exclude_outbound_ports=_ports(annotations, EXCLUDE_OUTBOUND_PORTS),
            exclude_inbound_ports=_ports(annotations, EXCLUDE_INBOUND_PORTS),
            include_inbound_ports=_ports_or_all(annotations, INCLUDE_INBOUND_PORTS),
            exclude_outbound_ranges=_ranges(annotations, EXCLUDE_OUTBOUND_RANGES),
            include_outbound_ranges=_ranges_or_all(annotations, INCLUDE_OUTBOUND_RANGES),
        )

    def to_json(self) -> dict[str, object]:
        """A plain form for the agent's status and registry (and back with ``from_json``)."""
        return {
            "excludeOutboundPorts": list(self.exclude_outbound_ports),
            "excludeInboundPorts": list(self.exclude_inbound_ports),
            "includeInboundPorts": None
            if self.include_inbound_ports is None
            else list(self.include_inbound_ports),
            "excludeOutboundIPRanges": [str(n) for n in self.exclude_outbound_ranges],
            "includeOutboundIPRanges": None
            if self.include_outbound_ranges is None
            else [str(n) for n in self.include_outbound_ranges],
            "dnsCapture": self.dns,
            "captureMode": self.mode,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> CaptureSpec:
        def ports(key: str) -> tuple[int, ...]:
            value = raw.get(key) or []
            assert isinstance(value, list)
            return tuple(int(p) for p in value)

        def nets(key: str) -> tuple[Network, ...]:
            value = raw.get(key) or []
            assert isinstance(value, list)
            return tuple(ipaddress.ip_network(str(n)) for n in value)

        return cls(
            exclude_outbound_ports=ports("excludeOutboundPorts"),
            exclude_inbound_ports=ports("excludeInboundPorts"),
            include_inbound_ports=None
            if raw.get("includeInboundPorts") is None
            else ports("includeInboundPorts"),
            exclude_outbound_ranges=nets("excludeOutboundIPRanges"),
            include_outbound_ranges=None
            if raw.get("includeOutboundIPRanges") is None
            else nets("includeOutboundIPRanges"),
            dns=bool(raw.get("dnsCapture", False)),
            mode=str(raw.get("captureMode", "")),
        )


def _items(annotations: Mapping[str, str], key: str) -> list[str]:
    return [item.strip() for item in annotations.get(key, "").split(",") if item.strip()]


def _ports(annotations: Mapping[str, str], key: str) -> tuple[int, ...]:
    ports = []
    for item in _items(annotations, key):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise CaptureSpecError(f"annotation {key}: {item!r} is not a port number (1-65535)")
        ports.append(int(item))
    return tuple(sorted(set(ports)))


def _ports_or_all(annotations: Mapping[str, str], key: str) -> tuple[int, ...] | None:
    # Istio: "*" (the default) captures every port; an empty value captures none.
    if key not in annotations or annotations[key].strip() == "*":
        return None
    return _ports(annotations, key)


def _ranges(annotations: Mapping[str, str], key: str) -> tuple[Network, ...]:
    nets = []
    for item in _items(annotations, key):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise CaptureSpecError(
                f"annotation {key}: {item!r} is not an IP range (CIDR)"
            ) from None
    return tuple(sorted(set(nets), key=lambda n: (n.version, n)))


def _ranges_or_all(annotations: Mapping[str, str], key: str) -> tuple[Network, ...] | None:
    if key not in annotations or annotations[key].strip() == "*":
        return None
    return _ranges(annotations, key)
