"""DestinationRule ``tls.credentialName``: which Kubernetes Secrets a node needs, and what of a
Secret is kept (pure).

Istio's rules (istio.io/latest/docs/reference/config/networking/destination-rule/
#ClientTLSSettings, credentialName; istio/istio pilot/pkg/networking/core/cluster_tls.go
buildUpstreamClusterTLSContext; pilot/pkg/credentials/kube/secrets.go):

- At a sidecar, credentialName counts only in a DestinationRule with a ``workloadSelector``
  (the Secret is then read in the workload's namespace, which is the rule's: a selector rule
  applies to its own namespace's workloads only). Elsewhere Istio builds no TLS context.
- A Secret holds the client certificate as ``cert``/``key`` (generic) or ``tls.crt``/``tls.key``
  (kubernetes.io/tls), the CA bundle as ``cacert`` or ``ca.crt``, a CRL as ``crl`` or
  ``ca.crl``; the CA may also come from a companion Secret ``<name>-cacert``, which wins when it
  exists (secrets.go GetCaCert looks it up first).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from nodeagent.mesh.model import Credential, Pod
from nodeagent.mesh.store import MeshStore

CA_SUFFIX = "-cacert"  # Istio's SdsCaSuffix: the companion Secret of a CA bundle
SDS_PREFIX = "kubernetes://"
# The CA bundle (the placeholder: it signed nothing) of the sockets of callers refused a
# credential's certificate (mesh/secret_access.py); no Secret's name (those have a "/").
UNAUTHORIZED_CA = SDS_PREFIX + "~unauthorized"
ORIGINATED = ("SIMPLE", "MUTUAL")
# (certificate, key) and the CA / CRL keys, generic first (Istio's order of preference).
_CERT_KEYS = (("cert", "key"), ("tls.crt", "tls.key"))
_CA_KEYS = ("cacert", "ca.crt")
_CRL_KEYS = ("crl", "ca.crl")


def certificate_name(namespace: str, name: str) -> str:
    """The SDS name of a credential's certificate (the namespace spelled out: one node Envoy
    serves every namespace)."""
    return f"{SDS_PREFIX}{namespace}/{name}"


def ca_name(namespace: str, name: str) -> str:
    """The SDS name of a credential's CA bundle."""
    return f"{SDS_PREFIX}{namespace}/{name}{CA_SUFFIX}"


def parse_secret(doc: Mapping[str, Any]) -> Credential | None:
    """The TLS material of the Secret document DOC (``data`` base64, ``stringData`` plain, as
    the API server merges them); None when it holds none. ValueError "data.<key>: ..." for data
    that is not base64."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "default")
    values = dict(_decoded(doc.get("data")))
    string_data = doc.get("stringData")
    if isinstance(string_data, Mapping):
        values |= {str(k): str(v).encode() for k, v in string_data.items()}
    cert = key = b""
    for cert_key, key_key in _CERT_KEYS:
        if values.get(cert_key) and values.get(key_key):
            cert, key = values[cert_key], values[key_key]
            break
    cacert = next((values[k] for k in _CA_KEYS if values.get(k)), b"")
    crl = next((values[k] for k in _CRL_KEYS if values.get(k)), b"")
    if not (cert or cacert):
        return None
    return Credential(namespace, name, cert, key, cacert, crl)


def _decoded(data: Any) -> Iterator[tuple[str, bytes]]:
    if not isinstance(data, Mapping):
        return
    for k, v in data.items():
        try:
            yield str(k), base64.b64decode(str(v or ""), validate=True)
        except binascii.Error:
            raise ValueError(f"data.{k}: not base64") from None


def tls_blocks(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every ``tls`` block of a DestinationRule SPEC: the rule's, its ports', its subsets' and
    their ports'."""
    policies = [spec.get("trafficPolicy")]
    for subset in spec.get("subsets") or []:
        if isinstance(subset, Mapping):
            policies.append(subset.get("trafficPolicy"))
    for policy in policies:
        if not isinstance(policy, Mapping):
            continue
        blocks = [policy.get("tls")]
        blocks += [
            p.get("tls") for p in policy.get("portLevelSettings") or [] if isinstance(p, Mapping)
        ]
        yield from (b for b in blocks if isinstance(b, Mapping))


def credential_name(tls: Mapping[str, Any]) -> str:
    """The credentialName of a tls block that originates TLS with one ("" otherwise)."""
    name = tls.get("credentialName")
    if tls.get("mode") not in ORIGINATED or not isinstance(name, str):
        return ""
    return name


def referenced(store: MeshStore, pods: Iterable[Pod]) -> set[tuple[str, str]]:
    """(namespace, credentialName) of every DestinationRule with a workloadSelector that
    selects one of PODS (this node's): the Secrets this node may need, and no others."""
    by_namespace: dict[str, list[Pod]] = {}
    for pod in pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
    wanted: set[tuple[str, str]] = set()
    for namespace, members in by_namespace.items():
        for rule in store.istio_in("DestinationRule", namespace):
            selector = rule.spec.get("workloadSelector")
            if not isinstance(selector, Mapping):
                continue
            labels = selector.get("matchLabels") or {}
            if not any(all(p.labels.get(k) == v for k, v in labels.items()) for p in members):
                continue
            for tls in tls_blocks(rule.spec):
                if name := credential_name(tls):
                    wanted.add((namespace, name))
    return wanted


def with_companions(names: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """NAMES and their ``<name>-cacert`` companions: every Secret a source must read."""
    return {n for ns, name in names for n in ((ns, name), (ns, name + CA_SUFFIX))}
