"""Every Prometheus metric cloudnbd exposes, defined once, in the front process.

Worker processes do not export metrics themselves: each task result they send back
carries its duration, bytes and retries, and the front aggregates them, so one scrape of
the front shows the whole server. Timings arrive through hooks (the NBD server's
on_request, the engine's on_transfer); everything else is rendered at scrape time from
the snapshots the engine and the NBD server give, the same ones `cloudnbd status`
renders (service.py), instead of being counted twice.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloudnbd.engine.device import EngineSnapshot
from cloudnbd.engine.workers import WorkerKind
from cloudnbd.errors import UsageError
from cloudnbd.nbd.protocol import Command
from cloudnbd.nbd.server import ServerSnapshot

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
        self._by_kind = {WorkerKind.UPLOAD: self.upload_seconds,
                         WorkerKind.FETCH: self.fetch_seconds}

    def observe_request(self, command: int, seconds: float) -> None:
        """The NBD server's hook: one finished request (a protocol.Command value)."""
        self._by_command[command].observe(seconds)  # labels() per request costs more

    def observe_transfer(self, kind: WorkerKind, seconds: float) -> None:
        """The engine's hook: one chunk uploaded or fetched."""
        self._by_kind[kind].observe(seconds)

    def attach(self, engine: Callable[[], EngineSnapshot],
               server: Callable[[], ServerSnapshot]) -> None:
        """Expose the engine's and the server's snapshots, taken at each scrape."""
        self.registry.register(_SnapshotCollector(engine, server))

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


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _counters(name: str, doc: str, label: str, values: dict[str, float]
              ) -> CounterMetricFamily:
    """A counter with one series per value of label."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


class _SnapshotCollector(Collector):
    def __init__(self, engine: Callable[[], EngineSnapshot],
                 server: Callable[[], ServerSnapshot]) -> None:
        self.engine = engine
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.engine()
        stats = engine.stats
        yield _gauge("cloudnbd_backlog_bytes",
                     "Bytes written but not yet durable in the cloud (no head names them).",
                     engine.dirty_bytes)
        yield _gauge("cloudnbd_backlog_chunks", "Chunks with writes not yet durable.",
                     engine.dirty_chunks)
        yield _gauge("cloudnbd_backlog_oldest_age_seconds",
                     "Age of the oldest write not yet durable.",
                     engine.oldest_dirty_seconds)
        yield _gauge("cloudnbd_store_journal_objects",
                     "Journal objects in the store not yet folded into chunk objects.",
                     engine.store_journal_objects)
        yield _gauge("cloudnbd_store_journal_bytes",
                     "Bytes of the store's journal objects not yet folded.",
                     engine.store_journal_bytes)
        yield _gauge("cloudnbd_head_generation", "Generation of the volume's head.",
                     engine.head_generation)
        if engine.snapshots is not None:  # known once the first garbage listing is done
            yield _gauge("cloudnbd_snapshots",
                         "Snapshots of the volume, as of the last garbage listing.",
                         engine.snapshots)
            yield _gauge("cloudnbd_snapshot_only_bytes",
                         "Bytes of objects kept alive only by snapshots (the head names "
                         "none of them), as of the last garbage listing.",
                         engine.snapshot_only_bytes or 0)
        yield _counter("cloudnbd_commits", "Commits (a head naming new writes) done.",
                       stats.commits)
        yield _counter("cloudnbd_checkpoints",
                       "Checkpoints done (the store's journal folded into chunks).",
                       stats.checkpoints)
        yield _gauge("cloudnbd_journal_disk_bytes", "Bytes the local journal occupies.",
                     engine.journal_disk_bytes)
        gc = stats.garbage_requests
        yield _counters("cloudnbd_cloud_requests",
                        "Object-store requests of the engine that were answered, by kind "
                        "(one per request: a DeleteObjects of up to 1000 objects is one "
                        "delete, a page of a listing one list; not counting retries, nor "
                        "the few metadata and lease requests of open and close).",
                        "kind", {"put": stats.uploads + stats.journal_objects
                                 + stats.page_puts + stats.head_puts + gc.get("put", 0),
                                 "delete": gc.get("delete", 0),
                                 "get": stats.gets + gc.get("get", 0),
                                 "list": gc.get("list", 0), "head": gc.get("head", 0)})
        yield _counter("cloudnbd_garbage_deleted_objects",
                       "Objects garbage collection deleted.", stats.garbage_deleted)
        yield _counters("cloudnbd_cloud_objects_written",
                        "Objects written to the store, by family.",
                        "family", {"chunk": stats.uploads,
                                   "journal": stats.journal_objects,
                                   "map": stats.page_puts, "head": stats.head_puts})
        yield _counters("cloudnbd_cloud_bytes",
                        "Object bytes sent to and received from the object store.",
                        "direction", {"sent": stats.sent_wire_bytes,
                                      "received": stats.fetch_wire_bytes})
        yield _counters("cloudnbd_cloud_errors",
                        "Transfers that failed after all retries.",
                        "kind", {"upload": stats.upload_errors, "fetch": stats.fetch_errors,
                                 "commit": stats.commit_errors})
        yield _counter("cloudnbd_cloud_retries", "Retried object-store requests.",
                       stats.retries)
        yield _counter("cloudnbd_integrity_errors",
                       "Chunk objects that failed authentication (corrupt or tampered).",
                       stats.integrity_errors)
        yield _counter("cloudnbd_uploaded_bytes", "Plain bytes of chunks uploaded.",
                       stats.upload_bytes)
        ratio = stats.upload_bytes / stats.upload_wire_bytes if stats.upload_wire_bytes else 1
        yield _gauge("cloudnbd_compression_ratio",
                     "Plain bytes uploaded per byte sent (higher is better).", ratio)
        yield _gauge("cloudnbd_cache_bytes", "Bytes of clean chunks cached locally.",
                     engine.cache_bytes)
        yield _gauge("cloudnbd_cache_limit_bytes", "The --cache-size bound.",
                     engine.cache_limit)
        yield _counter("cloudnbd_cache_hits", "Reads served from the local cache.",
                       engine.cache_hits)
        yield _counter("cloudnbd_cache_misses", "Reads that needed a fetch.",
                       engine.cache_misses)
        server = self.server()
        yield _gauge("cloudnbd_nbd_connections", "Open NBD connections.", server.connections)
        yield _counter("cloudnbd_nbd_connections_accepted",
                       "NBD connections accepted since start.", server.connections_accepted)
