"""One optimizer step: micro-batches, gradient checks, clipping, the update.

Per step: GRAD_ACCUM_STEPS micro-batches (DDP gradient sync only on the last),
unscale, injected faults, ONE global gradient norm that every consumer reuses
(clipping, the monitor, optimizers that gate on it), the spike guard's
decision, and a finiteness check: a non-finite step is skipped and counted.
The check is the step's one host synchronisation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .checkpoint import load_latest_checkpoint
from .distributed import all_reduce_mean
from .setup import Run


class TrainingStopped(SystemExit):
    """The run stopped on purpose (non-finite steps, a signal); the message says why."""


@dataclass
class StepOutcome:
    loss: torch.Tensor        # mean training loss of the step (0-dim, on the device)
    grad_norm: torch.Tensor   # global L2 norm of the unscaled gradients, before clipping
    lr: float
    finite: bool
    events: dict = field(default_factory=dict)  # rollback records for the log


def _no_sync(run: Run, last_micro: bool):
    """Skip the gradient all-reduce on every micro-batch but the last."""
    if not run.info.enabled or last_micro:
        return contextlib.nullcontext()
    if run.fsdp:
        @contextlib.contextmanager
        def fsdp_no_sync():
            run.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                run.wrapped.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return run.wrapped.no_sync()


def _forward_backward(run: Run, step: int) -> tuple[torch.Tensor, list]:
    """Accumulate the gradients of the step's micro-batches; returns (mean loss, sample ids)."""
    ga = run.cfg.GRAD_ACCUM_STEPS
    step_loss = torch.zeros((), device=run.device)
    micro_ids = []
    for micro in range(ga):
        batch = run.faults.corrupt_batch(step + 1, run.family.train_batch(step * ga + micro)).to(run.device)
        micro_ids.append(batch.sample_ids)
        with _no_sync(run, last_micro=micro == ga - 1):
            with run.autocast():
                loss = run.faults.poison_loss(step + 1, run.family.loss(run.wrapped, batch)) / ga
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
        if run.monitor is not None:
            run.monitor.on_micro_batch(step, micro)
    return step_loss, micro_ids


def global_grad_norm(grads) -> torch.Tensor:
    """L2 norm over the gradients, as a 0-dim tensor (no host sync)."""
    if grads and all(hasattr(g, "to_local") for g in grads):
        return _sharded_grad_norm(grads)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    # (some gradients sharded, some not: the norm is a DTensor of per-rank partial sums)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _sharded_grad_norm(grads) -> torch.Tensor:
    """FSDP2: each rank's float64-accurate sum of squares of its gradient blocks, summed
    over the ranks (one all-reduce): the whole model's norm, the same on every rank. A
    float32 norm of a million-element block is off by about 1e-3 relative on a CPU, by a
    different amount for each way of cutting the tensor into blocks (optim.norms)."""
    from optim.norms import sums_of_squares
    squares = sums_of_squares([g.to_local() for g in grads]).sum()
    torch.distributed.all_reduce(squares, group=grads[0].device_mesh.get_group())
    return squares.sqrt().float()


