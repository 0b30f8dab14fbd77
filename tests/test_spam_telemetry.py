"""AdamWSpam's clipped fraction per parameter class, against a plain count."""

import pytest
import torch
from torch import nn

from optim import build_optimizer
from optim.spam import AdamWSpam
from optim.spam_plan import classify_name
from tests.test_optim_build import TinyGPT, settings

torch.set_num_threads(1)


@pytest.mark.parametrize("name, dim, expected", [
    ("transformer.wte.weight", 2, "embedding"),
    ("transformer.wpe.weight", 2, "embedding"),
    ("transformer.h.0.attn.c_attn.weight", 2, "attention"),
    ("transformer.h.3.attn.c_proj.weight", 2, "attention"),
    ("transformer.h.0.attn.c_attn.bias", 1, "other"),
    ("transformer.h.1.mlp.c_fc.weight", 2, "mlp"),
    ("transformer.h.1.mlp.c_proj.weight", 2, "mlp"),
    ("transformer.h.1.ln_1.weight", 1, "other"),
    ("transformer.ln_f.bias", 1, "other"),
    ("lm_head.weight", 2, "head"),  # untied heads only: a tied one is listed as wte
    ("fc.weight", 2, "head"),  # the ResNets' classifier
    ("blocks.0.conv1.weight", 4, "other"),
])
def test_classify_name(name, dim, expected):
    assert classify_name(name, dim) == expected


def test_build_optimizer_names_the_classes_and_the_tied_head_is_the_embedding():
    model = TinyGPT()  # lm_head.weight is wte.weight; named_parameters() lists it once, as wte
    opt = build_optimizer(settings(SPAM_DENSITY=1.0), model)
    by_param = {p: name for name, p in model.named_parameters()}
    classes = {by_param[p]: ("embedding", "attention", "mlp", "head", "other")[c] for p, c in opt._classes.items()}
    assert classes == {"wte.weight": "embedding", "wpe.weight": "embedding", "ln.weight": "other",
                       "ln.bias": "other", "attn.weight": "attention", "attn.bias": "other", "mlp.weight": "mlp",
                       "frozen": "other"}
    assert opt._classes[model.lm_head.weight] == 0


class Named(nn.Module):
    """A GPT-2-like set of parameters, with a separate (untied) head."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))

        self.wte = param(40, 8)
        self.attn_c_attn = param(24, 8)
        self.attn_c_attn_bias = param(24)
        self.mlp_c_fc = param(32, 8)
        self.ln_weight = param(8)
        self.lm_head = param(40, 8)


def test_clipped_fraction_per_class_matches_a_plain_count():
    model = Named()
    names = dict(model.named_parameters())
    kinds = {"wte": "embedding", "attn_c_attn": "attention", "attn_c_attn_bias": "other",
             "mlp_c_fc": "mlp", "ln_weight": "other", "lm_head": "head"}
    groups = [dict(params=[names["attn_c_attn"], names["mlp_c_fc"]], sparse=True),
              dict(params=[p for n, p in names.items() if n not in ("attn_c_attn", "mlp_c_fc")])]
    theta = 4.0
    opt = AdamWSpam(groups, lr=1e-2, weight_decay=0.0, theta=theta, spike_threshold=0.0, periodic_reset=False,
                    clip_grace_steps=2, density=0.5, param_names=names)
    gen = torch.Generator().manual_seed(1)
    seen = {kind: 0 for kind in set(kinds.values())}
    for k in range(1, 15):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in names.items()}
        grads["wte"][k % 40] *= 50.0  # one rare-token row at a time
        v_prev = {n: opt.state[p]["exp_avg_sq"].clone() if opt.state.get(p) else None for n, p in names.items()}
        for n, p in names.items():
            p.grad = grads[n]
        opt.step()
        tele = opt.read_telemetry()
        counts = {kind: 0 for kind in seen}
        sizes = {kind: 0 for kind in seen}
        for n, p in names.items():
            index = opt.moment_index(p)  # sparse: only the kept elements are eligible
            g = grads[n].flatten()
            g = g if index is None else g[index]
            v = v_prev[n]
            sizes[kinds[n]] += g.numel()
            if k >= 2:  # clipping starts after the 2 grace steps
                v = v.flatten()
                counts[kinds[n]] += sum(1 for gi, vi in zip(g.tolist(), v.tolist()) if gi * gi > theta * vi)
        for kind in seen:
            assert tele[f"clipped_fraction/{kind}"] == pytest.approx(counts[kind] / sizes[kind], abs=1e-12), (k, kind)
            seen[kind] += counts[kind]
        assert tele["clipped_count"] == sum(counts.values())
        assert tele["clipped_fraction"] == pytest.approx(sum(counts.values()) / sum(sizes.values()), abs=1e-12)
    assert all(seen[kind] > 0 for kind in seen)  # every class was clipped at some point


def test_without_names_everything_is_other():
    p = nn.Parameter(torch.zeros(3, 4))
    opt = AdamWSpam([p], spike_threshold=0.0, clip_grace_steps=0)
    p.grad = torch.ones(3, 4)
    opt.step()
    tele = opt.telemetry()
    assert [name for name in tele if name.startswith("clipped_fraction/")] == ["clipped_fraction/other"]
    assert float(tele["clipped_fraction/other"]) == 1.0  # v = 0 before the first step: every element clips


def test_an_element_with_no_second_moment_is_clipped_to_almost_zero():
    # v = 0 before the first step: the bound is sqrt(smallest normal float) ~ 1.1e-19
    # instead of exactly 0 (it keeps torch's slow square root of 0 out of the step)
    p = nn.Parameter(torch.zeros(5))
    opt = AdamWSpam([p], betas=(0.9, 0.999), spike_threshold=0.0, clip_grace_steps=0)
    p.grad = torch.tensor([3.0, -2.0, 0.0, 1e-3, -1e-30])
    opt.step()
    clipped = opt.state[p]["exp_avg"] / (1 - 0.9)  # m = (1 - beta1) * clipped g
    bound = torch.finfo(torch.float32).tiny ** 0.5
    assert torch.allclose(clipped, torch.tensor([bound, -bound, 0.0, bound, -1e-30]), rtol=1e-5, atol=0)
    assert opt.read_telemetry()["clipped_count"] == 3  # 0 and -1e-30 are within the bound

