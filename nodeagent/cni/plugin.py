"""nodeagent-cni: the chained CNI plugin that hands each new pod to the node agent.

It runs on the host, after the primary plugin, and replaces Istio's istio-init container: ADD
returns only once the agent has answered that the pod's traffic capture is in place (or that the
pod is not in the mesh), so no app starts outside the mesh. If the agent cannot be reached or
fails, ADD fails (fail closed) and the runtime retries. DEL informs the agent and never fails.

Standard library only, shipped as a self-contained bundle. Logs go to a file, never to stdout:
stdout carries only the CNI result or error, as the spec requires.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from nodeagent.cni import wire

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_LOG_FILE = "/var/log/nodeagent-cni.log"
DEFAULT_TIMEOUT = 30.0  # seconds an ADD waits for the agent; kubelet retries after a failure
DEL_TIMEOUT = 5.0

# CNI spec error codes.
INCOMPATIBLE_VERSION = 1
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50  # STATUS (CNI 1.1)
CAPTURE_FAILED = 100  # plugin-specific: the agent could not capture the pod


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class Log:
    """Appends one JSON line per event to the plugin's log file (stderr if it cannot be opened)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, level: str, msg: str, **fields: Any) -> None:
        line = json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": level, "msg": msg, **fields}
        )
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            print(line, file=sys.stderr)


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS: ``K=V;K=V`` (the runtime passes K8S_POD_NAMESPACE, K8S_POD_NAME, ...)."""
    out = {}
    for item in raw.split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def result_ips(prev: dict[str, Any]) -> list[str]:
    """Pod addresses (without prefix length) from the primary plugin's result."""
    ips = []
    for entry in prev.get("ips") or []:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            ips.append(entry["address"].split("/")[0])
    return ips


def load_config(stdin: str) -> dict[str, Any]:
    try:
        conf = json.loads(stdin)
    except ValueError as e:
        raise CniError(DECODE_FAILURE, "failed to decode network configuration", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "network configuration is not a JSON object")
    version = conf.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"nodeagent-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return conf


def require_env(*names: str) -> dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise CniError(INVALID_ENV, f"missing environment variables: {', '.join(missing)}")
    return {n: os.environ[n] for n in names}


