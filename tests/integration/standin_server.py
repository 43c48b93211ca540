"""The stand-in API server (nodeagent/testbed/apiserver.py) as a process of its own, serving a
fixed set of objects (the testbed's own API server serves its cluster directory instead).

``python standin_server.py OBJECTS.json KUBECONFIG``: serves the objects listed in OBJECTS.json on
127.0.0.1 (of the network namespace it runs in) and writes a kubeconfig for it, atomically, once it
listens. On SIGTERM it stops and writes the requests it got to KUBECONFIG + ".requests.json".
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from nodeagent.testbed.apiserver import APIServerStandIn


async def serve(objects: Path, kubeconfig: Path) -> None:
    server = APIServerStandIn()
    for obj in json.loads(objects.read_text()):
        server.add(obj)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        partial = kubeconfig.with_name(f".{kubeconfig.name}.tmp")
        server.write_kubeconfig(partial)
        partial.replace(kubeconfig)
        await stop.wait()
    finally:
        await server.stop()
        kubeconfig.with_name(f"{kubeconfig.name}.requests.json").write_text(
            json.dumps(server.requests)
        )


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), Path(sys.argv[2])))
