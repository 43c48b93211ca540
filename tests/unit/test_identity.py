"""Workload identity as a peer sees it: chains that verify to the mesh root, the SPIFFE SAN, key
types and lifetimes, certificates that follow the node's pods and renew on time, SDS secrets.

No privileges; the rotation test runs a real event loop with a 2 s TTL and bounded waits.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.identity import manager as manager_module
from nodeagent.identity.ca import BuiltinCA, CAError, PluginCA, create_plugin_cacerts
from nodeagent.identity.certs import ChainError, WorkloadCert, issue, spiffe_id, verify_chain
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.secrets import ROOTCA, describe_secrets, root_secret, workload_secret
from nodeagent.translate import tls
from tests.waiting import wait_for_async

TD = "cluster.local"
SA = spiffe_id(TD, "shop", "cart")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leaf(cert: WorkloadCert) -> x509.Certificate:
    return x509.load_pem_x509_certificates(cert.chain_pem)[0]


@pytest.fixture
def plugin_ca(tmp_path: Path) -> PluginCA:
    create_plugin_cacerts(tmp_path / "cacerts", TD)
    return PluginCA.load(tmp_path / "cacerts")


# CA backends


def test_builtin_ca_is_created_private_and_reloaded_identical(tmp_path: Path) -> None:
    first = BuiltinCA.load_or_create(tmp_path, TD)
    ca_dir = tmp_path / "ca"
    assert _mode(ca_dir) == 0o700
    assert _mode(ca_dir / "root-cert.pem") == 0o600
    assert _mode(ca_dir / "ca-key.pem") == 0o600

    again = BuiltinCA.load_or_create(tmp_path, TD)
    assert again.root_pem == first.root_pem
    # The reloaded key is the same key: what it signs verifies to the first start's root.
    verify_chain(issue(again, SA, timedelta(hours=1)).chain_pem, first.root_pem)

    root = x509.load_pem_x509_certificate(first.root_pem)
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nodeagent root CA"
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)


def test_builtin_ca_with_a_lost_file_names_it_instead_of_making_a_new_root(tmp_path: Path) -> None:
    BuiltinCA.load_or_create(tmp_path, TD)
    (tmp_path / "ca" / "ca-key.pem").unlink()
    with pytest.raises(CAError, match=r"ca-key\.pem: missing"):
        BuiltinCA.load_or_create(tmp_path, TD)


def test_builtin_ca_signs_only_its_trust_domain(tmp_path: Path) -> None:
    ca = BuiltinCA.load_or_create(tmp_path, TD)
    with pytest.raises(ValueError, match="outside trust domain"):
        issue(ca, spiffe_id("other.domain", "shop", "cart"), timedelta(hours=1))


def test_plugin_ca_chain_with_intermediate_verifies_to_root_cert(tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    create_plugin_cacerts(cacerts, TD)
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        assert _mode(cacerts / name) == 0o600, name
    ca = PluginCA.load(cacerts)
    assert ca.root_pem == (cacerts / "root-cert.pem").read_bytes()

    cert = issue(ca, SA, timedelta(hours=1))
    chain = x509.load_pem_x509_certificates(cert.chain_pem)
    root = x509.load_pem_x509_certificate(ca.root_pem)
    intermediate = x509.load_pem_x509_certificate((cacerts / "ca-cert.pem").read_bytes())
    assert chain[1:] == [intermediate]  # leaf + intermediate, root left out
    assert cert.root_pem == ca.root_pem
    verify_chain(cert.chain_pem, (cacerts / "root-cert.pem").read_bytes())

    other = tmp_path / "other"
    create_plugin_cacerts(other, TD)
    with pytest.raises(ChainError, match="does not verify"):
        verify_chain(cert.chain_pem, (other / "root-cert.pem").read_bytes())
    with pytest.raises(ChainError, match="does not verify"):
        verify_chain(chain[0].public_bytes(serialization.Encoding.PEM), ca.root_pem)
    assert root not in chain


def test_plugin_ca_signing_with_the_root_itself_sends_the_leaf_only(tmp_path: Path) -> None:
    create_plugin_cacerts(tmp_path, TD, intermediate=False)
    ca = PluginCA.load(tmp_path)
    cert = issue(ca, SA, timedelta(hours=1))
    assert len(x509.load_pem_x509_certificates(cert.chain_pem)) == 1
    verify_chain(cert.chain_pem, ca.root_pem)


def _break_key_mismatch(cacerts: Path, other: Path) -> None:
    (cacerts / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())


def _break_not_a_ca(cacerts: Path, other: Path) -> None:
    ca = PluginCA.load(cacerts)
    leaf = issue(ca, SA, timedelta(hours=1))
    (cacerts / "ca-cert.pem").write_bytes(
        x509.load_pem_x509_certificates(leaf.chain_pem)[0].public_bytes(serialization.Encoding.PEM)
    )


def _break_foreign_root(cacerts: Path, other: Path) -> None:
    (cacerts / "root-cert.pem").write_bytes((other / "root-cert.pem").read_bytes())


def _break_garbage_chain(cacerts: Path, other: Path) -> None:
    (cacerts / "cert-chain.pem").write_bytes(b"not a certificate\n")


def _break_missing_key(cacerts: Path, other: Path) -> None:
    (cacerts / "ca-key.pem").unlink()


def _break_chain_not_starting_with_ca_cert(cacerts: Path, other: Path) -> None:
    (cacerts / "cert-chain.pem").write_bytes((cacerts / "root-cert.pem").read_bytes())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_missing_key, r"ca-key\.pem: missing"),
        (_break_key_mismatch, r"ca-key\.pem: does not match the public key of ca-cert\.pem"),
        (_break_not_a_ca, r"ca-cert\.pem: not a CA certificate"),
        (_break_foreign_root, r"cert-chain\.pem: does not chain to root-cert\.pem"),
        (_break_garbage_chain, r"cert-chain\.pem: not a PEM certificate"),
        (_break_chain_not_starting_with_ca_cert, r"cert-chain\.pem: its first certificate"),
    ],
)
def test_broken_cacerts_errors_name_the_file(
    tmp_path: Path, damage: Callable[[Path, Path], None], message: str
) -> None:
    cacerts, other = tmp_path / "cacerts", tmp_path / "other"
    create_plugin_cacerts(cacerts, TD)
    create_plugin_cacerts(other, TD)
    damage(cacerts, other)
    with pytest.raises(CAError, match=message) as raised:
        PluginCA.load(cacerts)
    assert "PRIVATE KEY" not in str(raised.value)


# Workload certificates


def test_leaf_names_only_the_spiffe_id_and_serves_both_tls_roles(plugin_ca: PluginCA) -> None:
    leaf = _leaf(issue(plugin_ca, SA, timedelta(hours=1)))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SA)]
    assert SA == "spiffe://cluster.local/ns/shop/sa/cart"
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _key_matches(cert: WorkloadCert) -> CertificatePublicKeyTypes:
    assert b"-----BEGIN PRIVATE KEY-----" in cert.key_pem  # PKCS8
    key = serialization.load_pem_private_key(cert.key_pem, password=None)
    public = _leaf(cert).public_key()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == public.public_bytes(*spki)
    return public


def test_ec_p256_by_default_rsa_2048_on_request(plugin_ca: PluginCA) -> None:
    ec_key = _key_matches(issue(plugin_ca, SA, timedelta(hours=1)))
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    assert isinstance(ec_key.curve, ec.SECP256R1)

    rsa_cert = issue(plugin_ca, SA, timedelta(hours=1), key_type="RSA")
    rsa_key = _key_matches(rsa_cert)
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    assert rsa_key.key_size == 2048
    verify_chain(rsa_cert.chain_pem, plugin_ca.root_pem)
    assert "PRIVATE KEY" not in repr(rsa_cert)


def test_lifetime_is_the_ttl_backdated_one_minute(plugin_ca: PluginCA) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = issue(plugin_ca, SA, timedelta(hours=3))
    after = datetime.now(UTC)
    leaf = _leaf(cert)
    assert cert.serial == leaf.serial_number
    assert cert.not_after == leaf.not_valid_after_utc
    assert before + timedelta(hours=3) <= cert.not_after <= after + timedelta(hours=3)
    assert before - timedelta(minutes=1) <= cert.not_before <= after - timedelta(minutes=1)
    assert issue(plugin_ca, SA, timedelta(hours=3)).serial != cert.serial  # random serials


# The manager


class FlakyCA:
    """Delegates to a real CA after failing a given number of times."""

    def __init__(self, ca: PluginCA, failures: int) -> None:
        self.ca = ca
        self.failures = failures
        self.root_pem = ca.root_pem

    def sign(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta
    ) -> list[bytes]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("CA unreachable")
        return self.ca.sign(public_key, spiffe_id, ttl)


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _issue(mgr: IdentityManager) -> int:
    """One pass of the renewal loop: what it issues after set_local_identities scheduled it."""
    return asyncio.run(mgr.renew_due())


def test_manager_issues_on_first_pod_and_forgets_on_last(plugin_ca: PluginCA) -> None:
    changes: list[int] = []
    registry = CollectorRegistry()
    mgr = IdentityManager(plugin_ca, TD, on_change=lambda: changes.append(1), registry=registry)
    cart, pay = spiffe_id(TD, "shop", "cart"), spiffe_id(TD, "shop", "pay")

    mgr.set_local_identities([("shop", "cart"), ("shop", "cart"), ("shop", "pay")])
    assert mgr.certs() == {}  # scheduled: the push that asked does not wait for the CA
    assert changes == []
    assert _issue(mgr) == 2
    certs = mgr.certs()
    assert set(certs) == {cart, pay}
    assert len(changes) == 1
    verify_chain(certs[cart].chain_pem, plugin_ca.root_pem)
    assert _metric(registry, "nodeagent_identities") == 2
    # :15020 names no identity (#12): one figure, the first expiry of them all.
    expiry = _metric(registry, "nodeagent_cert_earliest_expiry_timestamp_seconds")
    assert expiry == min(c.not_after.timestamp() for c in certs.values())
    assert "spiffe://" not in generate_latest(registry).decode()

    mgr.set_local_identities([("shop", "pay"), ("shop", "cart")])  # another pod, same accounts
    assert mgr.certs() == certs
    assert len(changes) == 1

    mgr.set_local_identities([("shop", "pay")])  # cart's last pod left
    assert set(mgr.certs()) == {pay}
    assert mgr.certs()[pay] == certs[pay]
    assert len(changes) == 2
    assert _metric(registry, "nodeagent_identities") == 1
    expiry = _metric(registry, "nodeagent_cert_earliest_expiry_timestamp_seconds")
    assert expiry == certs[pay].not_after.timestamp()
    mgr.set_local_identities([])
    assert _metric(registry, "nodeagent_cert_earliest_expiry_timestamp_seconds") is None

    mgr.set_local_identities([("shop", "cart"), ("shop", "pay")])  # back: a new key and cert
    assert _issue(mgr) == 2
    assert mgr.certs()[cart].serial != certs[cart].serial


def test_renewal_at_half_life_with_jitter_on_a_fake_clock(plugin_ca: PluginCA) -> None:
    now = [1000.0]
    registry = CollectorRegistry()
    changes: list[int] = []
    mgr = IdentityManager(
        plugin_ca,
        TD,
        ttl=timedelta(hours=1),
        on_change=lambda: changes.append(1),
        clock=lambda: now[0],
        registry=registry,
    )
    mgr.set_local_identities([("shop", "cart")])
    assert _issue(mgr) == 1
    first = mgr.certs()[SA]

    now[0] += 0.39 * 3600  # before the earliest jittered renewal (40% of the lifetime)
    assert asyncio.run(mgr.renew_due()) == 0
    now[0] += 0.11 * 3600  # half-life: always due
    assert asyncio.run(mgr.renew_due()) == 1
    assert mgr.certs()[SA].serial != first.serial
    assert _metric(registry, "nodeagent_cert_rotations_total") == 1
    assert len(changes) == 2


def test_issuance_failures_are_retried_with_backoff(
    plugin_ca: PluginCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = [0.0]
    registry = CollectorRegistry()
    changes: list[int] = []
    flaky = FlakyCA(plugin_ca, failures=2)
    mgr = IdentityManager(
        flaky, TD, on_change=lambda: changes.append(1), clock=lambda: now[0], registry=registry
    )
    mgr.set_local_identities([("shop", "cart")])
    assert _issue(mgr) == 0
    assert mgr.certs() == {}
    assert changes == []
    assert SA in caplog.text and "CA unreachable" in caplog.text

    assert asyncio.run(mgr.renew_due()) == 0  # backoff not elapsed yet
    now[0] += 1.3 * manager_module.RETRY_INITIAL
    assert asyncio.run(mgr.renew_due()) == 0  # second failure, longer backoff
    assert _metric(registry, "nodeagent_cert_issuance_failures_total") == 2
    now[0] += 2.5 * manager_module.RETRY_INITIAL
    assert asyncio.run(mgr.renew_due()) == 1
    assert set(mgr.certs()) == {SA}
    assert len(changes) == 1
    assert _metric(registry, "nodeagent_cert_rotations_total") == 0  # a first issue, not a renewal


def test_after_an_outage_longer_than_the_ttl_the_identity_recovers_within_seconds(
    plugin_ca: PluginCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long outage backs renewal off to RETRY_MAX; once the certificate expires and is
    dropped, the identity is asked for at most RETRY_MAX_WITHOUT_CERT (+20 % jitter) apart,
    so it has a certificate again within seconds of the CA's return."""
    now = [time.time()]
    # Expiry on the same fake clock as the retries (the manager reads the wall clock for it).
    monkeypatch.setattr(
        IdentityManager, "_expired", staticmethod(lambda c: c.not_after.timestamp() <= now[0])
    )
    registry = CollectorRegistry()
    ca = FlakyCA(plugin_ca, failures=0)
    ttl = 600.0
    mgr = IdentityManager(
        ca, TD, ttl=timedelta(seconds=ttl), clock=lambda: now[0], registry=registry
    )
    mgr.set_local_identities([("shop", "cart")])
    assert _issue(mgr) == 1
    expires = mgr.certs()[SA].not_after.timestamp()
    entry = mgr._identities[SA]

    ca.failures = 10**6  # the CA goes away for longer than the certificate lives
    now[0] = entry.due_at
    backoff = 0.0
    while now[0] < expires:  # renewal fails from half-life on, backing off towards RETRY_MAX
        asyncio.run(mgr.renew_due())
        assert set(mgr.certs()) == {SA}  # the current certificate keeps serving meanwhile
        backoff = entry.due_at - now[0]
        now[0] = min(entry.due_at, expires)
    assert backoff > 2 * manager_module.RETRY_MAX_WITHOUT_CERT  # backed off: no retry soon

    bound = manager_module.RETRY_MAX_WITHOUT_CERT * 1.2
    failures = _metric(registry, "nodeagent_cert_issuance_failures_total") or 0
    for _ in range(5):  # expired: dropped at once (fail closed), then retried promptly
        asyncio.run(mgr.renew_due())
        assert mgr.certs() == {}
        assert "CA unreachable" in mgr.identity_problem(SA)
        assert _metric(registry, "nodeagent_cert_issuance_failures_total") == failures + 1
        failures += 1
        assert entry.due_at - now[0] <= bound
        now[0] = entry.due_at
    assert _metric(registry, "nodeagent_cert_expired_total") == 1

    ca.failures = 0  # the CA is back: the next retry, at most `bound` later, issues
    mgr.ttl = timedelta(hours=1)  # valid on the fake clock, which is ahead of the CA's
    assert asyncio.run(mgr.renew_due()) == 1
    assert set(mgr.certs()) == {SA}
    assert mgr.identity_problem(SA) == ""


