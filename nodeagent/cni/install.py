"""install-cni: puts nodeagent-cni on the node and keeps it chained last in the primary CNI config.

The primary CNI (flannel, calico, ...) owns the network config; we only add our plugin entry to
the end of its plugin list, the way Istio's install-cni does, and take only that entry out again
on uninstall. Primary CNIs rewrite their file when they restart, so ``CniInstaller.watch`` puts
the entry back whenever it disappears.

Standard library only: this runs in the node agent's install step on the host's files.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

PLUGIN_TYPE = "nodeagent-cni"
BUNDLE_DIRNAME = "nodeagent-cni.d"

log = logging.getLogger("nodeagent.install_cni")

# The extensions containerd hands to libcni; kubelet/CRI-O use the first two.
_CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
# libcni refuses a .conflist without a name; Istio uses this one when wrapping a nameless .conf.
_DEFAULT_NETWORK_NAME = "k8s-pod-network"
# Our scratch entries in bin_dir. The leading dot and the name keep runtimes and other installers
# from mistaking them for plugins.
_STAGING_PREFIX = f".{PLUGIN_TYPE}.staging-"
# Edits that race with the primary CNI's own writes are redone from a fresh read, this many times.
_EDIT_ATTEMPTS = 3
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

_T = TypeVar("_T")
# What watch() compares between ticks: names and contents of the candidate config files.
_DirState: TypeAlias = tuple[tuple[str, bytes], ...]


class InstallError(RuntimeError):
    """The node cannot be set up for nodeagent-cni (no primary CNI config, broken bundle...)."""


class _InvalidConfig(Exception):
    """A config file libcni would not load; the message says why."""


class _ConfigRaced(Exception):
    """The config file changed between our read and our write; redo the edit."""


@dataclass(frozen=True)
class _Config:
    path: Path
    doc: dict[str, Any]
    stat: os.stat_result  # as read: for mode/owner, and to notice a concurrent rewrite

    @property
    def plugins(self) -> list[dict[str, Any]]:
        # A single-plugin .conf/.json is a list of one, as libcni loads it.
        if self.path.suffix == ".conflist":
            return cast(list[dict[str, Any]], self.doc["plugins"])
        return [self.doc]


# --- plugin binary -------------------------------------------------------------------------------


def install_binary(bundle: Path, bin_dir: Path) -> Path:
    """Install the onedir bundle as ``bin_dir/nodeagent-cni.d`` and return the plugin symlink.

    A runtime exec'ing the plugin at any moment gets either the old or the new complete bundle.
    """
    if not (bundle / PLUGIN_TYPE).is_file():
        raise InstallError(f"{bundle} is not a {PLUGIN_TYPE} bundle: no {PLUGIN_TYPE} executable")
    if not bin_dir.is_dir():
        raise InstallError(f"CNI bin dir {bin_dir} does not exist")
    _remove_staging_leftovers(bin_dir)

    installed = bin_dir / BUNDLE_DIRNAME
    if _is_real_dir(installed) and _tree_digest(installed) == _tree_digest(bundle):
        log.debug("%s is up to date", installed)
    else:
        staged = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=bin_dir))
        try:
            shutil.copytree(bundle, staged, symlinks=True, dirs_exist_ok=True)
            staged.chmod(0o755)
            _swap_in(staged, installed)
        finally:
            # After an exchange this holds the previous bundle.
            _remove_tree(staged)
        log.info("installed %s bundle into %s", PLUGIN_TYPE, installed)

    link = bin_dir / PLUGIN_TYPE
    target = f"{BUNDLE_DIRNAME}/{PLUGIN_TYPE}"
    if not (link.is_symlink() and os.readlink(link) == target):
        staged_link = bin_dir / f"{_STAGING_PREFIX}link-{secrets.token_hex(4)}"
        os.symlink(target, staged_link)
        try:
            os.replace(staged_link, link)
        except OSError:
            staged_link.unlink(missing_ok=True)
            raise
        log.info("pointed %s at %s", link, target)
    return link


def uninstall_binary(bin_dir: Path) -> None:
    """Remove the plugin symlink, then the bundle; absent parts are fine."""
    link = bin_dir / PLUGIN_TYPE
    if link.is_symlink() or link.is_file():
        link.unlink(missing_ok=True)
        log.info("removed %s", link)
    installed = bin_dir / BUNDLE_DIRNAME
    if os.path.lexists(installed):
        # Rename first so nothing can exec a half-deleted bundle.
        doomed = bin_dir / f"{_STAGING_PREFIX}old-{secrets.token_hex(4)}"
        os.rename(installed, doomed)
        _remove_tree(doomed)
        log.info("removed %s", installed)


def _swap_in(staged: Path, installed: Path) -> None:
    if not os.path.lexists(installed):
        os.rename(staged, installed)
    elif not _exchange(staged, installed):
        # No atomic exchange here: the bundle is absent for the instant between the two renames.
        old = installed.with_name(f"{_STAGING_PREFIX}old-{secrets.token_hex(4)}")
        os.rename(installed, old)
        os.rename(staged, installed)
        _remove_tree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _tree_digest(root: Path) -> str:
    """Names, types, modes, link targets and contents below root, in a stable order."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body = os.fsencode(os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    body = hashlib.file_digest(f, "sha256").digest()
            else:
                body = b""
            head = f"\0{stat.S_IFMT(st.st_mode):o}:{stat.S_IMODE(st.st_mode):o}:{len(body)}\0"
            digest.update(os.fsencode(os.path.relpath(path, root)) + head.encode() + body)
    return digest.hexdigest()


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove_tree(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_staging_leftovers(bin_dir: Path) -> None:
    # A crash mid-install leaves these behind; they would pile up across restarts.
    with os.scandir(bin_dir) as entries:
        for entry in entries:
            if entry.name.startswith(_STAGING_PREFIX):
                log.info("removing leftover %s", entry.path)
                _remove_tree(Path(entry.path))


# --- CNI network config --------------------------------------------------------------------------


def primary_config(conf_dir: Path) -> Path | None:
    """The config file libcni/containerd would load from conf_dir: the first valid one by name."""
    found = _load_primary(conf_dir, warn=True)
    return None if found is None else found.path


def plugin_chain(conf_dir: Path) -> tuple[Path, list[str]] | None:
    """The primary config and the types of its plugins in order (None: no valid config);
    read only, quiet (``nodeagent doctor``)."""
    config = _load_primary(conf_dir, warn=False)
    return None if config is None else (config.path, [str(p["type"]) for p in config.plugins])


def holds_entry(conf_dir: Path) -> bool:
    """Whether the primary config exists and runs nodeagent-cni as its last plugin."""
    return _missing_entry(conf_dir, warn=True) is None


def insert_entry(conf_dir: Path, entry: dict[str, Any]) -> Path:
    """Put entry last in the primary config's plugins (replacing ours) and return the file.

    A single-plugin .conf/.json becomes ``<stem>.conflist``.
    """
    if entry.get("type") != PLUGIN_TYPE:
        raise ValueError(f"entry type must be {PLUGIN_TYPE!r}, got {entry.get('type')!r}")
    return _retrying_edit(
        f"inserting {PLUGIN_TYPE} in {conf_dir}", lambda: _insert_once(conf_dir, entry, warn=True)
    )


def remove_entry(conf_dir: Path) -> Path | None:
    """Take our entries out of the primary config; the file written, or None if none was there."""
    return _retrying_edit(f"removing {PLUGIN_TYPE} from {conf_dir}", lambda: _remove_once(conf_dir))


def _insert_once(conf_dir: Path, entry: dict[str, Any], *, warn: bool) -> Path:
    config = _load_primary(conf_dir, warn=warn)
    if config is None:
        raise InstallError(f"no valid CNI network config in {conf_dir}")
    listed = config.doc if config.path.suffix == ".conflist" else _as_conflist(config.doc)
    others = [p for p in listed["plugins"] if p["type"] != PLUGIN_TYPE]
    # Replacing "plugins" in place keeps the file's key order.
    wanted = {**listed, "plugins": [*others, copy.deepcopy(entry)]}

    if config.path.suffix == ".conflist":
        if wanted == config.doc:
            log.debug("%s already ends with our %s entry", config.path.name, PLUGIN_TYPE)
            return config.path
        _write_config(config.path, wanted, config)
        log.info("inserted %s last into %s", PLUGIN_TYPE, config.path.name)
        return config.path

    target = config.path.with_suffix(".conflist")
    if target.exists():
        # Invalid or shadowed by the file we are wrapping, so no runtime was loading it.
        log.warning("overwriting %s while wrapping %s", target.name, config.path.name)
    _write_config(target, wanted, config)
    # Left in place, a .conf would still sort first and shadow the new list.
    config.path.unlink(missing_ok=True)
    log.info("wrapped %s into %s with %s last", config.path.name, target.name, PLUGIN_TYPE)
    return target


def remove_entries(conf_dir: Path) -> list[Path]:
    """Take our entries out of every CNI config in conf_dir; the files written.

    Not only the primary: a file we inserted into before a newer primary shadowed it would bring
    a dangling entry back to life if the shadowing file went away.
    """
    written = [path for path in [remove_entry(conf_dir)] if path is not None]
    for path in _candidates(conf_dir):
        if path.suffix == ".conflist":
            stripped = _retrying_edit(
                f"removing {PLUGIN_TYPE} from {path}", functools.partial(_strip_file, path)
            )
            if stripped is not None:
                written.append(stripped)
    return written


def _remove_once(conf_dir: Path) -> Path | None:
    config = _load_primary(conf_dir, warn=True)
    if config is None or config.path.suffix != ".conflist":
        return None
    return _strip(config)


def _strip(config: _Config) -> Path | None:
    kept = [p for p in config.plugins if p["type"] != PLUGIN_TYPE]
    if len(kept) == len(config.plugins):
        return None
    _write_config(config.path, {**config.doc, "plugins": kept}, config)
    log.info("removed %s from %s", PLUGIN_TYPE, config.path.name)
    return config.path


def _strip_file(path: Path) -> Path | None:
    try:
        return _strip(_read_config(path))
    except _InvalidConfig:
        return None


def _as_conflist(conf: dict[str, Any]) -> dict[str, Any]:
    # Network-level keys move up to the list; the plugin keeps everything else.
    listed = {key: conf[key] for key in ("cniVersion", "name") if key in conf}
    listed.setdefault("name", _DEFAULT_NETWORK_NAME)
    plugin = {key: value for key, value in conf.items() if key not in ("cniVersion", "name")}
    return {**listed, "plugins": [plugin]}


def _missing_entry(conf_dir: Path, *, warn: bool) -> str | None:
    """Why the primary config does not end with our plugin, or None when it does."""
    config = _load_primary(conf_dir, warn=warn)
    if config is None:
        return f"no valid CNI network config in {conf_dir}"
    last = config.plugins[-1]["type"]
    if last != PLUGIN_TYPE:
        return f"{config.path.name}: last plugin is {last!r}, not {PLUGIN_TYPE!r}"
    return None


def _candidates(conf_dir: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    paths = (conf_dir / name for name in names if os.path.splitext(name)[1] in _CONFIG_SUFFIXES)
    return [path for path in paths if path.is_file()]


def _load_primary(conf_dir: Path, *, warn: bool) -> _Config | None:
    for path in _candidates(conf_dir):
        try:
            return _read_config(path)
        except _InvalidConfig as invalid:
            if warn:
                log.warning("skipping CNI config %s: %s", path, invalid)
    return None


def _read_config(path: Path) -> _Config:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as exc:
        raise _InvalidConfig(exc.strerror or str(exc)) from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise _InvalidConfig(f"invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _InvalidConfig("not a JSON object")
    if path.suffix == ".conflist":
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise _InvalidConfig("no plugins")
        for i, plugin in enumerate(plugins):
            if not (isinstance(plugin, dict) and _is_type(plugin.get("type"))):
                raise _InvalidConfig(f"plugins[{i}] has no string 'type'")
    elif not _is_type(doc.get("type")):
        raise _InvalidConfig("no 'type'; perhaps this is a .conflist?")
    return _Config(path, doc, st)


def _is_type(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _retrying_edit(what: str, edit: Callable[[], _T]) -> _T:
    for _ in range(_EDIT_ATTEMPTS):
        try:
            return edit()
        except _ConfigRaced as raced:
            log.info("%s changed while %s; redoing it", raced, what)
    raise InstallError(f"config kept changing while {what}")


def _write_config(target: Path, doc: dict[str, Any], source: _Config) -> None:
    """Atomically replace target with doc, keeping source's mode and owner.

    Raises _ConfigRaced instead if source changed since it was read, so that a primary CNI's
    concurrent rewrite is not overwritten with stale content.
    """
    data = (json.dumps(doc, indent=2) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(source.stat.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), source.stat.st_uid, source.stat.st_gid)
            os.fsync(f.fileno())
        if _changed_since_read(source):
            raise _ConfigRaced(source.path.name)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _changed_since_read(config: _Config) -> bool:
    try:
        now = os.stat(config.path)
    except FileNotFoundError:
        return True
    return _identity(now) != _identity(config.stat)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # Atomic replacement changes the inode; an in-place rewrite the mtime (and mostly the size).
    return st.st_ino, st.st_mtime_ns, st.st_size


def _conf_dir_state(conf_dir: Path) -> _DirState:
    state = []
    for path in _candidates(conf_dir):
        with contextlib.suppress(OSError):
            state.append((path.name, path.read_bytes()))
    return tuple(state)


# --- the installer -------------------------------------------------------------------------------


@dataclass(eq=False)  # a live installer, not a value
class CniInstaller:
    """Keeps nodeagent-cni installed on this node: bundle in bin_dir, entry last in conf_dir.

    ``bundle`` None leaves the binary alone (it is provisioned some other way).
    """

    bundle: Path | None
    bin_dir: Path
    conf_dir: Path
    entry: dict[str, Any] = field(default_factory=lambda: {"type": PLUGIN_TYPE})
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Set by uninstall() so that a watch() still running does not put the entry back.
    _retired: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.entry.get("type") != PLUGIN_TYPE:
            raise ValueError(f"entry type must be {PLUGIN_TYPE!r}, got {self.entry.get('type')!r}")

    def install(self) -> Path:
        """Install the binary, then the entry (so no runtime sees an entry without its binary).

        Raises InstallError while there is no primary config; watch() inserts the entry once one
        appears.
        """
        with self._lock:
            self._retired = False
            if self.bundle is not None:
                install_binary(self.bundle, self.bin_dir)
            return insert_entry(self.conf_dir, self.entry)

    def uninstall(self) -> None:
        """Remove our entries, then the binary (so no runtime sees an entry without its binary)."""
        with self._lock:
            self._retired = True
            remove_entries(self.conf_dir)
            if self.bundle is not None:
                uninstall_binary(self.bin_dir)

    def ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the node is not ready for meshed pods, or None when it is."""
        if self.bundle is not None and not (self.bin_dir / PLUGIN_TYPE).is_file():
            return f"{PLUGIN_TYPE} is not installed in {self.bin_dir}"
        # Quiet: probes would repeat the invalid-file warnings that watch() already logs.
        return _missing_entry(self.conf_dir, warn=False)

    def watch(self, stop: threading.Event, interval: float = 0.2) -> None:
        """Until stop is set, put the entry back whenever the primary config loses it."""
        previous: _DirState | None = None
        checked: _DirState | None = None
        failed: tuple[_DirState | None, str] | None = None
        binary_failed: str | None = None
        while not stop.is_set():
            # The binary first: an entry without its binary would fail every pod on the node.
            try:
                self._reinstall_binary()
                binary_failed = None
            except Exception as exc:
                _log_retry(exc, repeated=binary_failed == str(exc))
                binary_failed = str(exc)
            state: _DirState | None = None
            try:
                state = _conf_dir_state(self.conf_dir)
                # Act only once the directory held still for a tick: a primary CNI's half-written
                # file must not be skipped as invalid in favour of the next file.
                if binary_failed is None and state == previous and state != checked:
                    # Invalid files were already named when this same state first failed.
                    self._reinsert(warn=failed is None or failed[0] != state)
                    checked, failed = state, None
                previous = state
            except Exception as exc:
                _log_retry(exc, repeated=failed == (state, str(exc)))
                failed = (state, str(exc))
            stop.wait(interval)

    def _reinsert(self, *, warn: bool) -> None:
        with self._lock:
            if self._retired:
                return
            problem = _missing_entry(self.conf_dir, warn=warn)
            if problem is not None:
                log.info("re-inserting %s: %s", PLUGIN_TYPE, problem)
                _retrying_edit(
                    f"inserting {PLUGIN_TYPE} in {self.conf_dir}",
                    lambda: _insert_once(self.conf_dir, self.entry, warn=warn),
                )

    def _reinstall_binary(self) -> None:
        with self._lock:
            if self.bundle is None or self._retired or (self.bin_dir / PLUGIN_TYPE).exists():
                return
            log.warning("%s is gone from %s; reinstalling it", PLUGIN_TYPE, self.bin_dir)
            install_binary(self.bundle, self.bin_dir)


def _log_retry(exc: Exception, *, repeated: bool) -> None:
    # watch() retries every tick: a failure that persists is logged once.
    if repeated:
        log.debug("CNI install check still failing: %s", exc)
    else:
        unexpected = not isinstance(exc, InstallError | OSError)
        log.warning("CNI install check failed, retrying: %s", exc, exc_info=unexpected)


# --- readiness -----------------------------------------------------------------------------------


def serve_readiness(
    installer: CniInstaller, port: int, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve ``GET /readyz`` (200 while the entry is in place, else 503 and why) in a daemon thread.

    Stop it with ``shutdown()`` and ``server_close()``.
    """

    class Readyz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/readyz":
                self._reply(404, "not found")
                return
            try:
                ready = installer.ready()
                reason = None if ready else installer.unready_reason() or "not ready"
            except Exception as exc:
                reason = f"readiness check failed: {exc}"
            if reason is None:
                self._reply(200, "ok")
            else:
                self._reply(503, reason)

        def _reply(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes every few seconds would flood stderr.
            log.debug("readyz %s: " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Readyz)
    threading.Thread(target=server.serve_forever, name="install-cni-readyz", daemon=True).start()
    log.info("serving readiness on http://%s:%d/readyz", host, server.server_address[1])
    return server
