"""Fault injection: each spike kind multiplies exactly the gradients it should (checked
element by element against copies taken before), bad targets are refused, faults are
pure functions of (SEED, step), and data outliers really spike the gradient norm."""
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.gpt2 import GPT, GPTConfig
from train.families import Batch
from train.faults import FaultConfigError, FaultInjector

FACTOR = 1000.0


def settings(kind="whole", rows=None, layer=None, outlier="repeat", **over):
    values = dict(FAULT_INJECTION=True, SEED=7, FAULT_SPIKE_STEPS="3", FAULT_SPIKE_PROB=0.0,
                  FAULT_SPIKE_FACTOR=FACTOR, FAULT_SPIKE_WHOLE=kind == "whole",
                  FAULT_SPIKE_EMBED_ROWS=kind == "embed_rows", FAULT_SPIKE_ONE_LAYER=kind == "layer",
                  FAULT_SPIKE_HEAD=kind == "head", FAULT_SPIKE_ROWS=rows, FAULT_SPIKE_LAYER=layer,
                  FAULT_OUTLIER_STEPS="", FAULT_OUTLIER_REPEAT=outlier == "repeat",
                  FAULT_OUTLIER_RANDOM=outlier == "random", FAULT_NAN_STEPS="", FAULT_KILL_STEP=0, FAULT_KILL_RANK=0,
                  TOKENIZER_GPT2=False, TOKENIZER_BYTES=True)
    return SimpleNamespace(**{**values, **over})


def model_with_grads(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=257, dropout=0.0))
    x = torch.randint(0, 257, (2, 16))
    _, loss = m(x, torch.roll(x, -1, 1))
    loss.backward()
    return m


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def changed_by_factor(before, model):
    """{name: boolean mask of the elements that changed}, after checking element by element
    that each element is either unchanged or exactly its old value times FACTOR."""
    masks = {}
    for n, p in model.named_parameters():
        old, new = before[n].flatten().numpy(), p.grad.flatten().numpy()
        flags = []
        for a, b in zip(old, new):  # float32 scalars: the product rounds as the gradient's does
            assert b == a or b == a * np.float32(FACTOR), (n, a, b)
            flags.append(b != a)
        masks[n] = torch.tensor(flags).reshape(p.shape)
    return masks


def test_whole_gradient():
    m = model_with_grads()
    before = grads_of(m)
    names = FaultInjector(settings("whole"), m).inject_gradient_spike(3, m)
    masks = changed_by_factor(before, m)
    for n in masks:  # every nonzero element changed
        assert torch.equal(masks[n], before[n] != 0), n
    assert set(names) == set(before)


def test_no_spike_off_the_listed_steps():
    m = model_with_grads()
    before = grads_of(m)
    assert FaultInjector(settings("whole"), m).inject_gradient_spike(4, m) == []
    assert all(torch.equal(before[n], p.grad) for n, p in m.named_parameters())


def test_embedding_rows():
    m = model_with_grads()
    before = grads_of(m)
    names = FaultInjector(settings("embed_rows", rows=5), m).inject_gradient_spike(3, m)
    masks = changed_by_factor(before, m)
    assert names == ["transformer.wte.weight"]
    assert not any(masks[n].any() for n in masks if n != "transformer.wte.weight")
    rows = [r for r in range(masks["transformer.wte.weight"].shape[0]) if masks["transformer.wte.weight"][r].any()]
    assert len(rows) == 5 and max(rows) < 257  # distinct real tokens, never a padded row
    for r in rows:  # the whole row, not part of it
        assert masks["transformer.wte.weight"][r].all()

    # the same rows for the same (SEED, step): another rank, a resumed run
    m2 = model_with_grads()
    b2 = grads_of(m2)
    FaultInjector(settings("embed_rows", rows=5), m2).inject_gradient_spike(3, m2)
    mask2 = changed_by_factor(b2, m2)["transformer.wte.weight"]
    rows2 = [r for r in range(mask2.shape[0]) if mask2[r].any()]
    assert rows2 == rows
    # and other rows at another step
    m3 = model_with_grads()
    b3 = grads_of(m3)
    FaultInjector(settings("embed_rows", rows=5, FAULT_SPIKE_STEPS="4"), m3).inject_gradient_spike(4, m3)
    mask3 = changed_by_factor(b3, m3)["transformer.wte.weight"]
    rows3 = [r for r in range(mask3.shape[0]) if mask3[r].any()]
    assert len(rows3) == 5 and rows3 != rows


