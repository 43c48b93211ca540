"""Istio's explicit protocol selection for a service port (pure).

``appProtocol`` wins; otherwise the port name's prefix before the first ``-`` (``http-web``,
``grpc``, ``tcp-db``). HTTP-family ports get an HTTP connection manager; everything else is proxied
as TCP. Istio would sniff unnamed ports; nodeagent does not sniff, so they are TCP. HTTPS and TLS
ports are proxied as TCP too, but a VirtualService routes them by its ``tls`` rules (SNI), not
its ``tcp`` ones, as Istio's ``Protocol.IsTLS`` decides (pilot/pkg/networking/core/tls.go).
"""

from __future__ import annotations

HTTP, HTTP2, TCP = "HTTP", "HTTP2", "TCP"
HTTPS, TLS = "HTTPS", "TLS"

_BY_NAME = {
    "http": HTTP,
    "http2": HTTP2,
    "grpc": HTTP2,
    "grpc-web": HTTP,
    "h2c": HTTP2,
    "https": HTTPS,
    "tls": TLS,
}
_BY_APP_PROTOCOL = {
    "http": HTTP,
    "http2": HTTP2,
    "grpc": HTTP2,
    "grpc-web": HTTP,
    "kubernetes.io/h2c": HTTP2,
    "https": HTTPS,
    "tls": TLS,
}


def port_protocol(name: str, app_protocol: str = "") -> str:
    if app_protocol:
        return _BY_APP_PROTOCOL.get(app_protocol.lower(), TCP)
    lowered = name.lower()
    if lowered in _BY_NAME:
        return _BY_NAME[lowered]
    prefix = lowered.split("-", 1)[0]
    return _BY_NAME.get(prefix, TCP)


def is_http(protocol: str) -> bool:
    return protocol in (HTTP, HTTP2)


def is_tls(protocol: str) -> bool:
    """Istio's IsTLS: the port carries TLS the proxy does not terminate (routed by SNI)."""
    return protocol in (HTTPS, TLS)
