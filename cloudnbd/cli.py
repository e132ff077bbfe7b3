"""The cloudnbd command: parse arguments, call the library, print results and errors.

No business logic lives here. Every CloudnbdError becomes one line on stderr and the
error's exit code; a traceback is shown only with --debug.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cloudnbd import __version__, backends, config, logs, volume
from cloudnbd.backends import BACKENDS, StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore, RetryPolicy
from cloudnbd.chunks import chunk_index
from cloudnbd.codec import Argon2idParams
from cloudnbd.errors import (
    CloudnbdError,
    DamagedVolume,
    UnsupportedFormat,
    UsageError,
    VolumeBusy,
    local_error,
)
from cloudnbd.hardening import no_core_dumps
from cloudnbd.password import check_private_file, get_password, scrub_environment
from cloudnbd.progress import Progress
from cloudnbd.sizes import SIZE_HELP, format_size, parse_size

if TYPE_CHECKING:
    from cloudnbd.lease import Lease
    from cloudnbd.nbd.server import ServerSettings
    from cloudnbd.runtime import Entry, LocalState
    from cloudnbd.service import ServeSettings, Service

log = logging.getLogger("cloudnbd")

LOCATION_HELP = backends.location_help()


def _store_options(args: argparse.Namespace) -> StoreOptions:
    return StoreOptions(
        endpoint_url=args.endpoint_url,
        credentials_file=args.credentials,
        interactive=sys.stdin.isatty(),
        retry=RetryPolicy(deadline=args.timeout),
    )


def _resolve(args: argparse.Namespace) -> None:
    """Fill args with effective settings: command line, then config files, then defaults.

    Commands that take `BACKEND|NAME [VOLUME]` accept the name of a volume defined in
    the config directory instead of a backend and location.
    """
    cli = {key: getattr(args, key) for key in config.SETTINGS if hasattr(args, key)}
    name = None
    if hasattr(args, "target"):
        if args.volume is None:
            name = args.target
        elif args.target not in BACKENDS:
            raise UsageError(f"unknown backend {args.target!r}: choose one of "
                             f"{', '.join(BACKENDS)}, or give the NAME of a configured "
                             f"volume alone")
        else:
            cli["backend"], cli["location"] = args.target, args.volume
    elif hasattr(args, "backend"):
        cli["backend"] = args.backend
    settings = config.effective(name, cli, args.config_dir)
    args.settings = settings
    args.config_name = name
    for key, value in settings.items():
        if key == "location":
            continue
        if hasattr(args, key) or key not in ("backend",):
            setattr(args, key, value.value)
    if hasattr(args, "target"):
        args.backend = settings["backend"].value
        args.volume = settings["location"].value


def _store(args: argparse.Namespace, location: str | None = None) -> ObjectStore:
    return open_store(args.backend, location or args.volume, _store_options(args))


def _front_store(args: argparse.Namespace) -> ObjectStore:
    """The serving process's own store. A cloud SDK stays out of that long-lived process:
    its few requests go through an agent forked from the zygote (backends.remote)."""
    if backends.find(args.backend).in_front:
        return _store(args)
    from cloudnbd.backends.remote import RemoteStore

    return RemoteStore(args.backend, args.volume, _store_options(args))


def _kdf(args: argparse.Namespace) -> Argon2idParams | None:
    """Explicit parameters from --kdf-cost; None: calibrate on this machine."""
    from cloudnbd import kdf

    return None if args.kdf_cost is None else kdf.explicit(args.kdf_cost)


def _unlock(args: argparse.Namespace, password: str | None = None) -> volume.Volume:
    """The volume, unlocked with password (else the one the user gives). A version-3
    head older than the newest this machine has seen is refused here, for every command
    (freshness.check_head)."""
    store = _store(args)
    volume.read_metadata(store)  # a missing or too-new volume is reported before the prompt
    if password is None:
        password = get_password(args.password_file)
    vol = volume.unlock(store, password)
    if vol.meta.version >= volume.LAYOUT_V3:
        from cloudnbd.reader import read_head

        read_head(vol)
    return vol


def _require_v3(meta: volume.VolumeMeta, args: argparse.Namespace, command: str) -> None:
    """Refuse a command that needs the version-3 layout on an older volume, naming the
    one that converts it."""
    if meta.version < volume.LAYOUT_V3:
        raise UnsupportedFormat(
            f"{command} needs a volume of format version {volume.LAYOUT_V3}, and this one "
            f"is version {meta.version}: convert it once with `cloudnbd upgrade "
            f"{_target(args)}` (resumable; export and verify read it as it is meanwhile)")


def _size_change_note(requested: int, rounded: int) -> str:
    if requested == rounded:
        return ""
    return (f" (rounded up from {requested} bytes to a multiple of "
            f"{format_size(volume.SIZE_ALIGNMENT)}, as NBD clients need)")


# -- commands ------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> None:
    requested = parse_size(args.size)
    size = volume.round_size(requested)
    chunk_size = parse_size(args.chunk_size, "chunk size")
    volume.check_geometry(size, chunk_size)
    store = _store(args)
    volume.check_location_free(store)  # before the password is asked for
    password = get_password(args.password_file, confirm=True, prompt="New volume password: ")
    created = volume.create(store, size, chunk_size, password, _kdf(args))
    print(f"Created volume {store.description}: {format_size(size)} ({size} bytes)"
          f"{_size_change_note(requested, size)}, chunk size {format_size(chunk_size)}.")
    print(f"Volume id {created.meta.volume_id.hex()}. Nothing is stored until data is "
          f"written; keep the password safe, without it the data cannot be recovered.")
    print(f"Key slot 0: {created.meta.slots[0].kdf} (opening needs that much memory).")


def cmd_info(args: argparse.Namespace) -> None:
    vol = _unlock(args)
    meta = vol.meta
    info: dict[str, Any] = {
        "location": vol.store.description,
        "volume_id": meta.volume_id.hex(),
        "format_version": meta.version,
        "size": meta.size,
        "chunk_size": meta.chunk_size,
        "chunks": meta.chunk_count,
        **(_stored_v3(vol) if meta.version >= volume.LAYOUT_V3 else _stored_v1(vol)),
        "key_slots": [{"slot": s.slot, **s.kdf.fields()} for s in meta.slots],
        "generation": meta.generation,
        "created": meta.created,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    slots = "; ".join(f"slot {s.slot}: {s.kdf}" for s in meta.slots)
    print(f"location:        {info['location']}")
    print(f"volume id:       {info['volume_id']}")
    print(f"format version:  {info['format_version']}")
    print(f"size:            {format_size(meta.size)} ({meta.size} bytes)")
    print(f"chunk size:      {format_size(meta.chunk_size)}")
    print(f"chunks stored:   {info['stored_chunks']} of {meta.chunk_count}")
    print(f"stored bytes:    {format_size(info['stored_bytes'])} ({info['stored_bytes']})")
    if "head" in info:
        head = info["head"]
        print(f"head:            generation {head['generation']}, written "
              f"{head['written']} ({head['key']})")
        print(f"cloud journal:   {info['journal_objects']} objects, "
              f"{format_size(info['journal_bytes'])} (folded into chunks at close)")
        if info["garbage_objects"] is None:
            print(f"garbage:         unknown: {info['damaged_objects']} objects the head "
                  f"names are missing or damaged; run cloudnbd verify")
        else:
            print(f"garbage:         {info['garbage_objects']} objects, "
                  f"{format_size(info['garbage_bytes'])} (no head names them)")
    print(f"key slots:       {len(meta.slots)} ({slots})")
    print(f"generation:      {meta.generation}")
    print(f"created:         {meta.created}")


def _stored_v1(vol: volume.Volume) -> dict[str, Any]:
    """What a volume of version 1 or 2 stores: its chunk objects, from a listing."""
    stored = list(vol.stored_chunks())
    return {"stored_chunks": len(stored),
            "stored_bytes": sum(info.size for _, info in stored)}


def _stored_v3(vol: volume.Volume) -> dict[str, Any]:
    """What a version-3 volume stores, as its head says (map pages and journal) and a
    listing sizes: the chunks held by objects, the bytes of every named object, the
    store's journal, and garbage."""
    from cloudnbd.reader import Image, garbage, read_head
    from cloudnbd.volume import own_objects

    head, _ = read_head(vol)
    damaged: list[str] = []
    image = Image(vol, head, on_damage=lambda key, _: damaged.append(key))
    listing = list(own_objects(vol.store))
    found = garbage(vol, listing, image.named) if image.complete else None
    return {
        "stored_chunks": sum(1 for s in image.sources.values() if s.stamp),
        "stored_bytes": sum(i.size for i in listing
                            if i.key in image.named and i.key != vol.meta.head),
        "head": {"key": vol.meta.head, "generation": head.generation, "seq": head.seq,
                 "epoch": head.epoch, "written": head.written},
        "journal_objects": len(head.journal),
        "journal_bytes": sum(ref.size for ref in head.journal),
        "garbage_objects": None if found is None else len(found),
        "garbage_bytes": None if found is None else sum(i.size for i in found),
        "damaged_objects": len(damaged),
    }


