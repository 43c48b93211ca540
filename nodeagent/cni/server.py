"""The agent's end of the CNI plugin's socket: a root-only UNIX socket served with asyncio.

Each connection carries one request (see ``wire``). A malformed request gets an answer saying
what was wrong; it never affects other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nodeagent.cni import inputs, wire
from nodeagent.metrics import AgentMetrics
from nodeagent.redirect.manager import CaptureManager

log = logging.getLogger("nodeagent.cni.server")
READ_TIMEOUT = 10.0


class CniServer:
    def __init__(
        self,
        path: Path,
        manager: CaptureManager,
        metrics: AgentMetrics,
        extra: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] | None = None,
    ) -> None:
        self.path = path
        self.manager = manager
        self.metrics = metrics
        self.extra = extra or {}  # operator commands (PROXY_STATUS, ...) on the same socket
        self.ready = False  # answered in STATUS; set by the agent once its first reconcile ran
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        if self.path.is_socket():
            self.path.unlink()  # left by a previous agent; nobody is listening on it any more
        old_umask = os.umask(0o177)  # the socket is born 0600: root-only from the first moment
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=wire.MAX_MESSAGE
            )
        finally:
            os.umask(old_umask)
        log.info("CNI socket listening at %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = "?"
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            request = wire.decode(line)
            command = str(request.get("command", "?"))
            answer = await self.dispatch(request)
        except (wire.ProtocolError, ValueError) as e:
            answer = {"ok": False, "reason": f"malformed request: {e}"}
        except TimeoutError:
            answer = {"ok": False, "reason": "no request received"}
        except Exception as e:  # one bad request must never take the server down
            log.exception("request %s failed", command)
            answer = {"ok": False, "reason": f"internal error: {e}"}
        self.metrics.cni_requests.labels(command, "ok" if answer.get("ok") else "error").inc()
        try:
            writer.write(wire.encode(answer))
            await writer.drain()
        except ConnectionError:
            log.warning("plugin went away before the %s answer", command)
        finally:
            writer.close()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        pod = request.get("pod") if isinstance(request.get("pod"), dict) else {}
        assert isinstance(pod, dict)
        if command == "ADD":
            timeout = request.get("timeout", 30.0)
            if not isinstance(timeout, int | float) or isinstance(timeout, bool):
                raise ValueError("timeout must be a number")
            problem = inputs.add_problem(pod)
            if problem:
                log.warning("ADD refused: %s", problem)
                return {"ok": False, "reason": problem}
            return await self.manager.add(pod, float(timeout))
        if command == "DEL":
            return await self.manager.delete(pod)
        if command == "CHECK":
            return await self.manager.check(pod)
        if command == "GC":
            ids = request.get("validContainerIds")
            if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
                raise ValueError("GC needs validContainerIds: a list of non-empty strings")
            network = request.get("network", "")
            if not isinstance(network, str):
                raise ValueError("GC network must be a string")
            return await self.manager.gc(ids, network)
        if command == "STATUS":
            if not self.ready:
                return {"ok": False, "reason": "the node agent is starting"}
            return {"ok": True, "pods": self.manager.status()}
        if isinstance(command, str) and command in self.extra:
            return await self.extra[command](request)
        raise ValueError(f"unknown command {command!r}")
