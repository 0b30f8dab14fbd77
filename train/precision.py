"""Compute precision: which autocast, if any, the forward and backward run under.

DTYPE_BF16 / DTYPE_FP16 select mixed precision through torch.autocast: the
matmuls and convolutions run in the low-precision dtype, while the master
weights, their gradients and the optimizer state stay fp32 (autocast casts
copies of the weights per op and never touches the parameters), and
reductions such as the loss run in fp32 (autocast's fp32 op list, and the
fused output-head loss of models/fused_loss.py accumulates in fp32).

On CUDA both dtypes are used as asked. On a CPU only bf16 is, and only where
the processor multiplies bf16 in hardware: x86 with AVX512-BF16 (Cooper Lake,
Sapphire Rapids and later Xeons, AMD Zen 4 and later) or AMX-BF16 (Sapphire
Rapids and later), or Arm with the BF16 extension (Armv8.6, e.g. Graviton 3,
Neoverse V1/N2). Elsewhere oneDNN emulates bf16 by converting to fp32 around
fp32 arithmetic, which is slower than plain fp32, so that CPU gets one clear
message and fp32. fp16 autocast on a CPU has no fast kernels and no loss
scaling in this trainer: message, fp32.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

# Feature flags that mean bf16 matmuls in hardware: x86 /proc/cpuinfo "flags"
# (and torch's own CPU probe, same names), Arm /proc/cpuinfo "Features".
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def flags_from_cpuinfo(text: str) -> set[str]:
    """The CPU feature names of /proc/cpuinfo text: x86 "flags" lines, Arm "Features" lines."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_flags() -> set[str]:
    """Feature names this CPU reports.

    torch's own probe first (torch._C._cpu._get_cpu_capability(), the cpuinfo
    library, keys such as avx512_bf16 and amx_bf16, also outside Linux); it is
    private, so /proc/cpuinfo is read as well. The public
    torch.backends.cpu.get_cpu_capability() only names the SIMD level its
    kernels were dispatched to ("AVX512"), which says nothing about bf16.
    """
    flags: set[str] = set()
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if probe is not None:
        try:
            flags.update(name for name, present in probe().items() if present is True)
        except Exception:  # noqa: BLE001 - a private API: any failure means "no answer"
            pass
    try:
        flags.update(flags_from_cpuinfo(Path("/proc/cpuinfo").read_text()))
    except OSError:
        pass
    return flags


def cpu_supports_bf16() -> bool:
    """True if this CPU multiplies bf16 in hardware (AVX512-BF16, AMX-BF16 or Arm BF16)."""
    return bool(BF16_FLAGS & cpu_flags())


def autocast_factory(cfg, device: torch.device, say: Callable[[str], None]) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the context every forward runs in.

    CUDA: bf16 or fp16 autocast as DTYPE_* asks. CPU: bf16 autocast for
    DTYPE_BF16 where cpu_supports_bf16(); otherwise (no bf16 hardware, or
    DTYPE_FP16) one message through say and fp32. DTYPE_FP32: no autocast.
    """
    device = torch.device(device)
    if not (cfg.DTYPE_BF16 or cfg.DTYPE_FP16):
        return contextlib.nullcontext
    if device.type == "cuda":
        dtype = torch.bfloat16 if cfg.DTYPE_BF16 else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cfg.DTYPE_BF16:
        if cpu_supports_bf16():
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        say("note: DTYPE_BF16: this CPU has no bf16 matmul instructions (AVX512-BF16, AMX-BF16 or Arm "
            "BF16), where bf16 would be slower than fp32; training in fp32")
        return contextlib.nullcontext
    which = "DTYPE_BF16" if cfg.DTYPE_BF16 else "DTYPE_FP16"
    where = "CUDA and CPUs with bf16 instructions" if cfg.DTYPE_BF16 else "CUDA only"
    say(f"note: {which} applies on {where}; training in fp32 on the {device.type.upper()}")
    return contextlib.nullcontext
