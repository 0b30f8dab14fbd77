"""Gradients of the probe batch: per-example GSNR and the cross-rank comparison under DDP.

Both are computed with torch.func on detached copies of the parameters, so
they never touch .grad, never go through DDP's gradient hooks, and never
depend on what the model's forward returns as its loss: the loss is computed
here from all-position logits (lm_logits), because a training forward may
fuse the output head with the loss and return no logits at all.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from monitor.metrics import GSNR_EPS


def lm_logits(model, idx: torch.Tensor, drop_padding: bool = True) -> torch.Tensor:
    """All-position logits (B, T, vocab) of a GPT-API language model.

    drop_padding: keep only the real vocabulary (model.vocab_size) for
    probabilities; False keeps the padded ids, as the training loss's softmax does.

    Computed from the model's parts (embedding, blocks, final norm, output
    head) when it has them; otherwise through the GPT API
    forward(idx, return_logits=True) -> (logits, loss).
    """
    parts = getattr(model, "transformer", None)
    if parts is not None and hasattr(model, "_embed") and hasattr(model, "lm_head"):
        x = model._embed(idx)
        for block in parts.h:
            x = block(x)
        logits = model.lm_head(parts.ln_f(x))
    else:
        out = model(idx, return_logits=True)
        logits = out[0] if isinstance(out, tuple) else out
        if logits is None or logits.dim() != 3 or logits.size(1) != idx.size(1):
            raise ValueError("the model must give logits for every position, shaped (B, T, vocab)")
    vocab = getattr(model, "vocab_size", None) if drop_padding else None
    return logits[..., :vocab] if vocab else logits


class _LossOf(nn.Module):
    """loss(model, x, y) as a module, so that functional_call can swap the model's parameters.

    Language models (integer inputs): mean next-token cross-entropy of the
    (B, T) rows over the padded vocabulary, exactly the training loss;
    classifiers: mean cross-entropy of model(x) against labels.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        if x.is_floating_point():
            return F.cross_entropy(self.model(x), y)
        logits = lm_logits(self.model, x, drop_padding=False)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def _state(model):
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"model.{k}": v.detach() for k, v in model.named_buffers()}
    return params, buffers


def per_example_grads(model, names, x, y) -> dict:
    """{name: (B, *shape)} gradients of each example's loss for the named parameters.

    Example b's loss is the mean cross-entropy over its own tokens (or its
    label): the per-sample gradient of mini-batch SGD. vmap over grad, all
    examples in one batched forward/backward. Run the model in eval mode
    (dropout draws under vmap differ from a per-example loop).
    """
    wrapper = _LossOf(model)
    params, buffers = _state(model)
    chosen = {f"model.{n}": params[f"model.{n}"] for n in names}
    fixed = {k: v for k, v in params.items() if k not in chosen}

    def example_loss(wanted, xb, yb):
        return functional_call(wrapper, {**fixed, **buffers, **wanted}, (xb.unsqueeze(0), yb.unsqueeze(0)))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(chosen, x, y)
    return {n: grads[f"model.{n}"] for n in names}


def gsnr_from_examples(per_example: torch.Tensor, eps: float = GSNR_EPS) -> torch.Tensor:
    """GSNR of one parameter from its per-example gradients (B, ...), B >= 2, 0-dim.

    The same per-element definition as the micro-batch estimate
    (metrics.gsnr_from_sums): r = m^2 / (var + eps * mean of g^2) with m the
    mean over the examples and var their unbiased variance, averaged over the
    elements some example touched (an embedding row of a token absent from
    the probe has neither signal nor noise). All examples are in hand, so the
    variance is taken two-pass, from the deviations (g - m): accurate in
    float32, where the one-pass sums of the micro-batch estimate need float64.
    """
    n = per_example.size(0)
    if n < 2:
        raise ValueError(f"GSNR needs at least 2 examples, got {n}")
    g = per_example.float()
    mean = g.mean(dim=0)
    var = (g - mean).square_().sum(dim=0).div_(n - 1)
    mean_square = g.square().mean(dim=0)
    ratio = mean.square() / (var + eps * mean_square)
    touched = mean_square > 0
    ratio = torch.where(touched, ratio, torch.zeros_like(ratio))  # 0/0 of untouched elements
    return ratio.sum(dtype=torch.float64) / touched.sum()  # masked mean without a host sync


def probe_loss_and_grads(model, x, y):
    """(mean loss 0-dim, [gradient per parameter]) of the whole probe batch, via torch.func.

    Leaves .grad alone and bypasses DDP's hooks: the caller compares this
    rank's own gradient of a batch every rank evaluates.
    """
    wrapper = _LossOf(model)
    params, buffers = _state(model)

    def loss(p):
        out = functional_call(wrapper, {**p, **buffers}, (x, y))
        return out, out

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads, value = grad(loss, has_aux=True)(params)
    return value.detach(), [grads[k] for k in params]