def cmd_passwd(args: argparse.Namespace) -> None:
    store = _store(args)
    volume.read_metadata(store)
    current = get_password(args.password_file, prompt="Current password: ")
    vol = _unlock(args, current)
    if args.remove is not None:
        vol.remove_slot(args.remove)
        print(f"Removed key slot {args.remove}.")
        return
    new = get_password(args.new_password_file, confirm=True, prompt="New password: ")
    if not new:
        raise UsageError("the new password must not be empty")
    kdf = _kdf(args)
    if args.add:
        number = vol.add_password(new, kdf)
        print(f"Added key slot {number}.")
    else:
        number = vol.change_password(current, new, kdf)
        print(f"Changed the password of key slot {number}; no data was re-encrypted.")


def cmd_resize(args: argparse.Namespace) -> None:
    from cloudnbd import runtime, transfer

    requested = parse_size(args.size)
    size = volume.round_size(requested)
    volume.check_size(size)
    vol = _unlock(args)
    old = vol.meta.size
    if size == old:
        print(f"Volume is already {format_size(size)} ({size} bytes).")
        return
    if size < old and not args.shrink:
        raise UsageError(f"{format_size(size)} is smaller than the volume "
                         f"({format_size(old)}); data past it would be destroyed. "
                         f"Pass --shrink to do so")
    if size < old:
        _require_v3(vol.meta, args, "resize --shrink")
    volume.check_geometry(size, vol.meta.chunk_size)
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
    if local.running is not None:
        if size < old:
            raise VolumeBusy(f"volume is open on this machine (pid "
                                   f"{local.running.pid}); close it before shrinking")
        answer = _control(local.running, {"cmd": "grow", "size": size})
        print(f"Resized {vol.store.description} from {format_size(old)} to "
              f"{format_size(size)} ({size} bytes){_size_change_note(requested, size)}, "
              f"through its running server: new connections see the new size; clients "
              f"already connected keep the old one until they reconnect "
              f"(then grow the filesystem, e.g. btrfs filesystem resize max).")
        del answer
        return
    if size < old:
        _confirm(args, f"Shrink {vol.store.description} from {format_size(old)} to "
                       f"{format_size(size)}, deleting everything past the new end?")
    held = _exclusive(vol, args.force, "resize", local)
    try:
        if size < old:
            progress, update = _progress_callback("Shrinking")
            transfer.shrink(vol, size, held.epoch, progress=update)
            progress.finish()
        else:
            vol.grow(size)
    finally:
        held.release()
    print(f"Resized {vol.store.description} from {format_size(old)} to "
          f"{format_size(size)} ({size} bytes){_size_change_note(requested, size)}.")


def cmd_delete(args: argparse.Namespace) -> None:
    import contextlib

    from cloudnbd import layout, runtime
    from cloudnbd.runtime import default_cache_root, volume_cache_dir
    from cloudnbd.service import purging_cache

    store = _store(args)
    volume.read_metadata(store)
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
    if local.running is not None:
        raise VolumeBusy(f"volume is open on this machine (pid {local.running.pid}); "
                               f"close it first; nothing was deleted")
    # the cache a crashed server left (found by the registry), else the one named here,
    # and those of its snapshots served here (plaintext as well): all locked first, so
    # that nothing is deleted while a server here uses one
    snapshots = [name for info in store.list(layout.SNAPSHOT_PREFIX)
                 if (name := layout.snapshot_name(info.key)) is not None]
    root = args.cache or default_cache_root()
    with contextlib.ExitStack() as caches:
        caches.enter_context(purging_cache(local.cache_dir or _cache_dir(args)))
        for name in snapshots:
            caches.enter_context(purging_cache(
                volume_cache_dir(root, args.backend, args.volume, name)))
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError("refusing to delete without confirmation: pass --yes")
            answer = input(f"Delete volume {store.description} and all its data? "
                           f"Type the volume name to confirm: ")
            if answer.strip() != args.volume:
                raise UsageError("not confirmed; nothing was deleted")
        _take_lease(store, args.force, "delete", local)  # deleted with the volume
        count = volume.delete(store)
    print(f"Deleted volume {store.description} ({count} objects), and this machine's "
          f"cache of it.")


def cmd_list(args: argparse.Namespace) -> None:
    store = _store(args, args.location)
    store.check()
    found = list(volume.find_volumes(store))
    base = args.location.rstrip("/")

    def full(location: str) -> str:
        """What BACKEND commands take: the listing's location under the one listed."""
        return f"{base}/{location}" if location else base

    if args.json:
        print(json.dumps([{**v.__dict__, "location": full(v.location)} for v in found],
                         indent=2))
        return
    if not found:
        print(f"No volumes under {store.description}.")
    for v in found:
        name = full(v.location)
        if v.error:
            print(f"{name}\t(unreadable: {v.error})")
        else:
            print(f"{name}\t{format_size(v.size or 0)}\tchunk {format_size(v.chunk_size or 0)}")


def _cache_dir(args: argparse.Namespace) -> Path:
    from cloudnbd.runtime import default_cache_root, volume_cache_dir

    return volume_cache_dir(args.cache or default_cache_root(), args.backend, args.volume)


