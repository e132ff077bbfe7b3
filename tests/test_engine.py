"""The engine's data path and invariants, with the real worker code on a file backend."""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cloudnbd import layout
from cloudnbd.engine import localfs
from cloudnbd.engine.cache import CleanCache
from cloudnbd.engine.chunkmap import ChunkMap
from cloudnbd.engine.workers import (
    HeadTask,
    JournalTask,
    Listing,
    Result,
    Task,
    UploadTask,
    WorkerKind,
)
from cloudnbd.errors import CloudnbdError
from cloudnbd.layout import Snapshot
from cloudnbd.reader import Image
from tests.engine_harness import CHUNK, EngineRig
from tests.faultfs import FaultFS, Policy
from tests.test_format_reader import read_volume_v3

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


def test_writes_read_back_before_and_after_upload(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path)
    data = os.urandom(3 * CHUNK + 1000)
    rig.write(CHUNK // 2, data)
    assert rig.read(CHUNK // 2, len(data)) == data
    rig.engine.flush()
    assert rig.cloud_bytes()[CHUNK // 2:CHUNK // 2 + len(data)] == data
    assert rig.read(0, 5 * CHUNK)[CHUNK // 2:CHUNK // 2 + len(data)] == data
    assert not rig.engine.dirty


def test_random_workload_matches_a_model_through_clean_close(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path)
    size = rig.volume.meta.size
    model = bytearray(size)
    rng = random.Random(7)
    for step in range(300):
        offset = rng.randrange(0, size // 512) * 512
        length = min(rng.choice([512, 4096, 70000, CHUNK]), size - offset)
        action = rng.random()
        if action < 0.7:
            data = rng.randbytes(length)
            rig.write(offset, data)
            model[offset:offset + length] = data
        elif action < 0.85:
            rig.engine.zero(offset, length, fua=False)
            model[offset:offset + length] = bytes(length)
        elif action < 0.95:
            assert rig.read(offset, length) == model[offset:offset + length], step
        else:
            rig.engine.flush()
            assert rig.cloud_bytes() == model
    rig.engine.drain()
    rig.engine.stop(clean=True)
    assert rig.cloud_bytes() == model
    assert not list((rig.cache_dir / "journal").iterdir())
    engine = rig.reopen()
    assert rig.read(0, size) == model
    assert engine.clean.bytes > 0  # a clean stop keeps the clean cache


def test_unflushed_writes_survive_a_process_crash(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path, auto=False)
    data = os.urandom(2 * CHUNK)
    rig.write(CHUNK, data)
    rig.crash()  # nothing was uploaded: the journal is all there is
    assert rig.cloud_bytes()[CHUNK:3 * CHUNK] == bytes(2 * CHUNK)
    rig.auto = True
    engine = rig.reopen()
    assert engine.recovered_records == 1
    assert rig.read(CHUNK, 2 * CHUNK) == data
    engine.flush()
    assert rig.cloud_bytes()[CHUNK:3 * CHUNK] == data


def test_rewrite_during_upload_is_uploaded_again(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path, auto=False)
    first, second = os.urandom(CHUNK), os.urandom(4096)
    rig.write(0, first)
    upload = rig.pool.wait_for(UploadTask)  # in flight: the worker has not run yet
    assert isinstance(upload, UploadTask)
    rig.write(8192, second)  # rewritten while the upload is in flight
    rig.pool.run(upload)
    second_upload = rig.pool.wait_for(UploadTask)
    assert second_upload.index == 0 and second_upload.seq > upload.seq
    rig.pool.run(second_upload)
    rig.engine.flush()
    expected = first[:8192] + second + first[8192 + 4096:]
    assert rig.cloud_bytes()[:CHUNK] == expected
    assert rig.read(0, CHUNK) == expected


def test_partial_write_to_uncached_stored_chunk_keeps_the_rest(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path)
    original = os.urandom(CHUNK)
    rig.engine.stop(clean=True)
    rig.store_behind({5: original})  # stored in the cloud, not in this cache
    rig.reopen()
    rig.write(5 * CHUNK + 100, b"x" * 50)
    rig.engine.flush()
    expected = original[:100] + b"x" * 50 + original[150:]
    assert rig.cloud_bytes()[5 * CHUNK:6 * CHUNK] == expected


def test_never_written_chunks_read_as_zeros_without_fetching(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path, auto=False)
    assert rig.read(0, 4 * CHUNK) == bytes(4 * CHUNK)
    assert rig.pool.pending == []


def test_trim_of_whole_chunks_leaves_no_object(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path)
    rig.write(0, os.urandom(4 * CHUNK))
    rig.engine.flush()
    assert sorted(i for i, s in rig.engine.map.stamps()) == [0, 1, 2, 3]
    rig.engine.trim(CHUNK, 2 * CHUNK, fua=False)
    rig.write(3 * CHUNK, bytes(CHUNK))  # a chunk that becomes all zeros has none too
    rig.engine.drain()  # folded: the map says so
    assert sorted(i for i, _ in rig.engine.map.stamps()) == [0]
    assert Image(rig.volume).stored() == [0]
    assert rig.read(CHUNK, 3 * CHUNK) == bytes(3 * CHUNK)


def test_unclean_stop_discards_the_clean_cache(tmp_path: Path) -> None:
    """A chunk changed locally without being recorded dirty can never be served.

    The only way such a file could arise is a crash while a clean file was being
    written (or damage to the cache); after an unclean stop no clean file is trusted.
    """
    rig = EngineRig(tmp_path)
    data = os.urandom(CHUNK)
    rig.write(0, data)
    rig.engine.flush()
    clean = rig.cache_dir / "clean" / f"{0:016x}"
    assert clean.read_bytes() == data
    rig.crash()
    clean.write_bytes(os.urandom(CHUNK))  # local change nobody recorded
    rig.reopen()
    assert rig.read(0, CHUNK) == data  # refetched from the cloud, not the planted file
    assert rig.cloud_bytes()[:CHUNK] == data


def test_concurrent_misses_on_one_chunk_share_one_fetch(tmp_path: Path) -> None:
    import threading

    rig = EngineRig(tmp_path, auto=False)
    original = os.urandom(CHUNK)
    rig.engine.stop(clean=True)
    rig.store_behind({2: original})
    rig.reopen()
    results: list[bytes] = []
    readers = [threading.Thread(target=lambda: results.append(rig.read(2 * CHUNK, CHUNK)))
               for _ in range(5)]
    for reader in readers:
        reader.start()
    from cloudnbd.engine.workers import FetchTask

    fetch = rig.pool.wait_for(FetchTask)
    rig.pool.run(fetch)
    for reader in readers:
        reader.join()
    assert results == [original] * 5
    assert rig.pool.pending == []  # one fetch served all five readers


def test_read_now_answers_hits_and_never_fetches_or_waits(tmp_path: Path) -> None:
    """pread_now (the NBD reader's inline path) serves dirty, clean and never-written
    data, and gives up, without asking for a fetch, at a chunk only the cloud has."""
    rig = EngineRig(tmp_path, auto=False)
    original = os.urandom(CHUNK)
    rig.engine.stop(clean=True)
    rig.store_behind({2: original})  # in the cloud only
    rig.reopen()
    dirty = os.urandom(CHUNK)
    rig.write(0, dirty)  # in the journal only

    buf = bytearray(2 * CHUNK)
    assert rig.engine.pread_now(memoryview(buf), 0)  # dirty chunk, then a never-written one
    assert bytes(buf) == dirty + bytes(CHUNK)
    assert not rig.engine.pread_now(memoryview(bytearray(CHUNK)), 2 * CHUNK)
    assert not rig.engine.pread_now(memoryview(bytearray(2 * CHUNK)), CHUNK)  # spans it
    assert rig.pool.pending == []  # gave up without a fetch

    rig.pool.auto = True
    assert rig.read(2 * CHUNK, CHUNK) == original  # the pool path fetches it
    buf = bytearray(CHUNK)
    assert rig.engine.pread_now(memoryview(buf), 2 * CHUNK)  # now a clean-cache hit
    assert bytes(buf) == original


def test_reads_follow_the_clean_file_an_upload_puts_in_place(tmp_path: Path) -> None:
    """C7: a read after an upload replaced a chunk's clean file reads the new file, not
    the descriptor an earlier read was lent (once the extents are dropped, a stale
    descriptor would serve the old contents)."""
    rig = EngineRig(tmp_path)
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)
    rig.write(0, first)
    rig.engine.flush()
    assert not rig.engine.dirty and rig.read(0, CHUNK) == first  # from the clean file
    rig.write(0, second)  # written whole: uploaded whole, its clean file replaced
    rig.engine.flush()
    assert not rig.engine.dirty
    assert rig.read(0, CHUNK) == second
    rig.engine.trim(0, CHUNK, fua=False)  # a chunk of zeros: its clean file goes
    rig.engine.flush()
    rig.engine.drain()
    assert 0 not in rig.engine.clean and rig.read(0, CHUNK) == bytes(CHUNK)


def _open_clean_files(cache: CleanCache) -> set[str]:
    """The clean files this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(cache.directory)):
            found.add(target)
    return found


def test_a_lent_descriptor_is_closed_only_once_given_back(tmp_path: Path) -> None:
    """C7: a clean file replaced (added) or removed (evicted) while a read holds its
    descriptor keeps it open for that read, which reads the file it was lent; the
    descriptor is closed when the read gives it back, and the next read opens the
    new file."""
    cache = CleanCache(tmp_path, 2 * CHUNK)
    cache.open(ChunkMap(4))
    cache.path(0).write_bytes(b"a" * CHUNK)
    cache.added(0, CHUNK, "1")
    held = cache.lend(0)
    assert held is not None
    tmp = cache.directory / ".new"
    tmp.write_bytes(b"b" * CHUNK)
    os.replace(tmp, cache.path(0))  # an upload puts a new file in place
    cache.added(0, CHUNK, "2")
    assert os.pread(held.fd, 1, 0) == b"a"  # still the file it was lent
    fresh = cache.lend(0)
    assert fresh is not None and os.pread(fresh.fd, 1, 0) == b"b"
    cache.give_back(fresh)
    assert len(_open_clean_files(cache)) == 2  # the old file, held; the new one, cached
    cache.give_back(held)
    assert _open_clean_files(cache) == {str(cache.path(0))}

    for index in (1, 2):  # two more chunks: chunk 0, least recently used, is evicted
        cache.path(index).write_bytes(b"c" * CHUNK)
        cache.added(index, CHUNK, "3")
    assert 0 not in cache and not cache.path(0).exists()
    assert _open_clean_files(cache) == set()
    cache.close()


def test_the_cache_keeps_at_most_open_files_descriptors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudnbd.engine import cache as cache_module

    monkeypatch.setattr(cache_module, "OPEN_FILES", 2)
    cache = CleanCache(tmp_path, 8 * CHUNK)
    cache.open(ChunkMap(8))
    for index in range(4):
        cache.path(index).write_bytes(bytes([index]) * 10)
        cache.added(index, 10, "1")
        lent = cache.lend(index)
        assert lent is not None and os.pread(lent.fd, 1, 0) == bytes([index])
        cache.give_back(lent)
    assert _open_clean_files(cache) == {str(cache.path(2)), str(cache.path(3))}
    cache.close()
    assert _open_clean_files(cache) == set()


def test_a_run_of_writes_is_journaled_at_once_and_reads_back(tmp_path: Path) -> None:
    """pwrite_many_now (the NBD reader's runs of WRITEs): every write of the run is
    journaled and laid over the extents in order, a later one over an earlier one, and
    the run survives a crash of the process."""
    rig = EngineRig(tmp_path, auto=False, segment_bytes=64 * 1024)
    rng = random.Random(3)
    model = bytearray(rig.volume.meta.size)
    writes = []
    for _ in range(100):
        offset = rng.randrange(0, 4 * CHUNK // 512) * 512
        data = rng.randbytes(rng.choice([512, 4096, 9000]))
        writes.append((memoryview(data), offset))
        model[offset:offset + len(data)] = data
    assert rig.engine.pwrite_many_now(writes) == len(writes)
    assert len(rig.engine.journal.segments_on_disk()) > 2  # the run crossed segments
    assert rig.read(0, 5 * CHUNK) == model[:5 * CHUNK]
    rig.crash()
    rig.auto = True
    engine = rig.reopen()
    assert engine.recovered_records == len(writes)
    assert rig.read(0, 5 * CHUNK) == model[:5 * CHUNK]


def test_a_run_that_fails_midway_reports_the_writes_it_made(tmp_path: Path) -> None:
    """A run whose second journal append fails (disk full) returns the writes the first
    made, which read back; the others are not applied (the NBD layer sends them to
    pwrite, which reports the error), and a run failing at once raises."""
    rig = EngineRig(tmp_path, auto=False, segment_bytes=4 * (4096 + 32))
    writes = [(memoryview(bytes([i + 1]) * 4096), i * 4096) for i in range(8)]

    class FullAfterOne(localfs.OsLayer):
        def __init__(self) -> None:
            self.calls = 0

        def pwritev(self, fd: int, buffers, offset: int) -> int:  # type: ignore[no-untyped-def,override]
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                return os.pwritev(fd, buffers, offset)  # another test's engine
            self.calls += 1
            if self.calls > 1:
                raise OSError(28, "No space left on device")
            return os.pwritev(fd, buffers, offset)

    with localfs.installed(FullAfterOne()):
        assert rig.engine.pwrite_many_now(writes) == 4  # the first segment's four
    assert rig.read(0, 8 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(4)) \
        + bytes(4 * 4096)
    full = FullAfterOne()
    full.calls = 1
    with localfs.installed(full), pytest.raises(OSError):
        rig.engine.pwrite_many_now(writes[4:])
    assert rig.engine.pwrite_many_now(writes[4:]) == 4  # the same numbers are not reused
    assert rig.read(0, 8 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(8))


def test_a_clean_stop_keeps_only_files_the_store_still_holds(tmp_path: Path) -> None:
    """C6: another machine rewrote chunk 0 and deleted chunk 1 while this one was
    stopped; their clean files go at open, the others (one uploaded, one fetched)
    stay."""
    rig = EngineRig(tmp_path)
    fetched = os.urandom(CHUNK)
    rig.engine.stop(clean=True)
    rig.store_behind({3: fetched})  # in the store before this engine's open
    rig.reopen()
    assert rig.read(3 * CHUNK, CHUNK) == fetched  # a fetch makes its clean file
    ours = os.urandom(3 * CHUNK)
    rig.write(0, ours)  # uploads make the clean files of chunks 0-2
    rig.engine.flush()
    rig.engine.drain()
    rig.engine.stop(clean=True)

    elsewhere = os.urandom(CHUNK)
    # the other machine, behind this one's back: chunk 0 rewritten, chunk 1 zeroed
    rig.store_behind({0: elsewhere, 1: bytes(CHUNK)})
    engine = rig.reopen(import_journal=True)
    assert [i for i in range(4) if i in engine.clean] == [2, 3]
    expected = elsewhere + bytes(CHUNK) + ours[2 * CHUNK:] + fetched
    assert rig.read(0, 4 * CHUNK) == expected
    assert engine.stats.fetches == 1  # chunk 0; chunks 2 and 3 came from the cache


def test_a_clean_file_without_a_recorded_version_is_dropped(tmp_path: Path) -> None:
    """C6: a file a worker renamed into place without the front learning of it (its
    result lost with the worker), or one kept by a release that recorded no versions,
    copies an object nobody can name: it is not trusted."""
    rig = EngineRig(tmp_path)
    data = os.urandom(2 * CHUNK)
    rig.write(0, data)
    rig.engine.flush()
    rig.engine.drain()
    rig.engine.stop(clean=True)
    rig.store_behind({5: os.urandom(CHUNK)})
    unrecorded = rig.cache_dir / "clean" / f"{5:016x}"
    unrecorded.write_bytes(os.urandom(CHUNK))
    engine = rig.reopen()
    assert 5 not in engine.clean and not unrecorded.exists()
    assert [i for i in range(2) if i in engine.clean] == [0, 1]
    engine.stop(clean=True)

    (rig.cache_dir / "clean-shutdown").write_text("")  # the marker of an older release
    engine = rig.reopen()
    assert not any(i in engine.clean for i in range(16))
    assert rig.read(0, 2 * CHUNK) == data


def test_only_a_run_that_stopped_uncleanly_is_reported_as_such(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cloudnbd.engine.cache")
    listing = ChunkMap(0)
    assert not CleanCache(tmp_path, CHUNK).open(listing)  # a new cache: nothing to trust
    assert "did not stop cleanly" not in caplog.text
    assert not CleanCache(tmp_path, CHUNK).open(listing)  # the first run ended unmarked
    assert "previous run did not stop cleanly" in caplog.text


def test_garbage_collection_deletes_only_unnamed_objects_of_this_epoch_or_older(
        tmp_path: Path) -> None:
    """G1-G3 (engine/device.py): what no head names is deleted after two listings a
    grace apart; what the head names, and any object of a later lease epoch (a newer
    holder's), never."""
    rig = EngineRig(tmp_path, gc_grace=0.05)
    data = os.urandom(3 * CHUNK)
    rig.write(0, data)
    mine = layout.chunk_key(9, layout.stamp(rig.epoch, 999))  # a crashed upload of ours
    older = layout.journal_key(layout.stamp(rig.epoch - 1 if rig.epoch > 1 else 0, 5))
    newer = layout.chunk_key(9, layout.stamp(rig.epoch + 1, 1))  # a newer holder's
    for key in (mine, older, newer):
        rig.store.put(key, b"not really sealed: it is never read")
    rig.engine.flush()  # a new head: the rounds after it list everything (G5)
    listed = rig.engine.stats.garbage_listings
    assert rig.engine.wait_for_stats(lambda s: s.garbage_listings >= listed + 3, 30)
    assert rig.engine.wait_for_stats(lambda s: s.garbage_deleted >= 2, 30)
    keys = {info.key for info in rig.store.list("")}
    assert mine not in keys and older not in keys
    assert newer in keys
    assert rig.cloud_bytes()[:3 * CHUNK] == data  # every object the head names is there


def test_an_idle_volume_costs_one_list_a_round_until_its_head_or_snapshots_change(
        tmp_path: Path) -> None:
    """G5 (engine/device.py): after a listing that found nothing unnamed, and while the
    head and the snapshots stay as they were, a round is one LIST of the snapshots and
    nothing else. A snapshot deleted by another process brings the full listing back,
    and what only that snapshot kept is collected."""
    rig = EngineRig(tmp_path, gc_grace=0.05, checkpoint_bytes=1)  # fold every commit
    rig.write(0, os.urandom(CHUNK))
    rig.engine.flush()
    with rig.engine.snapshot_head() as (head, size):
        rig.volume.objects.put_snapshot(Snapshot("s1", layout.utc_now(), size, head))
    rig.write(0, os.urandom(CHUNK))  # chunk 0's first object: once folded, only s1's
    rig.engine.flush()
    assert rig.engine.wait_for_stats(lambda s: not rig.engine.head.journal, 30)
    quiet_from = rig.engine.snapshot().stats.garbage_quiet_rounds
    assert rig.engine.wait_for_stats(lambda s: s.garbage_quiet_rounds >= quiet_from + 2, 30)
    before = rig.engine.snapshot().stats
    assert rig.engine.wait_for_stats(
        lambda s: s.garbage_quiet_rounds >= before.garbage_quiet_rounds + 3, 30)
    after = rig.engine.snapshot().stats
    quiet = after.garbage_quiet_rounds - before.garbage_quiet_rounds
    spent = {kind: count - before.garbage_requests.get(kind, 0)
             for kind, count in after.garbage_requests.items()}
    assert after.garbage_listings == before.garbage_listings  # nothing changed
    assert {kind: count for kind, count in spent.items() if count} == {"list": quiet}

    def chunk_zero_objects() -> list[str]:
        return [info.key for info in rig.store.list("chunks/")
                if (found := layout.parse_key(info.key)) and found[1] == 0]

    assert len(chunk_zero_objects()) == 2
    rig.volume.objects.delete_snapshot("s1")  # as `snapshot delete` does beside a server
    assert rig.engine.wait_for_stats(lambda s: s.garbage_deleted > after.garbage_deleted, 30)
    assert chunk_zero_objects() == [layout.chunk_key(0, rig.engine.map.get(0).stamp)]


def test_reads_are_served_while_a_garbage_listing_is_handled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage collection never blocks I/O (issue 14): while the engine goes through the
    keys a listing found, which takes time in proportion to the objects of the volume,
    a read from another thread is served. Nothing here is timed: the read either gets
    through while the keys are being gone through, or waits for the engine's lock."""
    rig = EngineRig(tmp_path, gc_grace=0.05)
    data = os.urandom(CHUNK)
    rig.write(0, data)
    served: list[bool] = []

    def read_meanwhile() -> None:
        done = threading.Event()
        got: list[bytes] = []

        def read() -> None:
            got.append(rig.read(0, 4096))
            done.set()

        threading.Thread(target=read, daemon=True).start()
        served.append(done.wait(timeout=10) and got == [data[:4096]])

    class Keys(tuple[str, ...]):
        """The listed keys; the first pass over them checks that a read gets through."""

        def __iter__(self) -> Iterator[str]:
            if not served:
                read_meanwhile()
            return super().__iter__()

    # this engine's worker only: engines other tests left running list too
    worker = rig.pool.worker  # type: ignore[union-attr]
    real_run = worker.run

    def run(task: Task) -> Result:
        result = real_run(task)
        if isinstance(result.value, Listing):
            result = replace(result, value=replace(result.value,
                                                   unkept=Keys(result.value.unkept)))
        return result

    monkeypatch.setattr(worker, "run", run)
    rig.engine.flush()  # a new head: a full listing follows (G5)
    assert rig.engine.wait_for_stats(lambda s: bool(served), 30)
    assert served == [True]


def test_the_garbage_thread_is_published_only_once_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """halt() and stop() join the thread sorting a listing without the engine lock: the
    thread they find must be a started one (a power-loss campaign met "cannot join
    thread before it is started"). Looked at from the moment the thread is started."""
    rig = EngineRig(tmp_path, gc_grace=0.05)
    seen: list[bool] = []

    class Watched(threading.Thread):
        def start(self) -> None:
            if self.name == "garbage":
                published = rig.engine._gc_thread
                seen.append(published is None or published.ident is not None)
            super().start()

    monkeypatch.setattr(threading, "Thread", Watched)
    rig.write(0, os.urandom(CHUNK))
    rig.engine.flush()  # a new head: a full listing follows, sorted on its thread
    assert rig.engine.wait_for_stats(lambda s: bool(seen), 30)
    assert all(seen), seen


def test_garbage_lookups_name_what_the_head_and_the_commit_in_flight_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """G4 (engine/device.py): looked up key by key, an object is named exactly when the
    head needs it (layout.named_keys over the stored head), before and after a
    checkpoint, and the objects of a commit in flight are named from the start, so
    that none is ever unnamed and then named again."""
    rig = EngineRig(tmp_path, gc_grace=1e9)
    engine = rig.engine
    stray = {layout.chunk_key(9, layout.stamp(rig.epoch, 999)),  # a crashed upload
             layout.journal_key(layout.stamp(rig.epoch, 998))}
    for key in stray:
        rig.store.put(key, b"never read")

    def listed() -> set[str]:
        return {info.key for info in rig.volume.objects.list_own()}

    def needed() -> set[str]:
        head, _ = rig.volume.objects.get_head(rig.volume.meta.head)
        return rig.volume.objects.needed_by(head)

    rig.write(0, os.urandom(CHUNK))  # a CHUNK record
    rig.engine.flush()
    rig.write(CHUNK + 10, os.urandom(100))  # a journal write
    rig.engine.flush()
    rig.write(0, os.urandom(CHUNK))  # replaces the first chunk object in the map
    rig.engine.flush()
    assert engine.head.journal and not engine.head.pages
    assert set(engine._unnamed(listed()) or ()) == listed() - needed() == stray
    engine.drain()  # a checkpoint folds every journal object into map pages
    assert engine.head.pages and not engine.head.journal
    garbage = listed() - needed()
    assert len(garbage) > len(stray)  # the journal objects, the first chunk object
    assert set(engine._unnamed(listed()) or ()) == garbage

    worker = rig.pool.worker  # type: ignore[union-attr]
    real_run = worker.run
    head_asked, head_go = threading.Event(), threading.Event()

    def run(task: Task) -> Result:
        if isinstance(task, HeadTask):
            head_asked.set()
            head_go.wait(timeout=30)
        return real_run(task)

    monkeypatch.setattr(worker, "run", run)
    before = listed()
    rig.write(2 * CHUNK, os.urandom(CHUNK))
    rig.write(3 * CHUNK, os.urandom(100))
    flushed = threading.Thread(target=rig.engine.flush)
    flushed.start()
    try:
        assert head_asked.wait(timeout=30)
        in_flight = listed() - before  # its chunk and journal objects, stored
        assert {layout.parse_key(k)[0] for k in in_flight} == {  # type: ignore[index]
            layout.Kind.CHUNK, layout.Kind.JOURNAL}
        assert engine._unnamed(in_flight) == []
    finally:
        head_go.set()
        flushed.join(timeout=30)
    assert engine._unnamed(in_flight) == []
    assert set(engine._unnamed(listed()) or ()) == listed() - needed() == garbage


def test_retries_of_every_commit_step_are_counted(tmp_path: Path) -> None:
    """A FLUSH's journal object and head, and a checkpoint's map page, count the store's
    retries in the engine's stats (the metrics): the cloud-fault campaign saw none
    counted for them while the store retried them."""
    rig = EngineRig(tmp_path, checkpoint_bytes=1)
    store = rig.pool.worker.store  # type: ignore[union-attr]
    failed: list[str] = []
    real_put_if = store._put_if

    def flaky_put_if(key: str, data: bytes, expected: str | None) -> str:
        """The first write of each kind of object times out once, and is retried."""
        fail = [key.split("/")[0] not in {k.split("/")[0] for k in failed}]

        def attempt() -> str:
            if fail.pop() if fail else False:
                failed.append(key)
                raise TimeoutError("the store did not answer")
            return real_put_if(key, data, expected)

        return store.retrying(f"PUT {key}", attempt)

    store._put_if = flaky_put_if
    store.is_temp_failure = lambda exc: isinstance(exc, TimeoutError)
    rig.write(1000, b"x" * 3000)
    rig.engine.flush()
    rig.engine.drain()
    kinds = sorted(k.split("/")[0] for k in failed)
    assert "journal" in kinds and "map" in kinds and len(kinds) >= 3, kinds
    assert rig.engine.stats.retries == len(failed)


def test_a_flushed_zeroing_survives_a_power_loss(tmp_path: Path) -> None:
    """J1 for zeros: the power-loss campaign (seed 5) read old data where a FLUSHed
    WRITE_ZEROES had been. The journal object held the ZERO record, but its local
    segment was never fsync'd (a zero piece has no data to read, so the worker did not
    open its segment); the power loss took the record, and the replay on this machine,
    which trusts its own journal, brought the older write back."""
    (tmp_path / "cache").mkdir()
    fs = FaultFS(tmp_path / "cache", seed=1)
    with localfs.installed(fs):
        rig = EngineRig(tmp_path)
        rig.write(0, b"x" * 4096)
        rig.engine.flush()  # a journal object with the write; its segment fsync'd
        rig.engine.zero(0, 4096, fua=False)
        rig.engine.flush()  # a journal object with the zeroing
        fs.power_loss(Policy.DROP)
        rig.crash()
        assert rig.pool is not None
        rig.pool.stop()
    fs.materialize()
    rig.reopen()
    assert rig.read(0, 4096) == bytes(4096)


def test_a_large_flush_goes_to_several_bounded_journal_objects(tmp_path: Path) -> None:
    """The load campaign's long tier: an uploader reached 126 MiB (the bound for all
    processes together is 198) building one journal object of a FLUSH that covered
    tens of MiB of scattered writes. A FLUSH's journal data is now cut into objects of
    at most journal_object_bytes, like a chunk in a worker's memory, stored side by
    side and named by one head: no chunk is uploaded whole for it, and both another
    machine's open, reader.Image and the independent reader of
    tests/test_format_reader.py see every write."""
    bound = 16 * 1024
    rig = EngineRig(tmp_path, journal_object_bytes=bound, checkpoint_bytes=2**30)
    image = bytearray(16 * CHUNK)
    rng = random.Random(5)
    for index in range(16):  # 12 KiB in each chunk: none is "mostly written"
        for k in range(3):
            offset = index * CHUNK + k * 16384 + rng.randrange(4096)
            data = rng.randbytes(4096)
            rig.write(offset, data)
            image[offset:offset + 4096] = data
    rig.engine.flush()
    head, _ = rig.volume.objects.get_head(rig.volume.meta.head)
    assert len(head.journal) >= 16 * 12 * 1024 // bound, head.journal
    for ref in head.journal:
        records, _ = rig.volume.objects.get_journal(ref.stamp, ref)
        held = sum(len(r.data) for r in records if isinstance(r, layout.JWrite))
        assert 0 < held <= bound, (ref, held)
    assert rig.engine.stats.uploads == 0 and rig.engine.stats.commits == 1
    assert rig.cloud_bytes() == image
    _, sparse = read_volume_v3(rig.store.root, "pw")  # the independent reader too
    assert b"".join(sparse.get(i, bytes(CHUNK)) for i in range(16)) == image
    rig.crash()
    shutil.rmtree(rig.cache_dir)  # another machine: the store's journal is all there is
    rig.reopen(import_journal=True)
    assert rig.read(0, 16 * CHUNK) == image
    rig.engine.drain()  # the checkpoint at close folds them all
    assert rig.volume.objects.get_head(rig.volume.meta.head)[0].journal == ()
    assert rig.cloud_bytes() == image


def test_an_object_of_a_commit_given_up_counts_for_no_later_commit(tmp_path: Path) -> None:
    """A FLUSH's journal data in two objects: the first write fails, so the commit is
    given up and built again under new stamps, while the second write of the first
    attempt is still on its way. It lands while the new commit waits for its own
    objects, and must count for nothing: taken for one of them, the head could name
    an object not yet stored."""
    rig = EngineRig(tmp_path, journal_object_bytes=8192, retry_backoff=0.01)
    pool = rig.pool
    assert pool is not None
    store = pool.worker.store
    real_put_if = store._put_if
    journal_puts: list[str] = []
    # by the counter of the object's stamp: the first attempt's two objects are 1 and
    # 2 (1 is refused, 2 held), the new attempt's 3 and 4 (3 held)
    held = {2: threading.Event(), 3: threading.Event()}
    arrived = {2: threading.Event(), 3: threading.Event()}

    def put_if(key: str, data: bytes, expected: str | None) -> str:
        if key.startswith("journal/"):
            journal_puts.append(key)
            number = int(key[-8:], 16)
            if number == 1:
                raise CloudnbdError("the store refused it")
            if number in held:
                arrived[number].set()
                held[number].wait(timeout=30)
        return real_put_if(key, data, expected)

    store._put_if = put_if  # type: ignore[method-assign]
    late_ids: list[int] = []
    handled = threading.Event()
    failures: list[str] = []
    handle = pool.on_result

    def observe(task: Task, result: Result) -> None:
        if isinstance(task, JournalTask) and \
                task.stamp & 0xFFFFFFFF == 2:
            late_ids.append(task.task_id)

    def on_result(kind: WorkerKind, result: Result) -> None:
        handle(kind, result)
        if result.task_id in late_ids:
            handled.set()

    pool.observe, pool.on_result, pool.on_failure = observe, on_result, failures.append
    image = bytearray(16 * CHUNK)
    for index in (1, 5):
        data = os.urandom(6000)
        rig.write(index * CHUNK, data)
        image[index * CHUNK:index * CHUNK + 6000] = data
    flushing = threading.Thread(target=rig.engine.flush)
    flushing.start()
    # the first attempt failed, its second object is held, and so is the first
    # object of the new attempt
    assert arrived[2].wait(timeout=30) and arrived[3].wait(timeout=30)
    held[2].set()
    assert handled.wait(timeout=30)  # the late object is stored, its result handled
    assert failures == []
    assert rig.engine.stats.commits == 0 and flushing.is_alive()
    held[3].set()
    flushing.join(timeout=30)
    assert not flushing.is_alive() and failures == []
    head, _ = rig.volume.objects.get_head(rig.volume.meta.head)
    assert [ref.stamp & 0xFFFFFFFF for ref in head.journal] == [3, 4], head
    assert len(journal_puts) == 4
    assert rig.engine.stats.commits == 1 and rig.engine.stats.journal_objects == 2
    rig.engine.drain()
    assert rig.cloud_bytes() == image
