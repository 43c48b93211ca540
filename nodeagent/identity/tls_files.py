"""SDS secrets from the files DestinationRules name in ``tls`` (caCertificates, caCrl,
clientCertificate, privateKey), watched so that a rotated file is pushed without a config
change, as istio-agent does for a sidecar (istio/istio security/pkg/nodeagent/cache/
secretcache.go: a file secret is read on request and its files are watched; a change pushes
the secret again). Names: mesh/tls_files.py.

The files are checked before Envoy sees them (Envoy would NACK a secret it cannot load, and a
NACK stalls every other secret of the push): PEM certificates, a private key that matches the
certificate, a PEM CRL. A file that is missing, unreadable or invalid is logged once, naming
the DestinationRule(s) and the path, and taken as soon as it is valid. Meanwhile the secret
last read from valid files stays served, as at Istio's sidecar (a failed read pushes nothing,
so Envoy keeps what it has: a half-written rotation does not break calls); a secret never read
valid is a PLACEHOLDER (identity/credentials.py: a certificate no server trusts, a CA that
signed nothing), so the shared originate-tls cluster never waits for it and its calls fail.

Watching is polling (``stale``): one ``stat`` per watched file per period, comparing inode,
mtime and size, so a kubelet Secret volume's symlink swap (new inode) and an in-place rewrite
(new mtime) are both seen; a file is read again only when its stamp moved.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from nodeagent.identity.credentials import ca_secret, certificate_secret, placeholder
from nodeagent.mesh import tls_files
from nodeagent.mesh.model import IstioResource
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.identity")

DESTINATION_RULE = "DestinationRule"
POLL_PERIOD = 1.0  # seconds between looks at the watched files
_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
Stamp = tuple[int, int, int] | None  # (inode, mtime ns, size); None: cannot stat


class FileProblem(ValueError):
    """A file of a secret that cannot be served; the message names the field and the path."""


@dataclass
class _Served:
    """One file secret as last read: its files' stamps, and what was served."""

    paths: tuple[str, ...]
    stamps: tuple[Stamp, ...]
    secret: secret_pb2.Secret  # from valid files (the last ones), else a placeholder
    problem: str  # "" when the files were valid
    valid: bool  # SECRET was read from valid files (now or before a problem)


def stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data link gives another inode
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class FileSecrets:
    """The file secrets of the DestinationRules in the store, read when their files change."""

    def __init__(self) -> None:
        # DestinationRule key -> (the rule, the file secrets it names), for rules naming files.
        self._rules: dict[str, tuple[IstioResource, dict[str, tuple[str, ...]]]] = {}
        self._store: MeshStore | None = None
        self._generation = -1
        self._wanted: dict[
            str, tuple[tuple[str, ...], tuple[str, ...]]
        ] = {}  # name -> paths, rules
        self._served: dict[str, _Served] = {}

    def sds_secrets(self, store: MeshStore) -> list[secret_pb2.Secret]:
        """One secret per file secret a DestinationRule names; the same object while its files
        did not change (so a push sends only what changed)."""
        self._update_wanted(store)
        out = []
        for name, (paths, rules) in sorted(self._wanted.items()):
            stamps = tuple(stamp(p) for p in paths)
            served = self._served.get(name)
            if served is None or served.stamps != stamps or served.paths != paths:
                served = self._read(name, paths, stamps, rules, served)
                self._served[name] = served
            out.append(served.secret)
        for gone in self._served.keys() - self._wanted.keys():
            del self._served[gone]
        return out

    def stale(self) -> bool:
        """A watched file changed since it was read (a push reads it again)."""
        return any(
            tuple(stamp(p) for p in served.paths) != served.stamps
            for served in self._served.values()
        )

    def watched(self) -> int:
        return sum(len(served.paths) for served in self._served.values())

    async def watch(
        self, stop: asyncio.Event, on_change: Callable[[], None], period: float = POLL_PERIOD
    ) -> None:
        """Until STOP: every PERIOD, call ON_CHANGE when a watched file changed."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period)
                return
            except TimeoutError:
                pass
            if self._served and self.stale():
                on_change()

    def _update_wanted(self, store: MeshStore) -> None:
        """Bring the file secrets wanted up to date with the DestinationRules that changed
        since the last push (all of them when the store's change log does not reach back)."""
        if store is self._store and store.generation == self._generation:
            return
        changed = store.changes_since(self._generation) if store is self._store else None
        self._store, self._generation = store, store.generation
        if changed is None:
            rules = store.istio_of_kind(DESTINATION_RULE)
            self._rules = {r.key: (r, names) for r in rules if (names := tls_files.referenced(r))}
        else:
            keys = {key for kind, key in changed if kind == DESTINATION_RULE}
            if not keys:
                return
            for key in keys:
                rule = store.istio.get(key)
                names = tls_files.referenced(rule) if rule is not None else {}
                if rule is not None and names:
                    self._rules[key] = (rule, names)
                else:
                    self._rules.pop(key, None)
        # Only the rules that name files are kept: this is O(those), not O(every rule).
        by_name: dict[str, tuple[tuple[str, ...], set[str]]] = {}
        for rule, names in self._rules.values():
            for name, paths in names.items():
                by_name.setdefault(name, (paths, set()))[1].add(f"{rule.namespace}/{rule.name}")
        self._wanted = {name: (paths, tuple(sorted(r))) for name, (paths, r) in by_name.items()}

    def _read(
        self,
        name: str,
        paths: tuple[str, ...],
        stamps: tuple[Stamp, ...],
        rules: tuple[str, ...],
        before: _Served | None,
    ) -> _Served:
        try:
            secret = load(name, paths)
            problem = ""
        except FileProblem as exc:
            problem = str(exc)
            if before is not None and before.valid:
                kept = _Served(paths, stamps, before.secret, problem, valid=True)
                if before.problem != problem:
                    log.error(
                        "DestinationRule %s: tls %s; the last valid files stay served "
                        "(SDS secret %s)",
                        ", ".join(rules),
                        problem,
                        name,
                    )
                return kept
            cert, key = placeholder()
            secret = (
                certificate_secret(name, cert, key)
                if name.startswith(tls_files.FILE_CERT)
                else ca_secret(name, cert)
            )
        if problem and (before is None or before.problem != problem):
            log.error(
                "DestinationRule %s: tls %s; calls through it fail until it is valid "
                "(SDS secret %s)",
                ", ".join(rules),
                problem,
                name,
            )
        elif not problem and before is not None and before.problem:
            log.info("DestinationRule %s: tls files of %s are valid now", ", ".join(rules), name)
        elif not problem and before is not None:
            log.info("DestinationRule %s: tls files of %s changed: pushed", ", ".join(rules), name)
        if before is not None and not problem and before.secret == secret:
            secret = before.secret  # same content: the same object, nothing to push
        return _Served(paths, stamps, secret, problem, valid=not problem)


def load(name: str, paths: tuple[str, ...]) -> secret_pb2.Secret:
    """The secret NAME from its files PATHS (mesh/tls_files.py), checked as Envoy would load
    it; FileProblem naming the field and the path otherwise."""
    fields = tls_files.fields(name)
    contents = [_content(field, path) for field, path in zip(fields, paths, strict=False)]
    if name.startswith(tls_files.FILE_CERT):
        cert, key = contents
        chain = _certificates(fields[0], paths[0], cert)
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise FileProblem(f"{fields[1]} {paths[1]}: not a PEM private key ({exc})") from None
        if _public(private.public_key()) != _public(chain[0].public_key()):
            raise FileProblem(
                f"{fields[1]} {paths[1]}: does not match the certificate of {fields[0]} {paths[0]}"
            )
        return certificate_secret(name, cert, key)
    ca = contents[0]
    _certificates(fields[0], paths[0], ca)
    crl = contents[1] if len(contents) > 1 else b""
    if crl:
        blocks = _CRL_BLOCK.findall(crl)
        try:
            if not blocks:
                raise ValueError("no X509 CRL block")
            for block in blocks:
                x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise FileProblem(f"{fields[1]} {paths[1]}: not a PEM CRL ({exc})") from None
    return ca_secret(name, ca, crl)


def _content(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileProblem(f"{field} {path}: no such file on this node") from None
    except OSError as exc:
        raise FileProblem(f"{field} {path}: cannot be read ({exc.strerror})") from None


def _certificates(field: str, path: str, pem: bytes) -> list[x509.Certificate]:
    if not pem.strip():
        raise FileProblem(f"{field} {path}: empty")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise FileProblem(f"{field} {path}: not PEM certificates") from None


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