def _check_endpoint(server: ServerSettings, args: argparse.Namespace) -> None:
    """Where and how to listen: problems are reported here, before the server starts."""
    import ssl

    from cloudnbd.control import SUN_PATH_MAX
    from cloudnbd.nbd.device import DeviceError
    from cloudnbd.nbd.server import stale_socket

    tls = server.tls
    if tls.psk is not None:
        check_private_file(tls.psk, "PSK file")
    try:
        tls.context()
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS: {exc}") from None
    if tls.mode == "require" and not tls.authenticates_clients:
        log.warning("TLS is required but clients are not authenticated (no --tls-ca or "
                    "--tls-psk): anyone who can connect can read and write the volume")

    path = server.unix_path
    if path is not None:
        try:
            stale_socket(path)
        except DeviceError as exc:
            raise UsageError(str(exc)) from None
        port = args.settings["port"]
        if port.source not in ("default", "command line"):
            log.warning("port %s (%s) is not used: serving on the Unix socket %s instead",
                        port.value, port.source, path)
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise UsageError(f"--socket {path}: a Unix socket path holds at most "
                             f"{SUN_PATH_MAX} bytes, this one has {len(os.fsencode(path))}; "
                             f"choose a shorter path")


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The settings of `open`, from the command line and config files (args.settings);
    bad ones are reported here, before anything starts."""
    from cloudnbd.engine.device import EngineSettings
    from cloudnbd.nbd.server import ServerSettings, TlsSettings
    from cloudnbd.service import ServeSettings

    server = ServerSettings(
        export_name=args.export_name, host=args.bind, port=args.port, unix_path=args.socket,
        read_only=args.read_only,
        tls=TlsSettings(args.tls, args.tls_cert, args.tls_key, args.tls_ca, args.tls_psk))
    _check_endpoint(server, args)
    max_dirty = parse_size(args.max_dirty, "--max-dirty")
    if max_dirty < 64 * 2**20:
        raise UsageError("--max-dirty must be at least 64MiB (the largest NBD request "
                         "must fit)")
    engine = EngineSettings(
        cache_bytes=parse_size(args.cache_size, "--cache-size"), max_dirty=max_dirty,
        writeback_delay=args.writeback_delay, flush_timeout=args.flush_timeout,
        read_only=args.read_only,
        checkpoint_bytes=parse_size(args.checkpoint_size, "--checkpoint-size"),
        checkpoint_age=args.checkpoint_age, gc_grace=args.gc_grace)
    return ServeSettings(
        server=server, engine=engine, uploaders=args.uploaders, fetchers=args.fetchers,
        threads_per_worker=args.worker_threads,
        upload_limit=parse_size(args.upload_limit, "--upload-limit") if args.upload_limit
        else 0.0,
        force=args.force, metrics=args.metrics)


def _attach_hint(args: argparse.Namespace) -> str:
    if args.socket:
        return (f"nbd+unix:///{args.export_name}?socket={args.socket}  "
                f"(e.g. nbdfuse DIR/disk --unix {args.socket}; "
                f"nbd-client -unix {args.socket} /dev/nbd0 -b 4096)")
    return (f"nbd://{args.bind}:{args.port}/{args.export_name}  "
            f"(e.g. nbd-client {args.bind} {args.port} /dev/nbd0 -b 4096)")


def _serve_foreground(args: argparse.Namespace) -> None:
    """Run the server in this process until it is closed (systemd, or the daemon)."""
    from cloudnbd import daemon
    from cloudnbd.runtime import default_cache_root
    from cloudnbd.service import Service

    def start() -> Service:
        settings = _serve_settings(args)
        store = _front_store(args)
        meta, _, _ = volume.read_metadata(store)
        _require_v3(meta, args, "open")
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = get_password(args.password_file)
        vol = volume.unlock(store, password)
        del password
        service = Service(args.backend, args.volume, _store_options(args), vol,
                          args.cache or default_cache_root(), settings, args.snapshot)
        _start(service, args)
        return service

    if daemon.serve(start, args.ready_fd):
        raise CloudnbdError("closed with data still to upload; it is kept in the journal")


def _start(service: Service, args: argparse.Namespace) -> None:
    """service.start(), its failures as one-line errors: a cache directory that cannot be
    written, a port already taken."""
    from cloudnbd.nbd.device import DeviceError

    try:
        service.start()
    except OSError as exc:
        raise local_error(exc) from exc
    except DeviceError as exc:  # the NBD listener could not bind
        if exc.errno == errno.EADDRINUSE:
            raise CloudnbdError(f"port {args.port} on {args.bind} is in use (by another "
                                f"server, or a volume still open): choose another with -p"
                                ) from None
        raise CloudnbdError(str(exc)) from None


def cmd_open(args: argparse.Namespace) -> None:
    if args.foreground:
        _serve_foreground(args)
        return
    from cloudnbd import daemon
    from cloudnbd.runtime import default_cache_root
    from cloudnbd.service import private_cache_dir

    _serve_settings(args)  # report bad options here, not from the daemon
    store = _store(args)
    meta, _, _ = volume.read_metadata(store)
    _require_v3(meta, args, "open")
    password = None if args.password_file else get_password(None)
    try:
        cache_dir = private_cache_dir(args.cache or default_cache_root(), args.backend,
                                      args.volume, args.snapshot)
    except OSError as exc:
        raise local_error(exc) from exc
    daemon.start_background(args.argv, cache_dir, password, on_note=lambda note: print(
        f"cloudnbd: warning: {note}", file=sys.stderr))
    what = store.description if args.snapshot is None else \
        f"snapshot {args.snapshot} of {store.description} read-only"
    print(f"Serving {what} at {_attach_hint(args)}")
    target = args.config_name or f"{args.backend} {args.volume}"
    cache = f" --cache {args.cache}" if args.cache and not args.config_name else ""
    snapshot = f" --snapshot {args.snapshot}" if args.snapshot else ""
    print(f"Log: {daemon.log_path(cache_dir)}. Stop with: cloudnbd close {target}{cache}"
          f"{snapshot}")


class _Stall:
    """What the close's progress line adds while no upload succeeds: that it is retrying,
    for how long it has been, and the last reason the server knows."""

    QUIET = 2.0  # seconds without progress before saying so

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.left: int | None = None
        self.since = time.monotonic()

    def note(self, left: int, reason: str | None) -> str:
        now = time.monotonic()
        if left != self.left:
            self.left, self.since = left, now
        waited = now - self.since
        if waited < self.QUIET:
            return ""
        return (f"no upload has succeeded for {waited:.0f}s, retrying (gives up after "
                f"{self.timeout:.0f}s){': ' + reason if reason else ''}")


def _target(args: argparse.Namespace) -> str:
    """How the user named the volume, for the commands we suggest."""
    if getattr(args, "config_name", None):
        return str(args.config_name)
    return f"{args.backend} {args.volume}"


def _running(args: argparse.Namespace) -> object:
    """The registry entry of the volume's running server on this machine, or NotOpen /
    NeedsRecovery saying what happened and what recovers (runtime.local_state)."""
    from cloudnbd import lease, runtime
    from cloudnbd.errors import NeedsRecovery, NotOpen

    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache,
                                args.snapshot)
    if local.running is not None:
        return local.running
    if args.snapshot is not None:
        raise NotOpen(f"snapshot {args.snapshot} is not open on this machine")
    if local.stopped_unclean:
        raise NeedsRecovery(local.crash_message())
    holder = None
    try:
        holder = lease.holder(_store(args))
    except CloudnbdError:
        pass  # the store is out of reach: say what this machine knows
    if holder is not None and holder.alive() is not True:
        if holder.alive() is False:
            where = (f"on this machine (pid {holder.pid}), which no longer runs (it "
                     f"crashed; `cloudnbd open {_target(args)}` then `close` settles it)")
        else:
            where = f"on {holder.describe()}"
        raise NotOpen(f"the volume is not open here; its lease names a server {where}")
    raise NotOpen("the volume is not open on this machine")


def _control(entry: object, message: dict[str, object]) -> dict[str, object]:
    from cloudnbd.control import request

    answer = next(request(Path(entry.control_socket), message))  # type: ignore[attr-defined]
    _raise_if_error(answer)
    return answer


def _raise_if_error(answer: dict[str, object]) -> None:
    """A control answer with an error: the CloudnbdError it stands for."""
    if "error" in answer:
        error = CloudnbdError(str(answer["error"]))
        error.exit_code = int(answer.get("exit_code", 1))  # type: ignore[call-overload]
        raise error


def cmd_close(args: argparse.Namespace) -> None:
    from cloudnbd import runtime
    from cloudnbd.control import request

    entry = _running(args)
    progress: Progress | None = None
    outcome: dict[str, object] = {}
    stalled = _Stall(args.timeout)
    for message in request(Path(entry.control_socket),  # type: ignore[attr-defined]
                           {"cmd": "close", "timeout": args.timeout}, timeout=None):
        if "progress" in message:
            state = message["progress"]
            if progress is None:
                progress = Progress("Uploading", state["total"])
            progress.update(state["total"] - state["left"], state["total"],
                            stalled.note(state["left"], state.get("error")))
        else:
            outcome = message
    if progress is not None:
        progress.finish()
    _raise_if_error(outcome)
    runtime.wait_until_unlocked(Path(entry.cache_dir))  # type: ignore[attr-defined]
    if args.snapshot is not None:
        print(f"Closed snapshot {args.snapshot} of {_target(args)}.")
    else:
        print(f"Closed {_target(args)}: everything is uploaded.")


def cmd_status(args: argparse.Namespace) -> None:
    from cloudnbd.control import request

    entry = _running(args)
    status = next(request(Path(entry.control_socket), {"cmd": "status"}))  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps(status, indent=2))
        return
    print(f"location:      {status['location']} (pid {status['pid']})")
    if status.get("snapshot"):
        print(f"snapshot:      {status['snapshot']}, served read-only")
    print(f"connections:   {status['connections']}")
    print(f"backlog:       {format_size(status['dirty_bytes'])} in "
          f"{status['dirty_chunks']} chunks, oldest {status['oldest_dirty_seconds']:.1f}s "
          f"(not yet durable)")
    objects = status["store_journal_objects"]
    print(f"store journal: {format_size(status['store_journal_bytes'])} in {objects} "
          f"object{'' if objects == 1 else 's'} (durable; a checkpoint folds them "
          f"into chunks), head generation {status['head_generation']}")
    print(f"upload rate:   {format_size(int(status['upload_rate']))}/s sent "
          f"({format_size(int(status['upload_plain_rate']))}/s of data), "
          f"over the last {status['rate_window']:.0f}s")
    print(f"download rate: {format_size(int(status['download_rate']))}/s received")
    print(f"uploaded:      {format_size(status['uploaded_bytes'])} "
          f"({format_size(status['sent_wire_bytes'])} sent), "
          f"downloaded {format_size(status['fetched_wire_bytes'])}")
    print(f"cache:         {format_size(status['cache_bytes'])} of "
          f"{format_size(status['cache_limit'])}, {status['cache_hits']} hits, "
          f"{status['cache_misses']} misses")
    if status.get("snapshots") is not None:
        print(f"snapshots:     {status['snapshots']}, keeping "
              f"{format_size(status['snapshot_only_bytes'])} alive that the head does not "
              f"need (as of the last garbage listing)")
    print(f"errors:        {status['upload_errors']} upload, {status['fetch_errors']} "
          f"fetch, {status['integrity_errors']} integrity")
    if status.get("displaced"):
        print(f"DISPLACED:     the volume was taken over by {status['displaced']}; this "
              f"server fails every request. Close it.")


def cmd_config(args: argparse.Namespace) -> None:
    from cloudnbd.runtime import default_cache_root

    settings = config.effective(args.name, {}, args.config_dir)
    width = max(len(key) for key in settings)
    for key, value in settings.items():
        shown = "" if value.value is None else str(value.value)
        if key == "cache" and value.value is None:
            shown = str(default_cache_root())  # the default depends on the user
        print(f"{key:<{width}}  {shown:<30}  {value.source}")


def _progress_callback(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    progress = Progress(label, 0)
    return progress, lambda done, total: progress.update(done, total)


def _confirm(args: argparse.Namespace, question: str) -> None:
    """Ask before destroying data; --yes answers for scripts."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("this destroys data: pass --yes to confirm")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")


