"""The one training loop, for every model family.

Per optimizer step: GRAD_ACCUM_STEPS micro-batches (DDP gradient sync only on
the last), optional unscale and global-norm clip, a finiteness check (a
non-finite step is skipped and counted), the optimizer step, then logging,
evaluation and checkpoints at their intervals. Everything the loop does is
decided by the settings; batches are pure functions of the micro-batch index,
so a resumed run continues exactly where the checkpoint left off.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import torch

from .checkpoint import capture_rng_state, load_latest_checkpoint, restore_rng_state, save_checkpoint
from .distributed import DistInfo, all_reduce_mean, init_distributed, shutdown
from .families import total_iters_for
from .runlog import RunLog
from .schedule import schedule_from_settings

# Settings that may differ when a run is resumed: they change what is logged or
# kept, not what is computed. Anything else must match the checkpoint's settings.
RESUMABLE_CHANGES = {"EVAL_INTERVAL", "EVAL_BATCHES", "LOG_INTERVAL", "CKPT_INTERVAL", "CKPT_KEEP",
                     "TENSORBOARD", "SAMPLE_TOKENS", "SAMPLE_TEMPERATURE", "SAMPLE_TOP_K", "SAMPLE_PROMPT",
                     "MAX_NONFINITE_STEPS", "DATA_DIR", "COMPILE"}


class TrainingStopped(SystemExit):
    """The run stopped on purpose (non-finite steps, a signal); the message says why."""


def make_family(cfg, info: DistInfo):
    if cfg.MODEL_GPT2:
        from .families import GPTFamily
        return GPTFamily(cfg, info)
    from .families import ImageFamily
    return ImageFamily(cfg, info)


def _autocast_factory(cfg, device: torch.device):
    """bf16/fp16 autocast on CUDA; fp32 (no autocast) otherwise."""
    if device.type == "cuda" and (cfg.DTYPE_BF16 or cfg.DTYPE_FP16):
        dtype = torch.bfloat16 if cfg.DTYPE_BF16 else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def _wrap_model(cfg, model, info: DistInfo):
    """Compile, and replicate with DDP unless FSDP2 already sharded the model."""
    if cfg.COMPILE:
        model = torch.compile(model)
    if info.enabled and not cfg.FSDP:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def _no_sync(cfg, wrapped, info: DistInfo, last_micro: bool):
    """Skip the gradient all-reduce on every micro-batch but the last."""
    if not info.enabled or last_micro:
        return contextlib.nullcontext()
    if cfg.FSDP:
        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return wrapped.no_sync()


def _settings_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


class _StopFlag:
    """SIGTERM/SIGINT request a checkpoint and a clean exit after the current step."""

    def __init__(self):
        self.signum = 0

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum


def train(cfg, *, settings_path: Path, config_path: Path, log=print) -> dict | None:
    """Train; returns the run's summary on rank 0 (None on the other ranks)."""
    info = init_distributed(cfg)
    try:
        return _train(cfg, info, settings_path=settings_path, config_path=config_path, log=log)
    finally:
        shutdown(info)


