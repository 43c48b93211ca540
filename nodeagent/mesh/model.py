"""Typed records for the Kubernetes and Istio objects the node agent acts on.

Sources (directory, Kubernetes API) produce these; translation consumes them and never sees YAML.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeagent.mesh.extension_providers import ExtensionProviders
from nodeagent.mesh.tracing import MeshTracing

ALLOW_ANY, REGISTRY_ONLY = "ALLOW_ANY", "REGISTRY_ONLY"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


# A node's locality labels, in Istio's order (region/zone/subzone; pilot/pkg/serviceregistry/kube/
# controller/controller.go getPodLocality reads them from the pod's node).
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
LOCALITY_LABELS = (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)


@dataclass(frozen=True)
class Locality:
    """Where an endpoint or a proxy runs (Envoy's ``core.Locality``); all "" when unknown."""

    region: str = ""
    zone: str = ""
    sub_zone: str = ""

    @property
    def label(self) -> str:
        """Istio's "region/zone/subzone" form (trailing empty parts dropped)."""
        return "/".join((self.region, self.zone, self.sub_zone)).rstrip("/")


@dataclass(frozen=True)
class Node:
    """A Kubernetes Node; sources keep only its locality labels (nothing else is read)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def locality(self) -> Locality:
        return Locality(*(self.labels.get(label, "") for label in LOCALITY_LABELS))


@dataclass(frozen=True, slots=True)  # slots: the store holds every node's pods
class Pod:
    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    pod_ips: tuple[str, ...] = ()
    # The workload it belongs to, from its owner references (mesh/workload.py); "": itself.
    workload: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def workload_name(self) -> str:
        return self.workload or self.name


@dataclass(frozen=True)
class ServicePort:
    port: int
    name: str = ""
    target_port: int | str = 0  # 0: same as port; a string names a container port
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class EntryEndpoint:
    """One endpoint of a ServiceEntry (its ``endpoints``, or a pod or WorkloadEntry its
    ``workloadSelector`` selects): ADDRESS is an IP, or for DNS resolution a name."""

    address: str
    ports: tuple[tuple[str, int], ...] = ()  # port name -> endpoint port
    labels: tuple[tuple[str, str], ...] = ()
    network: str = ""
    locality: str = ""  # region/zone/subzone
    weight: int = 0  # 0: unset
    pod: str = ""  # namespace/name of a selected pod
    workload: str = ""  # namespace/name of a selected WorkloadEntry
    service_account: str = ""  # its workload's identity (a VM's proxy), in the entry's namespace


@dataclass(frozen=True)
class EntryPolicy:
    """What a ServiceEntry says of each of its hosts beyond a Service's fields
    (mesh/service_entries.py)."""

    entry: str  # the ServiceEntry's key, ServiceEntry/<ns>/<name>
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    addresses: tuple[str, ...] = ()  # IPs or CIDRs the host is reached at
    subject_alt_names: tuple[str, ...] = ()
    export_to: tuple[str, ...] = ()
    endpoints: tuple[EntryEndpoint, ...] = ()
    created: str = ""  # its creationTimestamp: the oldest entry wins a contested host

    @property
    def external(self) -> bool:
        return self.location != "MESH_INTERNAL"


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str = ""  # "" or "None": headless
    ports: tuple[ServicePort, ...] = ()
    selector: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    # A ServiceEntry host (mesh/service_entries.py): its name, and what the entry adds.
    host: str = ""
    entry: EntryPolicy | None = None
    # Its auto-allocated address (mesh/autoallocate.py) when the entry has no addresses: what
    # the DNS proxy answers (DNS_AUTO_ALLOCATE) and a chain of its own matches.
    allocated_ip: str = ""
    # The namespaces it is visible to (empty: every one): a ServiceEntry's exportTo, or a
    # Kubernetes Service's networking.istio.io/exportTo annotation.
    export_to: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def hostname(self, domain: str = "cluster.local") -> str:
        return self.host or f"{self.name}.{self.namespace}.svc.{domain}"


@dataclass(frozen=True)
class EndpointPort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    node_name: str = ""
    pod: str = ""  # namespace/name of the target pod, when the slice names one
    # A ServiceEntry endpoint's own labels (DestinationRule subsets select by them when it
    # names no pod), weight (0: unset) and locality.
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 0
    locality: str = ""  # region/zone/subzone, over its node's
    # A MESH_INTERNAL ServiceEntry endpoint naming no pod: the service account (in the entry's
    # namespace) it speaks mTLS as, verified as its SPIFFE ID; "": plaintext.
    service_account: str = ""


@dataclass(frozen=True)
class EndpointSlice:
    """One slice of a service's endpoints (core v1 Endpoints are converted into slices)."""

    namespace: str
    name: str
    service: str  # the owning Service's name (label kubernetes.io/service-name)
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    address_type: str = "IPv4"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str


@dataclass(frozen=True)
class Credential:
    """The TLS material of a Kubernetes Secret a DestinationRule's ``tls.credentialName`` may
    name (mesh/credentials.py reads it), PEM bytes; nothing else of the Secret is kept."""

    namespace: str
    name: str
    cert: bytes = b""  # certificate chain
    key: bytes = field(default=b"", repr=False)  # private key: never in logs
    cacert: bytes = b""  # trusted CA bundle
    crl: bytes = b""  # certificate revocation list

    @property
    def key_name(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class IstioResource:
    """An Istio object that passed validation against Istio's CRD schema for its version."""

    group: str  # networking.istio.io | security.istio.io
    version: str  # v1 | v1beta1 | v1alpha3 ...
    kind: str  # VirtualService, DestinationRule, ...
    namespace: str
    name: str
    spec: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # metadata.creationTimestamp (RFC 3339) as the API server set it, "" when the object has
    # none: where Istio lets the oldest of two conflicting objects win, this decides.
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class DefaultProviders:
    """MeshConfig ``defaultProviders``: the providers a Telemetry that names none uses
    (mesh/telemetry.py)."""

    tracing: tuple[str, ...] = ()
    # Istio's default mesh config names its built-in Prometheus provider (pkg/config/mesh
    # DefaultMeshConfig): Istio's standard metrics are on unless a mesh config says otherwise.
    metrics: tuple[str, ...] = ("prometheus",)
    access_logging: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeshConfig:
    """Mesh-wide settings (a subset of Istio's MeshConfig, same field names in the file)."""

    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    outbound_traffic_policy: str = ALLOW_ANY
    cluster_domain: str = "cluster.local"
    # localityLbSetting as JSON text (kept hashable): Istio's default enables it with no
    # distribute/failover (pkg/config/mesh/mesh.go DefaultMeshConfig).
    locality_lb_setting: str = '{"enabled": true}'
    # defaultConfig.proxyMetadata (sorted pairs, kept hashable): every proxy's ISTIO_META_*
    # settings unless a pod's proxy.istio.io/config says otherwise (mesh/proxy_metadata.py).
    proxy_metadata: tuple[tuple[str, str], ...] = ()
    # defaultConfig.gatewayTopology.numTrustedProxies: every gateway's, unless its pod's
    # proxy.istio.io/config says otherwise (mesh/gateway_topology.py).
    gateway_trusted_proxies: int = 0
    # extensionProviders: the ext_authz ones AuthorizationPolicy CUSTOM names
    # (mesh/extension_providers.py).
    extension_providers: ExtensionProviders = field(default_factory=ExtensionProviders)
    default_providers: DefaultProviders = field(default_factory=DefaultProviders)
    # accessLogFile ("": no access log, Istio's default), accessLogEncoding (TEXT or JSON),
    # accessLogFormat ("": Istio's default format): where no Telemetry configures access
    # logging (mesh/telemetry.py).
    access_log_file: str = ""
    access_log_encoding: str = "TEXT"
    access_log_format: str = ""
    # enableTracing, defaultProviders.tracing, defaultConfig.tracing (mesh/tracing.py).
    tracing: MeshTracing = field(default_factory=MeshTracing)

    @property
    def default_proxy_metadata(self) -> dict[str, str]:
        return dict(self.proxy_metadata)

    @property
    def locality_lb(self) -> Mapping[str, Any]:
        return _json_object(self.locality_lb_setting)


@functools.lru_cache(maxsize=16)
def _json_object(text: str) -> Mapping[str, Any]:
    loaded: Mapping[str, Any] = json.loads(text)
    return loaded
