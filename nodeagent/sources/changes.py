"""How a source writes to the MeshStore: one record at a time, and only when it differs.

Every put bumps the store's generation and wakes translation, so a source compares the record it
wants with the stored one and writes nothing when they are equal; both sources share this.
Records go to the store collection of the kind of the document they came from (Endpoints and
EndpointSlice documents both give EndpointSlices; every Istio kind goes to ``istio``).
"""

from __future__ import annotations

from collections.abc import Mapping

from nodeagent.mesh.model import (
    Credential,
    EndpointSlice,
    IstioResource,
    Namespace,
    Node,
    Pod,
    Service,
    ServiceAccount,
)
from nodeagent.mesh.store import MeshStore

Record = (
    Namespace | Node | Pod | Service | EndpointSlice | ServiceAccount | IstioResource | Credential
)

# Store collections in the order a batch of changes is applied: namespaces and identities before
# what refers to them, pods last (a pod's arrival wakes a CNI ADD waiting for it).
ORDER = (
    "namespaces",
    "nodes",
    "service_accounts",
    "credentials",
    "services",
    "endpoint_slices",
    "istio",
    "pods",
)
_BY_KIND = {
    "Namespace": "namespaces",
    "Node": "nodes",
    "ServiceAccount": "service_accounts",
    "Service": "services",
    "Endpoints": "endpoint_slices",
    "EndpointSlice": "endpoint_slices",
    "Pod": "pods",
    "Secret": "credentials",
}


def collection_of(kind: str) -> str:
    """The store collection records of documents of KIND go to."""
    return _BY_KIND.get(kind, "istio")


def stored(store: MeshStore, collection: str) -> Mapping[str, Record]:
    collections: dict[str, Mapping[str, Record]] = {
        "namespaces": store.namespaces,
        "nodes": store.nodes,
        "service_accounts": store.service_accounts,
        "services": store.services,
        "endpoint_slices": store.endpoint_slices,
        "istio": store.istio,
        "pods": store.pods,
        "credentials": store.credentials,
    }
    return collections[collection]


def store_key(record: Record) -> str:
    """The key of RECORD in its store collection."""
    if isinstance(record, Namespace | Node):
        return record.name
    if isinstance(record, ServiceAccount):
        return f"{record.namespace}/{record.name}"
    if isinstance(record, Credential):
        return record.key_name
    return record.key


def put(store: MeshStore, record: Record) -> None:
    if isinstance(record, Namespace):
        store.put_namespace(record)
    elif isinstance(record, Node):
        store.put_node(record)
    elif isinstance(record, Pod):
        store.put_pod(record)
    elif isinstance(record, Service):
        store.put_service(record)
    elif isinstance(record, EndpointSlice):
        store.put_endpoint_slice(record)
    elif isinstance(record, ServiceAccount):
        store.put_service_account(record)
    elif isinstance(record, Credential):
        store.put_credential(record)
    else:
        store.put_istio(record)


def delete(store: MeshStore, collection: str, key: str) -> None:
    deletes = {
        "namespaces": store.delete_namespace,
        "nodes": store.delete_node,
        "service_accounts": store.delete_service_account,
        "services": store.delete_service,
        "endpoint_slices": store.delete_endpoint_slice,
        "istio": store.delete_istio,
        "pods": store.delete_pod,
        "credentials": store.delete_credential,
    }
    deletes[collection](key)


def converge(store: MeshStore, collection: str, key: str, wanted: Record | None) -> bool:
    """Makes KEY of COLLECTION hold WANTED (None: absent); True if the store was written."""
    current = stored(store, collection).get(key)
    if wanted is None:
        if current is None:
            return False
        delete(store, collection, key)
        return True
    if current == wanted:
        return False
    put(store, wanted)
    return True
