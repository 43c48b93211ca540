"""The node's one Envoy: its bootstrap, its process, and its admin API."""

from nodeagent.envoy.admin import EnvoyAdmin, EnvoyAdminError
from nodeagent.envoy.bootstrap import bootstrap, write_bootstrap
from nodeagent.envoy.supervisor import EnvoySupervisor

__all__ = ["EnvoyAdmin", "EnvoyAdminError", "EnvoySupervisor", "bootstrap", "write_bootstrap"]
