"""Tampering with a version-3 volume in its store (docs/reliability.md, "Tampering"), on
every backend, seen through the public commands and a real server: each kind of damage is
detected (EIO through NBD, an error from open, export or verify), never read as wrong data
or zeros.

- chunk objects: a flipped bit, a truncated object, two chunks' objects swapped, one copied
  from another volume, a chunk rolled back to an older genuine object of itself (the
  store answers for the object the map names with the older one's bytes: the stamp is in
  the AEAD), a deleted chunk object;
- map pages: deleted, swapped with the other page, rolled back to an older genuine page;
- a deleted journal object the head names (a server killed after FLUSHes);
- the head: rolled back to an older genuine one (refused by a machine that saw a newer one;
  a fresh machine reads the older FLUSH point, consistent but old: the documented limit),
  or a head from another volume;
- volume.json rolled back (refused by a machine that saw a newer one).

And `export` of a volume a server is writing, from a second cache, is one consistent image:
some FLUSH point plus perhaps later writes, never a torn sector.
"""

from __future__ import annotations

import errno
import random
import struct
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudnbd import layout, volume
from cloudnbd.backends.base import ObjectStore
from cloudnbd.reader import Image
from cloudnbd.volume import METADATA_KEY
from testbed.served import KDF, Served, cloudnbd, start
from testbed.stores import free_port
from tests.nbdclient import NbdClient, NbdError
from tests.servers import BackendEnv, backend_env_for

CHUNK = 256 * 1024
PAGE_CHUNKS = 4096  # chunks per map page (docs/format.md)
SIZE = (PAGE_CHUNKS + 8) * CHUNK  # two map pages
WRITTEN = [*range(8), PAGE_CHUNKS]  # the chunks holding data; chunk 4096 is on page 1
REWRITTEN = (5, PAGE_CHUNKS)  # rewritten in a second session: older objects of them exist
ALL_BACKENDS = ["file", "s3", "gs"]

# A fresh machine: this one with an empty state directory (no head generations seen).
FRESH_MACHINE = ["unshare", "--mount", "sh", "-c",
                 'mount -t tmpfs tmpfs /var/lib/cloudnbd && exec "$@"', "fresh"]


@dataclass
class Named:
    """What one head names: its bytes and the stamps of chunk objects and map pages."""

    head: bytes
    chunks: dict[int, int]
    pages: dict[int, int]


def _named(env: BackendEnv, location: str, password_file: Path) -> Named:
    vol = volume.unlock(env.store(location), password_file.read_text().strip())
    image = Image(vol)
    return Named(env.store(location).get(vol.meta.head),
                 {i: s.stamp for i, s in image.sources.items()}, dict(image.head.pages))


@dataclass
class History:
    """A closed volume written in two sessions: its data now, and what each head named."""

    env: BackendEnv
    location: str
    head_key: str
    old_data: dict[int, bytes]
    data: dict[int, bytes]
    old: Named
    new: Named

    def store(self) -> ObjectStore:
        return self.env.store(self.location)

    def chunk_key(self, index: int, named: Named | None = None) -> str:
        return layout.chunk_key(index, (named or self.new).chunks[index])

    def page_key(self, page: int, named: Named | None = None) -> str:
        return layout.map_key(page, (named or self.new).pages[page])


def _init(env: BackendEnv, password_file: Path) -> str:
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB",
             *env.cli_args, "--password-file", str(password_file), *KDF, env=env.env)
    return location


def _serve(env: BackendEnv, location: str, tmp: Path, password_file: Path, cache: str,
           *extra: str) -> Served:
    return start(tmp, env.name, location, password_file, *extra, store_args=env.cli_args,
                 env=env.env, cache=tmp / cache)


def _write(served: Served, data: dict[int, bytes]) -> None:
    client = NbdClient.unix(str(served.socket))
    for index, plain in data.items():
        client.pwrite(plain, index * CHUNK)
    client.flush()
    client.close()


