"""
Optimizers: AdamWSpam, StableSpam, and build_optimizer(cfg, model), which
turns the Kconfig settings (OPTIM_*, LR, WEIGHT_DECAY, BETA1/2, ADAM_EPS, SGD_*,
SPAM_*, STABLE_SPAM_*) into torch.optim.AdamW, AdamWSpam, StableSpam or
torch.optim.SGD over nanoGPT-style param groups.
"""

import torch
from torch import nn

from optim.spam import AdamWSpam, warmup_scale
from optim.stable_spam import StableSpam

__all__ = ["AdamWSpam", "StableSpam", "build_optimizer", "param_groups", "warmup_scale"]


def _classify(model):
    """{id(param): (decay, sparse)} for every trainable parameter of the model.

    A parameter reached through several modules (tied weights) is decayed or
    sparse only if every module it belongs to says so: the GPT-2 token
    embedding tied to the output head is an embedding, and the head is dense.
    """
    dense_only = set(getattr(model, "dense_only_modules", ()))
    known = {name for name, _ in model.named_modules()}
    unknown = dense_only - known
    if unknown:
        raise ValueError(f"dense_only_modules names modules the model does not have: {sorted(unknown)}")
    verdicts = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            # matrices and kernels decay; vectors (biases, norm gains) and
            # embedding tables do not
            decay = p.dim() >= 2 and not isinstance(module, nn.Embedding)
            sparse = (isinstance(module, (nn.Linear, nn.Conv2d)) and param_name == "weight"
                      and module_name not in dense_only)
            previous = verdicts.get(id(p), (True, True))
            verdicts[id(p)] = (previous[0] and decay, previous[1] and sparse)
    return verdicts


def param_groups(model, weight_decay, with_sparse):
    """nanoGPT-style groups: decayed weights (split into sparse and dense ones
    when with_sparse) and undecayed everything else. Each tied parameter
    appears once; empty groups are left out; the order is the model's, so a
    checkpoint's optimizer state loads into an optimizer built the same way."""
    verdicts = _classify(model)
    buckets = {"sparse": [], "decay": [], "no_decay": []}
    for p in model.parameters():  # yields each tied parameter once
        if not p.requires_grad:
            continue
        decay, sparse = verdicts[id(p)]
        buckets["sparse" if (with_sparse and decay and sparse) else "decay" if decay else "no_decay"].append(p)
    extra = {"sparse": False} if with_sparse else {}  # only AdamWSpam knows the key
    groups = []
    if buckets["sparse"]:
        groups.append(dict(params=buckets["sparse"], weight_decay=weight_decay, sparse=True))
    if buckets["decay"]:
        groups.append(dict(params=buckets["decay"], weight_decay=weight_decay, **extra))
    if buckets["no_decay"]:
        groups.append(dict(params=buckets["no_decay"], weight_decay=0.0, **extra))
    if not groups:
        raise ValueError("the model has no trainable parameters to optimize")
    return groups


def build_optimizer(cfg, model):
    """The optimizer the settings select, over nanoGPT-style param groups of `model`."""
    lr = float(cfg.LR)
    weight_decay = float(cfg.WEIGHT_DECAY)

    if cfg.OPTIM_SGD:
        momentum = float(cfg.SGD_MOMENTUM)
        nesterov = bool(cfg.SGD_NESTEROV)
        if nesterov and momentum <= 0:
            raise ValueError("SGD_NESTEROV needs SGD_MOMENTUM > 0")
        return torch.optim.SGD(param_groups(model, weight_decay, with_sparse=False), lr=lr,
                               momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    if not (cfg.OPTIM_ADAMW or cfg.OPTIM_ADAMW_SPAM or cfg.OPTIM_STABLE_SPAM):
        raise ValueError("no optimizer selected: set one of OPTIM_ADAMW, OPTIM_ADAMW_SPAM, "
                         "OPTIM_STABLE_SPAM, OPTIM_SGD")
    betas = (float(cfg.BETA1), float(cfg.BETA2))
    eps = float(cfg.ADAM_EPS)

    if cfg.OPTIM_STABLE_SPAM:
        return StableSpam(param_groups(model, weight_decay, with_sparse=False), lr=lr, betas=betas,
                          eps=eps, weight_decay=weight_decay,
                          gamma1=float(cfg.STABLE_SPAM_GAMMA1), gamma2=float(cfg.STABLE_SPAM_GAMMA2),
                          gamma3=float(cfg.STABLE_SPAM_GAMMA3), interval=int(cfg.STABLE_SPAM_INTERVAL))

    if cfg.OPTIM_ADAMW:
        groups = param_groups(model, weight_decay, with_sparse=False)
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        # fused is one kernel per step on CUDA; elsewhere use the multi-tensor path
        kernel = dict(fused=True) if on_cuda else dict(foreach=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)

    # SPAM: knobs whose Kconfig dependencies are unmet arrive as None
    periodic_reset = bool(cfg.SPAM_PERIODIC_RESET)
    warmup = bool(cfg.SPAM_WARMUP) if periodic_reset else False
    enable_clip = bool(cfg.SPAM_ENABLE_CLIP)
    gate_statistic = gate_min_history = None
    if enable_clip:  # the gate's symbols depend on clipping
        gate_statistic = "window" if cfg.SPAM_GATE_WINDOW else "mad" if cfg.SPAM_GATE_MAD else "exclude"
        if not (cfg.SPAM_GATE_WINDOW or cfg.SPAM_GATE_MAD or cfg.SPAM_GATE_EXCLUDE):
            raise ValueError("no spike-gate statistics selected: set one of SPAM_GATE_WINDOW, "
                             "SPAM_GATE_EXCLUDE, SPAM_GATE_MAD")
        gate_min_history = int(cfg.SPAM_GATE_MIN_HISTORY)
    return AdamWSpam(
        param_groups(model, weight_decay, with_sparse=True), lr=lr, betas=betas, eps=eps,
        weight_decay=weight_decay,
        enable_clip=enable_clip,
        theta=float(cfg.SPAM_THETA),
        spike_threshold=float(cfg.SPAM_SPIKE_THRESHOLD),
        periodic_reset=periodic_reset,
        interval=int(cfg.SPAM_INTERVAL) if periodic_reset else None,
        warmup=warmup,
        warmup_steps=int(cfg.SPAM_WARMUP_STEPS) if warmup else 0,
        density=float(cfg.SPAM_DENSITY),
        clip_grace_steps=int(cfg.SPAM_CLIP_GRACE_STEPS),
        zscore_window=int(cfg.SPAM_ZSCORE_WINDOW),
        gate_statistic=gate_statistic or "exclude",
        gate_min_history=gate_min_history,
        reset_bias_correction=bool(cfg.SPAM_RESET_BIAS_CORRECTION) if periodic_reset else False,
        seed=int(cfg.SEED),
        # names for the per-class clipping telemetry (tied weights appear once)
        param_names=dict(model.named_parameters()),
    )
