"""A client for the node Envoy's admin API (blocking, stdlib only: call it from a thread).

The node Envoy's admin listens on a UNIX socket in the agent's run directory (mode 0600 in a 0700
directory): only root on the node reaches it, never a host-network pod over TCP (admin can
``POST /quitquitquit``). A TCP address remains for the sidecar model, whose Envoys keep Istio's
in-pod 127.0.0.1:15000.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from nodeagent.ports import ENVOY_ADMIN_PORT


class EnvoyAdminError(RuntimeError):
    """The admin API could not be reached, or answered with an error."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a UNIX stream socket (Envoy's ``admin.address.pipe``)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class EnvoyAdmin:
    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = ENVOY_ADMIN_PORT,
        timeout: float = 2.0,
    ) -> None:
        """SOCKET_PATH: the admin's UNIX socket (the node Envoy); else HOST:PORT over TCP."""
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.timeout = timeout

    @property
    def address(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"{self.host}:{self.port}"

    def ready(self) -> bool:
        """True once Envoy is LIVE (its init is done and its listeners accept connections)."""
        try:
            status, body = self._request("GET", "/ready")
        except EnvoyAdminError:
            return False  # not started yet, or gone: a probe answers, it does not raise
        return status == 200 and body.strip() == "LIVE"

    def server_state(self) -> str:
        """Envoy's server state from /ready: LIVE (200), or PRE_INITIALIZING, INITIALIZING,
        DRAINING (503). A few bytes, unlike /server_info. Raises when nothing answers."""
        status, body = self._request("GET", "/ready")
        state = body.strip()
        if status not in (200, 503) or not state.replace("_", "").isalpha():
            raise EnvoyAdminError(
                f"Envoy admin {self.address}/ready: unexpected answer {status}: {body[:100]!r}"
            )
        return state

    def server_info(self) -> dict[str, Any]:
        return self._json("/server_info")

    def config_dump(self, resource: str | None = None, include_eds: bool = False) -> dict[str, Any]:
        """``resource`` selects one kind, e.g. "dynamic_active_clusters"; EDS only on request,
        as it is the bulk of a node's config."""
        query: dict[str, str] = {}
        if resource:
            query["resource"] = resource
        if include_eds:
            query["include_eds"] = ""
        return self._json("/config_dump", query)

    def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges by name; ``filter`` is Envoy's regex on the stat name."""
        query = {"format": "json"}
        if filter:
            query["filter"] = filter
        dump = self._json("/stats", query)
        values: dict[str, int] = {}
        for entry in dump.get("stats", []):
            value = entry.get("value")
            # Histograms come as one {"histograms": ...} entry, text readouts as strings.
            if "name" in entry and isinstance(value, int) and not isinstance(value, bool):
                values[entry["name"]] = value
        return values

    def clusters_json(self) -> dict[str, Any]:
        """``/clusters?format=json``: each cluster's endpoints and their health."""
        return self._json("/clusters", {"format": "json"})

    def prometheus(self, query: str = "", timeout: float | None = None) -> str:
        """``/stats/prometheus`` (QUERY: Envoy's own, e.g. ``usedonly``), waiting up to TIMEOUT
        seconds per read instead of this client's."""
        path = f"/stats/prometheus?{query}" if query else "/stats/prometheus"
        return self._checked("GET", path, timeout)

    def post(self, path: str) -> str:
        """A mutating endpoint (/quitquitquit, /drain_listeners, /healthcheck/fail...)."""
        return self._checked("POST", path)

    def _json(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        full = f"{path}?{urlencode(query)}" if query else path
        body = self._checked("GET", full)
        try:
            answer = json.loads(body)
        except ValueError as exc:
            raise EnvoyAdminError(f"Envoy admin {self.address}{full}: not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise EnvoyAdminError(f"Envoy admin {self.address}{full}: expected a JSON object")
        return answer

    def _checked(self, method: str, path: str, timeout: float | None = None) -> str:
        status, body = self._request(method, path, timeout)
        if not 200 <= status < 300:
            raise EnvoyAdminError(
                f"Envoy admin {self.address}{path}: {method} answered {status}: {body[:200]}"
            )
        return body

    def _request(self, method: str, path: str, timeout: float | None = None) -> tuple[int, str]:
        if not path.startswith("/"):
            raise ValueError(f"admin path must start with '/': {path!r}")
        wait = self.timeout if timeout is None else timeout
        conn = (
            _UnixConnection(self.socket_path, wait)
            if self.socket_path is not None
            else http.client.HTTPConnection(self.host, self.port, timeout=wait)
        )
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            raise EnvoyAdminError(
                f"Envoy admin {self.address}{path}: {method} failed: {exc}; is Envoy running "
                f"with its admin on {self.address}?"
            ) from exc
        finally:
            conn.close()
