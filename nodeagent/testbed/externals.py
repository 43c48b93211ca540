"""The testbed's external servers (topology ``externals``): the outside world of S1.7.

Each one is a network namespace of its own (``layout.external_netns``) on the underlay bridge,
outside the mesh and outside every node, at ``External.ip`` (an underlay address: nothing of it is
routed in the root namespace). Two fake-service processes (nodeagent.testbed.workload) answer in
it: plain HTTP on ``http_port`` and HTTPS on ``https_port``, the latter with a certificate from the
external's OWN CA (never the mesh's), whose SANs are the external's DNS names, as a public server's
certificate names its host. The CA's PEM is ``layout.external_ca_file``: what a DestinationRule's
``caCertificates`` names to originate TLS to it.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import nodeagent
from nodeagent.testbed import layout
from nodeagent.testbed.topology import External

VALIDITY = datetime.timedelta(days=2)
HTTP, HTTPS = "http", "https"  # the two servers of an external


def write_pki(directory: Path, external: External) -> None:
    """DIRECTORY/ca.pem (the external's own self-signed CA), server.pem and server.key (its
    serving certificate: SANs = the external's names, CN = the first)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{external.name} external CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, external.names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in external.names]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    key_path = directory / "server.key"
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)


def server_env(testbed: str, external: External, kind: str) -> dict[str, str]:
    """The fake service's environment for the HTTP or HTTPS server of EXTERNAL."""
    port = external.http_port if kind == HTTP else external.https_port
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(Path(nodeagent.__file__).resolve().parents[1]),
        "NAME": external.name,
        "VERSION": kind,
        "POD_IP": str(external.ip),
        "LISTEN_ADDR": f"0.0.0.0:{port}",
    }
    if kind == HTTPS:
        folder = layout.external_dir(testbed, external.name)
        env |= {"TLS_CERT": str(folder / "server.pem"), "TLS_KEY": str(folder / "server.key")}
    return env


def server_argv() -> list[str]:
    return [sys.executable, "-m", "nodeagent.testbed.workload"]
