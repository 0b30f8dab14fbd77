"""`make bench`: the project's measured claims, in one run.

    python -m scripts.bench [--only NAME] [--quick] [--threads N] [--list]

Every comparison is a ratio whose two sides were timed alternately in this
process (scripts/benchlib.py), so load from other processes slows both alike.
Results: bench_results/bench-<timestamp>.{json,md} and bench_results/latest.*;
docs/benchmarks.md explains each figure and keeps the latest published table.

Training steps here are the trainer's step (forward, backward, gradient norm,
finiteness check, optimizer step, zero_grad) on fixed random tokens: the data
pipeline is left out so that only the model and the optimizer are measured.
Models, optimizers and the monitor are built from the presets through the
Kconfig tool, exactly as `make train` builds them.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

from scripts.benchlib import (REPO_ROOT, Context, Pending, Skipped, main, row, section, time_interleaved,
                              time_repeated)
from scripts.bench_workloads import (ADAMW, MATMUL_N, STEADY_SPAM, TrainStep, _ms, _pairs, _require, peak_rss_mb,
                                     preset_settings, preset_settings_path)

SCALING_SIZES = ("1M", "10M", "124M")  # optim/bench.py's GPT-2-shaped parameter sets

# Dense bf16 tensor-core peak FLOP/s from the vendors' data sheets (no sparsity).
# Matched against torch.cuda.get_device_name() in this order: more specific first.
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


@lru_cache(maxsize=None)
def _optimizer_by_size(sizes: tuple, repeats: int, warmup: int, threads: int) -> dict:
    """optim/bench.py's interleaved AdamWSpam vs AdamW step timing (memoised: the
    optimizer and scaling sections share one measurement), at the suite's threads."""
    bench = _require("optim.bench", "the optimizer benchmark")
    kwargs = dict(repeats=repeats, sizes=sizes, warmup=warmup)
    if "threads" in inspect.signature(bench.bench_optimizer_step).parameters:
        kwargs["threads"] = threads  # its own default is 1; the suite fixes one count for every figure
    return bench.bench_optimizer_step(**kwargs)


# ---------------------------------------------------------------- sections

@section("optimizer", "Optimizer step, AdamWSpam / AdamW (GPT-2 124M shapes, CPU)")
def bench_optimizer(ctx: Context) -> list:
    result = _optimizer_by_size(SCALING_SIZES, ctx.repeats, ctx.warmup, ctx.threads)["by_size"]["124M"]
    return [row("Optimizer step AdamWSpam / AdamW(foreach), GPT-2 124M shapes", result["ratio"], "×",
                ("<=", 1.10),
                f"AdamWSpam {_ms(result['spam_step_s'])} vs AdamW {_ms(result['adamw_step_s'])} per step, "
                f"{result['params'] / 1e6:.1f}M params; clip + z-score gate, reset, warmup on; "
                "optim/bench.py bench_optimizer_step")]


@section("e2e", "End-to-end training step, AdamWSpam / AdamW (gpt2-tiny, CPU)")
def bench_end_to_end(ctx: Context) -> list:
    spam = TrainStep(preset_settings("gpt2-tiny", **STEADY_SPAM))
    adamw = TrainStep(preset_settings("gpt2-tiny", **ADAMW))
    t = time_interleaved(adamw, spam, repeats=ctx.repeats + 4, warmup=ctx.warmup)
    c = spam.cfg
    return [row("gpt2-tiny training step AdamWSpam / AdamW", t.ratio, "×", ("<=", 1.02),
                f"{_ms(t.b_median)} vs {_ms(t.a_median)} per step (forward+backward+step); {_pairs(t)}; "
                f"{c.GPT2_N_LAYER}L {c.GPT2_N_HEAD}H {c.GPT2_N_EMBD}d, block {c.GPT2_BLOCK_SIZE}, "
                f"batch {c.BATCH_SIZE}; preset SPAM settings, grace 0 (steady state)")]


def _monitor_cycle(every: dict, cap: int = 1000) -> int:
    """Steps after which every enabled metric has come due a whole number of times."""
    cycle = 1
    for interval in every.values():
        if interval > 0:
            cycle = math.lcm(cycle, interval)
    return min(cycle, cap)


