"""The root bundle, published for everyone: ConfigMap ``nodeagent-ca-root``, key
``root-cert.pem`` (istiod's ``istio-ca-root-cert``), which node agents mount to trust the CA."""

from __future__ import annotations

import logging

from nodeagent.caservice.kubeapi import ClusterAPI, Conflict, NotFound
from nodeagent.identity.ca import ROOT_CERT

log = logging.getLogger("nodeagent.caservice.rootcert")

ROOT_CONFIGMAP = "nodeagent-ca-root"


async def publish_root(api: ClusterAPI, namespace: str, root_pem: bytes) -> bool:
    """Create or update the ConfigMap to hold ROOT_PEM; True when it changed. A concurrent
    writer's Conflict is left for the next call (the caller publishes periodically)."""
    bundle = root_pem.decode()
    try:
        config_map = await api.read("configmaps", namespace, ROOT_CONFIGMAP)
    except NotFound:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace},
            "data": {ROOT_CERT: bundle},
        }
        try:
            await api.create("configmaps", namespace, body)
        except Conflict:
            return False  # another replica published; checked again next time
        log.info("published the root bundle in ConfigMap %s/%s", namespace, ROOT_CONFIGMAP)
        return True
    data = config_map.get("data") or {}
    if data.get(ROOT_CERT) == bundle:
        return False
    config_map["data"] = {**data, ROOT_CERT: bundle}
    try:
        await api.replace("configmaps", namespace, ROOT_CONFIGMAP, config_map)
    except Conflict:
        return False
    log.info("updated the root bundle in ConfigMap %s/%s", namespace, ROOT_CONFIGMAP)
    return True
