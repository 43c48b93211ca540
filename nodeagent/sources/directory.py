"""A directory of Kubernetes YAML as the agent's source (standalone nodes and the testbed).

Every ``*.yaml``/``*.yml``/``*.json`` file may hold several documents (and ``kind: List``, as
``kubectl get -o yaml`` writes). Changes are picked up by polling (modification time, size,
inode): only the files that changed are re-read, and only their records that really changed are
put or deleted, so the store's generation moves only for real changes and a change costs the
file it is in, not the directory. A bad document is reported with file, document index, kind,
namespace/name and field; every other resource keeps working. A file that cannot be read as YAML
at all (a syntax error, or caught mid-write) keeps its last good records until it is fixed.

YAML is read as Kubernetes reads it (``nodeagent.kubeyaml``: YAML 1.2 syntax, so
``[2001:db8::]`` is a list of one address). Kinds read: Namespace, Node (its locality labels
only), Pod, Service, Endpoints (converted to EndpointSlices), EndpointSlice, ServiceAccount,
Secret (its TLS material only, for DestinationRule credentialName), and every Istio kind,
validated against Istio's CRD schemas. Other kinds (a cluster dump holds many) are skipped. The
optional mesh config file (Istio MeshConfig field names) is polled the same way; a broken one
keeps the last good config.

No RBAC here (a standalone node, or the testbed without an API server): every service account
may have the certificate of a DestinationRule credentialName (``MeshStore.secret_access`` is
not enforced; the Kubernetes source asks the API server, mesh/secret_access.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent import kubeyaml
from nodeagent.mesh import (
    extension_providers,
    gateway_topology,
    locality,
    telemetry,
    tracing,
    workload,
)
from nodeagent.mesh.credentials import parse_secret
from nodeagent.mesh.model import (
    ALLOW_ANY,
    LOCALITY_LABELS,
    REGISTRY_ONLY,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    MeshConfig,
    Namespace,
    Node,
    Pod,
    Service,
    ServiceAccount,
    ServicePort,
)
from nodeagent.mesh.proxy_metadata import ProxyMetadataError, check_booleans, metadata_mapping
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.sources import changes
from nodeagent.sources.changes import Record

log = logging.getLogger("nodeagent.sources.directory")

SUFFIXES = (".yaml", ".yml", ".json")
Key = tuple[str, str]  # (kind of the document, key of the record in the store)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TRUST_DOMAIN = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class ResourceError(ValueError):
    """A document that cannot be used; each problem says where and what."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Invalid(Exception):
    """A bad field inside a document; parse_document adds file, document and object."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> _FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


def _json_like(value: Any) -> Any:
    """Mapping keys as JSON has them: YAML's `8080:` is the key "8080" for Kubernetes too."""
    if isinstance(value, dict):
        return {_json_key(k): _json_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_like(v) for v in value]
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return "null" if key is None else str(key)


# -- field readers: each raises _Invalid naming the field -----------------------------------------


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(field, f"expected a mapping, got {_show(value)}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list, got {_show(value)}")
    return value


def _str(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_show(value)}")
    return value


