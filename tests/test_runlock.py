"""One trainer per run folder (train/runlock.py), with real processes: a second holder is
refused at once with the folder and the holder's pid; a killed holder blocks nobody."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.runlock import RunFolderBusy, RunLock

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom train.runlock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
TAKE = ("import sys\nfrom train.runlock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('got it', flush=True)\n")


def _python(code, *args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _start_holder(folder):
    holder = _python(HOLD, folder)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_process_is_refused_at_once_and_a_killed_holder_blocks_nobody(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run)
    try:
        t0 = time.monotonic()
        second = _python(TAKE, run)
        out, err = second.communicate(timeout=30)
        took = time.monotonic() - t0
        assert second.returncode != 0 and "got it" not in out
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # one line, no traceback
        assert f"run folder {run} is in use by process {holder.pid}" in lines[0]
        assert took < 10  # it did not wait for the holder (which sleeps 120 s)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run / ".lock").exists()  # the dead holder's file is still there ...
    third = _python(TAKE, run)
    out, err = third.communicate(timeout=30)
    assert third.returncode == 0 and out.strip() == "got it", err  # ... and blocks nothing


def test_lock_is_released_on_exit_and_taken_once_per_open_file(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().startswith('{"pid": %d' % os.getpid())
        with pytest.raises(RunFolderBusy, match=f"process {os.getpid()} on "):
            RunLock(tmp_path).acquire()  # flock is per open file: even this process is refused
    with RunLock(tmp_path):
        pass
