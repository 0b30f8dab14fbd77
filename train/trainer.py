"""The one training loop, for every model family.

The loop is three parts, each in its own module: set-up (train/setup.py builds
the model, optimizer, data and monitor from the settings and resumes from the
latest checkpoint), the optimizer step (train/step.py) and bookkeeping
(train/bookkeeping.py: logging, evaluation, checkpoints, the summary).
Everything the loop does is decided by the settings; batches are pure functions
of the micro-batch index, so a resumed run continues exactly where the
checkpoint left off.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

from .bookkeeping import Bookkeeper, already_complete
from .distributed import DistInfo, init_distributed, shutdown
from .runlock import RunLock
from .setup import RESUMABLE_CHANGES, set_up
from .step import TrainingStopped, optimizer_step

__all__ = ["RESUMABLE_CHANGES", "TrainingStopped", "train"]


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
        # one trainer per run folder: rank 0 holds the lock for the whole run
        with RunLock(Path(cfg.OUT_DIR)) if info.is_main else contextlib.nullcontext():
            return _train(cfg, info, settings_path=settings_path, config_path=config_path, log=log)
    finally:
        shutdown(info)


def _train(cfg, info: DistInfo, *, settings_path: Path, config_path: Path, log) -> dict | None:
    run = set_up(cfg, info, settings_path=settings_path, config_path=config_path, log=log)
    stop = _StopFlag()
    stop.install()
    if run.start_step >= run.total_iters:
        return already_complete(run)
    books = Bookkeeper(run)
    step = run.start_step
    run.wrapped.train()
    try:
        while step < run.total_iters:
            outcome = optimizer_step(run, step)
            step += 1
            books.after_step(step, outcome)
            stopping = _stop_requested(stop, info)
            books.checkpoint_if_due(step, stopping)
            if stopping and step < run.total_iters:
                books.close()
                raise TrainingStopped(f"interrupted by signal {stop.signum}: checkpoint saved at step {step} "
                                      f"in {run.ckpt_dir}; `make train` resumes from it")
    except RuntimeError as e:
        if not (info.enabled and _is_collective_failure(e)):
            raise
        # a dead or hung rank surfaces here as a failed collective: say so in one
        # line instead of a backend traceback (torchrun stops the other local ranks)
        books.close()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingStopped(
            f"error: rank {info.rank} stopped at step {step + 1}: a collective operation with the other "
            f"ranks failed ({reason[:200]}); another rank died or hung (DIST_TIMEOUT_S="
            f"{cfg.DIST_TIMEOUT_S}). The last complete checkpoint in {run.ckpt_dir} is intact: "
            "`make train` resumes from it") from e
    return books.finish(step)


# What torch's process-group backends say when a peer is gone or silent
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")


def _is_collective_failure(e: RuntimeError) -> bool:
    """A failed collective (a rank died, hung or lost its network), as opposed to a bug."""
    if isinstance(e, torch.distributed.DistError):
        return True
    message = str(e).lower()
    return any(marker in message for marker in _COLLECTIVE_FAILURE_MARKERS)


def _stop_requested(stop: _StopFlag, info: DistInfo) -> bool:
    if not info.enabled:
        return bool(stop.signum)
    flag = torch.tensor([float(stop.signum)], device=info.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and not stop.signum:
        stop.signum = int(flag.item())
    return bool(flag.item())
