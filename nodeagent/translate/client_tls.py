"""A DestinationRule's ``tls`` SIMPLE and MUTUAL: TLS the node Envoy originates to an endpoint
that terminates TLS itself (pure).

Istio's semantics (istio.io/latest/docs/reference/config/networking/destination-rule/
#ClientTLSSettings, and istio/istio pilot/pkg/networking/core/cluster_tls.go
buildUpstreamClusterTLSContext / constructUpstreamTLS / setAutoSniAndAutoSanValidation):

- SIMPLE: TLS without a client certificate; MUTUAL: with ``clientCertificate`` + ``privateKey``
  (both required when there is no ``credentialName``).
- The server is verified against ``caCertificates`` (a file; on the node agent a path on the
  node, read by the node's Envoy), else the OS root certificates (Istio's "system" default:
  here SYSTEM_CA, the Debian bundle; Envoy refuses SAN checks without a trusted CA file);
  ``caCrl`` adds a revocation list; ``insecureSkipVerify`` turns verification off.
- ``subjectAltNames``: the server certificate must carry one of them (any SAN type).
- ``sni``: the SNI sent. Unset, Istio sets Envoy's ``auto_sni`` (the request's Host) and, when
  no SANs are given either, ``auto_san_validation`` (the certificate must match that host). The
  node originates TLS below HTTP, in one shared TCP cluster, so it stands in the service's
  hostname for the Host (what a caller of ``http://<svc>.<ns>.svc.<domain>`` sends).
- ``credentialName`` at a sidecar counts only in a rule with a ``workloadSelector``; otherwise
  Istio builds no TLS context at all (plaintext, "to avoid delayed startup of sidecars"). The
  node does not read Kubernetes secrets yet: in a rule with a workloadSelector too, such a
  setting means plaintext here (logged), where Istio would use the secret.

Each distinct resolved setting is ONE transport socket of the ``originate-tls`` cluster, named
by a digest of its content: every cluster and caller with the same setting shares it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.translate.envoy import typed

log = logging.getLogger("nodeagent.translate")

SIMPLE, MUTUAL = "SIMPLE", "MUTUAL"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
ORIGINATED = (SIMPLE, MUTUAL)
SOCKET_PREFIX = "dr-tls-"
# Every SAN type: Istio's StringToExactMatch fills the legacy match_subject_alt_names, which
# Envoy matches against any SAN of the certificate.
_SAN_TYPES = ("DNS", "URI", "IP_ADDRESS", "EMAIL")


@dataclass(frozen=True)
class Origination:
    """What the node Envoy does for one cluster whose policy says SIMPLE or MUTUAL: send SNI,
    and use the transport socket NAME (None: plaintext, as Istio for a ``credentialName``
    without a workloadSelector)."""

    socket: str | None
    sni: str
    setting: Mapping[str, Any] = field(default_factory=dict, compare=False)


def resolved(tls: Any, host: str, http2: bool, at: str) -> dict[str, Any] | None:
    """The setting a merged policy's TLS block (TLS) means for a cluster of HOST, with Istio's
    defaults filled in; None when it is no SIMPLE/MUTUAL (auto mTLS, DISABLE, ISTIO_MUTUAL are
    the originate path's). ValueError naming the field path (AT is the tls block's)."""
    if tls is None:
        return None
    if not isinstance(tls, Mapping):
        raise ValueError(f"{at}: expected an object, got {type(tls).__name__}")
    mode = tls.get("mode") or "DISABLE"
    if mode not in ORIGINATED:
        return None
    strings = {
        name: _string(tls, name, at)
        for name in (
            "sni",
            "caCertificates",
            "caCrl",
            "clientCertificate",
            "privateKey",
            "credentialName",
        )
    }
    sans = tls.get("subjectAltNames") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) and s for s in sans):
        raise ValueError(f"{at}.subjectAltNames: expected a list of non-empty strings")
    insecure = tls.get("insecureSkipVerify", False)
    if isinstance(insecure, Mapping):  # BoolValue written as {value: true}
        insecure = insecure.get("value", False)
    if not isinstance(insecure, bool):
        raise ValueError(f"{at}.insecureSkipVerify: must be true or false, got {insecure!r}")
    if strings["credentialName"]:
        return {"plaintext": True, "credentialName": strings["credentialName"]}
    if mode == MUTUAL and not (strings["clientCertificate"] and strings["privateKey"]):
        raise ValueError(
            f"{at}: mode MUTUAL needs clientCertificate and privateKey (or credentialName)"
        )
    sni = strings["sni"]
    if not sni and not sans and not insecure:
        sans = [host]  # auto_san_validation: the certificate must match the host
    setting: dict[str, Any] = {
        "sni": sni or host,  # auto_sni: the Host, i.e. the service's hostname
        "sans": sorted(set(sans)),
        "ca": strings["caCertificates"] or SYSTEM_CA,
        "crl": strings["caCrl"],
        "insecure": insecure,
        "alpn": ["h2"] if http2 else [],
    }
    if mode == MUTUAL:
        setting |= {"cert": strings["clientCertificate"], "key": strings["privateKey"]}
    return setting


def socket_name(setting: Mapping[str, Any]) -> str:
    """A stable name for SETTING's socket (its SNI excluded: that is set per connection)."""
    content = {k: v for k, v in setting.items() if k != "sni"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return SOCKET_PREFIX + digest[:16]


def origination(tls: Any, host: str, http2: bool, at: str) -> Origination | None:
    """How a cluster of HOST whose merged policy has the TLS block TLS originates TLS (None:
    it does not: see ``resolved``)."""
    setting = resolved(tls, host, http2, at)
    if setting is None:
        return None
    if setting.get("plaintext"):
        log.warning(
            "%s.credentialName %r: applies at sidecars only in a DestinationRule with a "
            "workloadSelector; TLS is not originated (as Istio does)",
            at,
            setting["credentialName"],
        )
        return Origination(None, "")
    return Origination(socket_name(setting), str(setting["sni"]), setting)


def transport_socket(setting: Mapping[str, Any], sni: str = "") -> dict[str, Any]:
    """The UpstreamTlsContext for a resolved SETTING. The node's shared one has no SNI (it comes
    per connection, from the filter state ``envoy.network.upstream_server_name``); a sidecar's
    own cluster sets SNI."""
    common: dict[str, Any] = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2"}}
    if setting.get("alpn"):
        common["alpn_protocols"] = list(setting["alpn"])
    if setting.get("cert"):
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": setting["cert"]},
                "private_key": {"filename": setting["key"]},
            }
        ]
    if not setting.get("insecure"):
        validation: dict[str, Any] = {"trusted_ca": {"filename": setting["ca"]}}
        if setting.get("crl"):
            validation["crl"] = {"filename": setting["crl"]}
        sans: Sequence[str] = setting.get("sans") or ()
        if sans:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": kind, "matcher": {"exact": san}} for san in sans for kind in _SAN_TYPES
            ]
        common["validation_context"] = validation
    context: dict[str, Any] = {"common_tls_context": common}
    if sni:
        context["sni"] = sni
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context
        ),
    }


def files(setting: Mapping[str, Any]) -> dict[str, str]:
    """The files SETTING makes Envoy read: field name -> path."""
    named = {
        "caCertificates": "" if setting.get("insecure") else setting.get("ca", ""),
        "caCrl": "" if setting.get("insecure") else setting.get("crl", ""),
        "clientCertificate": setting.get("cert", ""),
        "privateKey": setting.get("key", ""),
    }
    return {field: str(path) for field, path in named.items() if path}


def _string(fields: Mapping[str, Any], name: str, at: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{at}.{name}: expected a string, got {value!r}")
    return value