def _history(env: BackendEnv, tmp: Path, password_file: Path, name: str) -> History:
    """Distinct random data in WRITTEN, closed; then REWRITTEN rewritten, closed again. The
    objects of the first session stay in the store (garbage is kept for a grace period)."""
    location = _init(env, password_file)
    rng = random.Random(name)
    old_data = {index: rng.randbytes(CHUNK) for index in WRITTEN}
    served = _serve(env, location, tmp, password_file, f"cache-{name}")
    _write(served, old_data)
    served.close()
    old = _named(env, location, password_file)
    data = {**old_data, **{index: rng.randbytes(CHUNK) for index in REWRITTEN}}
    served = _serve(env, location, tmp, password_file, f"cache-{name}")
    _write(served, {index: data[index] for index in REWRITTEN})
    served.close()
    new = _named(env, location, password_file)
    assert set(new.chunks) == set(WRITTEN) and set(new.pages) == {0, 1}
    for index in REWRITTEN:  # a second, newer object and page, the older still stored
        assert new.chunks[index] != old.chunks[index]
        assert env.store(location).get(layout.chunk_key(index, old.chunks[index]))
    assert new.pages[0] != old.pages[0] and new.pages[1] != old.pages[1]
    head_key = volume.read_metadata(env.store(location))[0].head
    return History(env, location, head_key, old_data, data, old, new)


