"""`make check`: a pre-flight check of .config, without training.

    python -m train.preflight [--settings generated/settings.py] [--steps 3] [--no-data]

Builds what training builds from the settings -- the model family and its data
pipeline, the model on the configured device, the optimizer, the health
monitor -- runs one forward and backward pass on one real batch and a few timed
optimizer steps, and prints what a user wants to know before a long run:
parameters, optimizer-state bytes (measured after a step, so SPAM_DENSITY
shows), peak memory of a step at the configured batch, FLOPs per token (or
image), the time of a step and of the whole run. A configuration that cannot
run stops here with one line: the data is missing, FSDP with an option it does
not support, out of memory.

--no-data uses random batches of the configured shape instead of the dataset
(nothing is downloaded or read): the model, optimizer and monitor are still
built and stepped, so every preset can be checked on any machine.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .distributed import DistInfo, pick_device
from .families import Batch, total_iters_for
from .precision import autocast_factory
from .setup import fsdp_problem

# What a ResNet's dataset looks like, for --no-data: (classes, channels, height).
IMAGE_SHAPES = {"DATA_DIGITS": (10, 1, 8), "DATA_CIFAR10": (10, 3, 32), "DATA_CIFAR100": (100, 3, 32)}


class PreflightError(SystemExit):
    """The configuration cannot run; the message is one line starting with "error:"."""


def out_of_memory_message(cfg, device: torch.device) -> str:
    where = f"{device}" + (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
                           if device.type == "cuda" else "")
    return (f"error: out of memory on {where} for one step at BATCH_SIZE={cfg.BATCH_SIZE}: lower BATCH_SIZE "
            f"and raise GRAD_ACCUM_STEPS to keep the batch (or use bf16, a smaller model, FSDP)")


class SyntheticFamily:
    """A family's interface over random batches of the configured shape (--no-data)."""

    def __init__(self, cfg):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.SEED)
        if cfg.MODEL_GPT2:
            from data.tokenizer import vocab_size_for
            self.unit, self.encoding = "tokens", None
            self.vocab_size = vocab_size_for(cfg.as_dict())  # the configured tokenizer's
            shape = (cfg.BATCH_SIZE, cfg.GPT2_BLOCK_SIZE)
            tokens = torch.randint(0, self.vocab_size, (shape[0], shape[1] + 1), generator=g)
            self._batch = Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                                torch.zeros(shape[0], 2, dtype=torch.long))
        else:
            dataset = next((s for s in IMAGE_SHAPES if getattr(cfg, s, False)), None)
            if dataset is None:
                raise PreflightError("error: a ResNet needs an image dataset (DATA_DIGITS, DATA_CIFAR10 or "
                                     "DATA_CIFAR100)")
            self.num_classes, self.channels, self.height = IMAGE_SHAPES[dataset]
            self.unit, self.encoding = "images", None
            self._batch = Batch(torch.randn(cfg.BATCH_SIZE, self.channels, self.height, self.height, generator=g),
                                torch.randint(0, self.num_classes, (cfg.BATCH_SIZE,), generator=g),
                                torch.arange(cfg.BATCH_SIZE)[:, None])

    def build_model(self):
        if self.cfg.MODEL_GPT2:
            from models.gpt2 import build_gpt2
            return build_gpt2(self.cfg, vocab_size=self.vocab_size)
        from models.resnet import build_resnet
        return build_resnet(self.cfg, self.num_classes, in_channels=self.channels, input_size=self.height)

    def units_per_micro_batch(self) -> int:
        return self.cfg.BATCH_SIZE * (self.cfg.GPT2_BLOCK_SIZE if self.cfg.MODEL_GPT2 else 1)

    def steps_per_epoch(self) -> int | None:
        return None  # unknown without the data

    def train_batch(self, micro_index: int) -> Batch:
        return self._batch

    def loss(self, model, batch: Batch) -> torch.Tensor:
        if self.cfg.MODEL_GPT2:
            return model(batch.inputs, batch.targets)[1]
        return F.cross_entropy(model(batch.inputs).float(), batch.targets)

    def probe_batch(self, device) -> Batch:
        return self._batch.to(device)

    def describe_sample(self, sample_ids):
        return []


def build_model_on_meta(cfg):
    """The configured model with no storage (device "meta"): its shapes and parameter count, free."""
    with torch.device("meta"):
        return SyntheticFamily(cfg).build_model()


def build_family(cfg, info: DistInfo, real_data: bool):
    """The family training builds (data prepared and opened as training does), or a synthetic one."""
    if not real_data:
        return SyntheticFamily(cfg)
    try:
        if cfg.MODEL_GPT2:
            from .families import GPTFamily
            return GPTFamily(cfg, info)
        from .families import ImageFamily
        return ImageFamily(cfg, info)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as e:  # data missing or unreadable
        raise PreflightError(f"error: the dataset cannot be read: {e}") from None


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (sparse SPAM moments and masks included)."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(dict(optimizer.state))
    return total


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Report:
    lines: list

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"  {label + ':':<18} {text}")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n} B"


