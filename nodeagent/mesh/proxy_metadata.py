"""Istio's per-proxy settings that switch DNS proxying on: ``proxyMetadata`` of the mesh's
``defaultConfig`` and of a pod's ``proxy.istio.io/config`` annotation (pure, no I/O).

Istio: https://istio.io/latest/docs/ops/configuration/traffic-management/dns-proxy/ (the mesh
default ``meshConfig.defaultConfig.proxyMetadata`` and, per pod, the annotation); the pod's
ProxyConfig overrides the mesh default key by key, as istiod merges them
(pkg/config/mesh/mesh.go ApplyProxyConfig). The values are Go booleans
(``strconv.ParseBool``, the agent's ``ISTIO_META_*`` StringBool).
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
DNS_AUTO_ALLOCATE = "ISTIO_META_DNS_AUTO_ALLOCATE"

_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class ProxyMetadataError(ValueError):
    """A proxyMetadata value or ProxyConfig annotation that cannot be read; names which."""


def pod_proxy_config(annotations: Mapping[str, str]) -> dict[str, object]:
    """The pod's ``proxy.istio.io/config`` annotation, a ProxyConfig in YAML or JSON ({}
    without one); ProxyMetadataError naming it when it is not a mapping."""
    text = annotations.get(PROXY_CONFIG_ANNOTATION)
    if text is None:
        return {}
    where = f"annotation {PROXY_CONFIG_ANNOTATION}"
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProxyMetadataError(f"{where}: not YAML ({e})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ProxyMetadataError(f"{where}: expected a ProxyConfig mapping, got {text!r}")
    return config


def pod_proxy_metadata(annotations: Mapping[str, str]) -> dict[str, str]:
    """``proxyMetadata`` of the pod's ``proxy.istio.io/config`` annotation ({} without one)."""
    config = pod_proxy_config(annotations)
    where = f"annotation {PROXY_CONFIG_ANNOTATION}"
    return metadata_mapping(config.get("proxyMetadata"), f"{where}: proxyMetadata")


def metadata_mapping(value: object, where: str) -> dict[str, str]:
    """A proxyMetadata value as a str -> str mapping; WHERE names it in the error."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ProxyMetadataError(f"{where}: expected a mapping of strings, got {value!r}")
    return dict(value)


def check_booleans(metadata: Mapping[str, str], where: str) -> list[str]:
    """Problems with the boolean keys read here (DNS capture, auto-allocation) in METADATA."""
    return [
        f'{where}.{key}: "{metadata[key]}" is not a boolean (true or false)'
        for key in (DNS_CAPTURE, DNS_AUTO_ALLOCATE)
        if key in metadata and metadata[key] not in _TRUE + _FALSE
    ]


def flag(key: str, mesh_default: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    """KEY's boolean for a pod: its annotation's proxyMetadata, else the mesh default, else
    off. A value that is no Go boolean is an error naming the key."""
    pod = pod_proxy_metadata(annotations)
    if key in pod:
        value, where = pod[key], f"annotation {PROXY_CONFIG_ANNOTATION}: proxyMetadata.{key}"
    elif key in mesh_default:
        value, where = mesh_default[key], f"mesh config defaultConfig.proxyMetadata.{key}"
    else:
        return False
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ProxyMetadataError(f'{where}: "{value}" is not a boolean (true or false)')
