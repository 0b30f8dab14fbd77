"""Fault injection (FAULT_* settings): gradient spikes and corrupted batches.

Every fault is a pure function of (SEED, step), so a rerun, a resumed run and every
DDP rank inject the same faults at the same steps (and spike the same rows).

Gradient spikes (inject_gradient_spike, after unscaling and before the gradient
norm) multiply by FAULT_SPIKE_FACTOR, depending on the kind chosen:
  whole       every gradient (the one case global-norm clipping undoes exactly);
  embed rows  FAULT_SPIKE_ROWS rows of the token-embedding gradient;
  one layer   the parameters whose names start with FAULT_SPIKE_LAYER;
  head        the output head's weight gradient (see _head_params for tied weights).
Data outliers (corrupt_batch) replace a step's batches by random token ids or by one
repeated token id (FAULT_OUTLIER_*).
"""
from __future__ import annotations

import os
import signal

import torch


def parse_steps(text: str | None) -> frozenset[int]:
    """"100, 250" -> {100, 250}; validation (integers >= 1) is done by the config checker."""
    if not text:
        return frozenset()
    return frozenset(int(part) for part in text.replace(" ", "").split(",") if part)


def _generator(seed: int, step: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return g


class FaultConfigError(SystemExit):
    """A spike target the model does not have: a one-line message and a non-zero exit."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# wrappers whose parameter names carry a prefix the user does not write
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _plain_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _unwrap(model):
    """The model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def named_parameters_with_aliases(model):
    """[(name, parameter)] including every name of a shared (tied) parameter: GPT-2's
    matrix is both transformer.wte.weight and lm_head.weight."""
    return [(_plain_name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def layer_params(model, prefix: str) -> list:
    """Parameters named `prefix` or `prefix.<anything>` (a module path such as
    transformer.h.1.attn; transformer.h.1 does not take in transformer.h.10)."""
    named = named_parameters_with_aliases(model)
    found = _unique(p for n, p in named if n == prefix or n.startswith(prefix + "."))
    if not found:
        modules = sorted({n.rsplit(".", 1)[0] for n, _ in named if "." in n})
        shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
        raise FaultConfigError(f"FAULT_SPIKE_LAYER={prefix!r} names no parameter of the model "
                               f"(module paths include: {shown})")
    return found


def _head_params(model) -> list:
    """The output head's parameters: lm_head (GPT) or fc (ResNet).

    GPT-2 ties lm_head.weight to the token embedding: one matrix whose .grad is the sum
    of the head's contribution (dense, every row) and the embedding's (only the rows
    of tokens in the batch). The two cannot be told apart after backward, so a head
    spike multiplies that whole tied matrix's gradient, embedding share included."""
    base = _unwrap(model)
    for name in ("lm_head", "fc"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return list(head.parameters())
    raise FaultConfigError("FAULT_SPIKE_HEAD: the model has no output head (lm_head or fc)")


def _embedding(model) -> tuple[torch.nn.Parameter, int]:
    """The token-embedding matrix and the number of real tokens (padded rows excluded)."""
    base = _unwrap(model)
    wte = getattr(getattr(base, "transformer", None), "wte", None)
    if not isinstance(wte, torch.nn.Embedding):
        raise FaultConfigError("FAULT_SPIKE_EMBED_ROWS needs a GPT model (a token embedding "
                               "transformer.wte)")
    return wte.weight, int(getattr(base, "vocab_size", wte.num_embeddings))


class FaultInjector:
    def __init__(self, cfg, model=None):
        """Pass the model to have spike targets checked now (a bad FAULT_SPIKE_LAYER stops
        the run before its first step); without it they are checked at the first spike."""
        self.enabled = bool(cfg.FAULT_INJECTION)
        self.seed = cfg.SEED
        if not self.enabled:
            return
        self.spike_steps = parse_steps(cfg.FAULT_SPIKE_STEPS)
        self.spike_prob = cfg.FAULT_SPIKE_PROB
        self.spike_factor = cfg.FAULT_SPIKE_FACTOR
        kinds = {"whole": cfg.FAULT_SPIKE_WHOLE, "embed_rows": cfg.FAULT_SPIKE_EMBED_ROWS,
                 "layer": cfg.FAULT_SPIKE_ONE_LAYER, "head": cfg.FAULT_SPIKE_HEAD}
        self.spike_kind = next((kind for kind, chosen in kinds.items() if chosen), "whole")
        self.spike_rows = cfg.FAULT_SPIKE_ROWS if self.spike_kind == "embed_rows" else 0
        self.spike_layer = cfg.FAULT_SPIKE_LAYER if self.spike_kind == "layer" else ""
        self.outlier_steps = parse_steps(cfg.FAULT_OUTLIER_STEPS)
        # (both None for a ResNet: image outliers are noise)
        self.outlier_repeat = bool(cfg.FAULT_OUTLIER_REPEAT) and not cfg.FAULT_OUTLIER_RANDOM
        self.nan_steps = parse_steps(cfg.FAULT_NAN_STEPS)
        self.kill_step = cfg.FAULT_KILL_STEP
        self.kill_rank = cfg.FAULT_KILL_RANK
        # text outliers draw ids from the run's tokenizer (257 for bytes, 50257 for GPT-2)
        from data.tokenizer import vocab_size_for
        self.vocab_size = vocab_size_for(cfg.as_dict() if hasattr(cfg, "as_dict") else vars(cfg))
        self._targets = None  # (id of the model, [(name, parameter)]), resolved once
        if model is not None:
            self.spike_targets(model)

    def kill_if_due(self, step: int, rank: int) -> None:
        """SIGKILL this process at FAULT_KILL_STEP on rank FAULT_KILL_RANK: a crash, not an exit."""
        if self.enabled and self.kill_step and step == self.kill_step and rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """NaN loss on the listed steps (its gradients become NaN too)."""
        if not self.enabled or step not in self.nan_steps:
            return loss
        return loss * float("nan")

    def is_spike_step(self, step: int) -> bool:
        """`step` is the 1-based optimizer step being computed."""
        if not self.enabled:
            return False
        if step in self.spike_steps:
            return True
        return self.spike_prob > 0 and bool(torch.rand((), generator=_generator(self.seed, step, 1))
                                            < self.spike_prob)

    def spike_targets(self, model) -> list:
        """[(name, parameter)] a spike multiplies (for embed rows: the embedding matrix)."""
        if self._targets is not None and self._targets[0] == id(model):
            return self._targets[1]
        if self.spike_kind == "layer":
            params = layer_params(model, self.spike_layer)
        elif self.spike_kind == "head":
            params = _head_params(model)
        elif self.spike_kind == "embed_rows":
            weight, vocab = _embedding(model)
            if self.spike_rows > vocab:
                raise FaultConfigError(f"FAULT_SPIKE_ROWS={self.spike_rows} is more than the "
                                       f"{vocab} rows of the token embedding")
            params = [weight]
        else:
            params = _unique(p for p in model.parameters())
        names = {id(p): n for n, p in reversed(named_parameters_with_aliases(model))}  # first name
        targets = [(names[id(p)], p) for p in params]
        self._targets = (id(model), targets)
        return targets

    def spike_rows_at(self, step: int, vocab: int) -> torch.Tensor:
        """The embedding rows spiked at `step`: FAULT_SPIKE_ROWS distinct token ids drawn
        uniformly from the real vocabulary by the (SEED, step) generator."""
        return torch.randperm(vocab, generator=_generator(self.seed, step, 3))[:self.spike_rows]

    def inject_gradient_spike(self, step: int, model) -> list[str]:
        """Multiply the chosen gradients by FAULT_SPIKE_FACTOR in place on a spike step.
        Call after unscaling, before the gradient norm. Returns the names of the
        parameters whose gradients were multiplied ([] on other steps), for telemetry."""
        if not self.is_spike_step(step):
            return []
        if not isinstance(model, torch.nn.Module):
            # the trainer before the step split passes its parameter list: only a whole-
            # gradient spike can be applied to it (remove once it passes the model)
            if self.spike_kind != "whole":
                raise FaultConfigError("this FAULT_SPIKE kind needs the model, not a parameter list")
            grads = [p.grad for p in model if p.grad is not None]
            torch._foreach_mul_(grads, self.spike_factor)
            return [f"param{i}" for i in range(len(grads))]
        targets = [(n, p) for n, p in self.spike_targets(model) if p.grad is not None]
        if self.spike_kind == "embed_rows":
            for _, p in targets:  # one matrix
                _, vocab = _embedding(model)
                rows = self.spike_rows_at(step, vocab).to(p.grad.device)
                p.grad[rows] *= self.spike_factor
        elif targets:
            torch._foreach_mul_([p.grad for _, p in targets], self.spike_factor)
        return [n for n, _ in targets]

    def corrupt_batch(self, step: int, batch):
        """Replace the batch of an outlier step with garbage of the same shape.

        Text: uniformly random token ids with random targets, or (FAULT_OUTLIER_REPEAT)
        one token id, drawn per step, as every input and every target. Images: noise."""
        if not self.enabled or step not in self.outlier_steps:
            return batch
        g = _generator(self.seed, step, 2)
        x = batch.inputs
        if x.dtype == torch.long and self.outlier_repeat:
            token = torch.randint(0, self.vocab_size, (), generator=g)
            garbage = torch.full(x.shape, int(token), dtype=x.dtype)
            targets = garbage.clone()
        elif x.dtype == torch.long:  # token ids
            garbage = torch.randint(0, self.vocab_size, x.shape, generator=g)
            targets = torch.randint(0, self.vocab_size, x.shape, generator=g)
        else:  # images, already normalised
            garbage = torch.rand(x.shape, generator=g) * 6 - 3
            targets = batch.targets
        return type(batch)(garbage.to(x.dtype), targets, batch.sample_ids)
