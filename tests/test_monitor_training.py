"""The health monitor inside real (tiny) training runs: every metric is logged, spikes roll back."""
from __future__ import annotations

import json

import pytest

from trainutil import make_settings, metrics, run_train

# Seed 002's indicator table (shared/seeds/002), each with the metrics.jsonl key that carries it.
SEED_002_INDICATORS = {
    "Global Gradient Norm": "grad_norm/global",
    "Gradient Spike Score (GSS)": "gss/global",
    "Update-to-Weight Ratio": "update_ratio/global",
    "Gradient Signal-to-Noise Ratio (GSNR)": "gsnr_examples/mean",  # GRAD_ACCUM_STEPS=1: over examples
    "Direction Consistency": "ddp/grad_cosine",
    "Attention Head Entropy": "attn_entropy/L0",
    "Singular Entropy": "singular_entropy/transformer.h.0.attn.c_attn.weight",
    "Token Entropy": "monitor/token_entropy",
    "Alpha Index (HT-SR Alpha)": "alpha/transformer.h.1.mlp.c_fc.weight",
    "Layer-wise Std": "param_std/transformer.h.0.ln_1.weight",
    "Spectral Radius": "spectral_radius/transformer.h.1.attn.c_proj.weight",
    "Collapse Residual": "collapse/residual",
    "Loss Dispersion": "ddp/loss_std",
    "CoDeC Score": "codec/score",
    "Zlib Compression Ratio": "zlib/ratio_mean",
}
# Beyond the table: the element-wise GSS per class, the spectral lens (seed 004)
MORE = ("gss_elem/embedding/max", "gss_elem/embedding/p999", "gss_elem/attention/p999", "gss_elem/mlp/max",
        "act_spectrum/L0/top10_mass", "act_spectrum/L1/tail_exponent", "grad_spectrum/effective_rank")
INTERVALS = {f"MONITOR_{m}_INTERVAL": n for m, n in (
    ("GRAD_NORM", 2), ("GSS", 2), ("GSS_ELEMENTWISE", 2), ("UPDATE_RATIO", 2), ("GSNR", 2), ("DDP_CONSISTENCY", 2), ("WEIGHT_SPECTRA", 4),
    ("COLLAPSE_RESIDUAL", 10), ("ATTN_ENTROPY", 4), ("TOKEN_ENTROPY", 4), ("ACT_SPECTRA", 4), ("GRAD_SPECTRA", 4),
    ("CODEC", 4), ("ZLIB", 4))}


def test_every_seed_002_indicator_reaches_jsonl_and_tensorboard_without_accumulation(tmp_path):
    """MONITOR=y and GRAD_ACCUM_STEPS=1 (the default preset's layout), 2 DDP processes so that
    the cross-worker indicators exist; the intervals are shortened to fit 10 steps."""
    settings = make_settings(tmp_path, MAX_ITERS=10, GRAD_ACCUM_STEPS=1, MONITOR="y", LOG_INTERVAL=2,
                             TENSORBOARD="y", MONITOR_PROBE_BATCH=4, **INTERVALS)
    run_train(settings, nproc=2)
    run = tmp_path / "run"
    records = metrics(run)
    keys = set().union(*(rec.keys() for rec in records))
    missing = {name: key for name, key in SEED_002_INDICATORS.items() if key not in keys}
    assert not missing, missing
    assert not [k for k in MORE if k not in keys]
    assert not any(k.startswith("gsnr_micro/") for k in keys)  # one micro-batch: the example estimate
    dispersion = [rec["ddp/loss_std"] for rec in records if "ddp/loss_std" in rec]
    cosine = [rec["ddp/grad_cosine"] for rec in records if "ddp/grad_cosine" in rec]
    assert dispersion and all(d == 0.0 for d in dispersion)  # DDP replicas agree exactly
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in cosine)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert not [k for k in SEED_002_INDICATORS.values() if "train/" + k not in tags]


