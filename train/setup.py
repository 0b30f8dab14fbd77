"""Setting up a run: everything the training loop needs, built from the settings.

`set_up` builds the model family, the model (sharded under FSDP2), the
optimizer, precision, schedule, run folder, health monitor and fault injector,
and restores the latest checkpoint of OUT_DIR when there is one. The result is
a `Run`: the loop (train/trainer.py), the optimizer step (train/step.py) and the
bookkeeping (train/bookkeeping.py) read and update it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_latest_checkpoint, restore_rng_state
from .distributed import DistInfo, check_ranks_agree, share_checkpoint
from .families import total_iters_for
from .runlog import RunLog
from .precision import autocast_factory
from .schedule import schedule_from_settings
# one rule for setconfig and resume
from scripts.kconfig.schema import GLOBAL_BATCH_FACTORS, RESUMABLE_CHANGES, settings_diff  # noqa: F401

@dataclass
class Run:
    """The state of one training run that outlives a single optimizer step."""

    cfg: object
    info: DistInfo
    say: Callable
    family: object
    model: torch.nn.Module          # the bare model (its state_dict is what checkpoints hold)
    wrapped: torch.nn.Module        # what runs forward passes: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_scaler: bool
    autocast: Callable
    fsdp: bool
    params: list
    lr_at: Callable[[int], float]
    total_iters: int
    steps_per_epoch: int
    out: Path
    ckpt_dir: Path
    runlog: RunLog
    monitor: object | None
    faults: object
    clipper: object | None          # optim.clipping: fixed GRAD_CLIP or ZClip (None when off)
    skipper: object | None          # optim.skip_step: skip-step (None when off)
    start_step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    elapsed_before: float = 0.0     # training seconds of earlier sessions of this run
    extra_state: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def units_per_step(self) -> int:
        return self.family.units_per_micro_batch() * self.cfg.GRAD_ACCUM_STEPS * self.info.world_size


def make_family(cfg, info: DistInfo):
    if cfg.MODEL_GPT2:
        from .families import GPTFamily
        return GPTFamily(cfg, info)
    from .families import ImageFamily
    return ImageFamily(cfg, info)


def fsdp_problem(cfg) -> str | None:
    """Why FSDP=y cannot run with these settings (also `make check`'s message), or None."""
    if cfg.FSDP and cfg.OPTIM_STABLE_SPAM:
        return ("error: FSDP=y works with OPTIM_ADAMW_SPAM, OPTIM_ADAMW or OPTIM_SGD; Stable-SPAM does not yet "
                "handle sharded (DTensor) parameters: use DDP (FSDP=n), or choose another optimizer")
    return None


def wrap_model(cfg, model, info: DistInfo):
    """Compile, and replicate with DDP unless FSDP2 already sharded the model."""
    if cfg.COMPILE:
        model = torch.compile(model)
    if info.enabled and not cfg.FSDP:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def set_up(cfg, info: DistInfo, *, settings_path: Path, config_path: Path, log) -> Run:
    from optim import build_optimizer

    device = info.device
    say = log if info.is_main else (lambda *a, **k: None)
    torch.manual_seed(cfg.SEED)  # identical initial weights on every rank
    family = make_family(cfg, info)
    check_ranks_agree(info, cfg.as_dict(), family.data_fingerprint())
    model = family.build_model().to(device)
    fsdp = info.enabled and cfg.FSDP
    if fsdp and fsdp_problem(cfg):
        raise SystemExit(fsdp_problem(cfg))
    if fsdp:  # before the optimizer: sharding replaces the parameters
        from .fsdp import shard_model
        shard_model(model)
    optimizer = build_optimizer(cfg, model)
    use_scaler = device.type == "cuda" and cfg.DTYPE_FP16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    autocast = autocast_factory(cfg, device, say)

    steps_per_epoch = family.steps_per_epoch()
    total_iters = total_iters_for(cfg, steps_per_epoch)
    out = Path(cfg.OUT_DIR)
    runlog = RunLog(out, enabled=info.is_main, tensorboard=cfg.TENSORBOARD)

    from .monitor_hooks import build_monitor
    monitor = build_monitor(cfg, model, optimizer, family, info, runlog, probe_on_all_ranks=fsdp)
    from .faults import FaultInjector
    from optim.clipping import build_grad_clipper
    from optim.skip_step import build_skip_step

    run = Run(cfg=cfg, info=info, say=say, family=family, model=model, wrapped=model, optimizer=optimizer,
              scaler=scaler, use_scaler=use_scaler, autocast=autocast, fsdp=fsdp,
              params=[p for p in model.parameters() if p.requires_grad],
              lr_at=schedule_from_settings(cfg, total_iters), total_iters=total_iters,
              steps_per_epoch=steps_per_epoch, out=out, ckpt_dir=out / "checkpoints", runlog=runlog,
              monitor=monitor, faults=FaultInjector(cfg, model), clipper=build_grad_clipper(cfg),
              skipper=build_skip_step(cfg))
    _resume(run)
    runlog.keep_config(config_path, settings_path)
    run.wrapped = wrap_model(cfg, model, info)
    return run


def global_batch(cfg, world_size: int) -> int:
    """Samples per optimizer step over all processes."""
    return cfg.BATCH_SIZE * world_size * cfg.GRAD_ACCUM_STEPS


def _resume(run: Run) -> None:
    """Load the newest readable checkpoint of OUT_DIR into the run, if there is one."""
    restored = share_checkpoint(run.info, load_latest_checkpoint(run.ckpt_dir, map_location=run.device,
                                                                  log=run.say))
    if restored is None:
        return
    state, path = restored
    _check_same_run(run, state)
    from .sharded_checkpoint import restore_training_state
    restore_training_state(run.model, run.optimizer, run.fsdp, state, path)
    run.scaler.load_state_dict(state["scaler"])
    # each rank its own generators when the number of ranks is the same (sharded
    # checkpoints keep every rank's), else rank 0's everywhere
    per_rank = state.get("rng_per_rank")
    same_world = per_rank is not None and len(per_rank) == run.info.world_size
    restore_rng_state(per_rank[run.info.rank] if same_world else state["rng"])
    if run.monitor is not None and "monitor" in state:
        run.monitor.load_state_dict(state["monitor"])
    for name, part in (("clipper", run.clipper), ("skip_step", run.skipper)):
        if part is not None and hasattr(part, "load_state_dict") and name in state:
            part.load_state_dict(state[name])
    run.start_step = state["step"]
    run.nonfinite_total = state.get("nonfinite_total", 0)
    run.elapsed_before = state.get("elapsed_s", 0.0)
    run.say(f"resuming {run.out} from {path.name} (step {run.start_step} of {run.total_iters})")
    run.runlog.truncate_after(run.start_step)


def _check_same_run(run: Run, state: dict) -> None:
    """Refuse to resume a checkpoint of another run: settings that differ beyond
    RESUMABLE_CHANGES, or another global batch. BATCH_SIZE and GRAD_ACCUM_STEPS may
    change with the number of processes as long as BATCH_SIZE x processes x
    GRAD_ACCUM_STEPS stays the checkpoint's (the data order depends on the global batch
    only); checkpoints older than this rule (no global batch recorded) keep them fixed."""
    saved, now = state["settings"], run.cfg.as_dict()
    recorded = "global_batch" in state
    changed = settings_diff(saved, now, ignore=GLOBAL_BATCH_FACTORS if recorded else frozenset())
    if changed:
        raise SystemExit(f"error: {run.out} holds a run with different settings ({', '.join(changed[:6])}"
                         f"{', ...' if len(changed) > 6 else ''}); set OUT_DIR to a new folder "
                         "or restore those settings to resume it")
    mine = global_batch(run.cfg, run.info.world_size)
    if recorded and mine != state["global_batch"]:
        raise SystemExit(
            f"error: {run.out} was trained with a global batch of {state['global_batch']} (BATCH_SIZE="
            f"{saved['BATCH_SIZE']} x {state['world_size']} processes x GRAD_ACCUM_STEPS={saved['GRAD_ACCUM_STEPS']}),"
            f" this run's is {mine} (BATCH_SIZE={run.cfg.BATCH_SIZE} x {run.info.world_size} processes x "
            f"GRAD_ACCUM_STEPS={run.cfg.GRAD_ACCUM_STEPS}); set BATCH_SIZE so that the global batch stays "
            f"{state['global_batch']}, or OUT_DIR to a new folder")
