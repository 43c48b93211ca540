"""Looking for a private key where it must not be: process memory and files (issue #13).

A key can sit in memory in many encodings; each is looked for: the PEM file as written, its
base64 body on one line, base64 of the whole PEM (a Secret's ``data`` as the API carries it), the
DER (PKCS#8 and the SEC1/traditional form) and, for an EC key, the raw private scalar in both
byte orders (OpenSSL keeps a BIGNUM as little-endian words)."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CHUNK = 16 << 20
# A region bigger than this is an address-space reservation (allocators, thread stacks), not data
# a process wrote; skipping it keeps the scan bounded.
MAX_REGION = 1 << 30


def key_encodings(pem: bytes) -> dict[str, bytes]:
    key = serialization.load_pem_private_key(pem, password=None)
    none = serialization.NoEncryption()
    der = serialization.Encoding.DER
    out = {
        "pem": pem.strip(),
        "pem-base64-body": b"".join(
            line for line in pem.strip().splitlines() if not line.startswith(b"-----")
        ),
        "base64-of-pem": base64.b64encode(pem),
        "der-pkcs8": key.private_bytes(der, serialization.PrivateFormat.PKCS8, none),
        "der-traditional": key.private_bytes(
            der, serialization.PrivateFormat.TraditionalOpenSSL, none
        ),
    }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        scalar = key.private_numbers().private_value.to_bytes(size, "big")
        out["raw-scalar-big-endian"] = scalar
        out["raw-scalar-little-endian"] = scalar[::-1]
    return out


def _regions(pid: int) -> list[tuple[int, int]]:
    """Readable regions that can hold data the process made: writable or anonymous ones
    (read-only file mappings are code and constants of binaries and libraries)."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        span, perms = fields[0], fields[1]
        path = fields[5] if len(fields) == 6 else ""
        if not perms.startswith("r") or path in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        if "w" not in perms and path and not path.startswith("["):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        if end - start <= MAX_REGION:
            out.append((start, end))
    return out


def found_in_process(pid: int, needles: dict[str, bytes]) -> set[str]:
    """Names of the NEEDLES present in PID's memory (root: reads /proc/PID/mem)."""
    found: set[str] = set()
    overlap = max(len(n) for n in needles.values())
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _regions(pid):
            tail = b""
            at = start
            while at < end:
                size = min(CHUNK, end - at)
                try:
                    mem.seek(at)
                    data = mem.read(size)
                except OSError:
                    break  # unmapped meanwhile, or not readable: nothing to find there
                window = tail + data
                found |= {name for name, n in needles.items() if n in window}
                tail = window[-overlap:]
                at += size
    return found


def found_in_files(folder: Path, needles: dict[str, bytes]) -> dict[Path, set[str]]:
    """Files under FOLDER holding any of NEEDLES, with the names of those they hold."""
    out: dict[Path, set[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits = {name for name, n in needles.items() if n in data}
            if hits:
                out[path] = hits
    return out


def files_scanned(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())
