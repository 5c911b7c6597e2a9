"""One ray-ft command per run folder: a second is refused with the holder named; a killed holder
leaves no stale lock; a refused or early-failing command leaves no folder behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ray_ft import locks
from ray_ft.errors import RayFTError
from tests.conftest import make_squad
from tests.test_cli import _assert_one_line, _job, ray_ft

HOLD = "import sys, time; from ray_ft import locks; locks.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"
TRY = ("import sys; from ray_ft import locks; from ray_ft.errors import RayFTError\n"
       "try:\n    locks.acquire(sys.argv[1])\nexcept RayFTError as e:\n    print(e); sys.exit(3)\n")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _other_process_gets(run_dir) -> bool:
    proc = subprocess.run([sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode == 0


def test_a_second_holder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "runs" / "job"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RayFTError, match=rf"{run_dir}: in use by another ray-ft command \(pid {holder.pid}: "):
            locks.acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locks.run_folder_lock(run_dir):  # the kernel dropped the dead holder's lock
        assert (run_dir / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()}: ")
        assert not _other_process_gets(run_dir)
    assert _other_process_gets(run_dir)


def test_the_lock_is_reentrant_within_a_process_and_unlocks_with_the_last_release(tmp_path):
    run_dir = tmp_path / "job"
    (run_dir / "data").mkdir(parents=True)  # a folder with outputs: kept, lock file and all
    locks.acquire(run_dir)
    locks.acquire(run_dir)
    locks.release(run_dir)
    assert not _other_process_gets(run_dir)
    locks.release(run_dir)
    assert _other_process_gets(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [locks.LOCK_NAME, "data"]


def test_a_folder_made_for_the_lock_alone_is_removed_on_release(tmp_path):
    run_dir = tmp_path / "runs" / "job"
    with locks.run_folder_lock(run_dir):
        assert run_dir.is_dir()
    assert not (tmp_path / "runs").exists()
    with locks.run_folder_lock(run_dir):
        (run_dir / "manifest.json").write_text("{}")
    assert (run_dir / "manifest.json").is_file()


def test_a_command_on_a_folder_in_use_exits_2_and_writes_nothing_there(tmp_path):
    data = make_squad(tmp_path / "d.json", [("ctx", [("a", "q?", "ctx")])])
    job = _job(tmp_path, data)
    run_dir = tmp_path / "runs" / "cli"
    holder = _holder(run_dir)
    try:
        for command in ("prepare", "run", "train", "eval", "pairs"):
            t = time.perf_counter()
            code, _, err = ray_ft(command, str(job))
            _assert_one_line(code, err, f"{run_dir}: in use by another ray-ft command (pid {holder.pid}:")
            assert time.perf_counter() - t < 60  # refused at once, not after the data stage
            assert [p.name for p in run_dir.iterdir()] == [locks.LOCK_NAME], command
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
