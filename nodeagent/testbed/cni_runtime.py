"""A container runtime's side of CNI, as the CNI spec (1.0/1.1) describes it.

For a pod sandbox the runtime reads the node's network configuration list and executes each plugin
binary with the CNI_* environment and the plugin's config on stdin:
- ADD runs the plugins in order, handing each the previous plugin's result as ``prevResult``;
- DEL runs them in reverse order with the cached ADD result as ``prevResult``;
- CHECK runs them in order with the cached result.
The final ADD result is cached per (network, container, interface), like libcni's cache, so DEL and
CHECK see what ADD returned. Plugins run in the node's network namespace (the runtime's "host").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.testbed.netns import CommandError, run

DEFAULT_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))

# The loopback network containerd sets up in every sandbox before the pod network.
LOOPBACK_CONFLIST: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}


class CNIError(RuntimeError):
    """A plugin failed; carries the spec's error fields (code, msg, details)."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        self.plugin, self.command, self.code, self.msg, self.details = (
            plugin,
            command,
            code,
            msg,
            details,
        )
        text = f"CNI {command} failed in plugin {plugin!r}: code {code}: {msg}"
        super().__init__(f"{text} ({details})" if details else text)


@dataclass(frozen=True)
class Sandbox:
    """What the runtime knows about a pod when it sets up its network."""

    container_id: str
    netns: Path
    namespace: str
    name: str
    uid: str
    ifname: str = "eth0"

    @property
    def cni_args(self) -> str:
        # The same K8S_* keys containerd and CRI-O pass; IgnoreUnknown lets plugins skip them.
        return ";".join(
            [
                "IgnoreUnknown=1",
                f"K8S_POD_NAMESPACE={self.namespace}",
                f"K8S_POD_NAME={self.name}",
                f"K8S_POD_INFRA_CONTAINER_ID={self.container_id}",
                f"K8S_POD_UID={self.uid}",
            ]
        )


def load_conflist(conf_dir: Path) -> dict[str, Any]:
    """The node's network: the first valid ``.conflist`` (or single-plugin ``.conf``) by name."""
    errors = []
    for path in sorted(conf_dir.glob("*")):
        if path.suffix not in (".conflist", ".conf", ".json"):
            continue
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            errors.append(f"{path.name}: {e}")
            continue
        if not isinstance(conf, dict):
            errors.append(f"{path.name}: not a JSON object")
            continue
        if path.suffix == ".conflist" and isinstance(conf.get("plugins"), list) and conf["plugins"]:
            return conf
        if path.suffix != ".conflist" and "type" in conf:
            # A single-plugin .conf becomes a list of one, as libcni does.
            plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
            return {
                "cniVersion": conf.get("cniVersion", "1.0.0"),
                "name": conf.get("name", ""),
                "plugins": [plugin],
            }
        errors.append(f"{path.name}: no plugins")
    why = "; ".join(errors) if errors else "no .conflist or .conf file"
    raise CNIError("runtime", "LOAD", 7, f"no valid network configuration in {conf_dir}", why)