def text_setting(conf: dict[str, Any], key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_CONFIG, f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def seconds_setting(conf: dict[str, Any], key: str, default: float) -> float:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise CniError(INVALID_CONFIG, f"field {key!r} must be a positive number, got {value!r}")
    return float(value)


def cmd_add(conf: dict[str, Any], log: Log) -> dict[str, Any]:
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(
            INVALID_CONFIG,
            "prevResult is missing: nodeagent-cni is a chained plugin",
            "list it after the primary plugin (bridge, calico, ...) in the conflist",
        )
    env = require_env("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if not os.path.exists(env["CNI_NETNS"]):
        raise CniError(3, f"network namespace {env['CNI_NETNS']} does not exist")
    args = parse_cni_args(os.environ.get("CNI_ARGS", ""))
    namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    if not namespace or not name:
        log(
            "info",
            "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME): passed through",
            container=env["CNI_CONTAINERID"],
        )
        return prev

    socket_path = text_setting(conf, "agentSocket", wire.DEFAULT_SOCKET)
    timeout = seconds_setting(conf, "timeoutSeconds", DEFAULT_TIMEOUT)
    pod = {
        "namespace": namespace,
        "name": name,
        "uid": args.get("K8S_POD_UID", ""),
        "containerId": env["CNI_CONTAINERID"],
        "netns": env["CNI_NETNS"],
        "ifname": env["CNI_IFNAME"],
        "ips": result_ips(prev),
        "network": str(conf.get("name", "")),
    }
    started = time.monotonic()
    try:
        answer = wire.request(
            socket_path, {"command": "ADD", "pod": pod, "timeout": timeout}, timeout + 1
        )
    except wire.AgentUnreachable as e:
        raise CniError(
            TRY_AGAIN_LATER, str(e), "the node agent must run before mesh pods start"
        ) from None
    except (OSError, wire.ProtocolError) as e:
        raise CniError(IO_FAILURE, f"talking to nodeagent at {socket_path}: {e}") from None
    took = round(time.monotonic() - started, 4)
    if not answer.get("ok"):
        log("error", "capture failed", pod=f"{namespace}/{name}", reason=answer.get("reason"))
        raise CniError(
            CAPTURE_FAILED, f"pod {namespace}/{name}: {answer.get('reason', 'capture failed')}"
        )
    log(
        "info",
        "pod handed to agent",
        pod=f"{namespace}/{name}",
        state=answer.get("state"),
        seconds=took,
    )
    return prev


def cmd_del(conf: dict[str, Any], log: Log) -> None:
    args = parse_cni_args(os.environ.get("CNI_ARGS", ""))
    pod = {
        "namespace": args.get("K8S_POD_NAMESPACE", ""),
        "name": args.get("K8S_POD_NAME", ""),
        "uid": args.get("K8S_POD_UID", ""),  # finds a pod the agent adopted without its ADD
        "containerId": os.environ.get("CNI_CONTAINERID", ""),
        "netns": os.environ.get("CNI_NETNS", ""),
    }
    try:
        socket_path = str(conf.get("agentSocket", wire.DEFAULT_SOCKET))
        wire.request(socket_path, {"command": "DEL", "pod": pod}, DEL_TIMEOUT)
    except (OSError, wire.ProtocolError) as e:
        # The spec wants DEL to succeed; the agent's reconcile forgets pods whose netns is gone.
        log("warning", "could not tell the agent about DEL", error=str(e), **pod)


def cmd_check(conf: dict[str, Any]) -> None:
    if not isinstance(conf.get("prevResult"), dict):
        raise CniError(INVALID_CONFIG, "prevResult is missing: CHECK needs the ADD result")
    env = require_env("CNI_CONTAINERID", "CNI_NETNS")
    args = parse_cni_args(os.environ.get("CNI_ARGS", ""))
    socket_path = text_setting(conf, "agentSocket", wire.DEFAULT_SOCKET)
    message = {
        "command": "CHECK",
        "pod": {
            "namespace": args.get("K8S_POD_NAMESPACE", ""),
            "name": args.get("K8S_POD_NAME", ""),
            "containerId": env["CNI_CONTAINERID"],
            "netns": env["CNI_NETNS"],
        },
    }
    try:
        answer = wire.request(socket_path, message, DEFAULT_TIMEOUT)
    except (OSError, wire.ProtocolError) as e:
        raise CniError(TRY_AGAIN_LATER, str(e)) from None
    if not answer.get("ok"):
        raise CniError(CAPTURE_FAILED, str(answer.get("reason", "capture check failed")))


def cmd_status(conf: dict[str, Any]) -> None:
    socket_path = text_setting(conf, "agentSocket", wire.DEFAULT_SOCKET)
    try:
        answer = wire.request(socket_path, {"command": "STATUS"}, DEL_TIMEOUT)
    except (OSError, wire.ProtocolError) as e:
        raise CniError(PLUGIN_NOT_AVAILABLE, str(e)) from None
    if not answer.get("ok"):
        raise CniError(PLUGIN_NOT_AVAILABLE, str(answer.get("reason", "agent not ready")))


VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# libcni also sends the spelling of an earlier spec draft (containernetworking/cni#1101).
OLD_VALID_ATTACHMENTS = "cni.dev/attachments"


def valid_container_ids(conf: dict[str, Any]) -> list[str]:
    """The container ids of GC's valid attachments; a missing or malformed list is an error."""
    key = VALID_ATTACHMENTS if VALID_ATTACHMENTS in conf else OLD_VALID_ATTACHMENTS
    attachments = conf.get(key)
    if attachments is None:
        raise CniError(
            INVALID_CONFIG,
            f"GC without field {VALID_ATTACHMENTS!r}: nothing removed",
            "the runtime must list the valid attachments: [{containerID, ifname}, ...]",
        )
    if not isinstance(attachments, list):
        raise CniError(
            INVALID_CONFIG,
            f"field {key!r} must be a list of attachments, got {attachments!r}: nothing removed",
        )
    ids = []
    for i, attachment in enumerate(attachments):
        cid = attachment.get("containerID") if isinstance(attachment, dict) else None
        if not isinstance(cid, str) or not cid:
            raise CniError(
                INVALID_CONFIG,
                f"field {key!r}[{i}] must be an object with a non-empty string containerID, "
                f"got {attachment!r}: nothing removed",
            )
        ids.append(cid)
    return ids


def cmd_gc(conf: dict[str, Any], log: Log) -> None:
    """CNI 1.1 GC: the agent forgets this network's pods that are not valid attachments, and
    only those its own view of the cluster agrees are gone (see CaptureManager.gc)."""
    ids = valid_container_ids(conf)
    message = {"command": "GC", "validContainerIds": ids, "network": str(conf.get("name", ""))}
    try:
        socket_path = str(conf.get("agentSocket", wire.DEFAULT_SOCKET))
        answer = wire.request(socket_path, message, DEL_TIMEOUT)
    except (OSError, wire.ProtocolError) as e:
        log("warning", "could not tell the agent about GC", error=str(e))
        return
    log("info", "GC", valid=len(ids), removed=answer.get("removed"), reason=answer.get("reason"))


def run(command: str, stdin: str) -> tuple[int, dict[str, Any] | None]:
    """Executes one CNI command; returns (exit code, JSON to print or None)."""
    version = "1.0.0"
    log = Log(DEFAULT_LOG_FILE)
    try:
        if command == "VERSION":
            with contextlib.suppress(ValueError, AttributeError):
                version = json.loads(stdin).get("cniVersion") or version
            return 0, {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
        if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
            raise CniError(
                INVALID_ENV,
                f"invalid CNI_COMMAND {command!r}",
                "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
            )
        conf = load_config(stdin)
        version = conf["cniVersion"]
        log = Log(text_setting(conf, "logFile", DEFAULT_LOG_FILE))
        if command == "ADD":
            return 0, cmd_add(conf, log)
        if command == "DEL":
            cmd_del(conf, log)
        elif command == "CHECK":
            cmd_check(conf)
        elif command == "STATUS":
            cmd_status(conf)
        else:
            cmd_gc(conf, log)
        return 0, None
    except CniError as e:
        log("error", e.msg, command=command, code=e.code, details=e.details)
        return 1, {"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}


def main() -> int:
    code, output = run(os.environ.get("CNI_COMMAND", ""), sys.stdin.read())
    if output is not None:
        json.dump(output, sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
