"""Checkpoint faults on real files: a full disk during a write, and a kill during the rename
stage, leave the previous checkpoints intact and the newest good one loadable."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointWriteError, list_checkpoints, load_latest_checkpoint, save_checkpoint
from trainutil import FullDisk, sigkill_at_marker

REPO = Path(__file__).resolve().parents[1]


def _state(step):
    return {"step": step, "model": {"w": torch.full((64, 64), float(step))}}


def test_full_disk_during_a_write_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(_state(step), folder, step, keep=2)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, mode, room=3000), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(3), folder, 3, keep=2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"error: could not write checkpoint {folder / 'ckpt_000000003.pt'}")
    assert ": No space left on device (ENOSPC); " in msg, msg
    assert "latest: ckpt_000000002.pt" in msg and "make train` resumes" in msg
    monkeypatch.undo()
    # nothing changed: no partial file, no pruning, and the newest good checkpoint loads
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    state, path = load_latest_checkpoint(folder)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.full((64, 64), 2.0))


# A child that saves step 1, then stops for good at one point of saving step 2.
SAVE = """
import sys, time
from pathlib import Path
import torch
from train import checkpoint
folder, marker, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def state(step):
    return {"step": step, "model": {"w": torch.full((64, 64), float(step))}}
checkpoint.save_checkpoint(state(1), folder, 1, keep=1)
def pause(real):
    def wrapper(*args, **kw):
        Path(marker).write_text(where)
        time.sleep(120)
    return wrapper
if where == "before-rename":
    checkpoint.os.replace = pause(checkpoint.os.replace)
else:  # renamed, not yet fsynced nor pruned (keep=1 would delete step 1 next)
    checkpoint._fsync_dir = pause(checkpoint._fsync_dir)
checkpoint.save_checkpoint(state(2), folder, 2, keep=1)
"""


@pytest.mark.parametrize("where,latest", [("before-rename", 1), ("after-rename", 2)])
def test_kill_during_the_rename_stage_leaves_a_loadable_latest_checkpoint(tmp_path, where, latest):
    folder, marker = tmp_path / "checkpoints", tmp_path / "marker"
    sigkill_at_marker(SAVE, [str(folder), str(marker), where], marker)
    messages = []
    state, path = load_latest_checkpoint(folder, log=messages.append)
    assert state["step"] == latest and torch.equal(state["model"]["w"], torch.full((64, 64), float(latest)))
    assert messages == []  # nothing corrupt was met on the way
    assert not list(folder.glob("*.tmp"))  # the interrupted temporary file is gone
    if where == "after-rename":
        assert [p.name for p in list_checkpoints(folder)] == ["ckpt_000000002.pt", "ckpt_000000001.pt"]


# The real trainer, with the disk filling up during the checkpoint of step 4.
TRAIN_WITH_FULL_DISK = """
import sys
sys.path.insert(0, "tests")  # run from the repository
from train import checkpoint
from train.__main__ import main
from trainutil import FullDisk
real_open = open
def opener(path, mode="r", *args, **kw):
    if str(path).endswith("ckpt_000000004.pt.tmp"):
        return FullDisk(path, mode, room=2000)
    return real_open(path, mode, *args, **kw)
checkpoint.open = opener
sys.exit(main(["--settings", sys.argv[1]]))
"""


def test_trainer_stops_on_a_full_disk_and_the_next_run_resumes_from_the_last_good_checkpoint(tmp_path):
    from trainutil import env, make_settings, metrics, run_train

    settings = make_settings(tmp_path, MAX_ITERS=4, CKPT_INTERVAL=2, CKPT_KEEP=3, EVAL_INTERVAL=1000)
    r = subprocess.run([sys.executable, "-c", TRAIN_WITH_FULL_DISK, str(settings)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    run = tmp_path / "run"
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # one line (after the progress bar the trainer leaves open)
    assert last.endswith(f"error: could not write checkpoint {run / 'checkpoints' / 'ckpt_000000004.pt'}: No space left "
                    "on device (ENOSPC); the previous checkpoints are intact (latest: ckpt_000000002.pt); free "
                    "space, then `make train` resumes from it"), last
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_000000002.pt"]
    again = run_train(settings)
    assert "from ckpt_000000002.pt (step 2 of 4)" in again.stdout + again.stderr
    assert [rec["step"] for rec in metrics(run)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_000000004.pt", "ckpt_000000002.pt"]
