"""Learning-rate schedule: linear warmup, then cosine decay to MIN_LR (or constant)."""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, warmup_iters: int, total_iters: int,
                  cosine: bool, min_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken).

    Warmup reaches `lr` at the end of step warmup_iters - 1 (so no step runs
    at lr 0); the cosine then ends at exactly `min_lr` on the last step.
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if not cosine:
        return lr
    decay_steps = max(1, total_iters - 1 - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def schedule_from_settings(cfg, total_iters: int):
    """A step -> lr function for the settings' LR, LR_WARMUP_ITERS, LR_COSINE and MIN_LR."""
    min_lr = cfg.MIN_LR if cfg.LR_COSINE else cfg.LR

    def lr_at(step: int) -> float:
        return learning_rate(step, lr=cfg.LR, warmup_iters=cfg.LR_WARMUP_ITERS,
                             total_iters=total_iters, cosine=cfg.LR_COSINE, min_lr=min_lr)
    return lr_at
