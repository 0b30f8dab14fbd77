"""build_optimizer: param groups, the sparse flag, and each optimizer built from its settings."""

import io
import types

import pytest
import torch
from torch import nn

from optim import AdamWSpam, build_optimizer


class TinyGPT(nn.Module):
    dense_only_modules = ("lm_head",)

    def __init__(self, vocab=17, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(5, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


class TinyResNet(nn.Module):
    dense_only_modules = ("fc",)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)


def settings(**overrides):
    base = dict(
        OPTIM_ADAMW=False, OPTIM_ADAMW_SPAM=True, OPTIM_STABLE_SPAM=False, OPTIM_SGD=False,
        LR=6e-4, WEIGHT_DECAY=0.1, BETA1=0.9, BETA2=0.95, ADAM_EPS=1e-8,
        SGD_MOMENTUM=None, SGD_NESTEROV=None,
        SPAM_ENABLE_CLIP=True, SPAM_THETA=50.0, SPAM_SPIKE_THRESHOLD=2.0,
        SPAM_PERIODIC_RESET=True, SPAM_INTERVAL=1000, SPAM_WARMUP=True, SPAM_WARMUP_STEPS=100,
        SPAM_DENSITY=0.25, SPAM_CLIP_GRACE_STEPS=20, SPAM_ZSCORE_WINDOW=100,
        SPAM_RESET_BIAS_CORRECTION=False, SEED=1337,
        STABLE_SPAM_GAMMA1=None, STABLE_SPAM_GAMMA2=None, STABLE_SPAM_GAMMA3=None, STABLE_SPAM_INTERVAL=None,
        SPAM_GATE_WINDOW=False, SPAM_GATE_EXCLUDE=True, SPAM_GATE_MAD=False, SPAM_GATE_MIN_HISTORY=10,
    )
    base.update(overrides)
    return types.SimpleNamespace(**base)


def groups_by_param(opt):
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_groups_decay_and_sparse_flags_gpt():
    model = TinyGPT()
    opt = build_optimizer(settings(), model)
    by_param = groups_by_param(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})  # the tied weight appears once
    assert id(model.frozen) not in by_param
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}

    decayed = {id(model.attn.weight), id(model.mlp.weight)}
    for p in params:
        group = by_param[id(p)]
        assert group["weight_decay"] == (0.1 if id(p) in decayed else 0.0)
        # sparse: Linear weights except the head (tied to the embedding, dense anyway)
        assert group["sparse"] == (id(p) in decayed)
    assert by_param[id(model.wte.weight)]["weight_decay"] == 0.0  # embedding, though tied to a Linear


def test_groups_resnet_and_sgd_has_no_sparse_key():
    model = TinyResNet()
    spam = build_optimizer(settings(), model)
    by_param = groups_by_param(spam)
    assert by_param[id(model.conv.weight)]["sparse"] is True
    assert by_param[id(model.fc.weight)]["sparse"] is False  # the final fc is dense_only
    assert by_param[id(model.fc.weight)]["weight_decay"] == 0.1
    assert by_param[id(model.bn.weight)]["weight_decay"] == 0.0
    assert by_param[id(model.fc.bias)]["weight_decay"] == 0.0

    sgd = build_optimizer(settings(OPTIM_ADAMW_SPAM=False, OPTIM_SGD=True, BETA1=None, BETA2=None,
                                   ADAM_EPS=None, SGD_MOMENTUM=0.9, SGD_NESTEROV=True), model)
    assert all("sparse" not in g for g in sgd.param_groups)
    assert groups_by_param(sgd)[id(model.conv.weight)]["weight_decay"] == 0.1


def test_builds_adamw_from_settings():
    opt = build_optimizer(settings(OPTIM_ADAMW_SPAM=False, OPTIM_ADAMW=True), TinyGPT())
    assert type(opt) is torch.optim.AdamW
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (6e-4, (0.9, 0.95), 1e-8, 0.1)
    assert d["foreach"] is True and not d["fused"]  # CPU: the multi-tensor path
    assert all("sparse" not in g for g in opt.param_groups)


