"""Sharded (FSDP, torch.distributed.checkpoint) checkpoints: the on-disk form, its
faults (full disk, truncation, a kill before the rename, code in the index), the
AdamWSpam form against a per-element reference, `make sample` on it, the resume
rule for the global batch, and, in two real gloo processes, writing, reading into
shards and the spike guard's rollback. (Resuming with 1, 2 and 4 processes:
tests/test_train.py::test_fsdp_adamwspam_matches_one_process.)"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import types

import pytest
import torch
from torch import nn

from optim import AdamWSpam, param_groups
from optim.spam_dcp import sharded_state as spam_sharded_state
from train import sharded_checkpoint
from train.checkpoint import CheckpointWriteError, list_checkpoints, load_latest_checkpoint, save_checkpoint
from train.distributed import DistInfo
from train.fsdp import sharded_state
from train.sharded_checkpoint import read_full_checkpoint, save_sharded_checkpoint
from trainutil import PY, REPO, FullDisk, env, make_settings, settings_in_process

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _trained(optimizer_kind="spam", steps=4):
    """A small model and its optimizer after a few steps (AdamWSpam: sparse moments, a
    reset at step 3 that redrew the masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 8))
    if optimizer_kind == "spam":
        opt = AdamWSpam(param_groups(model, 0.1, with_sparse=True), lr=1e-2, density=0.25, interval=3,
                        warmup_steps=1, clip_grace_steps=1, seed=3)
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.1, with_sparse=False), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(5, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(model, opt, folder, step, keep=3, **extra):
    tensors, plain = sharded_state(model, opt)
    return save_sharded_checkpoint(tensors, {"step": step, "optimizer": plain, **extra}, folder, step, keep, ONE)


def _same(a, b):
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape  # NaN == NaN (gate history)
                and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["spam", "adamw"])
def test_a_sharded_checkpoint_reads_back_whole_exactly(tmp_path, kind):
    model, opt = _trained(kind)
    path = _save(model, opt, tmp_path, 4)
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "run_state.pt"]
    full = read_full_checkpoint(path)  # what the single-file form holds
    assert full["step"] == 4
    assert _same(full["model"], model.state_dict())
    assert _same(full["optimizer"], opt.state_dict())


def test_the_adamwspam_form_against_a_per_element_reference():
    model, opt = _trained("spam")
    weight = model[0].weight
    state = opt.state[weight]
    state["exp_avg"][0] = 0.0  # a kept element whose moment is 0: only the mask says it is kept
    assert [p for g in opt.param_groups for p in g["params"]] == [weight, model[2].weight, model[0].bias,
                                                                 model[2].bias]  # sparse weights first
    tensors, plain = spam_sharded_state(opt, ["a", "b", "c", "d"])
    kept, position = [], 0  # decode the mask by hand: counts per block of 256, offsets inside it
    for block, count in enumerate(state["mask_counts"].tolist()):
        for offset in state["mask_offsets"][position:position + count].tolist():
            kept.append(block * 256 + offset)
        position += count
    assert len(kept) == round(0.25 * weight.numel())
    for name in ("exp_avg", "exp_avg_sq"):
        dense = tensors[f"a.{name}"]
        assert dense.shape == weight.shape
        flat = dense.flatten().tolist()
        for i in range(weight.numel()):
            want = state[name][kept.index(i)].item() if i in kept else 0.0
            assert flat[i] == want, (name, i)
    mask = tensors["a.mask"]
    assert mask.dtype == torch.uint8 and mask.flatten().tolist() == [int(i in kept) for i in range(weight.numel())]
    assert "b.mask" in tensors and "c.mask" not in tensors  # a bias has dense moments, as they are
    assert torch.equal(tensors["c.exp_avg"], opt.state[model[0].bias]["exp_avg"])
    assert plain["steps"] == {"a": 4, "b": 4, "c": 4, "d": 4} and plain["spam"]["step"] == 4


