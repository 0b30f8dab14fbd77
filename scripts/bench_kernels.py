"""`make bench` sections of issue 10: fast small-model training on a CPU.

- fused_loss: the fused output-head loss against plain logits + cross-entropy,
  step time (interleaved ratio) and peak memory (fresh processes), on
  gpt2-tiny and on GPT-2 124M shapes at block 1024 (batch 1 on a CPU);
- bf16: bf16 autocast against fp32, training-step time on gpt2-tiny and on the
  byte-level tiny shape (CPUs with bf16 instructions only);
- cpu_throughput: tokens/s of both shapes in fp32 and bf16, each with its
  achieved FLOP/s over the measured matmul peak of the same dtype;
- grad_norm: a step computing the global gradient norm three times (trainer,
  monitor, optimizer, before the shared step contract) against once;
- bf16_loss (optional, `--only bf16_loss`): the loss difference of bf16 and
  fp32 after a few hundred steps of the byte-level shape on Shakespeare.

--quick shrinks the shapes (gpt2-tiny stands in for 124M, batch 2) as well as
the repetitions: it checks that the sections run, not their numbers.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch

from scripts.bench_workloads import (MATMUL_N, TrainStep, _ms, _pairs, _require, peak_rss_mb, preset_settings,
                                     preset_settings_path)
from scripts.benchlib import REPO_ROOT, Context, Skipped, row, section, time_interleaved

# The byte-level tiny GPT (nanoGPT's character-level CPU shape): 4 layers, 4 heads,
# 128 wide, 256 bytes of context, 256 byte values + an end-of-document id.
BYTE_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=257)
BYTE_BATCH = 16  # 4,096 tokens per step
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
QUICK_BATCH = 2
BF16_LOSS_STEPS = 300  # bf16_loss: optimizer steps per precision (quick: 20)


# ------------------------------------------------------------------ shapes

@dataclass(frozen=True)
class Case:
    """A measured shape: the gpt2-tiny preset's settings with overrides (its
    optimizer, seed, batch size) and a model spec (GPTConfig keywords; None:
    the preset's own model)."""
    label: str
    overrides: tuple = ()
    spec: dict | None = None

    @property
    def settings_path(self) -> str:
        return str(preset_settings_path("gpt2-tiny", tuple(sorted(self.overrides))))

    @property
    def cfg(self):
        return preset_settings("gpt2-tiny", **dict(self.overrides))


def gpt2_tiny_case(ctx: Context) -> Case:
    """The gpt2-tiny preset as it stands (quick: batch 2)."""
    over = (("BATCH_SIZE", QUICK_BATCH),) if ctx.quick else ()
    cfg = Case("", over).cfg
    return Case(f"gpt2-tiny ({cfg.GPT2_N_LAYER}L {cfg.GPT2_N_EMBD}d, block {cfg.GPT2_BLOCK_SIZE}, "
                f"batch {cfg.BATCH_SIZE})", over)


def byte_tiny_case(ctx: Context) -> Case:
    """The byte-level tiny shape, built directly (vocabulary 257, padded to 320)."""
    batch = QUICK_BATCH if ctx.quick else BYTE_BATCH
    return Case(f"byte-level tiny (4L 128d, vocab 257, block 256, batch {batch})", (("BATCH_SIZE", batch),),
                dict(BYTE_MODEL))


def gpt2_124m_case(ctx: Context) -> Case:
    """GPT-2 124M shapes at block 1024, batch 1 (a CPU step takes seconds); quick: gpt2-tiny."""
    if ctx.quick:
        return gpt2_tiny_case(ctx)
    return Case("GPT-2 124M shapes (12L 768d, block 1024, batch 1)", (("BATCH_SIZE", 1),), dict(GPT2_124M))


def _gpt(**kw):
    from models.gpt2 import GPT, GPTConfig
    return GPT(GPTConfig(**kw))


def build_step(cfg, spec, **kw) -> TrainStep:
    """A TrainStep for settings cfg and a model spec (GPTConfig keywords; None: cfg's model)."""
    torch.manual_seed(cfg.SEED)
    return TrainStep(cfg, model=_gpt(**spec) if spec else None, **kw)


def case_step(case: Case, **kw) -> TrainStep:
    return build_step(case.cfg, case.spec, **kw)


def bf16_factory(say=lambda msg: None):
    """bf16 autocast for this CPU via train.precision, or Skipped where it has no bf16 instructions."""
    precision = _require("train.precision", "bf16 autocast on CPU")
    if not precision.cpu_supports_bf16():
        raise Skipped("this CPU has no bf16 matmul instructions (AVX512-BF16, AMX-BF16, Arm BF16)")
    from types import SimpleNamespace
    cfg = SimpleNamespace(DTYPE_FP32=False, DTYPE_BF16=True, DTYPE_FP16=False)
    return precision.autocast_factory(cfg, torch.device("cpu"), say)


# ------------------------------------------------------------ fused loss

def step_memory_child(spec: dict) -> dict:
    """Run in a fresh interpreter: peak RSS (VmHWM) of `steps` training steps
    with the fused or the plain loss. spec: settings (path), model (GPTConfig
    keywords or None), plain (bool), steps (int)."""
    from scripts.kconfig.settings import load_settings
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    step = build_step(load_settings(spec["settings"]), spec["model"], plain_loss=spec["plain"])
    before = peak_rss_mb()
    for _ in range(spec["steps"]):
        step()
    return {"peak_rss_mb": peak_rss_mb(), "before_steps_mb": before}


def _step_memory(spec: dict, threads: int) -> dict:
    code = ("import json, sys; from scripts.bench_kernels import step_memory_child; "
            "print(json.dumps(step_memory_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ, BENCH_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"memory subprocess failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fused_loss_rows(case: Case, ctx: Context, repeats: int, warmup: int) -> list:
    plain = case_step(case, plain_loss=True)
    fused = case_step(case)
    t = time_interleaved(plain, fused, repeats=repeats, warmup=warmup)
    loss_gap = abs(float(plain.last_loss) - float(fused.last_loss))
    del plain, fused
    mem = {}
    for name in ("plain", "fused"):  # one fresh process each: VmHWM is per process
        child = dict(settings=case.settings_path, model=case.spec, plain=name == "plain", steps=2)
        mem[name] = _step_memory(child, ctx.threads)
    growth = {k: v["peak_rss_mb"] - v["before_steps_mb"] for k, v in mem.items()}
    label = case.label
    return [
        row(f"{label} training step, fused loss / plain", t.ratio, "×", ("<=", 1.0),
            f"{_ms(t.b_median)} vs {_ms(t.a_median)} per step; {_pairs(t)}; last losses differ by {loss_gap:.1e}"),
        row(f"{label} peak RSS of training steps, fused loss / plain",
            mem["fused"]["peak_rss_mb"] / mem["plain"]["peak_rss_mb"], "×",
            detail=f"{mem['fused']['peak_rss_mb']:.0f} MiB vs {mem['plain']['peak_rss_mb']:.0f} MiB (VmHWM of a "
            f"fresh process after 2 steps); growth during the steps {growth['fused']:.0f} vs "
            f"{growth['plain']:.0f} MiB"),
    ]


@section("fused_loss", "Fused output-head loss / plain logits + cross-entropy (CPU)")
def bench_fused_loss(ctx: Context) -> list:
    rows = fused_loss_rows(gpt2_tiny_case(ctx), ctx, repeats=ctx.repeats + 2, warmup=ctx.warmup)
    if not ctx.quick:  # a 124M step at block 1024 takes seconds on a CPU: three pairs
        rows += fused_loss_rows(gpt2_124m_case(ctx), ctx, repeats=min(ctx.repeats, 3), warmup=1)
    return rows


# ------------------------------------------------------------------ bf16

@section("bf16", "bf16 autocast / fp32 training step on a CPU with bf16 instructions")
def bench_bf16(ctx: Context) -> list:
    factory = bf16_factory()
    rows = []
    for case in (gpt2_tiny_case(ctx), byte_tiny_case(ctx)):
        fp32 = case_step(case)
        bf16 = case_step(case, autocast=factory)
        t = time_interleaved(fp32, bf16, repeats=ctx.repeats + 2, warmup=ctx.warmup)
        rows.append(row(f"{case.label} training step, bf16 autocast / fp32", t.ratio, "×", ("<", 1.0),
                        f"{_ms(t.b_median)} vs {_ms(t.a_median)} per step; {_pairs(t)}"))
    return rows


# ------------------------------------------------------------ throughput

def matmul_probe(dtype: torch.dtype, n: int = MATMUL_N):
    """A callable doing one torch.mm of two n x n matrices in dtype, and its FLOPs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def throughput_rows(label: str, dtype_name: str, step: TrainStep, mm, mm_flops: int, ctx: Context) -> list:
    t = time_interleaved(mm, step, repeats=ctx.repeats + 2, warmup=ctx.warmup)
    flops_per_token = step.model.flops_per_token()
    tokens_per_s = step.tokens / t.b_median
    peak = mm_flops / t.a_median
    fractions = [flops_per_token * step.tokens / tb / (mm_flops / ta) for ta, tb in zip(t.a, t.b)]
    return [row(f"{label}, {dtype_name}: throughput", tokens_per_s, "tokens/s",
                detail=f"{_ms(t.b_median)} per step of {step.tokens} tokens"),
            row(f"{label}, {dtype_name}: achieved / {dtype_name} matmul peak", 100 * statistics.median(fractions), "%",
                detail=f"{flops_per_token * tokens_per_s / 1e9:.1f} GFLOP/s achieved (flops_per_token "
                f"{flops_per_token / 1e6:.1f}M) over {peak / 1e9:.0f} GFLOP/s measured (torch.mm {MATMUL_N}² "
                f"{dtype_name}, interleaved); median of per-pair fractions")]


@section("cpu_throughput", "Small-model tokens/s, fp32 and bf16, against the matmul peak of each dtype (CPU)")
def bench_cpu_throughput(ctx: Context) -> list:
    try:
        factory = bf16_factory()
    except Skipped as e:
        factory, no_bf16 = None, str(e)
    rows = []
    for case in (byte_tiny_case(ctx), gpt2_tiny_case(ctx)):
        mm, flops = matmul_probe(torch.float32)
        rows += throughput_rows(case.label, "fp32", case_step(case), mm, flops, ctx)
        if factory is None:
            rows.append(row(f"{case.label}, bf16: throughput", None, detail=f"skipped: {no_bf16}"))
            continue
        mm, flops = matmul_probe(torch.bfloat16)
        rows += throughput_rows(case.label, "bf16", case_step(case, autocast=factory), mm, flops, ctx)
    return rows


# ------------------------------------------------------------- grad norm

@section("grad_norm", "One global gradient norm per step / three (gpt2-tiny, CPU)")
def bench_grad_norm(ctx: Context) -> list:
    case = gpt2_tiny_case(ctx)
    three = case_step(case, norms=3)
    one = case_step(case, norms=1)
    t = time_interleaved(three, one, repeats=ctx.repeats + 4, warmup=ctx.warmup)
    one.forward_backward()  # gradients in place: time the norm alone
    norm_s = statistics.median(time_interleaved(one.grad_norm, lambda: None, repeats=21, warmup=2).a)
    return [row(f"{case.label} training step with 1 gradient norm / with 3", t.ratio, "×",
                detail=f"{_ms(t.b_median)} vs {_ms(t.a_median)} per step; {_pairs(t)}; one norm "
                f"(get_total_norm, foreach) takes {_ms(norm_s)} = {100 * norm_s / t.b_median:.2f}% of a step")]


# ------------------------------------------------------------ bf16 loss

def shakespeare_bytes(cache_dir) -> torch.Tensor:
    """The Shakespeare corpus as byte ids (documents separated by id 256), int64."""
    from data.shakespeare import load_shakespeare
    parts = []
    for _, text in load_shakespeare(cache_dir):
        parts.append(torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long())
        parts.append(torch.tensor([256]))
    return torch.cat(parts)


def byte_batches(data: torch.Tensor, batch: int, block: int, steps: int, seed: int):
    """`steps` (x, y) batches of random windows, the same for every caller with this seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + block + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train_bytes(cfg, autocast, train, val, steps: int, batch: int) -> dict:
    """Train the byte-level tiny shape for `steps` steps (the preset's optimizer
    and learning rate, no schedule) and return the mean loss of the last 20
    steps and the loss on 8 fixed validation batches."""
    import contextlib
    autocast = autocast or contextlib.nullcontext
    step = build_step(cfg, BYTE_MODEL)
    model, optimizer = step.model, step.optimizer
    block = BYTE_MODEL["block_size"]
    losses = []
    for x, y in byte_batches(train, batch, block, steps, seed=cfg.SEED):
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        if cfg.GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(step.params, cfg.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad(), autocast():
        val_loss = statistics.mean(float(model(x, y)[1]) for x, y in byte_batches(val, batch, block, 8, seed=1))
    return {"train": statistics.mean(losses[-20:]), "val": val_loss}


@section("bf16_loss", "bf16 autocast / fp32: loss after a few hundred steps (byte-level tiny, Shakespeare)",
         optional=True)
def bench_bf16_loss(ctx: Context) -> list:
    factory = bf16_factory()
    steps = 20 if ctx.quick else BF16_LOSS_STEPS
    batch = QUICK_BATCH if ctx.quick else BYTE_BATCH
    cfg = preset_settings("gpt2-tiny", BATCH_SIZE=batch)
    data = shakespeare_bytes(REPO_ROOT / cfg.DATA_DIR)  # an absolute DATA_DIR stays as it is
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    result = {name: train_bytes(cfg, f, train, val, steps, batch) for name, f in (("fp32", None), ("bf16", factory))}
    d_val = result["bf16"]["val"] - result["fp32"]["val"]
    return [row(f"Validation loss after {steps} steps, bf16 - fp32 (byte-level tiny)", d_val, "nats/byte",
                detail=f"bf16 {result['bf16']['val']:.4f} vs fp32 {result['fp32']['val']:.4f} on 8 fixed held-out "
                f"batches; last-20-step train loss {result['bf16']['train']:.4f} vs {result['fp32']['train']:.4f}; "
                f"same seed and batches, batch {batch}×{BYTE_MODEL['block_size']}, the preset's optimizer and LR"),
            row(f"Validation perplexity ratio after {steps} steps, bf16 / fp32", math.exp(d_val), "×")]