def _take_lease(store: ObjectStore, force: bool, purpose: str, local: LocalState) -> Lease:
    """The volume's lease for a command that changes it without a server (import,
    resize, delete, upgrade, rekey): refused while a server may be running, anywhere
    (lease.py)."""
    from cloudnbd import lease

    try:
        return lease.acquire(store, purpose, force=force)
    except VolumeBusy as exc:
        if exc.holder is not None and exc.holder.alive() is False and \
                local.stopped_unclean:
            raise VolumeBusy(f"{local.crash_message()}; or pass --force to "
                                   f"{purpose} anyway", exc.holder) from None
        raise


def _exclusive(vol: volume.Volume, force: bool, purpose: str, local: LocalState) -> Lease:
    """Hold the volume's lease around an operation that must not race a server."""
    return _take_lease(vol.store, force, purpose, local)


def cmd_verify(args: argparse.Namespace) -> None:
    from cloudnbd import transfer

    vol = _unlock(args)
    progress, update = _progress_callback("Verifying")
    report = transfer.verify(vol, threads=args.threads, progress=update,
                             snapshot=args.snapshot)
    progress.finish()
    for damage in report.damaged:
        print(f"damaged: {damage.name}: {damage.problem}")
    for index in report.beyond_end:
        print(f"stray: chunk {index} lies past the end of the volume")
    v3 = vol.meta.version >= volume.LAYOUT_V3
    if report.garbage_objects:
        print(f"garbage: {report.garbage_objects} objects "
              f"({format_size(report.garbage_bytes)}) that the head does not name, left "
              f"by compaction, an interrupted command or a crashed server (normal: a "
              f"server deletes them after a grace period; import, resize --shrink, "
              f"upgrade and rekey at once)")
    elif report.garbage_objects is None and args.snapshot is None:
        print("garbage: not counted, as damage hides part of what the head names "
              "or a snapshot cannot be read")
    what = (f"objects of head generation {report.head_generation}" if v3 else "chunks")
    if args.snapshot is not None:
        what = (f"objects of snapshot {args.snapshot} (head generation "
                f"{report.head_generation})")
    garbage = f", {report.garbage_objects or 0} garbage" if v3 and args.snapshot is None \
        else ""
    print(f"Checked {report.checked} {what} ({format_size(report.stored_bytes)} stored): "
          f"{len(report.damaged)} damaged, {len(report.beyond_end)} stray{garbage}.")
    if report.damaged:
        kinds = Counter(damage.kind for damage in report.damaged)
        raise DamagedVolume(", ".join(_count(n, "damaged", kind)
                                      for kind, n in sorted(kinds.items()))
                            + "; what they hold reads as I/O errors")
    if report.beyond_end:
        raise CloudnbdError(f"{_count(len(report.beyond_end), 'stray', 'chunk')} past the "
                            f"end of the volume, left by a shrink cut short: never read, "
                            f"but a grow would bring their old data back")