def _train(cfg, info: DistInfo, *, settings_path: Path, config_path: Path, log) -> dict:
    from optim import build_optimizer

    device = info.device
    say = log if info.is_main else (lambda *a, **k: None)
    torch.manual_seed(cfg.SEED)  # identical initial weights on every rank
    family = make_family(cfg, info)
    model = family.build_model().to(device)
    fsdp = info.enabled and cfg.FSDP
    if fsdp and (cfg.OPTIM_ADAMW_SPAM or cfg.MONITOR):
        raise SystemExit("error: FSDP=y works with OPTIM_ADAMW or OPTIM_SGD and MONITOR=n; AdamWSpam and "
                         "the health monitor do not yet handle sharded (DTensor) parameters: use DDP "
                         "(FSDP=n), or change those settings")
    if fsdp:  # before the optimizer: sharding replaces the parameters
        from .fsdp import shard_model
        shard_model(model)
    optimizer = build_optimizer(cfg, model)
    use_scaler = device.type == "cuda" and cfg.DTYPE_FP16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    autocast = _autocast_factory(cfg, device)
    if device.type == "cpu" and (cfg.DTYPE_BF16 or cfg.DTYPE_FP16):
        say("note: DTYPE_BF16/DTYPE_FP16 apply on CUDA only; training in fp32 on the CPU")

    steps_per_epoch = family.steps_per_epoch()
    total_iters = total_iters_for(cfg, steps_per_epoch)
    lr_at = schedule_from_settings(cfg, total_iters)
    ga = cfg.GRAD_ACCUM_STEPS

    out = Path(cfg.OUT_DIR)
    ckpt_dir = out / "checkpoints"
    runlog = RunLog(out, enabled=info.is_main, tensorboard=cfg.TENSORBOARD)

    from .monitor_hooks import build_monitor
    monitor = build_monitor(cfg, model, optimizer, family, info, runlog, probe_on_all_ranks=fsdp)
    from .faults import FaultInjector
    faults = FaultInjector(cfg)

    start_step, nonfinite_streak, nonfinite_total, elapsed_before = 0, 0, 0, 0.0
    restored = load_latest_checkpoint(ckpt_dir, map_location=device, log=say)
    if restored is not None:
        state, path = restored
        changed = _settings_diff(state["settings"], cfg.as_dict())
        if changed:
            raise SystemExit(f"error: {out} holds a run with different settings ({', '.join(changed[:6])}"
                             f"{', ...' if len(changed) > 6 else ''}); set OUT_DIR to a new folder "
                             "or restore those settings to resume it")
        if fsdp:
            from .fsdp import load_full_state
            load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        if monitor is not None and "monitor" in state:
            monitor.load_state_dict(state["monitor"])
        start_step = state["step"]
        nonfinite_total = state.get("nonfinite_total", 0)
        elapsed_before = state.get("elapsed_s", 0.0)
        say(f"resuming {out} from {path.name} (step {start_step} of {total_iters})")
        runlog.truncate_after(start_step)
    runlog.keep_config(config_path, settings_path)
    wrapped = _wrap_model(cfg, model, info)

    def checkpoint(step: int) -> None:
        state = {"step": step, "model": _model_state(cfg, model, info),
                 "optimizer": _optimizer_state(cfg, model, optimizer, info),
                 "scaler": scaler.state_dict(), "rng": capture_rng_state(),
                 "nonfinite_total": nonfinite_total, "settings": cfg.as_dict(),
                 "elapsed_s": elapsed_before + time.perf_counter() - t_start}
        if monitor is not None:
            state["monitor"] = monitor.state_dict()
        if info.is_main:
            save_checkpoint(state, ckpt_dir, step, cfg.CKPT_KEEP)

    stop = _StopFlag()
    stop.install()
    params = [p for p in model.parameters() if p.requires_grad]
    units_per_step = family.units_per_micro_batch() * ga * info.world_size
    progress = _progress_bar(info, start_step, total_iters)
    summary: dict = {"run_dir": str(out), "total_iters": total_iters}
    last_eval: dict = {}
    t_last, steps_since_log = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    if start_step >= total_iters:
        say(f"{out} is already complete ({total_iters} steps); set OUT_DIR to train again")
        progress.close()
        runlog.close()
        done = out / "summary.json"
        return json.loads(done.read_text()) if info.is_main and done.is_file() else None

    step = start_step
    t_start = time.perf_counter()
    wrapped.train()
    while step < total_iters:
        lr = lr_at(step) * (monitor.lr_factor(step + 1) if monitor is not None else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        micro_ids = []
        for micro in range(ga):
            micro_index = step * ga + micro
            batch = faults.corrupt_batch(step + 1, family.train_batch(micro_index)).to(device)
            micro_ids.append(batch.sample_ids)
            with _no_sync(cfg, wrapped, info, last_micro=micro == ga - 1):
                with autocast():
                    loss = faults.poison_loss(step + 1, family.loss(wrapped, batch)) / ga
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            if monitor is not None:
                monitor.on_micro_batch(step, micro)
        scaler.unscale_(optimizer)
        faults.inject_gradient_spike(step + 1, params)

        decision = monitor.before_step(step + 1, micro_ids) if monitor is not None else None
        if cfg.GRAD_CLIP > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.GRAD_CLIP, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None],
                                                      foreach=True)
        # One host sync per step: a NaN must not reach the weights. (With fp16 the
        # scaler already skips overflowing steps and adjusts its scale.)
        finite = bool(torch.isfinite(step_loss)) and (use_scaler or bool(torch.isfinite(grad_norm)))
        if finite:
            nonfinite_streak = 0
            if decision is not None and decision.skip:
                optimizer.zero_grad(set_to_none=True)  # the spike guard drops this update
            else:
                scaler.step(optimizer)
        else:
            nonfinite_streak += 1
            nonfinite_total += 1
            say(f"step {step + 1}: non-finite loss or gradients; update skipped "
                f"({nonfinite_streak} in a row, {nonfinite_total} in total)")
            if nonfinite_streak > cfg.MAX_NONFINITE_STEPS:
                runlog.log(step + 1, "train", {"nonfinite_skipped": 1, "nonfinite_total": nonfinite_total})
                runlog.close()
                raise TrainingStopped(
                    f"error: {nonfinite_streak} non-finite steps in a row (MAX_NONFINITE_STEPS="
                    f"{cfg.MAX_NONFINITE_STEPS}); stopped. The last good checkpoint in {ckpt_dir} is intact: "
                    "lower LR or enable GRAD_CLIP / SPAM clipping, then `make train` resumes from it")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        events = {}
        if monitor is not None and finite:
            monitor.after_step(step, step_loss)
            if decision is not None and decision.rollback:
                back_to = _rollback(monitor, model, optimizer, ckpt_dir, device, step, say, runlog)
                events = {"rollback": 1, "rollback_to": back_to}
        if finite:
            loss_sum += step_loss
            steps_since_log += 1
        progress.update(1)

        last = step == total_iters
        if monitor is not None:
            monitor.on_probe(step, wrapped)  # before logging, so probe values carry this step
        if step % cfg.LOG_INTERVAL == 0 or last or not finite or events:
            loss_avg = all_reduce_mean(loss_sum / max(steps_since_log, 1), info)
            now = time.perf_counter()
            rate = units_per_step * steps_since_log / max(now - t_last, 1e-9)
            record = {"loss": loss_avg.item() if steps_since_log else float("nan"), "lr": lr,
                      "grad_norm": grad_norm.item(),
                      f"{family.unit}_per_s": rate, "epoch": step / steps_per_epoch,
                      "nonfinite_total": nonfinite_total, "nonfinite_skipped": int(not finite), **events}
            if hasattr(optimizer, "read_telemetry"):
                record.update({f"spam/{k}": v for k, v in optimizer.read_telemetry().items()})
            if monitor is not None:
                record.update(monitor.metrics())
            runlog.log(step, "train", record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 **{{"tokens": "tok/s", "images": "img/s"}[family.unit]: f"{rate:,.0f}"})
            loss_sum.zero_()
            t_last, steps_since_log = now, 0
        if step % cfg.EVAL_INTERVAL == 0 or last:
            wrapped.eval()
            last_eval = family.evaluate(wrapped, device, autocast)
            wrapped.train()
            runlog.log(step, "val", last_eval)
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            t_last = time.perf_counter()  # evaluation time is not training throughput
        stopping = _stop_requested(stop, info)
        # (a checkpoint during a non-finite streak holds the last good weights: skipped
        # steps change nothing)
        if (cfg.CKPT_INTERVAL and step % cfg.CKPT_INTERVAL == 0) or last or stopping:
            checkpoint(step)
            t_last = time.perf_counter()
        if stopping and not last:
            progress.close()
            runlog.close()
            raise TrainingStopped(f"interrupted by signal {stop.signum}: checkpoint saved at step {step} "
                                  f"in {ckpt_dir}; `make train` resumes from it")
    progress.close()
    summary.update(last_eval)
    summary["wall_s"] = elapsed_before + time.perf_counter() - t_start  # across resumes
    summary["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        summary["peak_cuda_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    summary["steps"] = step
    summary["nonfinite_total"] = nonfinite_total
    if hasattr(family, "sample_text") and (info.is_main or fsdp):
        sample = family.sample_text(model, device)  # under FSDP every rank joins the forward passes
        if info.is_main:
            summary["sample"] = sample
    if info.is_main and monitor is not None:
        summary.update(monitor.summary())
    runlog.write_json("summary.json", summary)
    runlog.close()
    return summary if info.is_main else None


def _stop_requested(stop: _StopFlag, info: DistInfo) -> bool:
    if not info.enabled:
        return bool(stop.signum)
    flag = torch.tensor([float(stop.signum)], device=info.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and not stop.signum:
        stop.signum = int(flag.item())
    return bool(flag.item())


def _rollback(monitor, model, optimizer, ckpt_dir, device, step, say, runlog) -> int:
    """Spike cluster (seed 000, section 4.1): restore the last checkpoint's weights, reset
    momentum, and warm up again.

    The step counter and the data position keep going forward: replaying the same
    batches would replay the spikes, so the batches since the checkpoint are skipped
    (as large-scale practice does after a loss spike).
    """
    restored = load_latest_checkpoint(ckpt_dir, map_location=device, log=say)
    if restored is None:
        say(f"step {step}: spike cluster, but no checkpoint yet; resetting momentum only")
        back_to = step
    else:
        state, path = restored
        model.load_state_dict(state["model"])
        back_to = state["step"]
        say(f"step {step}: spike cluster -> weights rolled back to {path.name} (step {back_to}), "
            f"momentum reset, data of steps {back_to + 1}-{step} skipped")
    if hasattr(optimizer, "reset_momentum"):
        optimizer.reset_momentum()
    else:
        optimizer.state.clear()  # torch optimizers: fresh moments and bias correction
    monitor.rolled_back(step, restored[0] if restored is not None else None)
    runlog.event("spikes.jsonl", {"step": step, "event": "rollback", "to_step": back_to})
    return back_to


def _model_state(cfg, model, info):
    if info.enabled and cfg.FSDP:
        from .fsdp import full_model_state
        return full_model_state(model)
    return model.state_dict()


def _optimizer_state(cfg, model, optimizer, info):
    if info.enabled and cfg.FSDP:
        from .fsdp import full_optimizer_state
        return full_optimizer_state(model, optimizer)
    return optimizer.state_dict()


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress_bar(info: DistInfo, start: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not info.is_main, unit="step",
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
