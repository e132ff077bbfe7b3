"""Key derivation for key slots: Argon2id calibrated like LUKS2, its floor, scrypt slots
still opened and upgraded when their password is changed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cloudnbd import kdf, volume
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import Argon2idParams, ScryptParams
from cloudnbd.errors import IntegrityError
from testbed.served import KDF, cloudnbd

MiB = 1024  # in KiB, the unit of Argon2id's memory
CHUNK = 64 * 1024
TINY = Argon2idParams(memory_kib=1 * MiB, iterations=2)


def machine(kib_per_second: float, fixed: float = 0.0):  # type: ignore[no-untyped-def]
    """A model of a machine for calibrate(): time grows with memory x passes."""
    measured: list[Argon2idParams] = []

    def measure(params: Argon2idParams) -> float:
        measured.append(params)
        return fixed + params.memory_kib * params.iterations / kib_per_second
    return measure, measured


def test_a_fast_machine_gets_the_whole_gibibyte_and_more_passes() -> None:
    measure, measured = machine(kib_per_second=3 * 1024 * MiB)  # 1 GiB pass in 1/3 s
    params = kdf.calibrate(memory_cap_kib=kdf.MAX_MEMORY_KIB, measure=measure)
    assert params == Argon2idParams(1024 * MiB, 3, 4)
    # memory doubled from 32 MiB with one pass each time, never past the cap
    assert [p.memory_kib // MiB for p in measured] == [32, 64, 128, 256, 512, 1024]
    assert all(p.iterations == 1 for p in measured)


def test_a_slow_machine_gets_less_memory_and_one_pass() -> None:
    measure, _ = machine(kib_per_second=200 * MiB)  # like this test machine, loaded
    params = kdf.calibrate(memory_cap_kib=kdf.MAX_MEMORY_KIB, measure=measure)
    # 128 MiB took 0.64 s, past half the target: memory scaled to 1 s, one pass
    assert params == Argon2idParams(200 * MiB, 1, 4)


def test_a_small_machine_uses_at_most_its_memory_cap() -> None:
    measure, measured = machine(kib_per_second=3 * 1024 * MiB)
    params = kdf.calibrate(memory_cap_kib=100 * MiB, measure=measure)
    assert params.memory_kib <= 100 * MiB and max(p.memory_kib for p in measured) <= 100 * MiB
    assert params == Argon2idParams(100 * MiB, 31, 4)  # a pass over 100 MiB: 1/31 s


def test_calibration_never_goes_below_the_floor() -> None:
    # a machine so slow that 32 MiB takes 5 s, and one with almost no memory
    for measure, cap in ((machine(kib_per_second=6 * MiB)[0], kdf.MAX_MEMORY_KIB),
                         (machine(kib_per_second=3 * 1024 * MiB)[0], 4 * MiB)):
        params = kdf.calibrate(memory_cap_kib=cap, measure=measure)
        assert kdf.weakness(params) is None, params
        assert params.memory_kib >= kdf.FLOOR_MEMORY_KIB


def test_the_memory_cap_follows_the_memory_available() -> None:
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert 0 < kdf.available_memory() <= total


def test_calibration_on_this_machine() -> None:
    params = kdf.calibrate(target=0.2)
    assert kdf.weakness(params) is None
    assert params.memory_kib <= min(kdf.MAX_MEMORY_KIB, kdf.available_memory() // 2048)
    assert params.lanes == kdf.LANES


def test_explicit_cost_is_memory_in_kib_and_weak_below_15() -> None:
    assert kdf.explicit(10) == Argon2idParams(1 * MiB, 3, 4)
    assert "below the floor" in (kdf.weakness(kdf.explicit(14)) or "")
    assert kdf.weakness(kdf.explicit(15)) is None
    assert kdf.weakness(Argon2idParams(19 * MiB, 2)) is None  # OWASP's minimum itself
    assert kdf.weakness(Argon2idParams(19 * MiB, 1)) is not None
    assert kdf.weakness(Argon2idParams(38 * MiB, 1)) is None


# -- key slots of a volume ------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "vol")


def _slots(store: FileStore) -> list[dict[str, object]]:
    return json.loads(store.get(volume.METADATA_KEY))["key_slots"]


def test_a_new_volume_gets_a_calibrated_argon2id_slot(store: FileStore) -> None:
    vol = volume.create(store, 4 * CHUNK, CHUNK, "pw")
    [slot] = vol.meta.slots
    assert isinstance(slot.kdf, Argon2idParams) and kdf.weakness(slot.kdf) is None
    assert json.loads(store.get(volume.METADATA_KEY))["version"] == 3
    assert volume.unlock(store, "pw").keys == vol.keys


def test_scrypt_slots_still_open_and_a_password_change_upgrades_only_that_slot(
        store: FileStore) -> None:
    vol = volume.create(store, 4 * CHUNK, CHUNK, "first", ScryptParams(n=2**10), version=1)
    vol.add_password("second", ScryptParams(n=2**10))
    assert json.loads(store.get(volume.METADATA_KEY))["version"] == 1
    assert volume.unlock(store, "second").keys == vol.keys
    volume.unlock(store, "first").change_password("first", "renewed", TINY)
    assert [s["kdf"] for s in _slots(store)] == ["argon2id", "scrypt"]
    # an Argon2id slot needs version 2 (older readers would misread it)
    assert json.loads(store.get(volume.METADATA_KEY))["version"] == 2
    assert volume.unlock(store, "renewed").keys == vol.keys
    assert volume.unlock(store, "second").keys == vol.keys


def test_argon2id_parameters_out_of_range_are_refused_before_running_the_kdf(
        store: FileStore) -> None:
    volume.create(store, 4 * CHUNK, CHUNK, "pw", TINY)
    original = json.loads(store.get(volume.METADATA_KEY))
    for field, value in (("memory_kib", 2**23), ("iterations", 65), ("lanes", 17),
                         ("memory_kib", 16)):  # 16 KiB < 8 KiB per lane x 4 lanes
        doc = json.loads(json.dumps(original))
        doc["key_slots"][0][field] = value
        store.put(volume.METADATA_KEY, json.dumps(doc).encode())
        with pytest.raises(IntegrityError, match=r"out of range|below 8 KiB"):
            volume.unlock(store, "pw")
    doc = json.loads(json.dumps(original))
    doc["version"] = 1  # a version-1 document cannot hold an Argon2id slot
    store.put(volume.METADATA_KEY, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="unknown KDF"):
        volume.unlock(store, "pw")


def test_weak_parameters_are_warned_about(store: FileStore,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        volume.create(store, 4 * CHUNK, CHUNK, "pw", TINY)
    assert "key slot 0: Argon2id 1 MiB, 2 passes, 4 lanes is below the floor" in caplog.text


# -- the command line ---------------------------------------------------------------------

def test_passwd_upgrades_a_scrypt_slot_to_calibrated_argon2id(tmp_path: Path) -> None:
    location = tmp_path / "vol"
    volume.create(FileStore(location), 4 * CHUNK, CHUNK, "old password",
                  ScryptParams(n=2**10))
    old, new = tmp_path / "old", tmp_path / "new"
    for path, text in ((old, "old password"), (new, "new password")):
        path.write_text(text + "\n")
        path.chmod(0o600)
    changed = cloudnbd("passwd", "file", str(location), "--password-file", str(old),
                       "--new-password-file", str(new))
    assert "key slot 0" in changed.stdout and changed.stderr == ""
    info = json.loads(cloudnbd("info", "file", str(location), "--password-file", str(new),
                               "--json").stdout)
    [slot] = info["key_slots"]
    assert slot["kdf"] == "argon2id" and info["format_version"] == 3
    assert kdf.weakness(Argon2idParams(slot["memory_kib"], slot["iterations"],
                                       slot["lanes"])) is None


def test_init_with_a_weak_explicit_cost_says_so(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pw\n")
    password.chmod(0o600)
    result = cloudnbd("init", "file", str(tmp_path / "vol"), "64MiB", "--password-file",
                      str(password), *KDF)
    assert "Key slot 0: Argon2id 1 MiB, 3 passes, 4 lanes" in result.stdout
    assert result.stderr.splitlines() == [
        "cloudnbd: WARNING: key slot 0: Argon2id 1 MiB, 3 passes, 4 lanes is below the "
        "floor of 19 MiB and 2 passes (OWASP's minimum): a stolen volume.json makes "
        "guessing the password cheap"]
