"""`make check` (train/preflight.py): the figures of real gpt2-tiny and resnet-tiny checks against
independent counts, every preset's model built without data (published parameter counts), and
configurations that cannot run stopping with one line."""
from __future__ import annotations

import math

import pytest

from tests.trainutil import REPO, make_settings, settings_in_process
from train import preflight


def settings(tmp_path, preset, tiny=None, **overrides):
    return settings_in_process(preset, tiny=tiny, OUT_DIR=str(tmp_path / "run"), **overrides)


def test_gpt2_tiny_figures_match_independent_counts(tmp_path, capsys):
    cfg = settings(tmp_path, "gpt2-tiny-adamw", DEVICE_CPU="y")  # TINY_GPT: 2 layers, width 32
    f = preflight.check(cfg, steps=1)
    from models.gpt2 import build_gpt2
    model = build_gpt2(cfg)
    tensors = list(model.parameters())  # tied weights appear once
    n_params = sum(p.numel() for p in tensors)
    assert f["params"] == n_params
    assert f["params_non_embedding"] == n_params - cfg.GPT2_BLOCK_SIZE * cfg.GPT2_N_EMBD  # minus wpe
    # torch AdamW: exp_avg and exp_avg_sq in fp32 per element, and a fp32 `step` per tensor
    assert f["optimizer_state_bytes"] == 8 * n_params + 4 * len(tensors)
    # measured FLOPs within 2% of 6N + 12 L d T (the counter also sees the softmax-free attention
    # matmuls at full context and the layer norms it ignores)
    formula = 6 * f["params_non_embedding"] + 12 * cfg.GPT2_N_LAYER * cfg.GPT2_N_EMBD * cfg.GPT2_BLOCK_SIZE
    assert abs(f["flops_per_unit_measured"] / formula - 1) < 0.02
    # peak RSS is the process's high-water mark: in a test process an earlier test may
    # already have set it higher than this run takes (under `make check` it is the run's own)
    assert math.isfinite(f["first_loss"]) and f["step_s"] > 0 and f["peak_rss_bytes"] >= f["rss_before_bytes"] > 0
    assert f["total_iters"] == cfg.MAX_ITERS
    assert f["total_s"] == pytest.approx(cfg.MAX_ITERS * f["step_s"] + f["evaluations"] * cfg.EVAL_BATCHES
                                         * f["eval_batch_s"])
    out = capsys.readouterr().out
    for label in ("parameters:", "optimizer state:", "peak memory:", "FLOPs:", "step time:", "run time:"):
        assert label in out
    assert out.rstrip().endswith("OK: this configuration runs")


def test_sparse_spam_state_is_measured_after_a_step(tmp_path):
    quiet = dict(steps=1, real_data=False, say=lambda s: None)
    dense = preflight.check(settings(tmp_path, "gpt2-tiny", DEVICE_CPU="y", MONITOR="n"), **quiet)
    sparse = preflight.check(settings(tmp_path, "gpt2-tiny", DEVICE_CPU="y", MONITOR="n", SPAM_DENSITY="0.25"),
                             **quiet)
    assert dense["optimizer_state_bytes"] >= dense["dense_adam_state_bytes"]
    # Density 0.25 applies to the attention and MLP weights (S elements; the embedding stays
    # dense): their two fp32 moments shrink from 8 S to 8 x 0.25 S bytes, plus a 1-byte offset
    # per kept element and per-block counts, so at least 8 S - 2 S - 0.25 S - counts > 5 S is saved.
    from models.gpt2 import build_gpt2
    cfg = settings(tmp_path, "gpt2-tiny")
    model = build_gpt2(cfg)
    S = sum(p.numel() for name, p in model.named_parameters()
            if name.startswith("transformer.h.") and p.dim() == 2)
    assert S > 0
    assert dense["optimizer_state_bytes"] - sparse["optimizer_state_bytes"] > 5 * S


def test_resnet_tiny_on_the_digits(tmp_path):
    cfg = settings(tmp_path, "resnet-tiny", DEVICE_CPU="y", BATCH_SIZE="16")
    f = preflight.check(cfg, steps=1, say=lambda s: None)
    assert f["units"] == "images" and f["params"] == 701_178  # ResNet-18, base width 16, 10 classes, 1 channel
    assert f["total_iters"] == cfg.MAX_EPOCHS * f["steps_per_epoch"]  # resnet-tiny trains by epochs


# Published parameter counts: GPT-2 small with nanoGPT's vocabulary padded to 50304 (124.44M with
# 50257), ResNet-18 for CIFAR-10 and ResNet-50 for CIFAR-100 with the 3x3 stem.
KNOWN_PARAMS = {"gpt2": 124_475_904, "resnet18": 11_173_962, "resnet50": 23_705_252}


def test_every_preset_model_builds_without_data(tmp_path):
    presets = sorted(p.name for p in (REPO / "defconfigs").iterdir() if p.is_file())
    for name in presets:
        cfg = settings(tmp_path, name, tiny=False)
        model = preflight.build_model_on_meta(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n > 0, name
        if name in KNOWN_PARAMS:
            assert n == KNOWN_PARAMS[name], name


def test_a_gpu_preset_checks_on_random_batches_of_its_shape(tmp_path, capsys):
    cfg = settings(tmp_path, "resnet18", DEVICE_CPU="y", BATCH_SIZE="2", DTYPE_FP32="y", COMPILE="n")
    f = preflight.check(cfg, steps=1, real_data=False)
    assert f["params"] == KNOWN_PARAMS["resnet18"] and f["total_iters"] is None  # epochs need the data
    assert "random batches" in capsys.readouterr().out


def test_configurations_that_cannot_run_stop_with_one_line(tmp_path, capsys):
    fsdp = make_settings(tmp_path / "fsdp", "gpt2-tiny", DEVICE_CPU="y", FSDP="y", OPTIM_STABLE_SPAM="y")
    assert preflight.main(["--settings", str(fsdp)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: FSDP=y works with OPTIM_ADAMW_SPAM, OPTIM_ADAMW or OPTIM_SGD; Stable-SPAM")
    assert "\n" not in err

    missing = make_settings(tmp_path / "data", "gpt2-tiny", DEVICE_CPU="y",
                            DATA_PREPARED_DIR=str(tmp_path / "no-corpus"))
    assert preflight.main(["--settings", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    # the trainer's own one-line corpus error (data/integrity.py), not a traceback
    assert err.startswith(f"error: {tmp_path / 'no-corpus'} has no meta.json or progress.json: it is not a "
                          "prepared corpus") and "\n" not in err