def test_builds_sgd_from_settings():
    cfg = settings(OPTIM_ADAMW_SPAM=False, OPTIM_SGD=True, LR=0.1, WEIGHT_DECAY=5e-4,
                   SGD_MOMENTUM=0.9, SGD_NESTEROV=True)
    opt = build_optimizer(cfg, TinyResNet())
    assert type(opt) is torch.optim.SGD
    d = opt.defaults
    assert (d["lr"], d["momentum"], d["nesterov"], d["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    with pytest.raises(ValueError, match="SGD_NESTEROV"):
        build_optimizer(settings(OPTIM_ADAMW_SPAM=False, OPTIM_SGD=True, SGD_MOMENTUM=0.0,
                                 SGD_NESTEROV=True), TinyResNet())


def test_builds_spam_from_settings():
    cfg = settings(LR="6e-4", SPAM_THETA="40.0", SPAM_SPIKE_THRESHOLD="2.5", SPAM_INTERVAL=500,
                   SPAM_WARMUP_STEPS=150, SPAM_DENSITY="0.5", SPAM_CLIP_GRACE_STEPS=10,
                   SPAM_ZSCORE_WINDOW=64, SPAM_RESET_BIAS_CORRECTION=True, SEED=7)
    opt = build_optimizer(cfg, TinyGPT())
    assert type(opt) is AdamWSpam
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (6e-4, (0.9, 0.95), 1e-8, 0.1)
    assert (opt.enable_clip, opt.theta, opt.spike_threshold) == (True, 40.0, 2.5)
    assert (opt.periodic_reset, opt.interval, opt.warmup, opt.warmup_steps) == (True, 500, True, 150)
    assert (opt.density, opt.clip_grace_steps, opt.zscore_window) == (0.5, 10, 64)
    assert (opt.reset_bias_correction, opt.seed) == (True, 7)


def test_builds_spam_with_reset_off():
    # Kconfig leaves the reset's dependants unset (None) when the reset is off
    cfg = settings(SPAM_PERIODIC_RESET=False, SPAM_INTERVAL=None, SPAM_WARMUP=None,
                   SPAM_WARMUP_STEPS=None, SPAM_RESET_BIAS_CORRECTION=None, SPAM_ENABLE_CLIP=False)
    opt = build_optimizer(cfg, TinyGPT())
    assert (opt.periodic_reset, opt.interval, opt.warmup, opt.enable_clip) == (False, None, False, False)


def test_no_optimizer_selected():
    with pytest.raises(ValueError, match="no optimizer selected"):
        build_optimizer(settings(OPTIM_ADAMW_SPAM=False), TinyGPT())


@pytest.mark.parametrize("choice", ["OPTIM_ADAMW", "OPTIM_ADAMW_SPAM", "OPTIM_STABLE_SPAM", "OPTIM_SGD"])
def test_checkpoint_loads_into_optimizer_built_the_same_way(choice):
    cfg = settings(**{**dict(OPTIM_ADAMW_SPAM=False, SGD_MOMENTUM=0.9, SGD_NESTEROV=True,
                             STABLE_SPAM_GAMMA1=0.7, STABLE_SPAM_GAMMA2=0.9, STABLE_SPAM_GAMMA3=0.999,
                             STABLE_SPAM_INTERVAL=2), choice: True})
    torch.manual_seed(0)
    model = TinyGPT()
    opt = build_optimizer(cfg, model)
    for _ in range(3):
        idx = torch.randint(0, 17, (4, 5))
        x = model.ln(model.wte(idx) + model.wpe.weight)
        loss = model.lm_head(model.mlp(model.attn(x)[..., :8])).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_optimizer(cfg, model)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert [len(g["params"]) for g in fresh.param_groups] == [len(g["params"]) for g in opt.param_groups]
    for p in model.parameters():
        for name, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(fresh.state[p][name]), torch.as_tensor(value))