def optimizer_step(run: Run, step: int) -> StepOutcome:
    """Optimizer step number step + 1 (the counter the caller holds is 0-based)."""
    optimizer, scaler = run.optimizer, run.scaler
    lr = run.lr_at(step) * (run.monitor.lr_factor(step + 1) if run.monitor is not None else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss, micro_ids = _forward_backward(run, step)
    run.faults.kill_if_due(step + 1, run.info.rank)
    scaler.unscale_(optimizer)
    run.faults.inject_gradient_spike(step + 1, run.model)

    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm = global_grad_norm(grads)
    decision = None
    if run.monitor is not None:
        decision = run.monitor.before_step(step + 1, micro_ids, loss=step_loss, grad_norm=grad_norm)
        if decision.clipped:  # the spike guard scaled the gradients: what follows needs their new norm
            grad_norm = global_grad_norm(grads)
    if run.clipper is not None:
        run.clipper.clip_(grads, grad_norm)
    skip = _skip_verdict(run, step_loss, grad_norm)
    # One host sync per step: a NaN must not reach the weights, and skip-step's
    # verdict is read in the same transfer. (With fp16 the scaler already skips
    # overflowing steps and adjusts its scale.)
    loss_ok, norm_ok, skipped = torch.stack([torch.isfinite(step_loss), torch.isfinite(grad_norm), skip]).tolist()
    finite = loss_ok and (run.use_scaler or norm_ok)
    if finite:
        run.nonfinite_streak = 0
        if (decision is not None and decision.skip) or skipped:
            optimizer.zero_grad(set_to_none=True)  # the spike guard or skip-step drops this update
        else:
            kwargs = {"grad_norm": grad_norm} if getattr(optimizer, "accepts_grad_norm", False) else {}
            scaler.step(optimizer, **kwargs)
    else:
        _count_nonfinite(run, step + 1)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    events = {}
    if run.monitor is not None and finite:
        run.monitor.after_step(step + 1, step_loss)
        if decision is not None and decision.rollback:
            events = {"rollback": 1, "rollback_to": rollback(run, step + 1)}
    return StepOutcome(loss=step_loss, grad_norm=grad_norm, lr=lr, finite=finite, events=events)


def _skip_verdict(run: Run, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Skip-step's verdict as a 0-dim bool tensor (False when skip-step is off); records the step."""
    if run.skipper is None:
        return torch.zeros((), dtype=torch.bool, device=step_loss.device)
    # every rank must take the same decision: judge the mean loss over ranks (the
    # gradient norm is already the same everywhere after the all-reduce)
    loss = all_reduce_mean(step_loss, run.info)
    skip = run.skipper.verdict(loss, grad_norm)
    run.skipper.record(loss, grad_norm, skipped=skip)
    return skip


def _count_nonfinite(run: Run, step: int) -> None:
    run.nonfinite_streak += 1
    run.nonfinite_total += 1
    run.say(f"step {step}: non-finite loss or gradients; update skipped "
            f"({run.nonfinite_streak} in a row, {run.nonfinite_total} in total)")
    if run.nonfinite_streak > run.cfg.MAX_NONFINITE_STEPS:
        run.runlog.log(step, "train", {"nonfinite_skipped": 1, "nonfinite_total": run.nonfinite_total})
        run.runlog.close()
        raise TrainingStopped(
            f"error: {run.nonfinite_streak} non-finite steps in a row (MAX_NONFINITE_STEPS="
            f"{run.cfg.MAX_NONFINITE_STEPS}); stopped. The last good checkpoint in {run.ckpt_dir} is intact: "
            "lower LR or enable GRAD_CLIP / SPAM clipping, then `make train` resumes from it")


def rollback(run: Run, step: int) -> int:
    """Spike cluster (seed 000, section 4.1): restore the last checkpoint's weights (a file
    or a sharded folder), reset momentum, and warm up again. Returns the step rolled back to.

    The step counter and the data position keep going forward: replaying the same
    batches would replay the spikes, so the batches since the checkpoint are skipped
    (as large-scale practice does after a loss spike).
    """
    restored = load_latest_checkpoint(run.ckpt_dir, map_location=run.device, log=run.say)
    if restored is None:
        run.say(f"step {step}: spike cluster, but no checkpoint yet; resetting momentum only")
        back_to = step
    else:
        state, path = restored
        from .sharded_checkpoint import restore_weights
        restore_weights(run.model, run.fsdp, state, path)  # under FSDP each rank reads its shards
        back_to = state["step"]
        run.say(f"step {step}: spike cluster -> weights rolled back to {path.name} (step {back_to}), "
                f"momentum reset, data of steps {back_to + 1}-{step} skipped")
    if hasattr(run.optimizer, "reset_momentum"):
        run.optimizer.reset_momentum()
    else:
        run.optimizer.state.clear()  # torch optimizers: fresh moments and bias correction
    run.monitor.rolled_back(step, restored[0] if restored is not None else None)
    run.runlog.event("spikes.jsonl", {"step": step, "event": "rollback", "to_step": back_to})
    return back_to