def _cli(history: History, command: str, *args: str, prefix: list[str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    env = history.env
    return cloudnbd(command, env.name, history.location, *args, *env.cli_args, env=env.env,
                    check=False, prefix=prefix or [])


def _verify(history: History, password_file: Path, prefix: list[str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return _cli(history, "verify", "--password-file", str(password_file), prefix=prefix)


def _export(history: History, tmp: Path, password_file: Path, name: str,
            prefix: list[str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`cloudnbd export` to a new image file, from a cache of its own."""
    target = tmp / f"{name}.img"
    return _cli(history, "export", str(target), "--password-file", str(password_file),
                "--cache", str(tmp / f"export-cache-{name}"), prefix=prefix), target


def _says(line: str, words: tuple[str, ...], tmp: Path | None) -> None:
    """line names every word, outside the test's directory (whose name says much)."""
    said = line.replace(str(tmp), "<tmp>") if tmp is not None else line
    for word in words:
        assert word in said, line


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str,
                    tmp: Path | None = None) -> None:
    assert result.returncode != 0, f"succeeded:\n{result.stdout}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    _says(lines[0], words, tmp)


def _image_chunks(path: Path, indexes: list[int]) -> dict[int, bytes]:
    with open(path, "rb") as image:
        out = {}
        for index in indexes:
            image.seek(index * CHUNK)
            out[index] = image.read(CHUNK)
        return out


# -- chunk objects --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_damaged_chunks_read_as_eio_are_counted_logged_and_listed_by_verify(
        backend: str, tmp_path: Path, password_file: Path,
        request: pytest.FixtureRequest) -> None:
    env = backend_env_for(backend, tmp_path, request)
    history = _history(env, tmp_path, password_file, "victim")
    other = _history(env, tmp_path, password_file, "other")
    store = history.store()
    key = history.chunk_key
    flipped = bytearray(store.get(key(0)))
    flipped[len(flipped) // 2] ^= 0x01
    store.put(key(0), bytes(flipped))
    store.put(key(1), store.get(key(1))[:-100])
    two, three = store.get(key(2)), store.get(key(3))
    store.put(key(2), three)
    store.put(key(3), two)
    store.put(key(4), other.store().get(other.chunk_key(4)))
    # rolled back: the map names chunk 5's newer object; the store answers with the older
    store.put(key(5), store.get(key(5, history.old)))
    store.delete(key(6))
    damaged = {0, 1, 2, 3, 4, 5, 6}

    port = free_port()
    served = _serve(env, history.location, tmp_path, password_file, "fresh-cache",
                    "--metrics", f"127.0.0.1:{port}")
    client = NbdClient.unix(str(served.socket))
    try:
        for index in WRITTEN:
            if index in damaged:
                with pytest.raises(NbdError) as failed:
                    client.pread(index * CHUNK, 4096)
                assert failed.value.errno == errno.EIO
            else:
                assert client.pread(index * CHUNK, CHUNK) == history.data[index]
        assert client.pread(10 * CHUNK, CHUNK) == bytes(CHUNK)  # never written: zeros
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                         timeout=10).read().decode()
    finally:
        client.close()
    served.close()
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("cloudnbd_integrity_errors_total"))
    assert counted >= len(damaged)
    log = (tmp_path / "server.log").read_text()
    for index in damaged:
        assert f"fetch of chunk {index} failed" in log

    result = _verify(history, password_file)
    assert result.returncode != 0, result.stdout
    listed = {int(line.split()[2].rstrip(":")) for line in result.stdout.splitlines()
              if line.startswith("damaged: chunk")}
    assert listed == damaged, result.stdout
    exported, _ = _export(history, tmp_path, password_file, "damaged")
    _one_line_error(exported, "chunk")


# -- map pages and journal objects ---------------------------------------------------------

def _refused_everywhere(history: History, tmp: Path, password_file: Path, name: str,
                        *words: str) -> None:
    """A fresh server does not serve the volume (open fails, naming the damage), export
    and verify fail: nothing reads the damaged volume as data."""
    env = history.env
    with pytest.raises(AssertionError, match="server did not start"):
        _serve(env, history.location, tmp, password_file, f"cache-{name}")
    _says((tmp / "server.log").read_text().strip().splitlines()[-1], words, tmp)
    exported, _ = _export(history, tmp, password_file, name)
    _one_line_error(exported, *words, tmp=tmp)
    _one_line_error(_verify(history, password_file), *words, tmp=tmp)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_damaged_map_pages_are_refused(backend: str, tmp_path: Path, password_file: Path,
                                       request: pytest.FixtureRequest) -> None:
    env = backend_env_for(backend, tmp_path, request)
    history = _history(env, tmp_path, password_file, "pages")
    store = history.store()
    page0, page1 = history.page_key(0), history.page_key(1)
    genuine = {page0: store.get(page0), page1: store.get(page1)}
    older = store.get(history.page_key(0, history.old))
    damages = {
        "deleted": lambda: store.delete(page0),
        "swapped": lambda: (store.put(page0, genuine[page1]), store.put(page1, genuine[page0])),
        "rolled back": lambda: store.put(page0, older),
    }
    for name, damage in damages.items():
        damage()
        _refused_everywhere(history, tmp_path, password_file, name.replace(" ", "-"), "map")
        for key, blob in genuine.items():  # undo: the volume reads again
            store.put(key, blob)
    assert _verify(history, password_file).returncode == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deleted_journal_object_is_refused(backend: str, tmp_path: Path,
                                           password_file: Path,
                                           request: pytest.FixtureRequest) -> None:
    """A server killed after FLUSHes leaves a head naming journal objects: one deleted,
    the volume is refused, not read without its writes."""
    env = backend_env_for(backend, tmp_path, request)
    history = _history(env, tmp_path, password_file, "journal")
    served = _serve(env, history.location, tmp_path, password_file, "cache-journal")
    client = NbdClient.unix(str(served.socket))
    for step in range(3):
        client.pwrite(bytes([step + 1]) * 4096, step * CHUNK + 4096)
        client.flush()
    served.kill()
    store = history.store()
    vol = volume.unlock(store, password_file.read_text().strip())
    head, _ = vol.objects.get_head(history.head_key)
    assert head.journal, "the head should name journal objects"
    victim = layout.journal_key(head.journal[0].stamp)
    store.delete(victim)
    _refused_everywhere(history, tmp_path, password_file, "journal", "journal")


# -- the head -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rolled_back_head_is_refused_by_a_machine_that_saw_newer(
        backend: str, tmp_path: Path, password_file: Path,
        request: pytest.FixtureRequest) -> None:
    """This machine saw the newer head (it wrote it): open, export, verify and info refuse
    the older one. A fresh machine cannot tell: it reads the older head's FLUSH point, a
    consistent image, whole (docs/format.md: the head's MAC proves who wrote it, not that
    it is the newest)."""
    env = backend_env_for(backend, tmp_path, request)
    history = _history(env, tmp_path, password_file, "head")
    store = history.store()
    store.put(history.head_key, history.old.head)

    with pytest.raises(AssertionError, match="server did not start"):
        _serve(env, history.location, tmp_path, password_file, "cache-rolled")
    assert "rolled back" in (tmp_path / "server.log").read_text().strip().splitlines()[-1]
    exported, _ = _export(history, tmp_path, password_file, "rolled")
    _one_line_error(exported, "rolled back")
    _one_line_error(_verify(history, password_file), "rolled back")
    _one_line_error(_cli(history, "info", "--password-file", str(password_file)),
                    "rolled back")
    assert store.get(history.head_key) == history.old.head  # refusing changed nothing

    exported, target = _export(history, tmp_path, password_file, "fresh",
                               prefix=FRESH_MACHINE)
    assert exported.returncode == 0, exported.stderr
    assert _image_chunks(target, WRITTEN) == history.old_data


def test_rolled_back_head_past_the_gc_grace_is_detected_by_a_fresh_machine(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    """Once a server has collected the objects only the older head needed, a fresh
    machine given the older head finds them missing: an error, not the older image."""
    env = backend_env_for("file", tmp_path, request)
    history = _history(env, tmp_path, password_file, "collected")
    older_page = Path(history.location) / history.page_key(0, history.old)
    served = _serve(env, history.location, tmp_path, password_file, "cache-collected",
                    "--gc-grace", "0.2")
    deadline = time.monotonic() + 60
    while older_page.exists():  # garbage collection runs every 0.2 s
        assert time.monotonic() < deadline, f"{older_page.name} was never collected"
        with pytest.raises(subprocess.TimeoutExpired):  # the interval and liveness check
            served.process.wait(timeout=0.1)
    served.close()
    history.store().put(history.head_key, history.old.head)
    exported, _ = _export(history, tmp_path, password_file, "fresh", prefix=FRESH_MACHINE)
    _one_line_error(exported, "missing", tmp=tmp_path)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_head_of_another_volume_is_refused(backend: str, tmp_path: Path,
                                           password_file: Path,
                                           request: pytest.FixtureRequest) -> None:
    env = backend_env_for(backend, tmp_path, request)
    history = _history(env, tmp_path, password_file, "mine")
    other = _history(env, tmp_path, password_file, "theirs")
    history.store().put(history.head_key, other.new.head)
    _refused_everywhere(history, tmp_path, password_file, "foreign", "head")


# -- volume.json ----------------------------------------------------------------------------

def test_rolled_back_metadata_is_refused_by_a_machine_that_saw_newer(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    env = backend_env_for("s3", tmp_path, request)
    location = _init(env, password_file)
    store = env.store(location)
    old = store.get(METADATA_KEY)
    new_password = tmp_path / "new-password"
    new_password.write_text("a second password\n")
    new_password.chmod(0o600)
    cloudnbd("passwd", "s3", location, *env.cli_args, "--password-file",
             str(password_file), "--new-password-file", str(new_password), "--add", *KDF,
             env=env.env)  # generation 2
    cache = tmp_path / "cache-rollback"
    start(tmp_path, "s3", location, password_file, store_args=env.cli_args, env=env.env,
          cache=cache).close()  # this machine has now seen generation 2
    store.put(METADATA_KEY, old)  # generation 1 again, genuine but old
    refused = cloudnbd("open", "s3", location, *env.cli_args, "--foreground", "--socket",
                       str(tmp_path / "x.sock"), "--cache", str(cache), "--password-file",
                       str(password_file), env=env.env, check=False)
    assert refused.returncode == 7
    assert "rolled back" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert store.get(METADATA_KEY) == old  # refusing changed nothing


# -- export while a server writes -----------------------------------------------------------

SECTOR = 4096
AREA = 6 * CHUNK // SECTOR  # sectors the writer touches: six chunks


def _sector(step: int, sector: int) -> bytes:
    """What step writes to sector: both numbers in every 16 bytes, so that a torn sector
    (two steps' halves) or a misplaced one cannot pass as whole."""
    return struct.pack(">QQ", step, sector) * (SECTOR // 16)


class PatternWriter(threading.Thread):
    """Steps 1, 2, ...: each writes some runs of sectors (within a chunk, across chunks,
    whole chunks) with its pattern, then FLUSHes; `written[s]` lists the steps that wrote
    sector s, `flushed` counts the FLUSHes answered. Runs until stopped."""

    def __init__(self, served: Served) -> None:
        super().__init__(daemon=True)
        self.client = NbdClient.unix(str(served.socket))
        self.rng = random.Random(7)
        self.written: dict[int, list[int]] = {}
        self.flushed = 0
        self.steps = 0
        self.stop = threading.Event()
        self.flush_seen = threading.Condition()
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def snapshot(self) -> tuple[int, dict[int, list[int]]]:
        """(steps whose writes were all answered, the steps that wrote each sector)."""
        with self.lock:
            return self.steps, {s: list(steps) for s, steps in self.written.items()}

    def step(self) -> None:
        step = self.steps + 1
        for _ in range(self.rng.randint(1, 4)):
            count = self.rng.choice([1, 1, 2, 5, CHUNK // SECTOR])
            first = self.rng.randrange(0, AREA - count + 1)
            with self.lock:  # noted before it is sent: an export may see it at once
                for s in range(first, first + count):
                    self.written.setdefault(s, []).append(step)
            self.client.pwrite(b"".join(_sector(step, s) for s in range(first, first + count)),
                               first * SECTOR)
        with self.lock:
            self.steps = step
        self.client.flush()
        with self.flush_seen:
            self.flushed = step
            self.flush_seen.notify_all()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.client.close()

    def wait_flushes(self, count: int) -> None:
        with self.flush_seen:
            assert self.flush_seen.wait_for(lambda: self.flushed >= count or self.error,
                                            timeout=120)


def _consistent_point(image: bytes, written: dict[int, list[int]], at_least: int,
                      steps: int) -> int:
    """The FLUSH point F (>= at_least) the image shows: every sector whole, as step F left
    it or as a later step wrote it. AssertionError if there is none."""
    versions: dict[int, int] = {}
    for sector in range(AREA):
        got = image[sector * SECTOR:(sector + 1) * SECTOR]
        if got == bytes(SECTOR):
            versions[sector] = 0
            continue
        step, where = struct.unpack_from(">QQ", got)
        assert got == _sector(step, where) and where == sector, f"sector {sector} is torn"
        assert step in written.get(sector, []), f"sector {sector} holds a step never written"
        versions[sector] = step
    for point in range(steps, at_least - 1, -1):
        # as of point, sector s held the last step <= point that wrote it (0: none)
        if all(versions[s] >= max([t for t in written.get(s, []) if t <= point], default=0)
               for s in range(AREA)):
            # every sector is at point's version or a later write: point is a FLUSH the
            # image holds whole; the highest such is the one it shows
            return point
    raise AssertionError(f"the image holds no FLUSH point at or after {at_least}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_export_of_a_volume_being_written_is_a_consistent_image(
        backend: str, tmp_path: Path, password_file: Path,
        request: pytest.FixtureRequest) -> None:
    """A server writes a known pattern with FLUSHes; `export --force` from a second cache
    runs meanwhile, three times: each image is some FLUSH point no older than the last
    FLUSH answered before the export began, plus perhaps later writes, never a torn
    sector."""
    env = backend_env_for(backend, tmp_path, request)
    location = _init(env, password_file)
    served = _serve(env, location, tmp_path, password_file, "cache-writer",
                    "--writeback-delay", "0.05")
    writer = PatternWriter(served)
    writer.start()
    points = []
    try:
        for attempt in range(3):
            writer.wait_flushes(writer.flushed + 5)
            assert writer.error is None, writer.error
            before = writer.flushed
            target = tmp_path / f"during-{attempt}.img"
            cloudnbd("export", env.name, location, str(target), *env.cli_args,
                     "--password-file", str(password_file), "--force", "--cache",
                     str(tmp_path / f"export-cache-{attempt}"), env=env.env)
            after, written = writer.snapshot()
            assert after > before, "the writer should have written during the export"
            image = target.read_bytes()[:AREA * SECTOR]
            points.append(_consistent_point(image, written, before, after))
    finally:
        writer.stop.set()
        writer.join(timeout=120)
        served.close()
    assert writer.error is None, writer.error
    assert points == sorted(points)