def _human_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def check(cfg, *, steps: int = 3, real_data: bool = True, say=print) -> dict:
    """Build, step and measure; returns the figures (printed through `say`). PreflightError
    when the configuration cannot run."""
    from optim import build_optimizer
    from .monitor_hooks import build_monitor
    from .runlog import RunLog

    problem = fsdp_problem(cfg)
    if problem:
        raise PreflightError(problem)
    device = pick_device(cfg, 0)
    info = DistInfo(0, 1, 0, device)
    torch.manual_seed(cfg.SEED)
    rss_before = _peak_rss_bytes()  # the interpreter, torch and the libraries: not the run's own
    family = build_family(cfg, info, real_data)
    model = family.build_model().to(device)
    optimizer = build_optimizer(cfg, model)
    with tempfile.TemporaryDirectory() as folder:
        monitor = build_monitor(cfg, model, optimizer, family, info, RunLog(Path(folder), enabled=False,
                                                                            tensorboard=False))
        try:
            figures = _measure(cfg, model, optimizer, monitor, family, device, steps)
        except torch.cuda.OutOfMemoryError:
            raise PreflightError(out_of_memory_message(cfg, device)) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise PreflightError(out_of_memory_message(cfg, device)) from None
            raise
    figures["rss_before_bytes"] = rss_before
    figures.update(_model_figures(cfg, model, optimizer, family, device))
    figures.update(_run_time(cfg, family, figures))
    _print(cfg, figures, device, real_data, say)
    return figures


