"""The newest head this machine has seen of each volume: a head older than that is a
rollback (docs/format.md, "The head"), refused by every command that unlocks a volume.

The record lives in identity.state_dir()/heads/<volume id>; a machine that never saw the
volume cannot tell an old head from a new one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudnbd import identity
from cloudnbd.errors import IntegrityError


def check_head(volume_id: bytes, generation: int) -> None:
    """Refuse a head older than the newest this machine has seen for the volume (a
    rolled-back head would serve older data as current), and remember this one. The
    record is per machine (identity.state_dir()/heads/<volume id>): a machine that
    never saw the volume cannot tell, as docs/format.md says."""
    record = identity.state_dir() / "heads" / volume_id.hex()
    check(record, generation, "head", f"restore the newest one, or remove {record} to "
                                      f"accept the old one")


def check(record: Path, generation: int, what: str, remedy: str) -> None:
    """Refuse generation if record holds a higher one (IntegrityError naming what was
    rolled back and the remedy); else record generation, atomically."""
    try:
        seen = int(record.read_text())
    except (OSError, ValueError):
        seen = 0
    if generation < seen:
        raise IntegrityError(
            f"the volume's {what} was rolled back: the store has generation {generation}, "
            f"this machine has seen {seen}; {remedy}")
    if generation > seen:
        record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{generation}\n")
        os.replace(tmp, record)
