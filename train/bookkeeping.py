"""Bookkeeping around the optimizer steps: logging, evaluation, checkpoints, the summary.

Nothing here changes what is trained; it decides when to look (LOG_INTERVAL,
EVAL_INTERVAL, CKPT_INTERVAL) and writes what it sees to the run folder.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from .checkpoint import capture_rng_state, save_checkpoint
from .distributed import all_reduce_mean
from .setup import Run, global_batch
from .step import StepOutcome


class Bookkeeper:
    def __init__(self, run: Run):
        self.run = run
        self.progress = _progress_bar(run)
        self.last_eval: dict = {}
        self.loss_sum = torch.zeros((), device=run.device)
        self.steps_since_log = 0
        self.t_start = self.t_last = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds of this run across resumes."""
        return self.run.elapsed_before + time.perf_counter() - self.t_start

    def after_step(self, step: int, outcome: StepOutcome) -> None:
        """Log and evaluate when due after optimizer step `step` (1-based)."""
        run, cfg = self.run, self.run.cfg
        if outcome.finite:
            self.loss_sum += outcome.loss
            self.steps_since_log += 1
        self.progress.update(1)
        last = step == run.total_iters
        if run.monitor is not None:
            run.monitor.on_probe(step, run.wrapped)  # before logging, so probe values carry this step
        if step % cfg.LOG_INTERVAL == 0 or last or not outcome.finite or outcome.events:
            self._log(step, outcome)
        if step % cfg.EVAL_INTERVAL == 0 or last:
            self._evaluate(step)

    def _log(self, step: int, outcome: StepOutcome) -> None:
        run = self.run
        loss_avg = all_reduce_mean(self.loss_sum / max(self.steps_since_log, 1), run.info)
        now = time.perf_counter()
        rate = run.units_per_step * self.steps_since_log / max(now - self.t_last, 1e-9)
        record = {"loss": loss_avg.item() if self.steps_since_log else float("nan"), "lr": outcome.lr,
                  "grad_norm": outcome.grad_norm.item(),
                  f"{run.family.unit}_per_s": rate, "epoch": step / run.steps_per_epoch,
                  "nonfinite_total": run.nonfinite_total, "nonfinite_skipped": int(not outcome.finite),
                  **outcome.events}
        if hasattr(run.optimizer, "read_telemetry"):
            record.update({f"spam/{k}": v for k, v in run.optimizer.read_telemetry().items()})
        for prefix, part in (("clip", run.clipper), ("skip_step", run.skipper)):
            if part is not None:
                record.update({f"{prefix}/{k}": float(v) for k, v in part.telemetry().items()})
        if run.monitor is not None:
            record.update(run.monitor.metrics())
        run.runlog.log(step, "train", record)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{outcome.lr:.2e}",
                                  **{{"tokens": "tok/s", "images": "img/s"}[run.family.unit]: f"{rate:,.0f}"})
        self.loss_sum.zero_()
        self.t_last, self.steps_since_log = now, 0

    def _evaluate(self, step: int) -> None:
        run = self.run
        run.wrapped.eval()
        self.last_eval = run.family.evaluate(run.wrapped, run.device, run.autocast)
        run.wrapped.train()
        run.runlog.log(step, "val", self.last_eval)
        self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))
        self.t_last = time.perf_counter()  # evaluation time is not training throughput

    def checkpoint_if_due(self, step: int, stopping: bool) -> None:
        # (a checkpoint during a non-finite streak holds the last good weights: skipped
        # steps change nothing)
        cfg = self.run.cfg
        if (cfg.CKPT_INTERVAL and step % cfg.CKPT_INTERVAL == 0) or step == self.run.total_iters or stopping:
            self.checkpoint(step)
            self.t_last = time.perf_counter()

    def checkpoint(self, step: int) -> None:
        """One process or DDP: rank 0 writes one file. FSDP: every rank writes its shards
        (train/sharded_checkpoint.py); the plain data goes beside them."""
        run = self.run
        state = {"step": step, "scaler": run.scaler.state_dict(), "rng": capture_rng_state(),
                 "nonfinite_total": run.nonfinite_total, "settings": run.cfg.as_dict(),
                 "elapsed_s": self.elapsed(), "world_size": run.info.world_size,
                 "global_batch": global_batch(run.cfg, run.info.world_size)}
        if run.monitor is not None:
            state["monitor"] = run.monitor.state_dict()
        for name, part in (("clipper", run.clipper), ("skip_step", run.skipper)):
            if part is not None:
                state[name] = part.state_dict()
        try:
            if run.fsdp:
                from .fsdp import sharded_state
                from .sharded_checkpoint import all_ranks, save_sharded_checkpoint
                tensors, state["optimizer"] = sharded_state(run.model, run.optimizer)
                state["rng_per_rank"] = all_ranks(state["rng"], run.info)
                save_sharded_checkpoint(tensors, state, run.ckpt_dir, step, run.cfg.CKPT_KEEP, run.info)
            elif run.info.is_main:
                state.update(model=run.model.state_dict(), optimizer=run.optimizer.state_dict())
                save_checkpoint(state, run.ckpt_dir, step, run.cfg.CKPT_KEEP)
        except SystemExit:
            self.progress.close()  # the one-line error must not land on the progress bar's line
            raise

    def close(self) -> None:
        self.progress.close()
        self.run.runlog.close()

    def finish(self, step: int) -> dict | None:
        """Write summary.json (with a text sample for language models); rank 0 returns it."""
        run = self.run
        self.progress.close()
        summary: dict = {"run_dir": str(run.out), "total_iters": run.total_iters, **self.last_eval}
        summary["wall_s"] = self.elapsed()
        summary["peak_rss_mb"] = _peak_rss_mb()
        if run.device.type == "cuda":
            summary["peak_cuda_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        summary["steps"] = step
        summary["nonfinite_total"] = run.nonfinite_total
        if hasattr(run.family, "sample_text") and (run.info.is_main or run.fsdp):
            sample = run.family.sample_text(run.model, run.device)  # under FSDP every rank joins the forward passes
            if run.info.is_main:
                summary["sample"] = sample
        if run.info.is_main and run.monitor is not None:
            summary.update(run.monitor.summary())
        run.runlog.write_json("summary.json", summary)
        run.runlog.close()
        return summary if run.info.is_main else None


def already_complete(run: Run) -> dict | None:
    """A run whose checkpoint is at its last step is not trained again: its summary."""
    run.say(f"{run.out} is already complete ({run.total_iters} steps); set OUT_DIR to train again")
    run.runlog.close()
    done = run.out / "summary.json"
    return json.loads(done.read_text()) if run.info.is_main and done.is_file() else None


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress_bar(run: Run):
    from tqdm import tqdm
    return tqdm(total=run.total_iters, initial=run.start_step, disable=not run.info.is_main, unit="step",
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