def test_keep_k_spans_both_forms_and_leftovers_are_removed_at_load(tmp_path):
    model, opt = _trained("spam")
    save_checkpoint({"step": 1}, tmp_path, 1, keep=2)
    for step in (2, 3):
        _save(model, opt, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000003", "ckpt_000000002"]
    (tmp_path / "ckpt_000000004.tmp").mkdir()  # a save killed half-way
    (tmp_path / "ckpt_000000004.tmp" / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "ckpt_000000001.old").mkdir()  # a deletion killed half-way
    state, path = load_latest_checkpoint(tmp_path, log=pytest.fail, remove_stale=False)  # make sample's way
    assert path.name == "ckpt_000000003" and (tmp_path / "ckpt_000000004.tmp").exists()
    state, path = load_latest_checkpoint(tmp_path, log=pytest.fail)
    assert state["step"] == 3 and "model" not in state  # the plain data; tensors are read on demand
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000002", "ckpt_000000003"]


def test_a_kill_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained("spam")
    _save(model, opt, tmp_path, 1, keep=1)

    def killed(*args):
        raise KeyboardInterrupt  # the process stops here, as under SIGKILL: nothing after runs
    monkeypatch.setattr(sharded_checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(model, opt, tmp_path, 2, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001", "ckpt_000000002.tmp"]
    state, path = load_latest_checkpoint(tmp_path, log=pytest.fail)
    assert state["step"] == 1 and not (tmp_path / "ckpt_000000002.tmp").exists()


def test_a_full_disk_during_a_sharded_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    model, opt = _trained("spam")
    _save(model, opt, tmp_path, 1, keep=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt_000000001").iterdir()}
    monkeypatch.setattr(sharded_checkpoint, "open", lambda path, mode: FullDisk(path, mode, room=3000),
                        raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        _save(model, opt, tmp_path, 2, keep=1)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"error: could not write checkpoint {tmp_path / 'ckpt_000000002'}: "
                                              "No space left on device (ENOSPC); the previous checkpoints are "
                                              "intact (latest: ckpt_000000001)"), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001"]  # the partial folder is gone
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt_000000001").iterdir()} == before


def test_shards_that_miss_rank_0s_folder_are_refused_at_the_write(tmp_path, monkeypatch):
    # nodes without a shared filesystem: another rank's file lands in its own OUT_DIR
    model, opt = _trained("spam")
    real_save = sharded_checkpoint.dcp.save

    def elsewhere(tensors, storage_writer, **kw):
        real_save(tensors, storage_writer=storage_writer, **kw)
        (storage_writer.fs.concat_path(storage_writer.path, "__0_0.distcp")).unlink()
    monkeypatch.setattr(sharded_checkpoint.dcp, "save", elsewhere)
    with pytest.raises(CheckpointWriteError, match=r"__0_0.distcp is missing: every rank must write to the same "
                                                   r"folder \(OUT_DIR on a filesystem that all nodes share\)"):
        _save(model, opt, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_corrupt_truncated_or_foreign_sharded_checkpoints_fall_back(tmp_path):
    model, opt = _trained("spam")
    for step in (1, 2, 3, 4):
        _save(model, opt, tmp_path, step, keep=4)
    shard = tmp_path / "ckpt_000000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    (tmp_path / "ckpt_000000003" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    (tmp_path / "ckpt_000000002" / "run_state.pt").unlink()
    messages = []
    state, path = load_latest_checkpoint(tmp_path, log=messages.append)
    assert state["step"] == 1 and path.name == "ckpt_000000001"
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert "ckpt_000000004 is corrupt or truncated (__0_0.distcp is truncated (" in messages[0]
    assert messages[0].endswith("falling back to ckpt_000000003")
    assert "ckpt_000000003 is corrupt or truncated (posix.system is not part of a checkpoint index)" in messages[1]
    assert "ckpt_000000002 is corrupt or truncated (run_state.pt is missing)" in messages[2]


def test_make_sample_reads_a_sharded_checkpoint(tmp_path, capsys):
    from data.tokenizer import encoding_for
    from models.gpt2 import build_gpt2
    from optim import build_optimizer
    from train import sample
    from train.families import generate_text

    settings = make_settings(tmp_path, preset="gpt-bytes", tiny=True)  # the byte tokenizer: nothing to build
    cfg = settings_in_process("gpt-bytes", tiny=True)
    encoding = encoding_for(cfg)
    torch.manual_seed(1)
    model = build_gpt2(cfg, vocab_size=encoding.n_vocab)
    _save(model, build_optimizer(cfg, model), tmp_path / "run" / "checkpoints", 7)
    assert sample.main(["--settings", str(settings)]) == 0
    out, err = capsys.readouterr()
    assert "ckpt_000000007 (step 7)" in err
    assert out.rstrip("\n") == generate_text(model, encoding, cfg, torch.device("cpu"))


def test_resume_may_change_batch_size_only_with_the_global_batch():
    from train.setup import _check_same_run
    from scripts.kconfig import schema

    def run(world, **settings):
        cfg = settings_in_process("gpt2-tiny", **settings)
        return types.SimpleNamespace(cfg=cfg, info=DistInfo(0, world, 0, torch.device("cpu")), out="runs/x")

    saved = run(2, BATCH_SIZE=4).cfg.as_dict()
    checkpoint_state = {"settings": saved, "world_size": 2, "global_batch": 8}
    _check_same_run(run(1, BATCH_SIZE=8), checkpoint_state)
    _check_same_run(run(4, BATCH_SIZE=2), checkpoint_state)
    _check_same_run(run(1, BATCH_SIZE=4, GRAD_ACCUM_STEPS=2), checkpoint_state)
    with pytest.raises(SystemExit) as e:
        _check_same_run(run(1, BATCH_SIZE=4), checkpoint_state)
    assert str(e.value) == ("error: runs/x was trained with a global batch of 8 (BATCH_SIZE=4 x 2 processes x "
                            "GRAD_ACCUM_STEPS=1), this run's is 4 (BATCH_SIZE=4 x 1 processes x GRAD_ACCUM_STEPS=1); "
                            "set BATCH_SIZE so that the global batch stays 8, or OUT_DIR to a new folder")
    with pytest.raises(SystemExit, match=r"different settings \(LR\)"):
        _check_same_run(run(1, BATCH_SIZE=8, LR="7e-4"), checkpoint_state)
    # a checkpoint from before the rule records no global batch: BATCH_SIZE stays as it was
    with pytest.raises(SystemExit, match=r"different settings \(BATCH_SIZE\)"):
        _check_same_run(run(1, BATCH_SIZE=8), {"settings": saved})
    # make setconfig / settings leave BATCH_SIZE to the trainer (they do not know the processes)
    assert schema.settings_diff(saved, run(1, BATCH_SIZE=8).cfg.as_dict(), ignore=schema.GLOBAL_BATCH_FACTORS) == []


# Two ranks of a real gloo group: write, read into shards, roll back, fail on one rank;
# AdamWSpam (odd block sizes) and AdamW.
TWO_RANKS = r"""
import json, os, sys, types
from pathlib import Path
import torch, torch.distributed as dist
rank, folder = int(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
from models.gpt2 import build_gpt2
from optim import build_optimizer
from scripts.kconfig.settings import Settings
from train import sharded_checkpoint
from train.checkpoint import CheckpointWriteError, load_latest_checkpoint
from train.distributed import DistInfo
from train.fsdp import shard_model, sharded_state, load_full_state
from train.sharded_checkpoint import restore_training_state, save_sharded_checkpoint
from train.step import rollback

info = DistInfo(rank, 2, rank, torch.device("cpu"))
spam, adamw = (Settings(values) for values in json.loads((folder / "settings.json").read_text()))
ckpts = folder / "checkpoints"

def built(cfg, sharded=True):
    torch.manual_seed(0)
    model = build_gpt2(cfg, vocab_size=95)
    if sharded:
        shard_model(model)
    return model, build_optimizer(cfg, model)

def train(model, opt, steps, seed=rank):  # each rank its own rows, as in training
    for i in steps:
        tokens = torch.randint(0, 95, (2, 32), generator=torch.Generator().manual_seed(100 * i + seed))
        model(tokens, tokens)[1].backward()
        opt.step()
        opt.zero_grad()

def whole(model):
    return {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}

def local_state(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]

def same(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                                            for k in x) for x, y in zip(a, b))

def save(step):
    tensors, plain = sharded_state(model, opt)
    save_sharded_checkpoint(tensors, {"step": step, "optimizer": plain}, ckpts, step, 2, info)

model, opt = built(spam)
train(model, opt, range(3))  # a reset at 2: masks redrawn
save(3)
weights, state = whole(model), local_state(opt)
assert any("mask_offsets" in s for s in state)
assert model.transformer.h[0].attn.c_attn.weight.to_local().shape[0] == (50 if rank == 0 else 49)

# a fresh sharded model and optimizer read their blocks: exactly what was written
fresh, fresh_opt = built(spam)
found, path = load_latest_checkpoint(ckpts, log=print)
restore_training_state(fresh, fresh_opt, True, found, path)
assert all(torch.equal(weights[n], p.full_tensor()) for n, p in fresh.named_parameters())
assert same(local_state(fresh_opt), state) and fresh_opt._step == 3

# the spike guard's rollback: weights of the checkpoint, momentum reset
train(model, opt, [3])
assert not torch.equal(weights["transformer.wte.weight"], whole(model)["transformer.wte.weight"])
events = []
run = types.SimpleNamespace(ckpt_dir=ckpts, device=info.device, say=print, model=model, optimizer=opt, fsdp=True,
                            monitor=types.SimpleNamespace(rolled_back=lambda step, st: events.append(st["step"])),
                            runlog=types.SimpleNamespace(event=lambda name, record: events.append(record)))
assert rollback(run, 4) == 3 and events[0] == 3
assert all(torch.equal(weights[n], p.full_tensor()) for n, p in model.named_parameters())
assert all(s["exp_avg"].abs().sum() == 0 for s in local_state(opt))

# rank 1's disk fills up: every rank stops, rank 0 says why in one line
if rank == 1:
    sys.path.insert(0, "tests")  # run from the repository
    from trainutil import FullDisk
    sharded_checkpoint.open = lambda path, mode: FullDisk(path, mode, room=0)
try:
    save(4)
    raise AssertionError("the save should have failed")
except CheckpointWriteError as e:
    print(f"rank {rank} stopped: {e.code}")
dist.barrier()
assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_000000003"]
if rank == 1:
    del sharded_checkpoint.open  # the disk has room again

# AdamW: torch's own sharded optimizer state, written by the shards and read back into new ones
model, opt = built(adamw)
train(model, opt, [0, 1])
save(5)
fresh, fresh_opt = built(adamw)
found, path = load_latest_checkpoint(ckpts, log=print)
assert path.name == "ckpt_000000005"
restore_training_state(fresh, fresh_opt, True, found, path)
for p, q in zip(model.parameters(), fresh.parameters()):
    assert torch.equal(p.full_tensor(), q.full_tensor())
    assert all(torch.equal(opt.state[p][k], fresh_opt.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))

# a whole-tensor (one-process) AdamW state into a sharded AdamW: each rank its blocks
plain, plain_opt = built(adamw, sharded=False)
train(plain, plain_opt, [0], seed=0)  # the same batch on both ranks: one whole state
model, opt = built(adamw)
load_full_state(model, opt, plain.state_dict(), plain_opt.state_dict())
for p_plain, p in zip(plain.parameters(), model.parameters()):
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(plain_opt.state[p_plain][k], opt.state[p][k].full_tensor())
print(f"rank {rank} ok", flush=True)
# both done, then leave without tearing gloo down: on a loaded machine its teardown
# sometimes aborts ("terminate called without an active exception") after all went well
dist.barrier()
os._exit(0)
"""


def test_two_ranks_write_read_roll_back_and_stop_together_on_a_full_disk(tmp_path):
    # 33 wide, 3 heads and a vocabulary of 95: odd numbers of rows, so the two ranks' blocks
    # differ in size (FSDP2 pads nothing on disk: the blocks must meet exactly)
    spam = settings_in_process("gpt2-tiny", GPT2_N_EMBD=33, GPT2_N_HEAD=3, SPAM_DENSITY="0.25", SPAM_INTERVAL=2,
                               SPAM_WARMUP_STEPS=1, SPAM_CLIP_GRACE_STEPS=1)
    adamw = settings_in_process("gpt2-tiny-adamw")
    (tmp_path / "settings.json").write_text(json.dumps([spam.as_dict(), adamw.as_dict()]))
    logs = [(tmp_path / f"out{rank}", tmp_path / f"err{rank}") for rank in (0, 1)]
    procs = []
    for rank, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall a rank
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen([PY, "-c", TWO_RANKS, str(rank), str(tmp_path)], cwd=REPO, env=env(),
                                          stdout=o, stderr=e))
    codes = [p.wait(timeout=120) for p in procs]
    outs = [(out.read_text(), err.read_text()) for out, err in logs]
    for rank, (code, (out, err)) in enumerate(zip(codes, outs)):
        assert code == 0 and f"rank {rank} ok" in out, out + err[-3000:]
    assert (f"rank 0 stopped: error: could not write checkpoint {tmp_path / 'checkpoints' / 'ckpt_000000004'}: "
            "No space left on device (ENOSPC); the previous checkpoints are intact (latest: ckpt_000000003)") \
        in outs[0][0]
    assert "rank 1 stopped: 1" in outs[1][0]
