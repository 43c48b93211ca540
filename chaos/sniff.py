"""A capture on the wire between the nodes: is any request's payload visible in clear?

``python sniff.py MARKER CONTROL SECONDS OUT STOPFILE`` inside the testbed's underlay netns
(the bridge every node's underlay link is plugged into): reads every frame on every interface
there (AF_PACKET, as tcpdump -i any would; the machine has no tcpdump) and counts the frames
holding MARKER (the load's payload: must be 0 under STRICT) and CONTROL (a payload the runner
sends in clear on purpose, proving the capture sees what crosses). Stops after SECONDS or once
STOPFILE exists; writes ``{"frames", "bytes", "marker_frames", "control_frames"}`` as JSON to OUT.
Stdlib only.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003


def main(marker: bytes, control: bytes, seconds: float, out: Path, stop: Path) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    counts = {"frames": 0, "bytes": 0, "marker_frames": 0, "control_frames": 0}
    end = time.monotonic() + seconds
    ready = Path(f"{out}.ready")
    ready.touch()
    while time.monotonic() < end and not stop.exists():
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        for _ in range(256):  # drain what is queued, bounded
            try:
                frame = sock.recv(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            counts["frames"] += 1
            counts["bytes"] += len(frame)
            if marker in frame:
                counts["marker_frames"] += 1
            if control in frame:
                counts["control_frames"] += 1
    out.write_text(json.dumps(counts) + "\n")


if __name__ == "__main__":
    m, c, s, o, stop_file = sys.argv[1:6]
    main(m.encode(), c.encode(), float(s), Path(o), Path(stop_file))