class Runtime:
    """Executes CNI plugins for one node.

    ``wrap`` turns a plugin argv into the argv that runs it in the node's network namespace.
    """

    def __init__(
        self,
        plugin_dirs: Sequence[Path],
        cache_dir: Path,
        wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
        timeout: float = 60.0,
    ) -> None:
        self.plugin_dirs = list(plugin_dirs)
        self.cache_dir = cache_dir
        self.wrap = wrap
        self.timeout = timeout

    def add(self, conflist: dict[str, Any], sandbox: Sandbox) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        try:
            for plugin in conflist["plugins"]:
                prev = self._exec("ADD", conflist, plugin, sandbox, prev)
        except CNIError:
            # A failed ADD leaves nothing behind: the runtime cleans up with DEL, as kubelet does.
            self.delete(conflist, sandbox, best_effort=True)
            raise
        result = prev or {"cniVersion": conflist.get("cniVersion", "1.0.0")}
        self._cache_path(conflist, sandbox).parent.mkdir(parents=True, exist_ok=True)
        self._cache_path(conflist, sandbox).write_text(
            json.dumps({"config": conflist, "result": result}, indent=1)
        )
        return result

    def check(self, conflist: dict[str, Any], sandbox: Sandbox) -> None:
        cached = self.cached_result(conflist, sandbox)
        if cached is None:
            raise CNIError(
                "runtime", "CHECK", 3, f"no cached ADD result for {sandbox.container_id}"
            )
        for plugin in conflist["plugins"]:
            self._exec("CHECK", conflist, plugin, sandbox, cached)

    def delete(
        self, conflist: dict[str, Any], sandbox: Sandbox, *, best_effort: bool = False
    ) -> list[CNIError]:
        """DEL in reverse order. With best_effort every plugin runs and failures are returned."""
        cached = self.cached_result(conflist, sandbox)
        failures: list[CNIError] = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._exec("DEL", conflist, plugin, sandbox, cached)
            except CNIError as e:
                if not best_effort:
                    raise
                failures.append(e)
        if not failures:
            self._cache_path(conflist, sandbox).unlink(missing_ok=True)
        return failures

    def cached_result(self, conflist: dict[str, Any], sandbox: Sandbox) -> dict[str, Any] | None:
        try:
            cached = json.loads(self._cache_path(conflist, sandbox).read_text())
        except (OSError, ValueError):
            return None
        result = cached.get("result")
        return result if isinstance(result, dict) else None

    def _cache_path(self, conflist: dict[str, Any], sandbox: Sandbox) -> Path:
        return self.cache_dir / f"{conflist['name']}-{sandbox.container_id}-{sandbox.ifname}"

    def _find(self, plugin_type: str) -> Path:
        for folder in self.plugin_dirs:
            candidate = folder / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        dirs = ":".join(str(d) for d in self.plugin_dirs)
        raise CNIError(plugin_type, "FIND", 7, f"plugin binary {plugin_type!r} not found in {dirs}")

    def _exec(
        self,
        command: str,
        conflist: dict[str, Any],
        plugin: dict[str, Any],
        sandbox: Sandbox,
        prev: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        plugin_type = str(plugin.get("type", ""))
        binary = self._find(plugin_type)
        config = dict(plugin)
        config["cniVersion"] = conflist.get("cniVersion", "1.0.0")
        config["name"] = conflist["name"]
        if prev is not None:
            config["prevResult"] = prev
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": sandbox.container_id,
            "CNI_NETNS": str(sandbox.netns),
            "CNI_IFNAME": sandbox.ifname,
            "CNI_ARGS": sandbox.cni_args,
            "CNI_PATH": ":".join(str(d) for d in self.plugin_dirs),
        }
        try:
            proc = run(
                self.wrap([str(binary)]),
                input=json.dumps(config),
                env=env,
                check=False,
                timeout=self.timeout,
            )
        except CommandError as e:
            raise CNIError(plugin_type, command, 5, str(e)) from None
        if proc.returncode != 0:
            try:
                err = json.loads(proc.stdout)
                raise CNIError(
                    plugin_type,
                    command,
                    int(err.get("code", 999)),
                    str(err.get("msg", "")),
                    str(err.get("details", "")),
                )
            except (ValueError, AttributeError):
                detail = (proc.stderr or proc.stdout).strip()
                raise CNIError(
                    plugin_type, command, 999, f"exit {proc.returncode}: {detail}"
                ) from None
        if command != "ADD":
            return None
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            raise CNIError(
                plugin_type, command, 6, f"plugin printed invalid JSON: {proc.stdout[:200]!r}"
            ) from None
        if not isinstance(result, dict):
            raise CNIError(plugin_type, command, 6, "plugin result is not a JSON object")
        return result


def pod_ipv4(result: dict[str, Any]) -> str:
    """The pod's IPv4 address (without prefix) from a CNI result."""
    for entry in result.get("ips", []):
        address = str(entry.get("address", ""))
        if address and ":" not in address:
            return address.split("/")[0]
    raise CNIError(
        "runtime", "ADD", 999, f"CNI result has no IPv4 address: {json.dumps(result)[:300]}"
    )