def test_one_layer_is_a_module_path():
    m = model_with_grads()
    before = grads_of(m)
    FaultInjector(settings("layer", layer="transformer.h.1.attn"), m).inject_gradient_spike(3, m)
    masks = changed_by_factor(before, m)
    for n, mask in masks.items():
        expected = n.startswith("transformer.h.1.attn.")
        assert torch.equal(mask, (before[n] != 0) if expected else torch.zeros_like(mask)), n
    assert any(masks[n].any() for n in masks if n.startswith("transformer.h.1.attn."))


def test_head_of_a_tied_gpt_is_the_whole_shared_matrix():
    m = model_with_grads()
    before = grads_of(m)
    names = FaultInjector(settings("head"), m).inject_gradient_spike(3, m)
    masks = changed_by_factor(before, m)
    assert names == ["transformer.wte.weight"]  # lm_head.weight is the same tensor
    assert torch.equal(masks["transformer.wte.weight"], before["transformer.wte.weight"] != 0)
    assert not any(masks[n].any() for n in masks if n != "transformer.wte.weight")


def test_bad_targets_are_refused_at_start():
    m = model_with_grads()
    with pytest.raises(FaultConfigError) as err:
        FaultInjector(settings("layer", layer="transformer.h.9"), m)
    message = str(err.value)
    assert message.startswith("error: FAULT_SPIKE_LAYER='transformer.h.9' names no parameter")
    assert "transformer.h.1.attn.c_attn" in message and err.value.code != 0
    # a path matches whole components only: "attn" is not "at"
    with pytest.raises(FaultConfigError, match="'transformer.h.1.at' names no parameter"):
        FaultInjector(settings("layer", layer="transformer.h.1.at"), m)
    with pytest.raises(FaultConfigError, match="FAULT_SPIKE_ROWS=300 is more than the 257 rows"):
        FaultInjector(settings("embed_rows", rows=300), m)


def test_outliers_are_pure_functions_of_seed_and_step_and_use_the_tokenizer_vocabulary():
    batch = Batch(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long),
                  torch.zeros(4, 2, dtype=torch.long))
    repeat = FaultInjector(settings(FAULT_OUTLIER_STEPS="2"))
    a, b = repeat.corrupt_batch(2, batch), repeat.corrupt_batch(2, batch)
    assert torch.equal(a.inputs, b.inputs) and repeat.corrupt_batch(1, batch) is batch
    token = int(a.inputs[0, 0])
    assert (a.inputs == token).all() and (a.targets == token).all() and 0 <= token < 257
    noise = FaultInjector(settings(outlier="random", FAULT_OUTLIER_STEPS="2")).corrupt_batch(2, batch)
    assert noise.inputs.max() < 257 and noise.targets.max() < 257 and noise.inputs.unique().numel() > 1
    gpt2 = FaultInjector(settings(outlier="random", FAULT_OUTLIER_STEPS="2", TOKENIZER_GPT2=True,
                                  TOKENIZER_BYTES=False)).corrupt_batch(2, batch)
    assert gpt2.inputs.max() >= 257  # drawn from GPT-2's 50257 ids (32 draws: certain in practice)


TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
        "First Citizen: First, you know Caius Marcius is chief enemy to the people. ") * 20


def test_outlier_batches_spike_the_gradient_norm():
    """A byte-level GPT trained 40 steps; the gradient norm of an outlier batch over the
    median norm of its last 20 normal steps must exceed 5x for a repeated id (measured
    9.3-9.5x) and 2x for random ids (measured 5-47x, varying with the ids drawn). On a GPT-2-vocabulary model (too slow for a test) random ids gave 0.4x,
    no spike at all, and a repeated id 6.8x: why the repeated id is the default."""
    torch.manual_seed(0)
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def batch():
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[i:i + 32] for i in starts])
        y = torch.stack([data[i + 1:i + 33] for i in starts])
        return Batch(x, y, torch.zeros(8, 2, dtype=torch.long))

    def grad_norm(b):
        model.zero_grad()
        _, loss = model(b.inputs, b.targets)
        loss.backward()
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))

    normal = []
    for step in range(40):
        normal.append(grad_norm(batch()))
        opt.step()
    median = statistics.median(normal[20:])
    for kind in ("repeat", "random"):
        faults = FaultInjector(settings(outlier=kind, FAULT_OUTLIER_STEPS="1,2,3,4,5"))
        ratios = [grad_norm(faults.corrupt_batch(step, batch())) / median for step in range(1, 6)]
        print(kind, "outlier / median normal gradient norm:", [round(r, 1) for r in ratios])
        assert min(ratios) > {"repeat": 5, "random": 2}[kind], (kind, ratios)
