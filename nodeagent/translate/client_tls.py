"""A DestinationRule's ``tls`` SIMPLE and MUTUAL: TLS the node Envoy originates to an endpoint
that terminates TLS itself (pure).

Istio's semantics (istio.io/latest/docs/reference/config/networking/destination-rule/
#ClientTLSSettings, and istio/istio pilot/pkg/networking/core/cluster_tls.go
buildUpstreamClusterTLSContext / constructUpstreamTLS / setAutoSniAndAutoSanValidation):

- SIMPLE: TLS without a client certificate; MUTUAL: with ``clientCertificate`` + ``privateKey``
  (both required when there is no ``credentialName``).
- The server is verified against ``caCertificates`` (a file; on the node agent a path on the
  node), else the OS root certificates (Istio's "system" default: here SYSTEM_CA, the Debian
  bundle; Envoy refuses SAN checks without a trusted CA); ``caCrl`` adds a revocation list;
  ``insecureSkipVerify`` turns verification off.
- The files are never named to Envoy: as istio-agent does, the node agent reads them and serves
  them over SDS (``file-cert:<cert>~<key>``, ``file-root:<ca>[~<crl>]``, mesh/tls_files.py;
  identity/tls_files.py reads and watches them), so a rotated file reaches Envoy without a
  config change, and a missing or broken one fails only the calls through it.
- ``subjectAltNames``: the server certificate must carry one of them (any SAN type).
- ``sni``: the SNI sent. Unset, Istio sets Envoy's ``auto_sni`` (the request's Host) and, when
  no SANs are given either, ``auto_san_validation`` (the certificate must match that host). The
  node originates TLS below HTTP, in one shared TCP cluster, so it stands in the service's
  hostname for the Host (what a caller of ``http://<svc>.<ns>.svc.<domain>`` sends).
- ``credentialName`` at a sidecar counts only in a rule with a ``workloadSelector``; otherwise
  Istio builds no TLS context at all (plaintext, "to avoid delayed startup of sidecars"). In a
  selector rule (the caller says so) it names a Secret of the rule's namespace, served over SDS
  (identity/credentials.py): MUTUAL presents ``kubernetes://<ns>/<name>``, and the server is
  verified against ``kubernetes://<ns>/<name>-cacert`` plus the SANs, unless
  ``insecureSkipVerify`` (istio/istio pilot/pkg/security/model/authentication.go
  ApplyCustomSDSToClientCommonTLSContext).
  The files fields are then not used.

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

from nodeagent.mesh import tls_files
from nodeagent.mesh.credentials import UNAUTHORIZED_CA, ca_name, certificate_name
from nodeagent.mesh.tls_files import SYSTEM_CA
from nodeagent.translate.tls import sds, upstream_tls

log = logging.getLogger("nodeagent.translate")

SIMPLE, MUTUAL = "SIMPLE", "MUTUAL"
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


def resolved(
    tls: Any,
    host: str,
    http2: bool,
    at: str,
    workload_selector: bool = False,
    namespace: str = "",
    denied: bool = False,
) -> dict[str, Any] | None:
    """The setting a merged policy's TLS block (TLS) means for a cluster of HOST, with Istio's
    defaults filled in; None when it is no SIMPLE/MUTUAL (auto mTLS, DISABLE, ISTIO_MUTUAL are
    the originate path's). ValueError naming the field path (AT is the tls block's).
    WORKLOAD_SELECTOR: the rule has one, so a credentialName is the Secret NAMESPACE/name.
    DENIED: the callers may not have its certificate (mesh/secret_access.py)."""
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
    credential = strings["credentialName"]
    if credential and not workload_selector:
        return {"plaintext": True, "credentialName": credential}
    if credential and not namespace:
        raise ValueError(f"{at}.credentialName: the rule's namespace is needed (caller bug)")
    if (
        mode == MUTUAL
        and not credential
        and not (strings["clientCertificate"] and strings["privateKey"])
    ):
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
    if credential:
        # Over SDS: no file is read, the Secret's own CA (and CRL) replaces caCertificates.
        setting |= {"ca": "", "crl": "", "credential": f"{namespace}/{credential}"}
        setting["mutual"] = mode == MUTUAL
        if denied and mode == MUTUAL:
            # istiod never sends these callers the certificate: their TLS fails (Envoy's
            # "Secret is not supplied by SDS"). A socket that trusts no server fails it too.
            setting = {"sni": setting["sni"], "alpn": setting["alpn"], "denied": True}
    elif mode == MUTUAL:
        setting |= {"cert": strings["clientCertificate"], "key": strings["privateKey"]}
    return setting


def socket_name(setting: Mapping[str, Any]) -> str:
    """A stable name for SETTING's socket (its SNI excluded: that is set per connection)."""
    content = {k: v for k, v in setting.items() if k != "sni"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return SOCKET_PREFIX + digest[:16]


def origination(
    tls: Any,
    host: str,
    http2: bool,
    at: str,
    workload_selector: bool = False,
    namespace: str = "",
    denied: bool = False,
) -> Origination | None:
    """How a cluster of HOST whose merged policy has the TLS block TLS originates TLS (None:
    it does not: see ``resolved``; WORKLOAD_SELECTOR, NAMESPACE: the rule's, as there)."""
    setting = resolved(tls, host, http2, at, workload_selector, namespace, denied)
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
    own cluster sets SNI. It names SDS secrets only, never a file or key material: Istio's
    ApplyCustomSDSToClientCommonTLSContext for a credentialName, ApplyToCommonTLSContext with
    an SdsCertificateConfig for files (pilot/pkg/security/model/authentication.go)."""
    common: dict[str, Any] = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2"}}
    if setting.get("alpn"):
        common["alpn_protocols"] = list(setting["alpn"])
    if setting.get("denied"):
        # No certificate, and only the placeholder CA trusted: every handshake fails.
        common["validation_context_sds_secret_config"] = sds(UNAUTHORIZED_CA)
        return upstream_tls(common, sni)
    credential = str(setting.get("credential") or "")
    if credential:
        namespace, _, name = credential.partition("/")
        certificate = certificate_name(namespace, name) if setting.get("mutual") else ""
        root = ca_name(namespace, name)
    else:
        cert, key = str(setting.get("cert") or ""), str(setting.get("key") or "")
        certificate = tls_files.certificate_name(cert, key) if cert else ""
        root = tls_files.root_name(str(setting["ca"]), str(setting.get("crl") or ""))
    if certificate:
        common["tls_certificate_sds_secret_configs"] = [sds(certificate)]
    if not setting.get("insecure"):
        sans: Sequence[str] = setting.get("sans") or ()
        common["combined_validation_context"] = {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": kind, "matcher": {"exact": san}}
                    for san in sans
                    for kind in _SAN_TYPES
                ]
            },
            "validation_context_sds_secret_config": sds(root),
        }
    return upstream_tls(common, sni)


def credential(setting: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, credentialName) whose SDS secrets SETTING's socket names; None for files."""
    value = str(setting.get("credential") or "")
    if not value:
        return None
    namespace, _, name = value.partition("/")
    return namespace, name


def file_secrets(setting: Mapping[str, Any]) -> set[str]:
    """The ``file-cert:``/``file-root:`` SDS names SETTING's socket asks for (none for a
    credentialName)."""
    if setting.get("credential") or setting.get("plaintext"):
        return set()
    names = set()
    if setting.get("cert"):
        names.add(tls_files.certificate_name(str(setting["cert"]), str(setting["key"])))
    if not setting.get("insecure"):
        names.add(tls_files.root_name(str(setting["ca"]), str(setting.get("crl") or "")))
    return names


def _string(fields: Mapping[str, Any], name: str, at: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{at}.{name}: expected a string, got {value!r}")
    return value
