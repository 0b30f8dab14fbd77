"""The trainer end to end, in subprocesses, on the real corpus with a tiny GPT-2."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from train.checkpoint import list_checkpoints
from train.sharded_checkpoint import read_full_checkpoint
from trainutil import REPO, env, kconfig, make_settings, metrics, run_train, train_cmd


def final_checkpoint(run):
    """The newest checkpoint in the single-file form (a sharded one of an FSDP run read
    whole), and the checkpoints oldest first."""
    ckpts = list_checkpoints(run / "checkpoints")[::-1]
    if ckpts[-1].is_dir():
        return read_full_checkpoint(ckpts[-1]), ckpts
    return torch.load(ckpts[-1], weights_only=True), ckpts


def test_run_folder_holds_everything(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=6, CKPT_INTERVAL=3, TENSORBOARD="y")
    r = run_train(settings)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["val_loss"])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
    assert "val loss:" in r.stdout and "sample:" in r.stdout and str(run) in r.stdout
    assert (run / "config").read_text() == (tmp_path / ".config").read_text()
    assert (run / "settings.py").read_text() == settings.read_text()
    train = metrics(run)
    assert [rec["step"] for rec in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(rec["loss"]) and rec["tokens_per_s"] > 0 for rec in train)
    assert "spam/clipped_fraction" in train[-1]  # gpt2-tiny uses AdamWSpam
    assert [rec["step"] for rec in metrics(run, "val")] == [6]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    _, ckpts = final_checkpoint(run)
    assert [p.name for p in ckpts] == ["ckpt_000000003.pt", "ckpt_000000006.pt"]
    # make sample: the same seeded continuation of SAMPLE_PROMPT from the latest checkpoint
    sample = subprocess.run([sys.executable, "-m", "train.sample", "--settings", str(settings)], cwd=REPO,
                            env=env(), capture_output=True, text=True)
    assert sample.returncode == 0 and sample.stdout.rstrip("\n") == summary["sample"]
    assert sample.stdout.startswith("ROMEO:") and "ckpt_000000006.pt" in sample.stderr


def test_lr_follows_the_schedule(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=10, LR="1e-3", MIN_LR="1e-4",
                             LR_WARMUP_ITERS=4)
    run_train(settings)
    lrs = [rec["lr"] for rec in metrics(tmp_path / "run")]
    # hand-computed: warmup (k+1)/4 * 1e-3 for steps 0-3, then a half cosine from 1e-3
    # (step 4) to 1e-4 (step 9, the last) in 5 equal parts
    expect = [0.25e-3, 0.5e-3, 0.75e-3, 1e-3]
    expect += [1e-4 + 0.5 * (1 + math.cos(math.pi * i / 5)) * 0.9e-3 for i in range(6)]
    assert lrs == pytest.approx(expect, rel=1e-9)


def _kill_after_checkpoint(settings, run, step, sig):
    proc = subprocess.Popen(train_cmd(settings), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    target = run / "checkpoints" / f"ckpt_{step:09d}.pt"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    common = dict(MAX_ITERS=120, CKPT_INTERVAL=10, CKPT_KEEP=2, GPT2_DROPOUT="0.1",
                  SPAM_INTERVAL=25, SPAM_WARMUP_STEPS=5, SPAM_CLIP_GRACE_STEPS=3, EVAL_INTERVAL=30)
    whole = make_settings(tmp_path / "whole", **common)
    run_train(whole)
    broken = make_settings(tmp_path / "broken", **common)
    code, _, _ = _kill_after_checkpoint(broken, tmp_path / "broken" / "run", 20, signal.SIGKILL)
    assert code == -signal.SIGKILL
    r = run_train(broken)
    assert "resuming" in r.stdout + r.stderr
    a, _ = final_checkpoint(tmp_path / "whole" / "run")
    b, _ = final_checkpoint(tmp_path / "broken" / "run")
    assert a["step"] == b["step"] == 120
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for key, value in sa[k].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[k][key]), (k, key)
    # the resumed run's metrics continue the interrupted ones without duplicates
    steps = [rec["step"] for rec in metrics(tmp_path / "broken" / "run")]
    assert steps == list(range(1, 121))
    losses_a = [rec["loss"] for rec in metrics(tmp_path / "whole" / "run")]
    losses_b = [rec["loss"] for rec in metrics(tmp_path / "broken" / "run")]
    assert losses_a == losses_b


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=5000, CKPT_INTERVAL=2)
    run = tmp_path / "run"
    code, out, err = _kill_after_checkpoint(settings, run, 2, signal.SIGTERM)
    assert code == 1 and "interrupted by signal" in err
    saved = int(err.split("checkpoint saved at step ")[1].split()[0])
    assert (run / "checkpoints" / f"ckpt_{saved:09d}.pt").exists()
    last_logged = metrics(run)[-1]["step"]
    assert last_logged == saved  # saved exactly where it stopped: nothing lost


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=8, CKPT_INTERVAL=4, CKPT_KEEP=3)
    run_train(settings)
    run = tmp_path / "run"
    latest = run / "checkpoints" / "ckpt_000000008.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    r = run_train(settings)
    log = r.stdout + r.stderr
    assert "ckpt_000000008.pt is corrupt or truncated" in log
    assert "falling back to ckpt_000000004.pt" in log
    assert "resuming" in log and "step 4 of 8" in log
    state, _ = final_checkpoint(run)
    assert state["step"] == 8
    again = run_train(settings)  # a finished run is not trained again; its summary is shown
    assert "already complete" in again.stdout + again.stderr and "val loss:" in again.stdout
    assert metrics(run)[-1]["step"] == 8


def test_resume_refuses_changed_settings(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=4, CKPT_INTERVAL=2)
    run_train(settings)
    # setconfig already refuses to point the configuration at a folder holding another run
    refused = kconfig("setconfig", "LR=2e-3", config=tmp_path / ".config", check=False)
    assert refused.returncode != 0 and "holds a run with different settings (LR=" in refused.stderr
    # the trainer checks again against the checkpoint itself: here the folder lost the
    # settings.py the trainer keeps, so only the checkpoint remembers the run's settings
    (tmp_path / "run" / "settings.py").unlink()
    changed = make_settings(tmp_path, MAX_ITERS=4, CKPT_INTERVAL=2, LR="2e-3")
    r = run_train(changed, check=False)
    assert r.returncode != 0 and "different settings (LR)" in r.stderr


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=6, CKPT_INTERVAL=1, CKPT_KEEP=10,
                             FAULT_INJECTION="y", FAULT_NAN_STEPS="3")
    r = run_train(settings)
    assert "step 3: non-finite loss or gradients; update skipped" in r.stdout + r.stderr
    run = tmp_path / "run"
    ck = {p.name: torch.load(p, weights_only=True) for p in (run / "checkpoints").glob("*.pt")}
    w2, w3 = ck["ckpt_000000002.pt"]["model"], ck["ckpt_000000003.pt"]["model"]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the NaN step changed nothing
    assert all(torch.isfinite(t).all() for t in ck["ckpt_000000006.pt"]["model"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_total"] == 1


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=20, CKPT_INTERVAL=2,
                             MAX_NONFINITE_STEPS=2, FAULT_INJECTION="y", FAULT_NAN_STEPS="5,6,7,8")
    r = run_train(settings, check=False)
    assert r.returncode == 1
    assert "3 non-finite steps in a row (MAX_NONFINITE_STEPS=2); stopped" in r.stderr
    state, ckpts = final_checkpoint(tmp_path / "run")
    assert state["step"] == 6 and all(torch.isfinite(t).all() for t in state["model"].values())
    before = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_000000004.pt", weights_only=True)
    assert all(torch.equal(before["model"][k], v) for k, v in state["model"].items())


def test_stale_settings_are_refused(tmp_path):
    settings = make_settings(tmp_path, MAX_ITERS=2)
    time.sleep(0.05)
    (tmp_path / ".config").touch()
    r = run_train(settings, check=False)
    assert r.returncode == 2 and "make settings" in r.stderr


def test_two_process_ddp_matches_one_process(tmp_path):
    common = dict(MAX_ITERS=20, CKPT_INTERVAL=0, EVAL_BATCHES=2)
    single = make_settings(tmp_path / "one", **common, BATCH_SIZE=8)
    double = make_settings(tmp_path / "two", **common, BATCH_SIZE=4)
    run_train(single)
    run_train(double, nproc=2)
    a = metrics(tmp_path / "one" / "run")
    b = metrics(tmp_path / "two" / "run")
    assert len(a) == len(b) == 20
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["step"], ra["loss"], rb["loss"])
    va = metrics(tmp_path / "one" / "run", "val")[-1]["val_loss"]
    vb = metrics(tmp_path / "two" / "run", "val")[-1]["val_loss"]
    assert abs(va - vb) <= 1e-5


def test_resnet_tiny_trains_and_reports_accuracy(tmp_path):
    settings = make_settings(tmp_path, preset="resnet-tiny", MAX_EPOCHS=1, RESNET_BASE_WIDTH=8,
                             DEVICE_CPU="y", TENSORBOARD="n", EVAL_BATCHES=3, LOG_INTERVAL=5)
    r = run_train(settings)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert "val top-1 accuracy" in r.stdout
    assert "images_per_s" in metrics(tmp_path / "run")[-1]


def test_fsdp_matches_ddp_and_refuses_what_it_cannot_shard(tmp_path):
    common = dict(MAX_ITERS=5, CKPT_INTERVAL=0, BATCH_SIZE=4, MONITOR="n")
    ddp = make_settings(tmp_path / "ddp", preset="gpt2-tiny-adamw", **common)
    fsdp = make_settings(tmp_path / "fsdp", preset="gpt2-tiny-adamw", FSDP="y", **common)
    run_train(ddp, nproc=2)
    run_train(fsdp, nproc=2)
    a = [rec["loss"] for rec in metrics(tmp_path / "ddp" / "run")]
    b = [rec["loss"] for rec in metrics(tmp_path / "fsdp" / "run")]
    assert len(a) == 5 and a == pytest.approx(b, abs=1e-5)
    state, ckpts = final_checkpoint(tmp_path / "fsdp" / "run")  # sharded: each rank wrote its shards
    assert sorted(p.name for p in ckpts[-1].iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                           "run_state.pt"]
    assert state["model"]["transformer.wte.weight"].shape == (50304, 32)  # read whole: the full tensors
    assert state["world_size"] == 2 and state["global_batch"] == 8
    stable = make_settings(tmp_path / "stable", FSDP="y", OPTIM_STABLE_SPAM="y", **common)
    r = run_train(stable, nproc=2, check=False)
    assert r.returncode != 0 and "Stable-SPAM does not yet handle sharded" in r.stderr


def test_fsdp_adamwspam_matches_one_process_and_resumes_with_1_2_or_4_processes(tmp_path):
    # AdamWSpam on FSDP2 shards: spikes at 17 and 28 (the gate arms at step 10 and
    # clipping is on from 3 steps after each reset), resets at 12 and 24 with a
    # 4-step warmup after each, sparse moments at density 0.25. No global clip in front
    # (GRAD_CLIP=0): it would scale by 1/norm, and the one-process trainer's float32 norm
    # differs from the sharded float64 one by up to 4e-4 (train/step.py)
    common = dict(MAX_ITERS=30, MONITOR="n", GRAD_CLIP="0.0", SPAM_INTERVAL=12, SPAM_WARMUP_STEPS=4,
                  SPAM_CLIP_GRACE_STEPS=3, SPAM_DENSITY="0.25", FAULT_INJECTION="y", FAULT_SPIKE_STEPS="17,28")
    single = make_settings(tmp_path / "one", **common, CKPT_INTERVAL=0, BATCH_SIZE=8)
    sharded = make_settings(tmp_path / "fsdp", **common, CKPT_INTERVAL=20, BATCH_SIZE=4, FSDP="y")
    run_train(single)
    run_train(sharded, nproc=2)
    a, b = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "fsdp" / "run")
    assert len(a) == len(b) == 30
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["step"], ra["loss"], rb["loss"])
        for key in ("spam/spike_step", "spam/reset"):
            assert ra[key] == rb[key], (ra["step"], key)
        # the clipped counts of the two ranks are summed: the whole model's count (an
        # element at its bound may tip either way with the ranks' float rounding)
        assert rb["spam/clipped_count"] == pytest.approx(ra["spam/clipped_count"], rel=1e-5), ra["step"]
    assert [r["step"] for r in a if r["spam/spike_step"]] == [17, 28]
    assert [r["step"] for r in a if r["spam/reset"]] == [12, 24]
    assert a[16]["spam/clipped_count"] > 0 and a[16]["spam/warmup_scale"] == 1.0
    assert 0 < a[24]["spam/warmup_scale"] < 1  # step 25: inside the warmup after the reset at 24
    # the sharded run's checkpoint, read whole, holds what one process's does: the same
    # masks, the same moments, the same step, gate and mask generator
    one, _ = final_checkpoint(tmp_path / "one" / "run")
    two, ckpts = final_checkpoint(tmp_path / "fsdp" / "run")
    assert [p.name for p in ckpts] == ["ckpt_000000020", "ckpt_000000030"]
    sa, sb = one["optimizer"], two["optimizer"]
    assert sa["state"].keys() == sb["state"].keys()
    assert sum("mask_offsets" in state for state in sa["state"].values()) >= 4  # the sparse matrices
    for index, state in sa["state"].items():
        other = sb["state"][index]
        assert state.keys() == other.keys() and state["step"] == other["step"]
        for name in ("mask_offsets", "mask_counts"):
            if name in state:
                assert torch.equal(state[name], other[name]), (index, name)
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].shape == other[name].shape
            assert torch.allclose(state[name], other[name], rtol=1e-3, atol=1e-7), (index, name)
    assert sa["spam"]["step"] == sb["spam"]["step"] == 30 and sa["spam"]["last_reset"] == sb["spam"]["last_reset"]
    assert torch.equal(sa["spam"]["mask_generator_state"], sb["spam"]["mask_generator_state"])
    # (the trainer's float32 gradient norm differs between the layouts by up to 2.5e-4 by
    # step 30, with plain AdamW too; at step 1 each is off the float64 norm by 3-6e-6:
    # rounding of the 1.6M-element embedding's sum, no error of either)
    assert torch.allclose(sa["spam"]["norm_history"], sb["spam"]["norm_history"], rtol=1e-3, equal_nan=True)

    # Resume the sharded checkpoint of step 20 (what a run stopped after step 20 leaves:
    # its checkpoints up to there) with 2, 1 and 4 processes, the global batch kept at 8.
    # Steps 21-30 cross the reset at 24 (masks drawn by the restored generator), its
    # warmup and the spike at 28.
    for nproc, batch in ((2, 4), (1, 8), (4, 2)):
        folder = tmp_path / f"resumed{nproc}"
        resumed = make_settings(folder, **common, CKPT_INTERVAL=0, BATCH_SIZE=batch, FSDP="y")
        shutil.copytree(ckpts[0], folder / "run" / "checkpoints" / ckpts[0].name)
        r = run_train(resumed, nproc=nproc)
        assert "from ckpt_000000020 (step 20 of 30)" in r.stdout + r.stderr
        c = metrics(folder / "run")
        assert [rc["step"] for rc in c] == list(range(21, 31))
        end, _ = final_checkpoint(folder / "run")  # 1 process: a file; 2 and 4: sharded
        if nproc == 2:  # the same layout: bitwise what the run never stopped did
            assert [rc["loss"] for rc in c] == [rb["loss"] for rb in b[20:]]
            assert all(torch.equal(v, two["model"][k]) for k, v in end["model"].items())
            for index, other in sb["state"].items():
                assert all(torch.equal(end["optimizer"]["state"][index][k], v) if torch.is_tensor(v)
                           else end["optimizer"]["state"][index][k] == v for k, v in other.items())
        else:  # another layout: float rounding of the reductions only (a loss of 10.3 is 9.5e-7 per ulp)
            assert all(abs(rc["loss"] - rb["loss"]) <= 1e-6 for rc, rb in zip(c, b[20:])), (nproc, c)
            assert all(torch.allclose(v, two["model"][k], rtol=0, atol=1e-6) for k, v in end["model"].items())
        state = end["optimizer"]["state"]
        assert [rc["spam/reset"] for rc in c].index(1.0) == 3  # step 24
        for index, other in sb["state"].items():  # the masks drawn at 24 are the uninterrupted run's
            for name in ("mask_offsets", "mask_counts"):
                if name in other:
                    assert torch.equal(state[index][name], other[name]), (nproc, index, name)


def test_missing_settings_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train", "--settings", str(tmp_path / "nope.py")], cwd=REPO,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "nope.py" in r.stderr
