"""Every Prometheus metric cloudnbd exposes, defined once, in the front process.

Worker processes do not export metrics themselves: each task result they send back
carries its duration, bytes and retries, and the front aggregates them here, so one
scrape of the front shows the whole server. Counters and gauges that already live in the
engine are read at scrape time by a collector instead of being updated twice.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloudnbd.errors import UsageError
from cloudnbd.nbd.protocol import Command

if TYPE_CHECKING:
    from cloudnbd.engine.device import Engine

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_CLOUD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)


class Metrics:
    """The registry of one running volume."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.nbd_request_seconds = Histogram(
            "cloudnbd_nbd_request_duration_seconds",
            "Time from receiving an NBD request to sending its reply, by command.",
            ["command"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        # Every command's series exists from the start at zero, so the first request of a
        # kind shows in rate() at once instead of after two more scrapes.
        self._by_command = {int(c): self.nbd_request_seconds.labels(c.name.lower())
                            for c in Command if c is not Command.DISC}
        self.upload_seconds = Histogram(
            "cloudnbd_upload_duration_seconds",
            "Time an uploader spent on one chunk: assemble, compress, encrypt, PUT.",
            buckets=_CLOUD_BUCKETS, registry=self.registry)
        self.fetch_seconds = Histogram(
            "cloudnbd_fetch_duration_seconds",
            "Time a fetcher spent on one chunk: GET, authenticate, decompress.",
            buckets=_CLOUD_BUCKETS, registry=self.registry)
        self._engine: Engine | None = None
        self._server: object = None

    def observe_request(self, command: int, seconds: float) -> None:
        """The NBD server's hook: one finished request (a protocol.Command value)."""
        self._by_command[command].observe(seconds)  # labels() per request costs more

    def attach(self, engine: Engine, server: object) -> None:
        """Expose the engine's and server's own counters at scrape time."""
        self._engine, self._server = engine, server
        self.registry.register(_EngineCollector(self))

    def serve(self, address: str) -> None:
        """Start the HTTP endpoint at ADDR:PORT (loopback unless an address is given)."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            ipaddress.ip_address(host)
            port_number = int(port)
        except ValueError:
            raise UsageError(f"malformed --metrics address {address!r}: expected "
                             f"ADDR:PORT, e.g. 127.0.0.1:9810") from None
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics are exposed beyond loopback on %s", address)
        start_http_server(port_number, addr=host, registry=self.registry)


class _EngineCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.metrics._engine
        if engine is None:
            return
        stats = engine.stats
        dirty_bytes, dirty_chunks, oldest = engine.backlog()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("cloudnbd_backlog_bytes", "Bytes written but not yet in the cloud.",
                    dirty_bytes)
        yield gauge("cloudnbd_backlog_chunks", "Chunks with data not yet in the cloud.",
                    dirty_chunks)
        yield gauge("cloudnbd_backlog_oldest_age_seconds",
                    "Age of the oldest write not yet in the cloud.", oldest)
        yield gauge("cloudnbd_journal_disk_bytes", "Bytes the local journal occupies.",
                    engine.journal.bytes_on_disk)
        requests = CounterMetricFamily(
            "cloudnbd_cloud_requests",
            "Chunk requests to the object store that were answered, by kind (not counting "
            "retries, nor the few metadata and lease requests of open and close).",
            labels=["kind"])
        requests.add_metric(["put"], stats.uploads)
        requests.add_metric(["delete"], stats.deletes)
        requests.add_metric(["get"], stats.gets)
        yield requests
        traffic = CounterMetricFamily("cloudnbd_cloud_bytes",
                                      "Chunk object bytes sent to and received from the "
                                      "object store.", labels=["direction"])
        traffic.add_metric(["sent"], stats.upload_wire_bytes)
        traffic.add_metric(["received"], stats.fetch_wire_bytes)
        yield traffic
        errors = CounterMetricFamily("cloudnbd_cloud_errors",
                                     "Chunk transfers that failed after all retries.",
                                     labels=["kind"])
        errors.add_metric(["upload"], stats.upload_errors)
        errors.add_metric(["fetch"], stats.fetch_errors)
        yield errors
        yield counter("cloudnbd_cloud_retries", "Retried object-store requests.",
                      stats.retries)
        yield counter("cloudnbd_integrity_errors",
                      "Chunk objects that failed authentication (corrupt or tampered).",
                      stats.integrity_errors)
        yield counter("cloudnbd_uploaded_bytes", "Plain bytes of chunks uploaded.",
                      stats.upload_bytes)
        ratio = stats.upload_bytes / stats.upload_wire_bytes if stats.upload_wire_bytes else 1
        yield gauge("cloudnbd_compression_ratio",
                    "Plain bytes uploaded per byte sent (higher is better).", ratio)
        cache = engine.clean
        yield gauge("cloudnbd_cache_bytes", "Bytes of clean chunks cached locally.",
                    cache.bytes)
        yield gauge("cloudnbd_cache_limit_bytes", "The --cache-size bound.", cache.max_bytes)
        yield counter("cloudnbd_cache_hits", "Reads served from the local cache.",
                      cache.hits)
        yield counter("cloudnbd_cache_misses", "Reads that needed a fetch.", cache.misses)
        server = self.metrics._server
        yield gauge("cloudnbd_nbd_connections", "Open NBD connections.",
                    getattr(server, "connection_count", 0))
        yield counter("cloudnbd_nbd_connections_accepted",
                      "NBD connections accepted since start.",
                      getattr(server, "connections_accepted", 0))
