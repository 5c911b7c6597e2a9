"""One ray-ft command per run folder at a time.

Two `ray-ft run` of the same job on one output folder would write the same shards, checkpoints
and reports at once. Every job command takes an exclusive lock on `run_dir/.lock` before it writes
anything there (its log included); a second command on the same folder is refused with the
holder's pid and command line. The lock is `flock(2)`: the kernel drops it when the holder exits,
however it exits (SIGKILL included), so a crashed run never leaves a stale lock behind.

Within one process the lock is re-entrant (the CLI holds it for the command, `run_all` takes it
again for each job of a `requires` chain): flock locks belong to an open file, and a second open
of the same file in the same process would conflict with the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from ray_ft.errors import RayFTError

LOCK_NAME = ".lock"
_held: dict[Path, list] = {}  # resolved run_dir -> [open lock file, holders in this process, folders made]


def acquire(run_dir: Path) -> None:
    """Take the run folder's lock (made with the folder) or raise RayFTError naming the holder."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    made = [d for d in (key, *key.parents) if not d.exists()]
    key.mkdir(parents=True, exist_ok=True)
    for _ in range(8):
        f = open(key / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RayFTError(f"{run_dir}: in use by another ray-ft command ({holder}); wait for it to end, or "
                             "give this job another name or output_dir") from None
        if _same_file(f, key / LOCK_NAME):
            break
        f.close()  # the holder removed the file between our open and our lock: open the new one
    else:
        raise RayFTError(f"{run_dir}: could not take the run folder's lock ({LOCK_NAME} keeps being replaced)")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}\n")
    f.flush()
    _held[key] = [f, 1, made]


def _same_file(f, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def has_outputs(run_dir: Path) -> bool:
    """The folder exists and holds something besides the lock."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def release(run_dir: Path) -> None:
    """Drop one hold; the last one unlocks. A folder that the lock made and that holds nothing
    else is removed again: a command refused or failed before writing leaves no trace."""
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    f, _, made = entry
    if made and not has_outputs(key):
        (key / LOCK_NAME).unlink(missing_ok=True)  # still locked: a waiter re-checks the file (_same_file)
        f.close()
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        return
    f.truncate(0)
    f.close()  # closing the file drops the flock


@contextlib.contextmanager
def run_folder_lock(run_dir: Path):
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