def _count(count: int, what: str, noun: str) -> str:
    return f"{count} {what} {noun}{'' if count == 1 else 's'}"


def cmd_export(args: argparse.Namespace) -> None:
    from cloudnbd import lease, runtime, transfer

    vol = _unlock(args)
    busy = lease.holder(vol.store)
    if busy is not None and args.snapshot is None:  # a snapshot does not change
        local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
        v3 = vol.meta.version >= volume.LAYOUT_V3
        if busy.alive() is False and local.stopped_unclean:
            why = local.crash_message()
        elif busy.alive() is False:
            why = (f"the lease names pid {busy.pid} of this machine, which no longer runs "
                   f"(it crashed); `cloudnbd open {_target(args)}` then `close` settles it")
        elif v3:
            why = ""
            log.warning("the volume is open on %s: exporting it as of its last commit "
                        "(every write a FLUSH covered by then)", busy.describe())
        else:
            why = (f"volume is open on {busy.describe()}: its newest data may not be "
                   f"uploaded yet. Close it first")
        if why and not args.force:
            raise VolumeBusy(f"{why}; or pass --force to export what the store "
                                   f"holds now", busy)
        if why:
            log.warning("exporting while the volume is open on %s", busy.describe())
    progress, update = _progress_callback("Exporting")
    size, written = transfer.export(vol, args.file, threads=args.threads,
                                    progress=update, overwrite=args.force,
                                    snapshot=args.snapshot)
    progress.finish()
    what = "" if args.snapshot is None else f" of snapshot {args.snapshot}"
    print(f"Exported {format_size(size)}{what} to {args.file} "
          f"({format_size(written)} of data, the rest left sparse).")


def cmd_snapshot(args: argparse.Namespace) -> None:
    from cloudnbd import runtime, snapshots

    vol = _unlock(args)
    _require_v3(vol.meta, args, "snapshot")
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache) \
        if args.action != "list" else None
    if args.action == "list":
        _list_snapshots(snapshots.list_all(vol, args.threads), args.json)
        return
    assert local is not None
    if args.action == "create":
        name = args.name or f"auto-{_name_time()}"
        if local.running is not None:
            answer = _control(local.running, {"cmd": "snapshot", "name": name})
            print(f"Created snapshot {name} of {vol.store.description} through its "
                  f"running server, after a FLUSH: head generation "
                  f"{answer['generation']}, committed {answer['written']}.")
        else:
            held = _exclusive(vol, args.force, "snapshot", local)
            try:
                snap = snapshots.create(vol, name)
            finally:
                held.release()
            print(f"Created snapshot {name} of {vol.store.description}: head generation "
                  f"{snap.head.generation}, committed {snap.head.written}.")
        if args.keep_last or args.keep_daily or args.keep_weekly:
            _prune(vol, args, local)
        return
    if args.action == "prune":
        _prune(vol, args, local)
        return
    if args.action == "delete":
        for name in args.names:
            served = _served_here(args, name)
            if served is not None:
                raise VolumeBusy(
                    f"snapshot {name} is served on this machine (pid {served.pid}); "
                    f"`cloudnbd close {_target(args)} --snapshot {name}` first")
        _with_lease_if_free(vol, args, local, "delete", lambda held: snapshots.delete(
            vol, args.names, held))
        print(f"Deleted snapshot{'' if len(args.names) == 1 else 's'} "
              f"{', '.join(args.names)} of {vol.store.description}.")
        return
    if local.running is not None:  # rollback
        raise VolumeBusy(f"volume is open on this machine (pid {local.running.pid}); "
                         f"close it before rolling back")
    snap = vol.objects.get_snapshot(args.name)
    keep = None if args.no_keep else f"before-rollback-{_name_time()}"
    _confirm(args, f"Make the contents of {vol.store.description} those of snapshot "
                   f"{args.name} ({snap.created})"
                   f"{'' if keep is None else f', keeping the current ones as {keep}'}?")
    held = _exclusive(vol, args.force, "rollback", local)
    try:
        snapshots.rollback(vol, args.name, held.epoch, keep, args.threads)
    finally:
        held.release()
    print(f"Rolled {vol.store.description} back to snapshot {args.name} ({snap.created})"
          f"{'' if keep is None else f'; the state before is snapshot {keep}'}.")


def _name_time() -> str:
    """The time now for a snapshot's name: 20240131T030000Z."""
    from cloudnbd.layout import utc_now

    return utc_now().replace("-", "").replace(":", "")


def _with_lease_if_free(vol: volume.Volume, args: argparse.Namespace, local: LocalState,
                        purpose: str, work: Callable[[bool], object]) -> None:
    """work(holding_lease): with the lease if nobody holds it, else without (a server
    runs somewhere, and its garbage collection deletes what work leaves unneeded)."""
    from cloudnbd import lease

    if local.running is not None or lease.holder(vol.store) is not None:
        work(False)
        return
    held = _exclusive(vol, args.force, purpose, local)
    try:
        work(True)
    finally:
        held.release()


def _served_here(args: argparse.Namespace, name: str) -> Entry | None:
    """The live server of snapshot name on this machine (`open --snapshot`), if any:
    deleting the snapshot would take the objects it reads."""
    from cloudnbd import runtime

    entry = runtime.lookup(args.backend, args.volume, name)
    return entry if entry is not None and entry.alive else None


def _prune(vol: volume.Volume, args: argparse.Namespace, local: LocalState) -> None:
    from cloudnbd import snapshots

    doomed: list[str] = []
    served: list[str] = []

    def spare(name: str) -> bool:
        if _served_here(args, name) is None:
            return False
        served.append(name)
        return True

    _with_lease_if_free(vol, args, local, "delete", lambda held: doomed.extend(
        snapshots.prune(vol, args.keep_last, args.keep_daily, args.keep_weekly, held,
                        spare=spare)))
    print(f"Pruned {len(doomed)} snapshot{'' if len(doomed) == 1 else 's'}"
          f"{': ' + ', '.join(doomed) if doomed else ''}"
          f"{'; kept, as served on this machine: ' + ', '.join(served) if served else ''}.")


