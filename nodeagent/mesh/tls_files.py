"""DestinationRule ``tls`` files (caCertificates, caCrl, clientCertificate, privateKey): which
files the node must serve over SDS, and under which names (pure).

Istio's sidecar does not hand these paths to Envoy: istio-agent reads the files and serves
them over SDS as ``file-cert:<cert>~<key>`` and ``file-root:<ca>`` (istio/istio
pkg/security/security.go SdsCertificateConfig.GetResourceName / GetRootResourceName, used by
pilot/pkg/security/model/authentication.go for the files of a ClientTLSSettings), and watches
them, so a rotated file is pushed without a config change (security/pkg/nodeagent/cache/
secretcache.go, addFileWatcher). The node agent does the same with the same names; a CRL
travels in the root's secret (one validation context), named ``file-root:<ca>~<crl>``.

On the node these are **paths on the node**, read by the agent (as root) on behalf of the
rule's author; at Istio's sidecar they are paths in the pod's own mounts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.mesh.credentials import tls_blocks
from nodeagent.mesh.model import IstioResource

FILE_CERT, FILE_ROOT = "file-cert:", "file-root:"
SEPARATOR = "~"  # Istio's ResourceSeparator
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"  # Istio's "system" roots: the Debian bundle
ORIGINATED = ("SIMPLE", "MUTUAL")
# The fields behind each path of a secret, in the order of its paths.
CERT_FIELDS = ("clientCertificate", "privateKey")
ROOT_FIELDS = ("caCertificates", "caCrl")


def certificate_name(cert: str, key: str) -> str:
    """The SDS name of a client certificate and its key (files)."""
    return f"{FILE_CERT}{cert}{SEPARATOR}{key}"


def root_name(ca: str, crl: str = "") -> str:
    """The SDS name of a CA bundle (file), with its revocation list when there is one."""
    return f"{FILE_ROOT}{ca}{SEPARATOR}{crl}" if crl else f"{FILE_ROOT}{ca}"


def is_file_secret(name: str) -> bool:
    return name.startswith((FILE_CERT, FILE_ROOT))


def fields(name: str) -> tuple[str, ...]:
    """The DestinationRule fields whose files the secret NAME holds, in its paths' order."""
    return CERT_FIELDS if name.startswith(FILE_CERT) else ROOT_FIELDS


def secrets_of_tls(tls: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """SDS name -> paths, for the files one tls block makes the node read, with Istio's
    defaults as translate/client_tls.py ``resolved`` applies them: no caCertificates means the
    OS bundle; insecureSkipVerify reads no CA and no CRL; a client certificate only in MUTUAL;
    credentialName (a Secret, or plaintext) reads no file."""
    if tls.get("mode") not in ORIGINATED or tls.get("credentialName"):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    cert, key = _path(tls, "clientCertificate"), _path(tls, "privateKey")
    if tls.get("mode") == "MUTUAL" and cert and key:
        out[certificate_name(cert, key)] = (cert, key)
    insecure = tls.get("insecureSkipVerify", False)
    if isinstance(insecure, Mapping):  # BoolValue written as {value: true}
        insecure = insecure.get("value", False)
    if insecure is not True:
        ca, crl = _path(tls, "caCertificates") or SYSTEM_CA, _path(tls, "caCrl")
        out[root_name(ca, crl)] = (ca, crl) if crl else (ca,)
    return out


def referenced(rule: IstioResource) -> dict[str, tuple[str, ...]]:
    """SDS name -> paths of every file a DestinationRule's tls blocks name (its own, its ports',
    its subsets')."""
    out: dict[str, tuple[str, ...]] = {}
    for tls in tls_blocks(rule.spec):
        out |= secrets_of_tls(tls)
    return out


def _path(tls: Mapping[str, Any], name: str) -> str:
    value = tls.get(name)
    return value if isinstance(value, str) else ""