def test_a_failing_ca_never_stops_the_loop(plugin_ca: PluginCA) -> None:
    mgr = IdentityManager(FlakyCA(plugin_ca, failures=10**6), TD)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mgr.run(stop))
        mgr.set_local_identities([("shop", "cart")])
        # The failure is recorded once the loop has handled it: the loop lives on.
        await wait_for_async(
            lambda: "CA unreachable" in mgr.identity_problem(SA), 2, "the failure recorded"
        )
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, timeout=2)

    asyncio.run(scenario())
    assert mgr.certs() == {}


def test_rotation_loop_renews_at_half_life_and_logs_no_keys(
    plugin_ca: PluginCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    changes: list[float] = []
    registry = CollectorRegistry()
    mgr = IdentityManager(
        plugin_ca,
        TD,
        ttl=timedelta(seconds=2),
        on_change=lambda: changes.append(time.monotonic()),
        registry=registry,
    )

    async def scenario() -> tuple[WorkloadCert, WorkloadCert, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(mgr.run(stop))
        issued = time.monotonic()
        mgr.set_local_identities([("shop", "cart")])
        await wait_for_async(lambda: SA in mgr.certs(), 1, "the first certificate")
        first = mgr.certs()[SA]
        await wait_for_async(
            lambda: mgr.certs()[SA].serial != first.serial,
            issued + 1.2 - time.monotonic(),
            "a renewal within 1.2 s of a 2 s certificate",
        )
        # The renewal loop pushes (on_change) on its next pass after installing the new cert.
        await wait_for_async(lambda: len(changes) >= 2, 0.5, "the renewed certificate pushed")
        stop.set()
        await asyncio.wait_for(task, timeout=2)
        return first, mgr.certs()[SA], issued

    first, renewed, issued = asyncio.run(scenario())
    assert renewed.serial != first.serial, "no renewal within 1.2 s of a 2 s certificate"
    verify_chain(renewed.chain_pem, plugin_ca.root_pem)
    assert len(changes) >= 2
    assert changes[1] - issued >= 0.75  # not before 40% of the lifetime (minus timer slack)
    assert (_metric(registry, "nodeagent_cert_rotations_total") or 0) >= 1

    assert SA in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    for cert in (first, renewed):
        body = b"".join(cert.key_pem.splitlines()[1:-1]).decode()
        assert body[:40] not in caplog.text


# SDS secrets


def test_workload_and_root_secrets(plugin_ca: PluginCA) -> None:
    cert = issue(plugin_ca, SA, timedelta(hours=1))
    secret = workload_secret(cert)
    assert secret.name == SA
    assert secret.tls_certificate.certificate_chain.inline_bytes == cert.chain_pem
    assert secret.tls_certificate.private_key.inline_bytes == cert.key_pem

    root = root_secret(plugin_ca.root_pem)
    assert root.name == ROOTCA == tls.ROOTCA == "ROOTCA"
    assert root.validation_context.trusted_ca.inline_bytes == plugin_ca.root_pem


def _dynamic(secret: Any) -> dict[str, Any]:
    as_json = json_format.MessageToDict(secret, preserving_proto_field_name=True)
    as_json["@type"] = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    if "tls_certificate" in as_json:  # what Envoy's admin shows instead of the key
        redacted = base64.b64encode(b"[redacted]").decode()
        as_json["tls_certificate"]["private_key"] = {"inline_bytes": redacted}
    return {"name": secret.name, "version_info": "1", "secret": as_json}


def test_describe_secrets_from_an_envoy_config_dump(plugin_ca: PluginCA) -> None:
    cert = issue(plugin_ca, SA, timedelta(hours=1))
    broken = {"name": "broken", "secret": {"tls_certificate": {"certificate_chain": {}}}}
    dump = {
        "configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"},
            {
                "@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
                "dynamic_active_secrets": [
                    _dynamic(workload_secret(cert)),
                    _dynamic(root_secret(plugin_ca.root_pem)),
                    broken,
                ],
            },
        ]
    }
    root = x509.load_pem_x509_certificate(plugin_ca.root_pem)
    fingerprint = root.fingerprint(hashes.SHA256()).hex()

    workload, rootca, bad = describe_secrets(dump)
    assert workload == {
        "name": SA,
        "identity": SA,
        "serial": f"{cert.serial:x}",
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "root_fingerprint": fingerprint,
    }
    assert rootca["name"] == ROOTCA
    assert rootca["identity"] == ""
    assert rootca["serial"] == f"{root.serial_number:x}"
    assert rootca["root_fingerprint"] == fingerprint
    assert bad["name"] == "broken" and "no certificate" in bad["error"]
    assert all("redacted" not in value and "KEY" not in value for value in workload.values())