def _list_snapshots(listed: list[Any], as_json: bool) -> None:
    rows = [{"name": item.snapshot.name, "created": item.snapshot.created,
             "size": item.snapshot.size, "head_generation": item.snapshot.head.generation,
             "needed_bytes": item.needed_bytes, "alone_bytes": item.alone_bytes}
            for item in listed]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("No snapshots.")
        return
    width = max(len(row["name"]) for row in rows)
    print(f"{'NAME':<{width}}  CREATED               SIZE        KEEPS ALONE")
    for row in rows:
        print(f"{row['name']:<{width}}  {row['created']}  {format_size(row['size']):<10}  "
              f"{format_size(row['alone_bytes'])}")


def cmd_import(args: argparse.Namespace) -> None:
    from cloudnbd import runtime, transfer

    vol = _unlock(args)
    _require_v3(vol.meta, args, "import")
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
    _confirm(args, f"Replace the contents of {vol.store.description} with {args.file}?")
    held = _exclusive(vol, args.force, "import", local)
    try:
        progress, update = _progress_callback("Importing")
        stored = transfer.import_image(vol, args.file, held.epoch,
                                       threads=args.threads, progress=update)
        progress.finish()
    finally:
        held.release()
    print(f"Imported {args.file} into {vol.store.description}: {stored} chunks stored.")


def cmd_upgrade(args: argparse.Namespace) -> None:
    from cloudnbd import convert, runtime

    vol = _unlock(args)
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
    if vol.meta.version >= volume.LAYOUT_V3:
        if not any(chunk_index(info.key) is not None
                   for info in vol.store.list("chunks/")):
            print(f"{vol.store.description} is format version {vol.meta.version} "
                  f"already; nothing to do.")
            return
        held = _exclusive(vol, args.force, "upgrade", local)
        try:
            progress, update = _progress_callback("Deleting old chunks")
            done = convert.finish_upgrade(vol, threads=args.threads, deleting=update)
            progress.finish()
        finally:
            held.release()
        print(f"Finished the upgrade of {vol.store.description}: deleted the "
              f"{done.deleted} objects ({format_size(done.deleted_bytes)}) an interrupted "
              f"run left.")
        return
    old = vol.meta.version
    held = _exclusive(vol, args.force, "upgrade", local)
    try:
        progress, update = _progress_callback("Upgrading")
        deleting, update_deleting = _progress_callback("Deleting old chunks")
        done = convert.upgrade(vol, held.epoch, threads=args.threads,
                               progress=update, deleting=update_deleting)
        progress.finish()
        deleting.finish()
    finally:
        held.release()
    print(f"Upgraded {vol.store.description} from format version {old} to "
          f"{vol.meta.version}: {done.chunks} chunks sealed again, {done.deleted} old "
          f"objects ({format_size(done.deleted_bytes)}) deleted. cloudnbd before format "
          f"version 3 can no longer open it.")


def cmd_rekey(args: argparse.Namespace) -> None:
    from cloudnbd import convert, runtime

    store = _store(args)
    meta, _, _ = volume.read_metadata(store)
    _require_v3(meta, args, "rekey")
    current = get_password(args.password_file, prompt="Current password: ")
    vol = _unlock(args, current)
    new = get_password(args.new_password_file, confirm=True, prompt="New password: ")
    if not new:
        raise UsageError("the new password must not be empty")
    local = runtime.local_state(args.backend, args.volume, _target(args), args.cache)
    if local.running is not None:
        raise VolumeBusy(f"volume is open on this machine (pid {local.running.pid}); "
                         f"close it first")
    kdf = _kdf(args)
    held = _exclusive(vol, args.force, "rekey", local)
    try:
        progress, update = _progress_callback("Re-encrypting")
        deleting, update_deleting = _progress_callback("Deleting old objects")
        done, dropped = convert.rekey(vol, new, kdf, held.epoch,
                                      threads=args.threads, progress=update,
                                      deleting=update_deleting)
        progress.finish()
        deleting.finish()
    finally:
        held.release()
    print(f"Re-encrypted {vol.store.description} under a new master key: {done.chunks} "
          f"chunks written, {done.deleted} objects of the old key "
          f"({format_size(done.deleted_bytes)}) deleted. Key slot {vol.meta.slots[0].slot} "
          f"holds the new password; a copy of the old volume.json, and the passwords of "
          f"its key slots, open nothing any more.")
    if dropped:
        numbers = ", ".join(str(n) for n in dropped)
        log.warning("key slots dropped: %s (their passwords opened the old master key "
                    "only); add those still wanted with `cloudnbd passwd --add`", numbers)


