"""The engine's table of chunk versions, and uploads conditional on it (F1, F2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cloudnbd.engine.versions import PAGE, ChunkVersions
from cloudnbd.engine.workers import UploadTask
from tests.engine_harness import CHUNK, EngineRig

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

tokens = st.one_of(
    st.binary(min_size=16, max_size=16).map(lambda b: f'"{b.hex()}"'),  # S3 ETag (MD5)
    st.integers(min_value=0, max_value=2**64).map(str),  # GCS generation
    st.text(min_size=1, max_size=40),  # anything else: multipart ETags, file versions
)


@given(st.lists(st.tuples(st.integers(0, 3 * PAGE - 1), st.one_of(st.none(), tokens)),
                max_size=50))
@example([(1, "\u00b2"), (2, "007"), (3, str(2**130))])  # not a packable number
def test_every_token_reads_back_exactly(changes: list[tuple[int, str | None]]) -> None:
    table = ChunkVersions(3 * PAGE)
    expected: dict[int, str | None] = {}
    for index, version in changes:
        table.record(index, version)
        expected[index] = version
    for index, version in expected.items():
        assert table.version(index) == version
        assert table.has(index) == (version is not None)
    assert table.count() == sum(v is not None for v in expected.values())


def test_pages_of_packed_tokens_exist_only_where_chunks_are_stored() -> None:
    table = ChunkVersions.from_listing(100 * PAGE, [(5, '"' + "ab" * 16 + '"'),
                                                    (7 * PAGE + 3, "1795634742427156"),
                                                    (200 * PAGE, "past the end")])
    assert len(table._pages) == 2
    assert table.version(7 * PAGE + 3) == "1795634742427156"
    assert not table.has(6)
    assert table.count() == 2  # the chunk past the end was ignored


def test_upload_writes_over_an_object_changed_behind_its_back(tmp_path: Path) -> None:
    """F2: a late write landed between the engine's last look and this upload; the upload
    is newer, so it is written over it, and the next upload expects the new version."""
    rig = EngineRig(tmp_path, auto=False)
    ours = os.urandom(CHUNK)
    rig.write(0, ours)
    task = rig.pool.wait_for(UploadTask)  # type: ignore[union-attr]
    assert isinstance(task, UploadTask) and task.expected is None  # nothing stored yet
    rig.volume.write_chunk(0, os.urandom(CHUNK))  # the late write of a dead process
    rig.pool.run(task)  # type: ignore[union-attr]
    rig.engine.flush()
    assert rig.engine.stats.fenced == 1
    assert rig.cloud_bytes()[:CHUNK] == ours
    newer = os.urandom(CHUNK)
    rig.write(0, newer)
    second = rig.pool.wait_for(UploadTask)  # type: ignore[union-attr]
    found = rig.store.stat("chunks/0000000000000000")
    assert found is not None and second.expected == found.version  # type: ignore[union-attr]
    rig.pool.run(second)  # type: ignore[union-attr]
    rig.engine.flush()
    assert rig.engine.stats.fenced == 1  # no surprise this time
    assert rig.cloud_bytes()[:CHUNK] == newer
