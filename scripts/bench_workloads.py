"""Workloads the benchmark sections share: preset settings through the Kconfig
tool, and the trainer's training step on a fixed random batch.

Split out of scripts/bench.py so that every section module (bench.py,
bench_kernels.py) can import them without importing bench.py itself, which
registers sections and is also run as __main__.
"""
from __future__ import annotations

import atexit
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from scripts.benchlib import REPO_ROOT, Pending


def _require(module: str, what: str):
    """Import a module another part of the project provides, or mark the section pending."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Pending(f"{what} ({module}) is not available yet: {e}") from None


@lru_cache(maxsize=None)
def preset_settings_path(preset: str, overrides: tuple = ()) -> Path:
    """generated settings of defconfigs/<preset> with NAME=VALUE overrides, via the
    Kconfig tool in a temporary folder (the working tree's .config is not touched)."""
    if not (REPO_ROOT / "defconfigs" / preset).is_file():
        raise Pending(f"preset defconfigs/{preset} is not there yet")
    _require("scripts.kconfig.settings", "the Kconfig tool")
    folder = Path(tempfile.mkdtemp(prefix="bench-config-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    env = dict(os.environ, KCONFIG_CONFIG=str(folder / ".config"))
    tool = [sys.executable, "-m", "scripts.kconfig"]
    commands = [tool + ["defconfig", f"defconfigs/{preset}"]]
    # the preset's own OUT_DIR may hold the user's run of it (setconfig refuses to point a
    # configuration with other settings at it); nothing is written there anyway
    overrides = (("OUT_DIR", str(folder / "run")), *overrides)
    commands.append(tool + ["setconfig", *(f"{k}={v}" for k, v in overrides)])
    commands.append(tool + ["settings", str(folder / "settings.py")])
    for cmd in commands:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            msg = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"`{' '.join(cmd[2:])}` failed: {msg[-1] if msg else done.returncode}")
    return folder / "settings.py"


def preset_settings(preset: str, **overrides):
    from scripts.kconfig.settings import load_settings
    return load_settings(preset_settings_path(preset, tuple(sorted(overrides.items()))))


MATMUL_N = 2048  # matmul peak probe: torch.mm of two MATMUL_N x MATMUL_N matrices


def peak_rss_mb() -> float:
    """High-water RSS of this process image (VmHWM). ru_maxrss is not used: a child
    created by fork inherits its parent's high-water mark, whatever it runs after exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# Settings that make the measured steps the steady state of a long run: no
# clipping grace period (clipping, gated by the z-score, is then computed from
# the first step on, as it is after step 20 of a real run).
STEADY_SPAM = dict(OPTIM_ADAMW_SPAM="y", SPAM_CLIP_GRACE_STEPS=0)
ADAMW = dict(OPTIM_ADAMW="y")


# --------------------------------------------------------------- workloads

class TrainStep:
    """The trainer's per-step work for one GPT-2 on a fixed random batch (fp32, CPU
    unless device says otherwise), callable: one call = one optimizer step.

    autocast: a zero-argument context factory (train.precision.autocast_factory)
    the forward runs in. plain_loss: compute the loss from materialised logits
    (GPT.forward(..., return_logits=True)) instead of the fused output-head
    loss, the default since issue 10. norms: how many times the global gradient
    norm is computed per step; 1 is the trainer's shared step contract, 3 is
    what it did before (trainer, monitor and AdamWSpam each computed one).
    """

    def __init__(self, cfg, device="cpu", model=None, autocast=None, plain_loss: bool = False, norms: int = 1):
        from models.gpt2 import build_gpt2
        optim = _require("optim", "the optimizer package")
        torch.manual_seed(cfg.SEED)
        self.cfg = cfg
        self.model = (model or build_gpt2(cfg)).to(device)
        self.optimizer = optim.build_optimizer(cfg, self.model)
        self.compiled = self.model
        gen = torch.Generator().manual_seed(cfg.SEED)
        shape = (cfg.BATCH_SIZE, self.model.config.block_size)
        self.x = torch.randint(0, self.model.vocab_size, shape, generator=gen).to(device)
        self.y = torch.randint(0, self.model.vocab_size, shape, generator=gen).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = autocast
        self.forward_kwargs = {"return_logits": True} if plain_loss else {}
        if norms < 1:
            raise ValueError(f"TrainStep needs norms >= 1, got {norms}")
        self.norms = norms
        self.tokens = cfg.BATCH_SIZE * self.model.config.block_size
        self.last_loss = None

    def forward_backward(self):
        if self.autocast is not None:
            with self.autocast():
                _, loss = self.compiled(self.x, self.y, **self.forward_kwargs)
        else:
            _, loss = self.compiled(self.x, self.y, **self.forward_kwargs)
        loss.backward()
        self.last_loss = loss.detach()

    def grad_norm(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in self.params], foreach=True)

    def finish_step(self):
        norm = self.grad_norm()
        for _ in range(self.norms - 1):  # the redundant norms of the pre-contract trainer
            norm = torch.maximum(norm, self.grad_norm())
        if self.cfg.GRAD_CLIP > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.GRAD_CLIP, norm, foreach=True)
        if not (bool(torch.isfinite(self.last_loss)) and bool(torch.isfinite(norm))):
            raise RuntimeError("benchmark step produced a non-finite loss or gradient")
        kw = {"grad_norm": norm} if getattr(self.optimizer, "accepts_grad_norm", False) else {}
        self.optimizer.step(**kw)
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self):
        self.forward_backward()
        self.finish_step()


def _pairs(t) -> str:
    q1, q3 = t.ratio_quartiles
    return f"{len(t.a)} pairs, per-pair ratios {q1:.3f}-{q3:.3f} (quartiles)"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


