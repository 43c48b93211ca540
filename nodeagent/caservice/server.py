"""The CA service: signing material kept current, the root published, the certificate API
served over TLS, monitoring.

The gRPC port's TLS certificate is fetched per handshake (``grpc.dynamic_ssl_server_credentials``)
so that a new signer (root rotation) or a renewal takes effect without restarting the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any

import grpc

from nodeagent.caservice.config import CAConfig
from nodeagent.caservice.keystore import KeyStore, Signer
from nodeagent.caservice.kubeapi import APIError, ClusterAPI
from nodeagent.caservice.metrics import CAMetrics, serve_monitoring
from nodeagent.caservice.rootcert import publish_root
from nodeagent.caservice.servercert import ServerCert, server_certificate
from nodeagent.caservice.service import CertificateService
from nodeagent.identity.ca import CAError

log = logging.getLogger("nodeagent.caservice")

RETRY_MIN, RETRY_MAX = 0.5, 10.0  # first load: how often to try while the API or Secret is bad


class CAServer:
    def __init__(self, config: CAConfig, api: ClusterAPI | None = None) -> None:
        self.config = config
        self.api = api
        self.metrics = CAMetrics()
        self.signer: Signer | None = None
        self.server_cert: ServerCert | None = None
        self.port = 0  # the gRPC port, once started
        self.monitoring_port = 0
        self.last_error = ""  # why the latest reload failed ("" when it worked)
        self._tls: Any = None  # (serial, grpc config): read from gRPC's handshake threads
        self._tls_serial = 0
        self._served_serial = 0  # the configuration gRPC holds
        self._grpc: grpc.aio.Server | None = None
        self._monitoring: ThreadingHTTPServer | None = None
        self._owns_api = api is None
        self._published = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Load the signer (retrying while the API or the Secret is bad), then serve."""
        if self.api is None:
            self.api = await ClusterAPI.connect(self.config.kubeconfig)
        if self.config.monitoring is not None:
            host, port = self.config.monitoring
            self._monitoring = serve_monitoring(host, port, self.metrics, self.ready)
            self.monitoring_port = self._monitoring.server_address[1]
        delay = RETRY_MIN
        while not await self.reload():
            if stop is not None and stop.is_set():
                return
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)
        assert self._tls is not None
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [CertificateService(self.config, self.api, lambda: self.signer, self.metrics).handler()]
        )
        self._served_serial = self._tls[0]
        credentials = grpc.dynamic_ssl_server_credentials(self._tls[1], self._fetch_tls)
        host, port = self.config.listen
        self.port = server.add_secure_port(f"{host}:{port}", credentials)
        await server.start()
        self._grpc = server
        log.info(
            "CA serving %s on %s:%d (TLS names %s), signing from %s",
            "IstioCertificateService",
            host,
            self.port,
            ", ".join(self.config.server_names),
            self.signer.source if self.signer else "?",
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Re-read the signing Secrets every --reload-interval until STOP."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.reload_interval)
            if not stop.is_set():
                await self.reload()

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=1)
        if self._monitoring is not None:
            self._monitoring.shutdown()
            self._monitoring.server_close()
        if self._owns_api and self.api is not None:
            await self.api.close()

    def ready(self) -> str:
        if self.signer is None:
            return f"no signing key: {self.last_error or 'loading'}"
        if self._grpc is None:
            return "the certificate API is not serving yet"
        if not self._published:
            return f"the root bundle is not published yet: {self.last_error}"
        return ""

    # -- signing material ---------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the signing Secrets; adopt a changed signer, re-make the TLS certificate when
        due, publish the root bundle. A bad Secret or a failing API keeps what was (logged);
        False when there is still no signer."""
        assert self.api is not None
        keystore = KeyStore(self.api, self.config.namespace, self.config.trust_domain)
        try:
            signer = await keystore.load(self.signer)
        except (CAError, APIError) as e:
            self._failed(str(e))
            return self.signer is not None
        if signer is not self.signer:
            if self.signer is not None:
                log.warning(
                    "the signing material changed (%s): new signer, server certificate and "
                    "root bundle",
                    signer.source,
                )
            self.signer = signer
            self.metrics.root_expiry.set(signer.root_expiry.timestamp())
        now = datetime.now(UTC)
        if self.server_cert is None or self.server_cert.stale(signer, now):
            self._set_server_cert(server_certificate(signer, self.config.server_names))
        try:
            await publish_root(self.api, self.config.namespace, signer.root_pem)
        except APIError as e:
            self._failed(f"publishing the root bundle: {e}")
            return True
        self._published = True
        self.last_error = ""
        return True

    def _failed(self, error: str) -> None:
        if error != self.last_error:  # once per distinct problem, not every interval
            keeping = (
                f"keeping the signer from {self.signer.source}" if self.signer else "no signer"
            )
            log.error("%s (%s; retrying)", error, keeping)
        self.last_error = error

    def _set_server_cert(self, cert: ServerCert) -> None:
        self.server_cert = cert
        self._tls_serial += 1
        config = grpc.ssl_server_certificate_configuration([(cert.key_pem, cert.chain_pem)])
        self._tls = (self._tls_serial, config)

    def _fetch_tls(self) -> Any:
        """gRPC asks before each handshake: a new configuration, or None to keep the last."""
        serial, config = self._tls
        if serial == self._served_serial:
            return None
        self._served_serial = serial
        return config


async def run(config: CAConfig) -> None:
    """``nodeagent ca``: until SIGTERM/SIGINT."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = CAServer(config)
    started = time.monotonic()
    try:
        await server.start(stop)
        if not stop.is_set():
            log.info("CA ready in %.1fs", time.monotonic() - started)
            await server.run(stop)
    finally:
        await server.stop()