# -- parser ----------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Errors in one line, as every other cloudnbd error (argparse prints the usage too).

    An argument that starts with a minus and a digit is a value, never an option (there
    is none such): `-5GB` reaches the size parser and is refused as a size.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cloudnbd: error: {message} (see: {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand parser that lets options sit between positionals in any order.

    `init photos 20GB` and `init s3 bucket/vol --endpoint-url URL 20GB` both parse: the
    optional VOLUME after BACKEND|NAME would otherwise swallow a later positional when an
    option interrupts them (argparse matches positionals chunk by chunk).
    """

    _intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or self._subparsers is not None:
            # the two passes parse_known_intermixed_args makes; or a command whose
            # actions parse their own (snapshot create ...: intermixing cannot)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _setting_type(key: str) -> Callable[[str], object]:
    parse = config.SETTINGS[key].parse

    def convert(text: str) -> object:
        try:
            return parse(text)
        except (ValueError, UsageError) as exc:
            reason = exc.message if isinstance(exc, UsageError) else str(exc)
            raise argparse.ArgumentTypeError(f"{text!r}: {reason}") from None
    return convert


def _add_settings(p: argparse.ArgumentParser, *keys: str) -> None:
    """Options backed by config.SETTINGS; unset ones fall back to config, then default."""
    for key in keys:
        setting = config.SETTINGS[key]
        flags = ["--" + key.replace("_", "-")]
        if key == "port":
            flags.insert(0, "-p")
        default = "" if setting.default in (None, "") else f" (default {setting.default})"
        if setting.parse is config._bool:
            p.add_argument(*flags, dest=key, action="store_const", const=True, default=None,
                           help=setting.help + default)
        else:
            metavar = {config._size: "SIZE", config._positive_int: "N", config._port: "PORT",
                       config._float: "SECONDS", Path: "PATH"}.get(setting.parse, "VALUE")
            p.add_argument(*flags, dest=key, type=_setting_type(key), default=None,
                           metavar=metavar, help=setting.help + default)


def _add_store_options(p: argparse.ArgumentParser, location: str = "volume") -> None:
    p.add_argument("backend", choices=BACKENDS,
                   help=f"where the volume lives: {backends.describe()}")
    p.add_argument(location, help=LOCATION_HELP)
    _add_settings(p, "endpoint_url", "credentials", "timeout")


def _add_target(p: argparse.ArgumentParser) -> None:
    """BACKEND VOLUME, or the NAME of a volume defined in the config directory."""
    p.add_argument("target", metavar="BACKEND|NAME",
                   help=f"{backends.names()}; or NAME, a volume defined in "
                        "/etc/cloudnbd/volumes.d/NAME.conf")
    p.add_argument("volume", nargs="?", metavar="VOLUME",
                   help=LOCATION_HELP + " (omitted with NAME)")
    _add_settings(p, "endpoint_url", "credentials", "timeout")


def _add_cache_option(p: argparse.ArgumentParser) -> None:
    _add_settings(p, "cache")


def _add_snapshot_served(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", metavar="NAME",
                   help="the server of snapshot NAME (open --snapshot), not the volume's")


def _add_rewrite_options(p: argparse.ArgumentParser, verb: str) -> None:
    """--threads, --force and --cache of a command that rewrites a volume's contents
    under its lease (import, upgrade, rekey)."""
    p.add_argument("--threads", type=int, default=8, help="parallel transfers (default 8)")
    p.add_argument("--force", action="store_true",
                   help=f"{verb} although a server of this machine crashed with the "
                        f"volume open (its journal is then never uploaded)")
    _add_cache_option(p)


def _add_retention_options(p: argparse.ArgumentParser) -> None:
    """The retention policy of snapshot create and prune (as restic's forget counts)."""
    for period, what in (("last", "the N newest snapshots"),
                         ("daily", "the newest snapshot of each of the last N days that "
                                   "have one"),
                         ("weekly", "the newest snapshot of each of the last N ISO weeks "
                                    "that have one")):
        p.add_argument(f"--keep-{period}", type=int, default=0, metavar="N",
                       help=f"then delete every snapshot but {what} (and those another "
                            f"--keep option keeps)")


def _add_password_option(p: argparse.ArgumentParser, new: bool = False) -> None:
    """--password-file; with new, --new-password-file too (passwd, rekey)."""
    p.add_argument("--password-file", dest="password_file", type=Path, default=None,
                   metavar="FILE", help="read the password from FILE (mode 0600); "
                   "CLOUDNBD_PASSWORD works too; otherwise it is asked on the terminal")
    if new:
        p.add_argument("--new-password-file", type=Path, metavar="FILE",
                       help="read the new password from FILE (mode 0600)")


#: --kdf-cost: 2^N KiB of Argon2id memory, 1 MiB to 4 GiB
KDF_COSTS = range(10, 23)


def _kdf_cost(text: str) -> int:
    if not text.isdigit() or int(text) not in KDF_COSTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: N must be {KDF_COSTS[0]} to {KDF_COSTS[-1]} (2^N KiB of memory: "
            f"1 MiB to 4 GiB)")
    return int(text)


def _add_kdf_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kdf-cost", type=_kdf_cost, default=None,
                   metavar="N", help="Argon2id with 2^N KiB of memory (10 to 22: 1 MiB to "
                                     "4 GiB) and 3 passes, instead of calibrating to about "
                                     "a second with up to 1 GiB here; below 15 is weak")


def manual_page() -> Path | None:
    """The installed man page: in share/man/man1 of the prefix `pip install` used (a venv's
    too) or of any directory above the package (a --prefix or --user install, an egg, the
    system's), else the one in this source tree."""
    package = Path(__file__).resolve().parent
    for root in (Path(sys.prefix), *package.parents):
        if (page := root / "share/man/man1/cloudnbd.1").is_file():
            return page
    page = package.parent / "cloudnbd.1"
    return page if page.is_file() else None


def _manual_hint() -> str:
    page = manual_page()
    if page is None:
        return "The manual: man cloudnbd"
    return (f"The manual: man cloudnbd, or wherever MANPATH does not reach it:\n"
            f"  man {page}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cloudnbd",
        description="A network block device stored, compressed and encrypted, in the "
                    "cloud (S3, Google Cloud Storage, or a local directory).",
        epilog=f"{SIZE_HELP}\n\n{_manual_hint()}", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"cloudnbd {__version__}")
    parser.add_argument("--debug", action="store_true", help="log debugging detail and "
                        "show tracebacks")
    parser.add_argument("--config-dir", type=Path, metavar="DIR",
                        help="where cloudnbd.conf and volumes.d/ live (default "
                             "/etc/cloudnbd, or $CLOUDNBD_CONFIG_DIR)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_CommandParser)

    def command(name: str, fn: Callable[[argparse.Namespace], None], help_text: str,
                description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           epilog=SIZE_HELP, formatter_class=_Formatter)
        p.set_defaults(func=fn)
        return p

    p = command("init", cmd_init, "create a new volume",
                "Create a new, empty volume. The size is only what clients are told; "
                "nothing is allocated in the cloud until data is written. The location "
                "must be empty, and not inside or above another volume.")
    _add_target(p)
    p.add_argument("size", help="volume size, e.g. 20GB (SI) or 20GiB (IEC); rounded up "
                                "to a multiple of 4 KiB")
    p.add_argument("--chunk-size", default=f"{volume.DEFAULT_CHUNK_SIZE // 2**20}MiB",
                   help="bytes per cloud object, a power of two from 64KiB to 64MiB "
                        "(default %(default)s)")
    _add_password_option(p)
    _add_kdf_option(p)

    p = command("info", cmd_info, "describe a volume")
    _add_target(p)
    _add_password_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("passwd", cmd_passwd, "change, add or remove a password (key slot)",
                "Change the password of the key slot the current password opens, add "
                "another key slot, or remove one. Only the metadata object is rewritten; "
                "the data is not re-encrypted.")
    _add_target(p)
    _add_password_option(p, new=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--add", action="store_true", help="add a key slot for a new "
                       "password, keeping the current one")
    group.add_argument("--remove", type=int, metavar="SLOT", help="remove key slot SLOT")
    _add_kdf_option(p)

    p = command("resize", cmd_resize, "grow (or with --shrink, shrink) a volume",
                "Grow a volume, or with --shrink shrink it. A volume open on this machine "
                "grows through its server (new connections see the new size at once); "
                "shrinking needs the volume closed everywhere, and asks first.")
    _add_target(p)
    p.add_argument("size", help="new size, e.g. 40GB or 40GiB")
    p.add_argument("--shrink", action="store_true", help="allow a smaller size: the data "
                   "past the new end is deleted for good")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true",
                   help="go ahead although a server of this machine crashed with the "
                        "volume open (its journal is then never uploaded)")
    _add_password_option(p)
    _add_cache_option(p)

    p = command("delete", cmd_delete, "delete a volume and all its data",
                "Delete the volume's own objects (volume.json, lease, head-*, chunks/, "
                "map/, journal/, snapshots/) and this "
                "machine's cache of it. Other objects under its location, other volumes "
                "included, are left alone. Refused while the volume is open anywhere.")
    _add_target(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true",
                   help="delete although a server of this machine crashed with the "
                        "volume open")
    _add_cache_option(p)

    p = command("open", cmd_open, "serve a volume over NBD",
                "Unlock a volume and serve it over NBD, in the background unless "
                "--foreground. Returns once the server accepts connections.")
    _add_target(p)
    _add_password_option(p)
    _add_settings(p, "port", "bind", "socket", "export_name", "read_only", "tls",
                  "tls_cert", "tls_key", "tls_ca", "tls_psk", "cache", "cache_size", "max_dirty",
                  "uploaders", "fetchers", "worker_threads", "upload_limit",
                  "writeback_delay", "flush_timeout", "checkpoint_size", "checkpoint_age",
                  "gc_grace", "metrics")
    p.add_argument("--force", action="store_true",
                   help="take the volume over from a server on another machine (one "
                        "that is gone; if it still runs, its FLUSHes fail from now on)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground (for systemd)")
    p.add_argument("--snapshot", metavar="NAME",
                   help="serve snapshot NAME read-only instead (beside the volume's own "
                        "server if it runs: give it another --port or --socket)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--password-stdin", action="store_true", help=argparse.SUPPRESS)

    p = command("close", cmd_close, "upload everything and stop serving a volume",
                "Stop accepting NBD requests, upload the whole backlog (with a progress "
                "bar on a terminal) and stop the server. If the cloud cannot be reached "
                "the data stays in the local journal and the next open resumes.")
    _add_target(p)
    _add_cache_option(p)
    _add_snapshot_served(p)

    p = command("status", cmd_status, "show what a running volume is doing")
    _add_target(p)
    _add_cache_option(p)
    _add_snapshot_served(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("verify", cmd_verify, "download and authenticate every object",
                "Download every object the volume's head names (chunks, map pages, "
                "journal objects), check its authentication tag, and list the missing "
                "or damaged ones (exit 7), chunks past the end of the volume (exit 1), "
                "and garbage: objects no head names (informational). A volume of format "
                "version 1 or 2: every stored chunk.")
    _add_target(p)
    _add_password_option(p)
    p.add_argument("--threads", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--snapshot", metavar="NAME",
                   help="verify snapshot NAME's image instead of the volume's")

    p = command("export", cmd_export, "restore a volume to a raw image file, without NBD",
                "Write the whole volume to FILE (a sparse raw image, or a block device). "
                "This needs only the bucket and the password.")
    _add_target(p)
    p.add_argument("file", type=Path, help="image file or block device to write")
    _add_password_option(p)
    p.add_argument("--threads", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--force", action="store_true",
                   help="overwrite FILE; export even if the volume is open elsewhere")
    p.add_argument("--snapshot", metavar="NAME",
                   help="export snapshot NAME's image (at the size it was taken at)")
    _add_cache_option(p)

    p = command("snapshot", cmd_snapshot, "create, list, delete, prune snapshots or roll "
                "back to one",
                "Snapshots are kept, authenticated copies of the volume's head: they "
                "share every object with the volume and cost only what changes after "
                "them. See SNAPSHOTS in the manual.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True,
                               parser_class=_CommandParser)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text,
                               formatter_class=_Formatter)
        _add_target(a)
        return a

    a = action("create", "take a snapshot (of an open volume: through its server, "
                         "after a FLUSH)")
    a.add_argument("name", metavar="SNAPSHOT", nargs="?",
                   help="its name: letters, digits, '.', '_', '-' (default: "
                        "auto-<UTC time>)")
    _add_retention_options(a)
    _add_password_option(a)
    _add_rewrite_options(a, "snapshot")
    a = action("list", "list the snapshots, with the bytes each alone keeps alive")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    _add_password_option(a)
    a.add_argument("--threads", type=int, default=8, help="parallel reads (default 8)")
    a = action("delete", "delete snapshots (a closed volume's unneeded objects at once)")
    a.add_argument("names", metavar="SNAPSHOT", nargs="+")
    _add_password_option(a)
    _add_rewrite_options(a, "delete")
    a = action("prune", "delete the snapshots a retention policy does not keep")
    _add_retention_options(a)
    _add_password_option(a)
    _add_rewrite_options(a, "prune")
    a = action("rollback", "make a closed volume's contents a snapshot's (asks first)")
    a.add_argument("name", metavar="SNAPSHOT")
    a.add_argument("--no-keep", action="store_true",
                   help="do not keep the state before the rollback as a snapshot "
                        "(before-rollback-<UTC time>)")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_password_option(a)
    _add_rewrite_options(a, "rollback")

    p = command("import", cmd_import, "seed a volume from a raw image file, without NBD",
                "Replace the volume's contents with FILE (a raw image or block device). "
                "All-zero chunks are not stored. The new contents are written beside "
                "the old ones and replace them in one step (the head), after which the "
                "old objects are deleted.")
    p.add_argument("file", type=Path, help="image file or block device to read")
    _add_target(p)
    _add_password_option(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_rewrite_options(p, "import")

    p = command("upgrade", cmd_upgrade, "convert a volume of format version 1 or 2 to "
                "version 3",
                "Convert a volume of format version 1 or 2 in place to version 3, which "
                "this cloudnbd serves: every chunk is read, sealed again as a version-3 "
                "object, and named by the volume's first head; volume.json then switches "
                "to it, and the old chunk objects are deleted. Until the switch the "
                "volume is unchanged; an interrupted upgrade is resumed by running it "
                "again. Refused while the volume is open anywhere.")
    _add_target(p)
    _add_password_option(p)
    _add_rewrite_options(p, "upgrade")

    p = command("rekey", cmd_rekey, "re-encrypt the whole volume under a new master key",
                "Re-encrypt every object of the volume under a new master key, with a new "
                "password: for when a password or a copy of volume.json may have leaked "
                "(changing the password alone does not help then, as an old volume.json "
                "and its password still give the master key). The volume then has one "
                "key slot; other passwords must be added again. The old objects are "
                "deleted. Refused while the volume is open anywhere.")
    _add_target(p)
    _add_password_option(p, new=True)
    _add_kdf_option(p)
    _add_rewrite_options(p, "rekey")

    p = command("config", cmd_config, "show the effective settings of a configured "
                "volume and where each comes from")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="volume defined in volumes.d/NAME.conf (omit for the defaults)")

    p = command("list", cmd_list, "list the volumes under a directory or bucket/prefix")
    _add_store_options(p, "location")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything else: this process may hold keys and plaintext (docs/design.md,
    # "Security"), and no child may inherit the password from the environment.
    no_core_dumps()
    scrub_environment()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != "--debug"]
    if "--debug" in argv:
        args.argv.insert(0, "--debug")
    logs.configure(logging.DEBUG if args.debug else logging.WARNING)
    if sys.stderr.isatty():
        from cloudnbd.backends import base

        base.retry_notice = lambda line: print(f"cloudnbd: {line}", file=sys.stderr)
    try:
        if args.func is not cmd_config:
            _resolve(args)
        args.func(args)
    except (CloudnbdError, OSError) as exc:
        # An OSError that nothing turned into a CloudnbdError is still the user's
        # machine answering (a full disk, a forbidden path): one line, like the rest.
        error = exc if isinstance(exc, CloudnbdError) else local_error(exc)
        if args.debug:
            log.exception("failed")
        print(f"cloudnbd: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("cloudnbd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
