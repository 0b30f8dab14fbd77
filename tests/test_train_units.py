"""Unit tests of the trainer's components: schedule, checkpoints, RNG capture, faults."""
from __future__ import annotations

import math
import random
import types

import numpy as np
import pytest
import torch

from train.checkpoint import (capture_rng_state, list_checkpoints, load_latest_checkpoint,
                              restore_rng_state, save_checkpoint)
from train.faults import FaultInjector, parse_steps
from train.families import total_iters_for
from train.schedule import learning_rate


def test_learning_rate_hand_computed():
    kw = dict(lr=1.0, warmup_iters=2, total_iters=7, cosine=True, min_lr=0.0)
    got = [learning_rate(s, **kw) for s in range(7)]
    # warmup 1/2, 2/2; then cos over 4 decay steps: 1, (1+cos(pi/4))/2, 1/2, (1+cos(3pi/4))/2, 0
    want = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert learning_rate(5, lr=2.0, warmup_iters=0, total_iters=10, cosine=False, min_lr=0.1) == 2.0


def test_total_iters_takes_the_earlier_limit():
    cfg = types.SimpleNamespace(MAX_ITERS=100, MAX_EPOCHS=2)
    assert total_iters_for(cfg, steps_per_epoch=30) == 60
    assert total_iters_for(types.SimpleNamespace(MAX_ITERS=0, MAX_EPOCHS=3), 30) == 90
    assert total_iters_for(types.SimpleNamespace(MAX_ITERS=50, MAX_EPOCHS=0), 30) == 50


def test_checkpoints_keep_the_last_k_and_leave_no_temp_files(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000040.pt", "ckpt_000000030.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    state, path = load_latest_checkpoint(tmp_path, log=lambda m: None)
    assert state["step"] == 40 and torch.equal(state["w"], torch.full((3,), 40.0))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    for step in (1, 2):
        save_checkpoint({"step": step}, tmp_path, step, keep=5)
    (tmp_path / "ckpt_000000002.pt").write_bytes(b"PK\x03\x04 garbage")
    (tmp_path / "ckpt_000000003.pt.tmp").write_bytes(b"half")  # an interrupted save
    messages = []
    state, path = load_latest_checkpoint(tmp_path, log=messages.append)
    assert state["step"] == 1 and path.name == "ckpt_000000001.pt"
    assert "ckpt_000000002.pt is corrupt or truncated" in messages[0]
    assert "falling back to ckpt_000000001.pt" in messages[0]
    assert not (tmp_path / "ckpt_000000003.pt.tmp").exists()


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt_000000005.pt").write_bytes(b"nope")
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        load_latest_checkpoint(tmp_path, log=lambda m: None)


def test_checkpoint_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"step": 1, "x": Evil()}, tmp_path / "ckpt_000000001.pt")
    with pytest.raises(SystemExit):
        load_latest_checkpoint(tmp_path, log=lambda m: None)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"step": 1, "rng": capture_rng_state()}, tmp_path, 1, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state, _ = load_latest_checkpoint(tmp_path, log=lambda m: None)
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _fault_cfg(**kw):
    base = dict(FAULT_INJECTION=True, SEED=0, FAULT_SPIKE_STEPS="", FAULT_SPIKE_PROB=0.0,
                FAULT_SPIKE_FACTOR=1000.0, FAULT_OUTLIER_STEPS="", FAULT_NAN_STEPS="", FAULT_KILL_STEP=0, FAULT_KILL_RANK=0,
                FAULT_SPIKE_WHOLE=True, FAULT_SPIKE_EMBED_ROWS=False, FAULT_SPIKE_ONE_LAYER=False,
                FAULT_SPIKE_HEAD=False, FAULT_SPIKE_ROWS=None, FAULT_SPIKE_LAYER=None,
                FAULT_OUTLIER_REPEAT=True, FAULT_OUTLIER_RANDOM=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_fault_steps_parse_and_spike_multiplies_gradients():
    assert parse_steps("3, 7,11") == {3, 7, 11} and parse_steps("") == frozenset()
    faults = FaultInjector(_fault_cfg(FAULT_SPIKE_STEPS="2"))
    model = torch.nn.Module()
    model.w = p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    assert faults.inject_gradient_spike(1, model) == []
    assert faults.inject_gradient_spike(2, model) == ["w"]
    assert torch.equal(p.grad, torch.tensor([1000.0, -2000.0, 500.0]))


def test_random_spikes_are_reproducible_and_near_their_probability():
    a = FaultInjector(_fault_cfg(FAULT_SPIKE_PROB=0.1, SEED=5))
    b = FaultInjector(_fault_cfg(FAULT_SPIKE_PROB=0.1, SEED=5))
    hits = [s for s in range(1, 2001) if a.is_spike_step(s)]
    assert hits == [s for s in range(1, 2001) if b.is_spike_step(s)]
    assert 140 <= len(hits) <= 260  # 200 expected; > 4 sigma either side


def test_faults_off_change_nothing():
    faults = FaultInjector(types.SimpleNamespace(FAULT_INJECTION=False, SEED=0))
    loss = torch.tensor(2.0)
    assert faults.poison_loss(1, loss) is loss and not faults.is_spike_step(1)