class StuckIssuer:
    """Issues from a real CA, except that requests for SA hang (a CA that never answers)."""

    name = "a stuck CA"
    refresh_interval = None

    def __init__(self, ca: PluginCA) -> None:
        self.ca = ca
        self.root_pem = ca.root_pem
        self.on_bundle_change: Callable[[], None] | None = None
        self.closed = False
        self.asked: list[str] = []

    async def issue(self, sid: str, ttl: timedelta, key_type: Any) -> WorkloadCert:
        self.asked.append(sid)
        if sid == SA:
            await asyncio.Event().wait()
        return issue(self.ca, sid, ttl, key_type)

    async def refresh(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def test_a_request_the_ca_does_not_answer_holds_up_no_other_identity(plugin_ca: PluginCA) -> None:
    issuer = StuckIssuer(plugin_ca)
    mgr = IdentityManager(issuer, TD)
    pay = spiffe_id(TD, "shop", "pay")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mgr.run(stop))
        mgr.set_local_identities([("shop", "cart")])
        await wait_for_async(lambda: SA in issuer.asked, 2, "the request for cart to hang")
        mgr.set_local_identities([("shop", "cart"), ("shop", "pay")])  # a new pod arrives
        await wait_for_async(lambda: pay in mgr.certs(), 2, "pay's certificate")
        assert set(mgr.certs()) == {pay}
        assert "being issued" in mgr.identity_problem(SA)
        stop.set()
        await asyncio.wait_for(task, timeout=2)  # the stuck request is cancelled on stop

    asyncio.run(scenario())
    assert issuer.closed
