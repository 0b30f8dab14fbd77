"""
Gradient clipping in front of any optimizer, chosen in Kconfig ("Gradient
clipping"): CLIP_NORM, a fixed global-norm bound (GRAD_CLIP; 0 = off), or
CLIP_ZCLIP, adaptive clipping by an EMA z-score of the global norm
(optim/zclip.py).

Every clipper has the same interface, so the trainer does not care which:
    clip_(grads, total_norm)   scale the gradients in place, given their global
                               L2 norm computed once by the trainer (no sync)
    telemetry()                dict of 0-dim tensors for logging
    state_dict() / load_state_dict(sd)   exact resume
"""

from typing import Protocol

import torch

from optim.zclip import ZClip, scale_grads_

__all__ = ["FixedNormClipper", "GradClipper", "ZClip", "build_grad_clipper"]


class GradClipper(Protocol):
    def clip_(self, grads: list[torch.Tensor], total_norm: torch.Tensor) -> None: ...

    def telemetry(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class FixedNormClipper:
    """Rescale the gradients so that their global norm is at most max_norm:
    exactly what torch.nn.utils.clip_grad_norm_ does, with the norm passed in."""

    def __init__(self, max_norm):
        if not max_norm > 0.0:
            raise ValueError(f"FixedNormClipper: max_norm (GRAD_CLIP) must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)
        self._clipped_total = None
        self._telemetry = {}

    @torch.no_grad()
    def clip_(self, grads, total_norm):
        # clip_grads_with_norm_'s arithmetic; it takes parameters, the trainer hands us gradients
        factor = (self.max_norm / (total_norm.detach() + 1e-6)).clamp(max=1.0)
        scale_grads_(grads, factor)
        clipped = total_norm.detach() > self.max_norm
        if self._clipped_total is None:
            self._clipped_total = torch.zeros((), dtype=torch.long, device=total_norm.device)
        self._clipped_total = self._clipped_total.to(total_norm.device) + clipped.long()
        self._telemetry = dict(clip_bound=self.max_norm, clipped=clipped.float(),
                               clipped_total=self._clipped_total)

    def telemetry(self):
        """The bound, whether the last step was clipped, and clipped steps so far."""
        return dict(self._telemetry)

    def state_dict(self):
        total = self._clipped_total.clone() if self._clipped_total is not None else None
        return dict(kind="norm", clipped_total=total)

    def load_state_dict(self, state_dict):
        if state_dict.get("kind") != "norm":
            raise ValueError("clipper checkpoint is not from fixed-norm clipping; was it saved with "
                             "another gradient-clipping choice?")
        total = state_dict["clipped_total"]
        self._clipped_total = total.clone() if total is not None else None


def build_grad_clipper(cfg):
    """The clipper the settings select, or None when clipping is off."""
    if cfg.CLIP_ZCLIP:
        return ZClip(alpha=float(cfg.ZCLIP_ALPHA), z_threshold=float(cfg.ZCLIP_Z_THRESHOLD),
                     warmup_steps=int(cfg.ZCLIP_WARMUP_STEPS), clip_factor=float(cfg.ZCLIP_CLIP_FACTOR),
                     max_norm=float(cfg.ZCLIP_MAX_NORM), freeze_on_spike=bool(cfg.ZCLIP_FREEZE_ON_SPIKE))
    if not cfg.CLIP_NORM:
        raise ValueError("no gradient-clipping mode selected: set one of CLIP_NORM, CLIP_ZCLIP")
    if float(cfg.GRAD_CLIP) > 0:
        return FixedNormClipper(float(cfg.GRAD_CLIP))
    return None