def _measure(cfg, model, optimizer, monitor, family, device, steps) -> dict:
    """One step with the FLOP counter (the first forward and backward), then `steps` timed steps."""
    from torch.utils.flop_counter import FlopCounterMode
    autocast = autocast_factory(cfg, device, lambda message: print(message, file=sys.stderr))
    use_scaler = device.type == "cuda" and cfg.DTYPE_FP16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    params = [p for p in model.parameters() if p.requires_grad]
    before_step_kw = inspect.signature(monitor.before_step).parameters if monitor is not None else {}
    step_kw = getattr(type(optimizer), "accepts_grad_norm", False)
    from optim.clipping import build_grad_clipper
    clipper = build_grad_clipper(cfg)
    ga = cfg.GRAD_ACCUM_STEPS
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    times, flops = [], None
    for step in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        counter = FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext()
        step_loss = torch.zeros((), device=device)
        micro_ids = []
        with counter:
            for micro in range(ga if step else 1):  # the counted step: one micro-batch
                batch = family.train_batch(step * ga + micro).to(device)
                micro_ids.append(batch.sample_ids)
                with autocast():
                    loss = family.loss(model, batch) / ga
                scaler.scale(loss).backward()
                step_loss += loss.detach()
                if monitor is not None:
                    monitor.on_micro_batch(step, micro)
        if step == 0:
            flops = counter.get_total_flops()
            loss0 = float(step_loss) * ga
            if not math.isfinite(loss0):
                raise PreflightError(f"error: the first forward pass gives a non-finite loss ({loss0})")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        if monitor is not None:
            kw = {k: v for k, v in (("loss", step_loss), ("grad_norm", grad_norm)) if k in before_step_kw}
            monitor.before_step(step + 1, micro_ids, **kw)
        if clipper is not None:
            clipper.clip_([p.grad for p in params if p.grad is not None], grad_norm)
        scaler.step(optimizer, **({"grad_norm": grad_norm} if step_kw else {}))
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.after_step(step + 1, step_loss)
            monitor.on_probe(step + 1, model)
        sync()
        if step:
            times.append(time.perf_counter() - t0)
    # one evaluation micro-batch, for the evaluation time
    model.eval()
    with torch.no_grad(), autocast():
        batch = family.train_batch(0).to(device)
        sync()
        t0 = time.perf_counter()
        family.loss(model, batch)
        sync()
        eval_batch_s = time.perf_counter() - t0
    model.train()
    out = {"first_loss": loss0, "step_s": statistics.median(times) if times else math.nan,
           "flops_per_micro_batch": flops, "eval_batch_s": eval_batch_s, "peak_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _model_figures(cfg, model, optimizer, family, device) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    non_embedding = model.num_params(non_embedding=True) if hasattr(model, "num_params") else total
    dense_adam = 2 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    units = family.units_per_micro_batch()
    out = {"params": total, "params_non_embedding": non_embedding, "optimizer": type(optimizer).__name__,
           "optimizer_state_bytes": state_bytes(optimizer), "dense_adam_state_bytes": dense_adam,
           "units": family.unit, "units_per_step": units * cfg.GRAD_ACCUM_STEPS}
    return out


def _run_time(cfg, family, figures) -> dict:
    steps_per_epoch = family.steps_per_epoch()
    if steps_per_epoch is not None:
        total = total_iters_for(cfg, steps_per_epoch)
    else:  # no data, so no epoch length: MAX_ITERS when set (MAX_EPOCHS may end the run sooner)
        total = cfg.MAX_ITERS or None
    out = {"total_iters": total, "steps_per_epoch": steps_per_epoch}
    if total is not None:
        evaluations = total // cfg.EVAL_INTERVAL + (total % cfg.EVAL_INTERVAL != 0)
        out["evaluations"] = evaluations
        out["train_s"] = total * figures["step_s"]
        out["eval_s"] = evaluations * cfg.EVAL_BATCHES * figures["eval_batch_s"]
        out["total_s"] = out["train_s"] + out["eval_s"]
    units = figures.get("units_per_step") or family.units_per_micro_batch() * cfg.GRAD_ACCUM_STEPS
    if figures["flops_per_micro_batch"]:
        out["flops_per_unit_measured"] = figures["flops_per_micro_batch"] / family.units_per_micro_batch()
    out["throughput"] = units / figures["step_s"] if figures["step_s"] > 0 else math.nan
    return out


def _print(cfg, f, device, real_data, say) -> None:
    r = Report([])
    unit = f["units"][:-1]  # token | image
    r.add("device", f"{device}" + ("" if real_data else " (random batches of the configured shape: --no-data)"))
    embed_note = " (all but the position embedding; the token embedding is the output head)" \
        if cfg.MODEL_GPT2 else ""
    r.add("parameters", f"{f['params']:,} total, {f['params_non_embedding']:,} non-embedding{embed_note}")
    ratio = f["optimizer_state_bytes"] / f["dense_adam_state_bytes"] if f["dense_adam_state_bytes"] else math.nan
    density = f", SPAM_DENSITY={cfg.SPAM_DENSITY:g}" if cfg.OPTIM_ADAMW_SPAM and cfg.SPAM_DENSITY is not None else ""
    r.add("optimizer state", f"{_human_bytes(f['optimizer_state_bytes'])} after one step ({f['optimizer']}{density}; "
          f"{ratio:.2f}x of dense Adam's two fp32 moments)")
    memory = (f"{_human_bytes(f['peak_rss_bytes'])} peak RSS of this process, "
              f"{_human_bytes(f['peak_rss_bytes'] - f['rss_before_bytes'])} above the libraries' own")
    if "peak_cuda_bytes" in f:
        memory = f"{_human_bytes(f['peak_cuda_bytes'])} peak CUDA memory of a step; " + memory
    r.add("peak memory", f"{memory} (BATCH_SIZE={cfg.BATCH_SIZE})")
    flops = f.get("flops_per_unit_measured")
    text = f"{flops:,.0f} per {unit}, forward + backward (measured)" if flops else "not measured"
    if cfg.MODEL_GPT2:
        formula = build_model_on_meta(cfg).flops_per_token()
        text += f"; 6N + 12*L*d*T = {formula:,}"
    r.add("FLOPs", text)
    r.add("step time", f"{_human_time(f['step_s'])} per optimizer step ({cfg.GRAD_ACCUM_STEPS} micro-batch"
          f"{'es' if cfg.GRAD_ACCUM_STEPS != 1 else ''} of {cfg.BATCH_SIZE}), {f['throughput']:,.0f} "
          f"{f['units']}/s" + (" (uncompiled; COMPILE=y is usually faster)" if cfg.COMPILE else ""))
    if f.get("total_s") is not None:
        r.add("run time", f"about {_human_time(f['total_s'])}: {f['total_iters']:,} steps x "
              f"{_human_time(f['step_s'])} + {f['evaluations']} evaluation{'s' * (f['evaluations'] != 1)} x {cfg.EVAL_BATCHES} batches "
              f"({_human_time(f['eval_s'])})")
    else:
        r.add("run time", f"unknown: MAX_EPOCHS={cfg.MAX_EPOCHS} needs the data for the epoch length")
    say("\n".join([f"pre-flight check (first loss {f['first_loss']:.4f}):", *r.lines, "OK: this configuration runs"]))


def main(argv=None) -> int:
    from scripts.kconfig.settings import SettingsError, load_settings
    p = argparse.ArgumentParser(prog="python -m train.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=Path, default=Path("generated/settings.py"))
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (default 3)")
    p.add_argument("--no-data", action="store_true", help="random batches instead of the dataset")
    args = p.parse_args(argv)
    try:
        cfg = load_settings(args.settings)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check(cfg, steps=max(1, args.steps), real_data=not args.no_data)
    except SystemExit as e:  # PreflightError and the families' own "error: ..." exits
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