class MonitorHooks:
    """Calls a HealthMonitor the way the trainer does for one optimizer step:
    on_micro_batch, before_step, after_step, on_probe when due, metrics() at
    LOG_INTERVAL. The gradients already in .grad are reused for every step."""

    def __init__(self, monitor, log_interval: int, loss, probe_batch=None, grad_accum: int = 1, grad_norm=None):
        self.monitor, self.log_interval = monitor, log_interval
        self.loss, self.probe_batch, self.grad_accum = loss, probe_batch, grad_accum
        self.grad_norm = grad_norm  # the trainer's one global norm per step, handed to the monitor
        self.step = 0

    def run(self, steps: int):
        m = self.monitor
        for _ in range(steps):
            self.step += 1
            s = self.step
            for micro in range(self.grad_accum):
                m.on_micro_batch(s, micro)
            m.before_step(s, loss=self.loss, grad_norm=self.grad_norm)
            m.after_step(s, self.loss)
            if self.probe_batch is not None and m.wants_probe(s):
                m.on_probe(s, self.probe_batch)
            if s % self.log_interval == 0:
                m.metrics()


@section("monitor", "Health-monitor overhead at default intervals (gpt2-tiny, CPU)")
def bench_monitor(ctx: Context) -> list:
    monitor_mod = _require("monitor.monitor", "the health monitor")
    cfg = preset_settings("gpt2-tiny", MONITOR="y")
    train_step = TrainStep(cfg)
    monitor = monitor_mod.HealthMonitor(cfg, train_step.model, train_step.optimizer)
    cycle = _monitor_cycle(monitor.every)
    probe = torch.randint(0, train_step.model.vocab_size,
                          (cfg.MONITOR_PROBE_BATCH, cfg.GPT2_BLOCK_SIZE + 1),
                          generator=torch.Generator().manual_seed(1))

    # Gradients for the hooks to read: one backward, then kept in place.
    train_step()
    train_step.forward_backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in train_step.params if p.grad is not None])
    hooks = MonitorHooks(monitor, cfg.LOG_INTERVAL, train_step.last_loss, probe, cfg.GRAD_ACCUM_STEPS, grad_norm)
    hooks.run(cycle)  # warm-up: allocations, first SVDs, the first loss fits
    hooks.step = 0
    repeats = ctx.repeats
    chunk = -(-cycle // repeats)
    saved = [p.grad for p in train_step.params]

    def training_step():  # the step's own optimizer/zero_grad must not eat the hooks' gradients
        for p in train_step.params:
            p.grad = None
        train_step()
        for p, g in zip(train_step.params, saved):
            p.grad = g

    # Interleaved: one training step (monitor off), then the hooks of the next
    # `chunk` steps of the cycle; over all repetitions the hooks cover >= 1 cycle.
    t = time_interleaved(training_step, lambda: hooks.run(chunk), repeats=repeats, warmup=0)
    hooks_per_step = sum(t.b) / (chunk * repeats)  # the b samples cover steps 1..chunk*repeats
    ratio = (t.a_median + hooks_per_step) / t.a_median
    due = ", ".join(f"{k} {v}" for k, v in monitor.every.items() if v > 0)
    return [row("Training step with health monitor / without (gpt2-tiny, default intervals)", ratio, "×",
                ("<=", 1.03),
                f"hooks {_ms(hooks_per_step)}/step amortised over steps 1-{chunk * repeats} "
                f"(cycle {cycle}), step {_ms(t.a_median)}; intervals: {due}")]


@section("throughput", "Trainer throughput vs. fp32 matmul peak (nanoGPT CPU settings)")
def bench_throughput(ctx: Context) -> list:
    cfg = preset_settings("gpt2-tiny", GPT2_TINY="y", GPT2_BLOCK_SIZE=64, BATCH_SIZE=12, DTYPE_FP32="y",
                          COMPILE="n", GRAD_ACCUM_STEPS=1)
    shape = (cfg.GPT2_N_LAYER, cfg.GPT2_N_HEAD, cfg.GPT2_N_EMBD)
    if shape != (4, 4, 128):
        raise RuntimeError(f"GPT2_TINY is no longer 4 layers, 4 heads, 128 wide (got {shape})")
    step = TrainStep(cfg)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    out = torch.empty(MATMUL_N, MATMUL_N)
    t = time_interleaved(lambda: torch.mm(a, b, out=out), step, repeats=ctx.repeats + 2, warmup=ctx.warmup)
    peak = 2 * MATMUL_N**3 / t.a_median
    tokens_per_s = step.tokens / t.b_median
    flops_per_token = step.model.flops_per_token()
    achieved = flops_per_token * tokens_per_s
    # fraction per pair (each step next to its own matmul), then the median
    fractions = sorted(flops_per_token * step.tokens / tb / (2 * MATMUL_N**3 / ta) for ta, tb in zip(t.a, t.b))
    optimizer = "AdamWSpam" if "Spam" in type(step.optimizer).__name__ else type(step.optimizer).__name__
    return [
        row("GPT-2 trainer throughput (4L 4H 128d, block 64, batch 12, fp32)", tokens_per_s, "tokens/s",
            detail=f"{_ms(t.b_median)} per step of {step.tokens} tokens, {optimizer}, no compile"),
        row("Achieved training FLOP/s", achieved / 1e9, "GFLOP/s",
            detail=f"flops_per_token {flops_per_token / 1e6:.1f}M (6N + attention) × tokens/s"),
        row("Measured fp32 matmul peak", peak / 1e9, "GFLOP/s",
            detail=f"torch.mm {MATMUL_N}×{MATMUL_N} fp32, median of {len(t.a)}, interleaved with the steps"),
        row("Achieved / matmul peak", 100 * statistics.median(fractions), "%",
            detail="model FLOP utilisation of this CPU (median of per-pair fractions)"),
    ]


def rss_child(settings_path: str, steps: int = 3) -> dict:
    """Run in a fresh interpreter: peak RSS of a few gpt2-tiny training steps."""
    from scripts.kconfig.settings import load_settings
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    step = TrainStep(load_settings(settings_path))
    before = peak_rss_mb()
    for _ in range(steps):
        step()
    return {"optimizer": type(step.optimizer).__name__, "peak_rss_mb": peak_rss_mb(), "before_steps_mb": before}


def _peak_rss_subprocess(settings_path: Path, threads: int) -> dict:
    code = ("import json, sys; from scripts.bench import rss_child; "
            "print(json.dumps(rss_child(sys.argv[1])))")
    env = dict(os.environ, BENCH_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code, str(settings_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"peak-RSS subprocess failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def optimizer_state_bytes(optimizer, sparse_groups_only: bool = False) -> int:
    """Bytes of the tensors in the optimizer's per-parameter state (moments, masks)."""
    total = 0
    for group in optimizer.param_groups:
        if sparse_groups_only and not group.get("sparse", False):
            continue
        for p in group["params"]:
            total += sum(t.numel() * t.element_size() for t in optimizer.state.get(p, {}).values()
                         if torch.is_tensor(t))
    return total


def _state_memory(preset: str, density: float) -> dict:
    """State bytes of the preset's model under AdamWSpam at `density` and dense,
    whole model and sparse-eligible weights only, after one step (state allocated)."""
    from models.gpt2 import build_gpt2
    optim = _require("optim", "the optimizer package")
    cfg = preset_settings(preset)
    torch.manual_seed(0)
    model = build_gpt2(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {"params": sum(p.numel() for p in model.parameters()), "n_layer": cfg.GPT2_N_LAYER,
           "n_embd": cfg.GPT2_N_EMBD}
    for name, d in (("sparse", density), ("dense", 1.0)):
        opt = optim.build_optimizer(preset_settings(preset, OPTIM_ADAMW_SPAM="y", SPAM_DENSITY=d), model)
        opt.step()
        out[f"{name}_bytes"] = optimizer_state_bytes(opt)
        out[f"{name}_eligible_bytes"] = optimizer_state_bytes(opt, sparse_groups_only=True)
        del opt
    out["eligible_params"] = sum(p.numel() for g in optim.param_groups(model, 0.1, with_sparse=True)
                                 if g.get("sparse") for p in g["params"])
    return out


@section("memory", "Optimizer state and peak RSS, AdamWSpam / AdamW")
def bench_memory(ctx: Context) -> list:
    preset = "gpt2-tiny" if ctx.quick else "gpt2"
    density = 0.25
    m = _state_memory(preset, density)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    model = f"GPT-2 {'124M' if preset == 'gpt2' else 'tiny'}"
    rows = [
        row(f"AdamWSpam state, density {density} / dense, attention+MLP weights ({model})",
            m["sparse_eligible_bytes"] / m["dense_eligible_bytes"], "×", ("<=", 0.30),
            f"{mib(m['sparse_eligible_bytes'])} vs {mib(m['dense_eligible_bytes'])} for the "
            f"{m['eligible_params'] / 1e6:.1f}M params SPAM_DENSITY applies to (moments + masks)"),
        row(f"AdamWSpam state, density {density} / dense, whole model ({model})",
            m["sparse_bytes"] / m["dense_bytes"], "×",
            detail=f"{mib(m['sparse_bytes'])} vs {mib(m['dense_bytes'])}; embeddings, biases and norms "
            "keep dense moments"),
    ]
    spam_path = preset_settings_path("gpt2-tiny", tuple(sorted(STEADY_SPAM.items())))
    adamw_path = preset_settings_path("gpt2-tiny", tuple(sorted(ADAMW.items())))
    runs = {"spam": [], "adamw": []}
    for i in range(1 if ctx.quick else 2):  # alternate which goes first, as elsewhere
        order = (("adamw", adamw_path), ("spam", spam_path))
        for name, path in (order if i % 2 == 0 else order[::-1]):
            runs[name].append(_peak_rss_subprocess(path, ctx.threads)["peak_rss_mb"])
    spam_mb, adamw_mb = statistics.median(runs["spam"]), statistics.median(runs["adamw"])
    rows.append(row("Peak RSS of gpt2-tiny training, AdamWSpam / AdamW", spam_mb / adamw_mb, "×",
                    detail=f"{spam_mb:.0f} MiB vs {adamw_mb:.0f} MiB (VmHWM after 3 steps, each optimizer in "
                    "a fresh process; preset density 1.0)"))
    return rows


def _tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree."""
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git ls-files failed: {done.stderr.strip()}")
    return [f for f in done.stdout.split("\0") if f and (REPO_ROOT / f).is_file()]


@section("config", "Config pipeline: make defconfig-gpt2 && make settings")
def bench_config(ctx: Context) -> list:
    if not (REPO_ROOT / "Makefile").is_file():
        raise Pending("the Makefile is not there yet")
    if shutil.which("make") is None:
        raise Skipped("`make` is not installed")
    venv = Path(sys.prefix)
    # -o: the venv's deps stamp counts as up to date, so the copy can never run
    # `pip install -e .` into this venv (which would point it at the temporary
    # copy); PIP_NO_INDEX makes any install that slipped through fail instead.
    stamp = venv / ".deps-stamp"
    make = f"make -o {shlex.quote(str(stamp))} VENV={shlex.quote(str(venv))}"
    command = f"{make} defconfig-gpt2 && {make} settings"
    env = dict(os.environ, PIP_NO_INDEX="1")
    env.pop("KCONFIG_CONFIG", None)
    with tempfile.TemporaryDirectory(prefix="bench-tree-") as tmp:
        for rel in _tree_files():
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dst)
        times = []
        for _ in range(ctx.repeats):
            t0 = time.perf_counter()
            done = subprocess.run(["bash", "-c", command], cwd=tmp, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise RuntimeError(f"`{command}` failed: {lines[-1] if lines else done.returncode}")
    return [row("make defconfig-gpt2 && make settings, wall time", statistics.median(times), "s", ("<", 2.0),
                f"median of {len(times)} runs in a temporary copy of the tree (the first, with no "
                f"bytecode cached yet: {times[0]:.2f} s), existing venv")]


class _ParamModel(torch.nn.Module):
    """A module that only holds GPT-2-shaped parameters (for the monitor's scaling)."""

    def __init__(self, shapes, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tensors = torch.nn.ParameterList()
        for _, shape, _ in shapes:
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            self.tensors.append(p)


def _monitor_scaling(ctx: Context) -> dict:
    """Per-step cost of the monitor's gradient statistics (grad norms, GSS incl. the
    element-wise score, update ratios) at their default intervals, per size."""
    bench = _require("optim.bench", "the optimizer benchmark")
    monitor_mod = _require("monitor.monitor", "the health monitor")
    from optim.spam import AdamWSpam
    from monitor.settings import INTERVALS
    kept = ("MONITOR_GRAD_NORM_INTERVAL", "MONITOR_GSS_INTERVAL", "MONITOR_GSS_ELEMENTWISE_INTERVAL",
            "MONITOR_UPDATE_RATIO_INTERVAL")
    # complete settings (the monitor reads them strictly) with every other metric off
    cfg = preset_settings("gpt2-tiny", MONITOR="y", MONITOR_SPIKE_GUARD="n",
                          **{name: "0" for name in INTERVALS.values() if name not in kept})
    intervals = {k: getattr(cfg, k) for k in kept}
    mcfg = cfg
    cycle = _monitor_cycle({k: v for k, v in intervals.items()})
    out = {}
    for size in SCALING_SIZES:
        model = _ParamModel(bench.gpt2_param_shapes(*bench.GPT2_SHAPES[size]))
        optimizer = AdamWSpam(model.parameters(), lr=1e-4)
        optimizer.step()  # second moments for the element-wise GSS
        monitor = monitor_mod.HealthMonitor(mcfg, model, optimizer)
        hooks = MonitorHooks(monitor, cfg.LOG_INTERVAL, torch.tensor(1.0))
        first = time_repeated(lambda: hooks.run(cycle), repeats=1, warmup=1)[0]
        # small sets take milliseconds per cycle: batch cycles so that one
        # sample lasts ~0.5 s and a scheduler hiccup cannot dominate it
        number = max(1, math.ceil(0.5 / max(first, 1e-6)))
        samples = time_repeated(lambda: hooks.run(cycle), repeats=1 if ctx.quick else 3, warmup=0,
                                number=number)
        params = sum(p.numel() for p in model.parameters())
        out[size] = {"step_s": statistics.median(samples) / cycle, "params": params}
        del model, optimizer, monitor, hooks
    return {"by_size": out, "cycle": cycle, "intervals": intervals}


def _scaling_rows(kind: str, by_size: dict, key: str, note: str) -> list:
    per_m = {s: r[key] / (r["params"] / 1e6) for s, r in by_size.items()}
    rows = [row(f"{kind} time per million params at {r['params'] / 1e6:.1f}M", per_m[s] * 1e3, "ms/M",
                detail=f"{_ms(r[key])} per step")
            for s, r in by_size.items()]
    small, large = list(by_size)[0], list(by_size)[-1]
    rows.append(row(f"{kind} time per param, {large} / {small}", per_m[large] / per_m[small], "×",
                    ("<=", 1.5), f"1.0 = linear in the parameter count; {note}"))
    return rows


@section("scaling", "Optimizer and monitor cost vs. parameter count (1M, 10M, 124M)")
def bench_scaling(ctx: Context) -> list:
    opt = _optimizer_by_size(SCALING_SIZES, ctx.repeats, ctx.warmup, ctx.threads)["by_size"]
    rows = _scaling_rows("AdamWSpam step", opt, "spam_step_s", "GPT-2-shaped sets of optim/bench.py")
    mon = _monitor_scaling(ctx)
    intervals = ", ".join(f"{k.removeprefix('MONITOR_').removesuffix('_INTERVAL').lower()} {v}"
                          for k, v in mon["intervals"].items())
    rows += _scaling_rows("Monitor gradient statistics", mon["by_size"], "step_s",
                          f"amortised over a {mon['cycle']}-step cycle ({intervals})")
    return rows


# Issue 10's sections (fused loss, bf16 on CPU, small-model throughput, one
# gradient norm): registered here, so that they run after the ones above.
from scripts import bench_kernels  # noqa: E402,F401

# ------------------------------------------------------------------ GPU

def gpu_peak_bf16(name: str):
    """Data-sheet dense bf16 peak for a device name, or None if unknown."""
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


def _measured_bf16_peak(repeats: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    samples = time_repeated(lambda: a @ b, repeats=repeats, warmup=3, number=10, sync=torch.cuda.synchronize)
    return 2 * n**3 / statistics.median(samples)


@section("gpu_mfu", "GPT-2 124M MFU on the GPU (bf16 autocast, torch.compile)", needs_cuda=True)
def bench_gpu_mfu(ctx: Context) -> list:
    cfg = preset_settings("gpt2", DTYPE_BF16="y", COMPILE="y", GRAD_ACCUM_STEPS=1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    step = TrainStep(cfg, device="cuda", autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    step.compiled = torch.compile(step.model)
    name = torch.cuda.get_device_name(0)
    measured = _measured_bf16_peak(ctx.repeats)
    peak = gpu_peak_bf16(name)
    peak_note = f"data-sheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else \
        "device not in the peak table: measured bf16 matmul peak used"
    peak = peak or measured
    for _ in range(3):  # compilation and autotuning happen here
        step()
    torch.cuda.synchronize()
    samples = time_repeated(step, repeats=ctx.repeats + 3, warmup=2, number=5, sync=torch.cuda.synchronize)
    t = statistics.median(samples)
    tokens_per_s = step.tokens / t
    achieved = step.model.flops_per_token() * tokens_per_s
    optimizer = type(step.optimizer).__name__
    return [
        row(f"GPT-2 124M MFU on {name}", 100 * achieved / peak, "%",
            detail=f"{achieved / 1e12:.0f} TFLOP/s achieved; {peak_note}; batch {cfg.BATCH_SIZE}×"
            f"{cfg.GPT2_BLOCK_SIZE}, {optimizer}"),
        row("GPT-2 124M training throughput (GPU)", tokens_per_s, "tokens/s", detail=f"{_ms(t)} per step"),
        row("Measured bf16 matmul peak (GPU)", measured / 1e12, "TFLOP/s",
            detail="torch.mm 8192×8192 bf16, median"),
    ]


if __name__ == "__main__":
    sys.exit(main())