def _port(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(field, f"expected a port number, got {_show(value)}")
    if not 1 <= value <= 65535:
        raise _Invalid(field, f"port {value} is out of range 1-65535")
    return int(value)


def _protocol(value: Any, field: str) -> str:
    protocol = _str(value, field) or "TCP"
    if protocol not in PROTOCOLS:
        raise _Invalid(field, f"unsupported protocol {_show(protocol)}; one of {PROTOCOLS}")
    return protocol


def _string_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Invalid(field, "expected a mapping of strings")
    return {k: str(v) for k, v in value.items()}


def _name(meta: Mapping[str, Any], field: str) -> str:
    value = meta.get(field)
    if not isinstance(value, str) or not value:
        raise _Invalid(f"metadata.{field}", "required string is missing")
    return value


def _namespace(meta: Mapping[str, Any]) -> str:
    return _str(meta.get("namespace"), "metadata.namespace") or "default"


def _address(value: Any, field: str, address_type: str) -> str:
    address = _str(value, field)
    if not address:
        raise _Invalid(field, "required address is missing")
    if address_type == "FQDN":
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _Invalid(field, f"{_show(address)} is not an IP address") from None
    if address_type and f"IPv{ip.version}" != address_type:
        raise _Invalid(field, f"{address} is not an {address_type} address")
    return address


def _target_pod(value: Any, field: str, namespace: str) -> str:
    """namespace/name of the pod an endpoint's targetRef names ("" if none or not a pod)."""
    ref = _mapping(value, field)
    if _str(ref.get("kind"), f"{field}.kind") not in ("", "Pod"):
        return ""
    name = _str(ref.get("name"), f"{field}.name")
    ns = _str(ref.get("namespace"), f"{field}.namespace") or namespace
    return f"{ns}/{name}" if name else ""


# -- documents to records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A record and the kind of the document it came from (Endpoints and EndpointSlice documents
    both give EndpointSlices; slices of the real kind win)."""

    kind: str
    record: Record

    @property
    def key(self) -> Key:
        return (self.kind, changes.store_key(self.record))


def _brief(value: Any, absent: str) -> str:
    """A kind, namespace or name as a message shows it: short, whatever the document holds."""
    if value is None or value == "":
        return absent
    text = value if isinstance(value, str) else _show(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(source: str, position: str, doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = _brief(meta.get("name"), "<unnamed>")
    kind = _brief(doc.get("kind"), "<no kind>")
    if meta.get("namespace"):
        name = f"{_brief(meta['namespace'], '')}/{name}"
    elif kind not in _CLUSTER_SCOPED:  # namespaced kinds land in "default", as with kubectl apply
        name = f"default/{name}"
    return f"{source}: {position}: {kind} {name}"


def parse_document(
    doc: Any, source: str, index: int, schemas: IstioSchemas | None = None
) -> list[Parsed]:
    """One YAML document to records; [] for kinds this source does not read."""
    return _parse(doc, source, f"document {index}", schemas or IstioSchemas.load())


def _parse(doc: Any, source: str, position: str, schemas: IstioSchemas) -> list[Parsed]:
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ResourceError(f"{source}: {position}: expected a mapping")
    where = _where(source, position, doc)
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not (isinstance(api, str) and api and isinstance(kind, str) and kind):
        field, value = ("kind", kind) if isinstance(api, str) and api else ("apiVersion", api)
        raise ResourceError(f"{where}: {field}: expected a non-empty string, got {_show(value)}")
    if (api, kind) == ("v1", "List"):
        raise ResourceError(f"{where}: items: expected a list of objects")
    if api.rpartition("/")[0] in schemas.groups():
        return [Parsed(kind, _istio(doc, where, schemas))]
    reader = _READERS.get((api, kind))
    if reader is None:
        log.debug("%s: %s is not read by this source", where, api)
        return []
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ResourceError(f"{where}: metadata: required mapping is missing")
    try:
        return [Parsed(kind, record) for record in reader(doc, meta)]
    except _Invalid as e:
        raise ResourceError(f"{where}: {e}") from None


def _istio(doc: dict[str, Any], where: str, schemas: IstioSchemas) -> IstioResource:
    admitted, problems = schemas.admit(doc)
    if problems:
        raise ResourceError(*(f"{where}: {p}" for p in problems))
    group, _, version = str(doc["apiVersion"]).rpartition("/")
    meta = admitted["metadata"]
    return IstioResource(
        group=group,
        version=version,
        kind=str(doc["kind"]),
        namespace=meta.get("namespace") or "default",
        name=meta["name"],
        spec=admitted.get("spec") or {},
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        created=str(meta.get("creationTimestamp") or ""),
    )


def _namespace_record(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    yield Namespace(_name(meta, "name"), _string_map(meta.get("labels"), "metadata.labels"))


def _node(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    """Only the locality labels are kept: a change of any other label (or of the status,
    heartbeats every few seconds) writes nothing to the store."""
    labels = _string_map(meta.get("labels"), "metadata.labels")
    yield Node(_name(meta, "name"), {k: labels[k] for k in LOCALITY_LABELS if k in labels})


def _pod(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    spec = _mapping(doc.get("spec"), "spec")
    status = _mapping(doc.get("status"), "status")
    ips = [
        str(i.get("ip"))
        for i in _list(status.get("podIPs"), "status.podIPs")
        if isinstance(i, dict) and i.get("ip")
    ]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    labels = _string_map(meta.get("labels"), "metadata.labels")
    yield Pod(
        namespace=_namespace(meta),
        name=_name(meta, "name"),
        uid=str(meta.get("uid") or ""),
        node_name=str(spec.get("nodeName") or ""),
        service_account=str(spec.get("serviceAccountName") or "default"),
        labels=labels,
        annotations=_string_map(meta.get("annotations"), "metadata.annotations"),
        host_network=bool(spec.get("hostNetwork", False)),
        pod_ips=tuple(ips),
        workload=_workload(meta, labels),
    )


def _workload(meta: dict[str, Any], labels: Mapping[str, str]) -> str:
    """The pod's workload (mesh/workload.py), "" when that is the pod itself."""
    owners = []
    for i, item in enumerate(_list(meta.get("ownerReferences"), "metadata.ownerReferences")):
        ref = _mapping(item, f"metadata.ownerReferences[{i}]")
        owners.append(
            workload.Owner(
                kind=_str(ref.get("kind"), f"metadata.ownerReferences[{i}].kind"),
                name=_str(ref.get("name"), f"metadata.ownerReferences[{i}].name"),
                controller=ref.get("controller") is True,
            )
        )
    name = _name(meta, "name")
    generate_name = _str(meta.get("generateName"), "metadata.generateName")
    derived = workload.workload_name(name, generate_name, labels, owners)
    return "" if derived == name else derived