def test_injected_spike_cluster_rolls_back_and_is_logged(tmp_path):
    settings = make_settings(
        tmp_path, MAX_ITERS=16, CKPT_INTERVAL=5, CKPT_KEEP=5, LR_WARMUP_ITERS=1,
        FAULT_INJECTION="y", FAULT_SPIKE_STEPS="8,9,10", FAULT_SPIKE_FACTOR="1000.0",
        MONITOR_SPIKE_GUARD="y", MONITOR_SPIKE_TAU="10.0", MONITOR_SPIKE_CLUSTER_K=2,
        MONITOR_SPIKE_CLUSTER_WINDOW=10, MONITOR_ROLLBACK_WARMUP=4, MONITOR_SPIKE_ACTION_SKIP="y",
        SPAM_CLIP_GRACE_STEPS=2)
    r = run_train(settings)
    log = r.stdout + r.stderr
    assert "step 10: spike cluster -> weights rolled back to ckpt_000000005.pt (step 5)" in log
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    spikes = [e for e in events if e["event"] == "spike"]
    assert [e["step"] for e in spikes] == [8, 9, 10]
    assert all(e["action"] == "skip" and e["max_gss"] > 10 for e in spikes)
    # which signal fired and which tensors carried the spike (top 3 by GSS, largest first)
    assert all(e["signals"] == ["gss"] and len(e["tensors"]) == 3 for e in spikes)
    assert all(e["tensors"][0]["gss"] == pytest.approx(e["max_gss"]) and e["tensors"][0]["grad_norm"] > 0
               for e in spikes)
    # the batch's documents, for make data-filter: 4 rows per batch, real Shakespeare ids
    assert len(spikes[0]["samples"]) == 4 and spikes[0]["samples"][0]["doc"].endswith("_gut")
    assert {"step": 10, "event": "rollback", "to_step": 5} in events
    rollback = [rec for rec in metrics(run) if rec.get("rollback")]
    assert [rec["step"] for rec in rollback] == [10]
    # the short warmup after the rollback: the lr is 1/4, 2/4, 3/4 of the schedule's, then all of it
    from train.schedule import learning_rate
    lrs = {rec["step"]: rec["lr"] for rec in metrics(run)}
    base = {s: learning_rate(s - 1, lr=1e-3, warmup_iters=1, total_iters=16, cosine=True, min_lr=1e-4)
            for s in range(1, 17)}
    assert [lrs[s] / base[s] for s in (9, 10, 11, 12, 13, 14)] == pytest.approx([1, 1, 0.25, 0.5, 0.75, 1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["spikes"] == 3 and summary["rollbacks"] == 1


def test_data_filter_output_trains(tmp_path):
    """Spike -> spikes.jsonl -> make data-filter -> a run on the filtered corpus (DATA_PREPARED_DIR)."""
    import subprocess
    import sys

    from trainutil import REPO, env
    settings = make_settings(tmp_path / "a", MAX_ITERS=8, FAULT_INJECTION="y", FAULT_SPIKE_STEPS="6",
                             MONITOR_SPIKE_GUARD="y", SPAM_CLIP_GRACE_STEPS=2)
    run_train(settings)
    run = tmp_path / "a" / "run"
    r = subprocess.run([sys.executable, "-m", "scripts.data_filter", str(run)], cwd=REPO, env=env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    filtered = run / "filtered_corpus"
    removed = {d["doc"] for d in json.loads((filtered / "removed.json").read_text())["documents"]}
    spiked = {s["doc"] for e in map(json.loads, (run / "spikes.jsonl").read_text().splitlines())
              if e["event"] == "spike" for s in e["samples"]}
    assert removed == spiked and not removed & set(json.loads((filtered / "train.ids.json").read_text()))
    again = make_settings(tmp_path / "b", MAX_ITERS=3, DATA_PREPARED_DIR=str(filtered))
    run_train(again)
    assert len(metrics(tmp_path / "b" / "run")) == 3