def _service(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    spec = _mapping(doc.get("spec"), "spec")
    ports = []
    for i, item in enumerate(_list(spec.get("ports"), "spec.ports")):
        field = f"spec.ports[{i}]"
        port = _mapping(item, field)
        ports.append(
            ServicePort(
                port=_port(port.get("port"), f"{field}.port"),
                name=_str(port.get("name"), f"{field}.name"),
                target_port=_target_port(port.get("targetPort"), f"{field}.targetPort"),
                protocol=_protocol(port.get("protocol"), f"{field}.protocol"),
                app_protocol=_str(port.get("appProtocol"), f"{field}.appProtocol"),
            )
        )
    yield Service(
        namespace=_namespace(meta),
        name=_name(meta, "name"),
        cluster_ip=_str(spec.get("clusterIP"), "spec.clusterIP"),
        ports=tuple(ports),
        selector=_string_map(spec.get("selector"), "spec.selector"),
        labels=_string_map(meta.get("labels"), "metadata.labels"),
        export_to=_export_to(meta),
    )


EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"


def _export_to(meta: dict[str, Any]) -> tuple[str, ...]:
    """A Service's ``networking.istio.io/exportTo`` annotation: namespaces separated by commas
    (``.``, ``*``, ``~`` as in an exportTo list; istio.io/latest/docs/reference/config/
    annotations/#NetworkingExportTo, split and trimmed as istio/istio pilot/pkg/
    serviceregistry/kube/conversion.go does)."""
    annotations = _string_map(meta.get("annotations"), "metadata.annotations")
    raw = annotations.get(EXPORT_TO_ANNOTATION, "")
    return tuple(ns.strip() for ns in raw.split(",") if ns.strip())


def _target_port(value: Any, field: str) -> int | str:
    if value is None:
        return 0
    if isinstance(value, str):
        # a container port's name (IANA_SVC_NAME); Kubernetes rejects "8080" as a string too
        if len(value) > 15 or not _DNS_LABEL.match(value) or not re.search("[a-z]", value):
            raise _Invalid(field, f"{_show(value)} is neither a port number nor a port name")
        return value
    return _port(value, field)


def _endpoints(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    """Core v1 Endpoints as slices: one per (ports, address family), as the mirroring controller
    splits them; the first is named like the Endpoints, further ones get a -N suffix."""
    namespace, name = _namespace(meta), _name(meta, "name")
    groups: dict[tuple[tuple[EndpointPort, ...], str], list[Endpoint]] = {}
    for i, item in enumerate(_list(doc.get("subsets"), "subsets")):
        field = f"subsets[{i}]"
        subset = _mapping(item, field)
        ports = tuple(
            _endpoint_port(p, f"{field}.ports[{j}]", required=True)
            for j, p in enumerate(_list(subset.get("ports"), f"{field}.ports"))
        )
        for list_name, ready in (("addresses", True), ("notReadyAddresses", False)):
            addresses = _list(subset.get(list_name), f"{field}.{list_name}")
            for j, entry in enumerate(addresses):
                at = f"{field}.{list_name}[{j}]"
                address = _mapping(entry, at)
                ip = _address(address.get("ip"), f"{at}.ip", "")
                family = f"IPv{ipaddress.ip_address(ip).version}"
                groups.setdefault((ports, family), []).append(
                    Endpoint(
                        addresses=(ip,),
                        ready=ready,
                        node_name=_str(address.get("nodeName"), f"{at}.nodeName"),
                        pod=_target_pod(address.get("targetRef"), f"{at}.targetRef", namespace),
                    )
                )
    if not groups:
        yield EndpointSlice(namespace, name, service=name)
    for n, ((ports, family), endpoints) in enumerate(groups.items()):
        yield EndpointSlice(
            namespace=namespace,
            name=name if n == 0 else f"{name}-{n}",
            service=name,
            endpoints=tuple(endpoints),
            ports=ports,
            address_type=family,
        )


def _endpoint_port(value: Any, field: str, required: bool) -> EndpointPort:
    port = _mapping(value, field)
    number = port.get("port")
    return EndpointPort(
        # an EndpointSlice port without a number means "all ports": 0 here
        port=0 if number is None and not required else _port(number, f"{field}.port"),
        name=_str(port.get("name"), f"{field}.name"),
        protocol=_protocol(port.get("protocol"), f"{field}.protocol"),
        app_protocol=_str(port.get("appProtocol"), f"{field}.appProtocol"),
    )


def _endpoint_slice(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    namespace = _namespace(meta)
    labels = _string_map(meta.get("labels"), "metadata.labels")
    address_type = doc.get("addressType")
    if address_type not in ADDRESS_TYPES:
        raise _Invalid("addressType", f"expected one of {ADDRESS_TYPES}, got {_show(address_type)}")
    endpoints = []
    for i, item in enumerate(_list(doc.get("endpoints"), "endpoints")):
        field = f"endpoints[{i}]"
        endpoint = _mapping(item, field)
        addresses = _list(endpoint.get("addresses"), f"{field}.addresses")
        if not addresses:
            raise _Invalid(f"{field}.addresses", "at least one address is required")
        conditions = _mapping(endpoint.get("conditions"), f"{field}.conditions")
        ready = conditions.get("ready")
        if ready is not None and not isinstance(ready, bool):
            raise _Invalid(f"{field}.conditions.ready", f"expected a boolean, got {_show(ready)}")
        endpoints.append(
            Endpoint(
                addresses=tuple(
                    _address(a, f"{field}.addresses[{j}]", address_type)
                    for j, a in enumerate(addresses)
                ),
                ready=ready is not False,  # absent: unknown, to be treated as ready
                node_name=_str(endpoint.get("nodeName"), f"{field}.nodeName"),
                pod=_target_pod(endpoint.get("targetRef"), f"{field}.targetRef", namespace),
            )
        )
    yield EndpointSlice(
        namespace=namespace,
        name=_name(meta, "name"),
        service=labels.get(SERVICE_NAME_LABEL, ""),
        endpoints=tuple(endpoints),
        ports=tuple(
            _endpoint_port(p, f"ports[{j}]", required=False)
            for j, p in enumerate(_list(doc.get("ports"), "ports"))
        ),
        address_type=address_type,
    )


def _service_account(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    yield ServiceAccount(_namespace(meta), _name(meta, "name"))


def _secret(doc: dict[str, Any], meta: dict[str, Any]) -> Iterator[Record]:
    """Only a Secret's TLS material is kept (mesh/credentials.py), and only when it has some."""
    _name(meta, "name")
    try:
        credential = parse_secret(doc)
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        raise _Invalid(field, problem) from None
    if credential is not None:
        yield credential


_READERS: dict[tuple[str, str], Callable[[dict[str, Any], dict[str, Any]], Iterator[Record]]] = {
    ("v1", "Namespace"): _namespace_record,
    ("v1", "Node"): _node,
    ("v1", "Pod"): _pod,
    ("v1", "Service"): _service,
    ("v1", "Endpoints"): _endpoints,
    ("v1", "ServiceAccount"): _service_account,
    ("v1", "Secret"): _secret,
    ("discovery.k8s.io/v1", "EndpointSlice"): _endpoint_slice,
}


# -- the mesh config file ------------------------------------------------------------------------

MESH_CONFIG_FIELDS = (
    "trustDomain",
    "rootNamespace",
    "outboundTrafficPolicy",
    "clusterDomain",
    "localityLbSetting",
    "defaultConfig",
    "extensionProviders",
    *telemetry.MESH_FIELDS,
    "enableTracing",
)
# Of Istio's ProxyConfig, the ones read here.
DEFAULT_CONFIG_FIELDS = ("proxyMetadata", gateway_topology.FIELD, "tracing")


def parse_mesh_config(data: Any) -> MeshConfig:
    """Istio MeshConfig fields (plus our clusterDomain); unset fields keep their defaults."""
    if data is None:
        return MeshConfig()
    if not isinstance(data, dict):
        raise ResourceError(f"expected a mapping of MeshConfig fields, got {_show(data)}")
    problems = [
        f'unknown field "{key}" (known: {", ".join(MESH_CONFIG_FIELDS)})'
        for key in data
        if key not in MESH_CONFIG_FIELDS
    ]
    defaults = MeshConfig()
    values: dict[str, Any] = {}
    checks = (
        ("trustDomain", "trust_domain", _TRUST_DOMAIN, 255, defaults.trust_domain),
        ("rootNamespace", "root_namespace", _DNS_LABEL, 63, defaults.root_namespace),
        ("clusterDomain", "cluster_domain", _DNS_NAME, 253, defaults.cluster_domain),
    )
    for field, attr, pattern, limit, default in checks:
        value = data.get(field, default)
        if not isinstance(value, str) or len(value) > limit or not pattern.match(value):
            problems.append(f"{field}: invalid value {_show(value)}")
        values[attr] = value
    policy = data.get("outboundTrafficPolicy")
    mode = defaults.outbound_traffic_policy
    if isinstance(policy, dict):
        problems += [
            f'unknown field "outboundTrafficPolicy.{key}" (known: mode)'
            for key in policy
            if key != "mode"
        ]
        mode = policy.get("mode", mode)
        if mode not in (ALLOW_ANY, REGISTRY_ONLY):
            problems.append(
                f"outboundTrafficPolicy.mode: unsupported value {_show(mode)}; "
                f"one of {ALLOW_ANY}, {REGISTRY_ONLY}"
            )
    elif policy is not None:
        problems.append(f"outboundTrafficPolicy: expected a mapping, got {_show(policy)}")
    balancing = data.get("localityLbSetting")
    if balancing is not None:
        if not isinstance(balancing, dict):
            problems.append(f"localityLbSetting: expected a mapping, got {_show(balancing)}")
        else:
            try:
                locality.check(balancing, "localityLbSetting")
            except ValueError as e:
                problems.append(str(e))
            values["locality_lb_setting"] = json.dumps(_json_like(balancing), sort_keys=True)
    metadata: tuple[tuple[str, str], ...] = ()
    trusted_proxies = 0
    default_config = data.get("defaultConfig")
    if isinstance(default_config, dict):
        problems += [
            f'unknown field "defaultConfig.{key}" (known: {", ".join(DEFAULT_CONFIG_FIELDS)})'
            for key in default_config
            if key not in DEFAULT_CONFIG_FIELDS
        ]
        try:
            found = metadata_mapping(
                default_config.get("proxyMetadata"), "defaultConfig.proxyMetadata"
            )
        except ProxyMetadataError as e:
            problems.append(str(e))
        else:
            problems += check_booleans(found, "defaultConfig.proxyMetadata")
            metadata = tuple(sorted(found.items()))
        try:
            topology = default_config.get(gateway_topology.FIELD)
            where = f"defaultConfig.{gateway_topology.FIELD}"
            hops = gateway_topology.trusted_proxies(topology, where)
        except ValueError as e:
            problems.append(str(e))
        else:
            trusted_proxies = hops or 0
    elif default_config is not None:
        problems.append(f"defaultConfig: expected a mapping, got {_show(default_config)}")
    providers = extension_providers.ExtensionProviders()
    try:
        providers = extension_providers.parse(data.get("extensionProviders"), env=os.environ)
    except extension_providers.ProviderError as e:
        problems += str(e).split("\n")
    mesh_tracing = tracing.MeshTracing()
    try:
        mesh_tracing = tracing.parse_mesh(data, os.environ)
    except tracing.TracingError as e:
        problems += str(e).split("\n")
    telemetry_values, telemetry_problems = telemetry.mesh_settings(data)
    problems += telemetry_problems
    values.update(telemetry_values)
    if problems:
        raise ResourceError(*problems)
    return MeshConfig(
        outbound_traffic_policy=str(mode),
        proxy_metadata=metadata,
        gateway_trusted_proxies=trusted_proxies,
        extension_providers=providers,
        tracing=mesh_tracing,
        **values,
    )


# -- the source ----------------------------------------------------------------------------------


class DirectorySource:
    """Polls ROOT and applies what changed to the store, file by file.

    Each pass stats every file; only files whose stamp (mtime, size, inode) moved are re-read,
    and only the records whose wanted value differs from the stored one are written: editing one
    file among thousands costs that file's parse and its changed records.

    When several files hold the same resource, the one whose path sorts last wins (as a merge of
    the files in path order would). An EndpointSlice document wins over an Endpoints one with
    the same store key, and, as kube-proxy does with a cluster dump holding both, a service
    with any EndpointSlice document ignores the slices converted from its Endpoints.
    """

    def __init__(
        self,
        root: Path,
        store: MeshStore,
        mesh_config_path: Path | None = None,
        interval: float = 0.2,
        schemas: IstioSchemas | None = None,
    ) -> None:
        self.root = root
        self.store = store
        self.mesh_config_path = mesh_config_path
        self.interval = interval
        self.schemas = schemas or IstioSchemas.load()
        self.errors: dict[Path, list[str]] = {}  # current problems, per file
        self._stamps: dict[Path, _FileStamp] = {}
        self._records: dict[Path, dict[Key, Record]] = {}
        self._holders: dict[Key, list[Path]] = {}  # files holding a key, in path order
        # (namespace, service) -> store keys of the slices its documents of each kind give.
        self._sliced: dict[tuple[str, str], set[str]] = {}
        self._mirrored: dict[tuple[str, str], set[str]] = {}
        self._service_of: dict[Key, tuple[str, str]] = {}  # slice keys -> their service
        self.mesh_config = MeshConfigFile(mesh_config_path, store) if mesh_config_path else None

    def scan(self) -> bool:
        """One pass over the directory; applies what changed. True if any file or the mesh
        config did."""
        current = self._list_files()
        changed = False
        touched: set[Key] = set()
        for path in [p for p in self._stamps if p not in current]:
            del self._stamps[path]
            self.errors.pop(path, None)
            touched |= self._replace(path, {})
            changed = True
        for path, stamp in current.items():
            if self._stamps.get(path) != stamp:
                self._stamps[path] = stamp
                changed = True
                records = self._read(path)
                if records is not None:
                    touched |= self._replace(path, records)
        self._apply(touched)
        mesh_changed = self.mesh_config.scan() if self.mesh_config else False
        if self.mesh_config:
            self._mesh_errors()
        return mesh_changed or changed

    def _mesh_errors(self) -> None:
        # The mesh config's problems are reported with the directory's, by file.
        assert self.mesh_config is not None
        path = self.mesh_config.path
        if path in self.mesh_config.errors:
            self.errors[path] = self.mesh_config.errors[path]
        else:
            self.errors.pop(path, None)

    async def run(self, stop: asyncio.Event) -> None:
        self.scan()
        self.store.synced.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            self.scan()

    def _list_files(self) -> dict[Path, _FileStamp]:
        files: dict[Path, _FileStamp] = {}
        self._walk(self.root, files)
        return files

    def _walk(self, directory: Path, files: dict[Path, _FileStamp]) -> None:
        """Adds the stamps of DIRECTORY's resource files to FILES, subdirectories included.

        Runs every interval over every file: one scandir per directory and one stat per file
        (not followed into symlinked directories; a symlinked file's stamp is its target's,
        so a ConfigMap volume's swap of ..data shows as a change)."""
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError:
            return
        for entry in entries:
            # Hidden paths hold editor droppings and a mounted ConfigMap's ..data copies.
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            if entry.is_dir(follow_symlinks=False):
                self._walk(path, files)
            elif entry.name.endswith(SUFFIXES) and not self._is_mesh_config(path):
                try:
                    st = entry.stat()
                except OSError:
                    continue  # gone meanwhile, or a dangling symlink
                if stat.S_ISREG(st.st_mode):
                    files[path] = _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)

    def _is_mesh_config(self, path: Path) -> bool:
        mesh = self.mesh_config_path
        return mesh is not None and path.name == mesh.name and path.resolve() == mesh.resolve()

    def _read(self, path: Path) -> dict[Key, Record] | None:
        """The records of PATH's good documents; None if it cannot be read as YAML at all (a
        file caught mid-write, or a syntax error): its last good records stay."""
        records: dict[Key, Record] = {}
        problems: list[str] = []
        try:
            docs = [_json_like(d) for d in kubeyaml.load_all(path.read_text())]
        except (OSError, UnicodeDecodeError, kubeyaml.YAMLError) as e:
            kept = " (keeping its last good resources)" if path in self._records else ""
            problems.append(f"{path}: cannot be read as YAML: {e}{kept}")
            docs = None
        for position, doc in _positions(docs or []):
            try:
                parsed = _parse(doc, str(path), position, self.schemas)
            except ResourceError as e:
                problems.extend(e.problems)
                continue
            records.update((p.key, p.record) for p in parsed)
        for problem in problems:
            log.error("%s", problem)
        if problems:
            self.errors[path] = problems
        else:
            self.errors.pop(path, None)
        return None if docs is None else records

    def _replace(self, path: Path, records: dict[Key, Record]) -> set[Key]:
        """Makes RECORDS the records of PATH; the keys whose record in PATH changed."""
        old = self._records.pop(path, {})
        if records:
            self._records[path] = records
        for key in old.keys() - records.keys():
            holders = self._holders[key]
            holders.remove(path)
            if not holders:
                del self._holders[key]
        for key in records.keys() - old.keys():
            bisect.insort(self._holders.setdefault(key, []), path)
        return {k for k in old.keys() | records.keys() if old.get(k) != records.get(k)}

    def file_of(self, kind: str, key: str) -> Path | None:
        """The file the store's record of KIND (a document's kind) and store KEY came from:
        of the files holding it, the one that wins (None: no file holds it)."""
        holders = self._holders.get((kind, key))
        return holders[-1] if holders else None

    def _winner(self, key: Key) -> Record | None:
        holders = self._holders.get(key)
        return self._records[holders[-1]][key] if holders else None

    def _apply(self, touched: set[Key]) -> None:
        """Writes to the store what the TOUCHED keys now want, and nothing else."""
        flipped = self._index_slices([k for k in touched if k[0] in _SLICE_KINDS])
        slots = {(_slot_kind(kind), key) for kind, key in touched}
        for service in flipped:  # the service's Endpoints-made slices now count, or no longer
            slots |= {("EndpointSlice", key) for key in self._mirrored.get(service, ())}
        by_collection: dict[str, list[Key]] = {}
        for slot in slots:
            by_collection.setdefault(changes.collection_of(slot[0]), []).append(slot)
        for collection in changes.ORDER:
            for slot in sorted(by_collection.get(collection, ())):
                changes.converge(self.store, collection, slot[1], self._wanted(slot))

    def _index_slices(self, keys: list[Key]) -> set[tuple[str, str]]:
        """Updates which services have slices of each kind; the services that gained their
        first EndpointSlice document or lost their last."""
        before: dict[tuple[str, str], bool] = {}
        for key in keys:
            index = self._sliced if key[0] == "EndpointSlice" else self._mirrored
            old = self._service_of.pop(key, None)
            record = self._winner(key)
            new = (record.namespace, record.service) if isinstance(record, EndpointSlice) else None
            for service in (old, new):
                if service is not None and service not in before:
                    before[service] = bool(self._sliced.get(service))
            if old is not None:
                index[old].discard(key[1])
                if not index[old]:
                    del index[old]
            if new is not None:
                self._service_of[key] = new
                index.setdefault(new, set()).add(key[1])
        return {s for s, was in before.items() if bool(self._sliced.get(s)) != was}

    def _wanted(self, slot: Key) -> Record | None:
        """The record the store should hold for SLOT (None: none)."""
        if slot[0] != "EndpointSlice":
            return self._winner(slot)
        sliced = self._winner(slot)
        if sliced is not None:
            return sliced
        mirrored = self._winner(("Endpoints", slot[1]))
        if isinstance(mirrored, EndpointSlice) and not self._sliced.get(
            (mirrored.namespace, mirrored.service)
        ):
            return mirrored
        return None


_SLICE_KINDS = ("EndpointSlice", "Endpoints")
_CLUSTER_SCOPED = ("Namespace", "Node")


def _slot_kind(kind: str) -> str:
    """Documents of both slice kinds fill one store slot per key."""
    return "EndpointSlice" if kind in _SLICE_KINDS else kind


class MeshConfigFile:
    """The mesh config file (Istio MeshConfig field names): re-read when it changes.

    Used by every source; a broken file keeps the last good config and reports why.
    """

    def __init__(self, path: Path, store: MeshStore) -> None:
        self.path = path
        self.store = store
        self.errors: dict[Path, list[str]] = {}
        self._stamp: _FileStamp | None = None
        self._read = False

    def scan(self) -> bool:
        """Re-reads the mesh config file when it changed; True if the store's config changed."""
        path = self.path
        stamp = _stamp(path)
        if self._read and stamp == self._stamp:
            return False
        self._read, self._stamp = True, stamp
        try:
            if stamp is None:
                raise ResourceError("does not exist")
            docs = [_json_like(d) for d in kubeyaml.load_all(path.read_text())]
            if len(docs) > 1:
                raise ResourceError("expected one YAML document")
            config = parse_mesh_config(docs[0] if docs else None)
        except (OSError, UnicodeDecodeError, kubeyaml.YAMLError) as e:
            problems = [f"{path}: cannot be read as YAML: {e}"]
        except ResourceError as e:
            problems = [f"{path}: {p}" for p in e.problems]
        else:
            self.errors.pop(path, None)
            before = self.store.generation
            self.store.set_mesh_config(config)
            return self.store.generation != before
        for problem in problems:
            log.error("%s (keeping the last good mesh config)", problem)
        self.errors[path] = problems
        return False

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            self.scan()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _positions(docs: list[Any]) -> Iterator[tuple[str, Any]]:
    """Each document with its position; the items of a `kind: List` count as documents."""
    for index, doc in enumerate(docs):
        items = doc.get("items") if isinstance(doc, dict) else None
        if isinstance(items, list) and (doc.get("apiVersion"), doc.get("kind")) == ("v1", "List"):
            for i, item in enumerate(items):
                yield f"document {index} items[{i}]", item
        else:
            yield f"document {index}", doc
