"""The training-health report (monitor/report.py) and its diagnosis rules (monitor/diagnosis.py)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor import diagnosis as D
from monitor.report import main as report_main
from monitor.report import series_from_records, write_report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MATRICES = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]


def rules_fired(findings):
    return {f.rule for f in findings}


# ------------------------------------------------------------- the rules

def test_update_ratio_bands():
    healthy = {"a": [1e-3] * 10, "b": [2e-3] * 10}
    assert D.update_ratio_rule(healthy) == []
    # judged after warmup: a tiny ratio in the first half does not count as stagnation
    assert D.update_ratio_rule({"a": [1e-6] * 5 + [1e-3] * 5}) == []
    high = D.update_ratio_rule({"a": [1e-3] * 10, "b": [5e-2] * 10})
    assert len(high) == 1 and "learning rate too high" in high[0].message and "b" in high[0].message
    low = D.update_ratio_rule({"a": [1e-5] * 10})
    assert len(low) == 1 and "stagnat" in low[0].message
    both = D.update_ratio_rule({"a": [5e-2] * 4, "b": [1e-5] * 4})
    assert len(both) == 2


def test_persistent_gss_needs_enough_consecutive_points():
    steps = np.arange(20)
    below = np.ones(20)
    assert D.persistent_gss_rule(steps, below) == []
    four = below.copy()
    four[5:9] = 3.0  # GSS_PERSISTENT_POINTS - 1 points above 2
    assert D.GSS_PERSISTENT_POINTS == 5 and D.persistent_gss_rule(steps, four) == []
    five = below.copy()
    five[5:10] = 3.0
    (f,) = D.persistent_gss_rule(steps, five)
    assert "momentum pollution" in f.message and "SPAM_PERIODIC_RESET" in f.message and "steps 5-9" in f.message
    broken = below.copy()
    broken[[5, 6, 8, 9, 11, 12]] = 3.0  # never 5 in a row
    assert D.persistent_gss_rule(steps, broken) == []


def test_transient_gss_spike_and_spike_events():
    steps = np.arange(1, 21)
    gss = np.ones(20)
    assert D.transient_gss_rule(steps, gss) == []
    gss[9] = 500.0
    (f,) = D.transient_gss_rule(steps, gss)
    assert "data outlier" in f.message and "data-filter" in f.message and "500" in f.message and "10" in f.message
    # a value above 10 inside a persistent stretch is momentum pollution, not a transient spike
    persistent = np.ones(20)
    persistent[3:12] = 20.0
    assert D.transient_gss_rule(steps, persistent) == []
    # the guard's events count even when the logged series missed the step
    events = [{"step": 7, "event": "spike", "max_gss": 80.0}, {"step": 9, "event": "rollback", "to_step": 0}]
    (f,) = D.transient_gss_rule(steps, np.ones(20), events)
    assert "1 transient" in f.message and "step 7" in f.message


def test_layer_specific_gss_only_for_embeddings_and_head():
    normal = np.ones(10)
    spike = normal.copy()
    spike[4] = 50.0
    wte, mlp = "transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"
    assert D.layer_specific_gss_rule({wte: normal, mlp: normal}) == []
    (f,) = D.layer_specific_gss_rule({wte: spike, mlp: normal})
    assert "sparse features" in f.message
    assert D.layer_specific_gss_rule({wte: spike, mlp: spike}) == []
    assert D.EMBEDDING_OR_HEAD.search("fc.weight") and not D.EMBEDDING_OR_HEAD.search("h.0.mlp.c_fc.weight")


def test_vanishing_gradients():
    steps = np.arange(40)
    assert D.vanishing_gradient_rule(steps, np.linspace(2.0, 0.5, 40)) == []
    (f,) = D.vanishing_gradient_rule(steps, np.full(40, 1e-8))
    assert "vanishing" in f.message
    # relative: fell to a millionth of its early level
    decay = np.concatenate([np.ones(10), np.full(30, 1e-4 * 1e-3)])
    assert rules_fired(D.vanishing_gradient_rule(steps, decay)) == {"grad_vanishing"}


def test_grad_norm_spikes_hand_computed():
    steps = np.arange(1, 9)
    # medians of the points before: 1, 1, 1, then 1 again after the spike
    values = np.array([1.0, 1.2, 0.8, 1.0, 10.5, 1.1, 0.9, 9.9])
    (f,) = D.grad_norm_spike_rule(steps, values)
    assert "1 sudden" in f.message and "step 5" in f.message and "10.5x" in f.message
    assert D.grad_norm_spike_rule(steps, np.array([1.0, 1.2, 0.8, 1.0, 9.5, 1.1, 0.9, 1.0])) == []
    # no history yet: the third point cannot be a spike
    assert D.grad_norm_spike_rule(np.arange(3), np.array([1.0, 1.0, 100.0])) == []
    # a smoothly falling norm has none
    assert D.grad_norm_spike_rule(np.arange(50), np.geomspace(5, 0.1, 50)) == []


def test_attention_entropy_rules():
    falling = np.linspace(3.0, 1.5, 8)
    assert D.attention_entropy_rule({"L0": falling, "L1": falling}) == []
    (f,) = D.attention_entropy_rule({"L0": falling, "L1": np.full(8, 3.0)})
    assert "not decreasing" in f.message and "L1" in f.message and "L0 " not in f.message
    (f,) = D.attention_entropy_rule({"L0": falling}, {"L0.H0": falling, "L0.H1": np.linspace(2, 0.01, 8)})
    assert "collapsed" in f.message and "L0.H1" in f.message
    # two points are too few to call a trend
    assert D.attention_entropy_rule({"L0": [3.0, 3.0]}) == []


def test_rank_collapse_spectral_radius_alpha():
    slow = np.linspace(4.0, 3.6, 10)  # 1% per point
    assert D.rank_collapse_rule({"a": slow}) == []
    sharp = slow.copy()
    sharp[6:] = 2.5
    (f,) = D.rank_collapse_rule({"a": slow, "b": sharp})
    assert "rank collapse" in f.message and "b" in f.message
    assert D.spectral_radius_rule({"a": np.linspace(1, 3, 5)}) == []
    (f,) = D.spectral_radius_rule({"a": np.linspace(1, 3, 5), "b": np.linspace(1, 20, 5)})
    assert "explosion" in f.message
    assert D.alpha_rule({"a": [9.0, 4.0]}) == []  # the latest point counts
    (f,) = D.alpha_rule({"a": [4.0, 9.0]})
    assert f.severity == "note" and "under-trained" in f.message


def test_distributed_rules():
    steps = np.arange(5)
    assert D.loss_dispersion_rule(steps, np.zeros(5)) == []
    (f,) = D.loss_dispersion_rule(steps, [0, 0, 0.2, 0, 0])
    assert "silent inconsistency" in f.message and "step 2" in f.message
    assert D.direction_consistency_rule(steps, np.full(5, 1.0)) == []  # the same batch on every replica
    (f,) = D.direction_consistency_rule(steps, np.full(5, 0.9))
    assert "unsynchronised" in f.message and "same probe batch" in f.message


def test_elementwise_gss_rule_judges_dense_classes_by_max_and_the_embedding_by_p999():
    healthy = {"embedding/max": [800.0, 5e4], "embedding/p999": [10.0, 135.0], "attention/max": [4.0, 5.5],
               "mlp/max": [3.0, 2.0], "mlp/p999": [2.0, 1.5]}
    assert D.elementwise_gss_rule(healthy) == []  # a 5e4 embedding maximum is the rare-token effect
    (f,) = D.elementwise_gss_rule({**healthy, "attention/max": [4.0, 60.0]})
    assert "attention" in f.message and "60" in f.message
    (f,) = D.elementwise_gss_rule({**healthy, "embedding/p999": [10.0, 2000.0]})
    assert "embedding" in f.message and "rare-token" in f.message
    assert D.elementwise_gss_rule({"mlp/max": [float("nan"), 3.0]}) == []


def test_loss_curve_rules():
    steps = np.arange(10)
    assert D.collapse_residual_rule(steps, np.full(10, 0.01)) == []
    assert rules_fired(D.collapse_residual_rule(steps, np.full(10, 0.2))) == {"collapse_residual"}
    assert D.codec_rule(steps, np.full(10, 0.3)) == []
    (f,) = D.codec_rule(steps, np.full(10, 0.001))
    assert "contamination" in f.message
    assert D.zlib_rule([0.5, 0.5], [0.45, 0.4]) == []
    assert rules_fired(D.zlib_rule([0.5, 0.5], [0.4, 0.1])) == {"zlib"}
    assert D.loss_divergence_rule(steps, np.linspace(10, 3, 10)) == []
    assert rules_fired(D.loss_divergence_rule(steps, np.r_[np.linspace(10, 3, 7), 8, 9, 10])) == {"loss_divergence"}
    assert D.nonfinite_rule([0, 0, 0]) == [] and rules_fired(D.nonfinite_rule([0, 1, 2])) == {"nonfinite"}


def test_rules_ignore_non_finite_values():
    nan = float("nan")
    assert D.update_ratio_rule({"a": [nan, 1e-3, 1e-3, nan]}) == []
    assert D.persistent_gss_rule(np.arange(4), [nan, 1.0, nan, 1.0]) == []
    assert D.grad_norm_spike_rule(np.arange(6), [1.0, nan, 1.0, 1.0, nan, 1.0]) == []


# -------------------------------------------------- a synthetic run folder

SETTINGS = """\
__source__: str = '/nowhere/.config'
__source_sha256__: str = '0'
MODEL_GPT2: bool = True
GPT2_TINY: bool = True
GPT2_N_LAYER: int = 2
GPT2_N_HEAD: int = 2
GPT2_N_EMBD: int = 32
GPT2_BLOCK_SIZE: int = 32
DATA_SHAKESPEARE: bool = True
DATA_DIR: str = 'data_cache'
OPTIM_ADAMW_SPAM: bool = True
LR: float = 0.001
LR_WARMUP_ITERS: int = 5
LR_COSINE: bool = True
MIN_LR: float = 0.0001
BETA1: float = 0.9
BETA2: float = 0.99
WEIGHT_DECAY: float = 0.1
SPAM_ENABLE_CLIP: bool = True
SPAM_THETA: float = 50.0
SPAM_PERIODIC_RESET: bool = True
SPAM_INTERVAL: int = 200
GRAD_CLIP: float = 0.0
BATCH_SIZE: int = 4
GRAD_ACCUM_STEPS: int = 1
SEED: int = 1337
MONITOR: bool = True
MONITOR_SPIKE_GUARD: bool = True
MONITOR_SPIKE_TAU: float = 10.0
MONITOR_SPIKE_ACTION_LOG: bool = True
"""

STEPS = 60
SPIKE_STEP = 20


def synthetic_records(anomalous: bool, full: bool = True) -> list[dict]:
    """One train record every step (all metric families when full) and a val record every 20.
    anomalous plants one anomaly per diagnosis rule."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, STEPS + 1):
        t = step / STEPS
        late = step > STEPS // 2
        loss = 10 - 6 * t ** 0.5 + 0.05 * rng.standard_normal()
        if anomalous and step > 50:
            loss = 8.0  # diverging
        grad = 1.5 - 0.5 * t + 0.05 * rng.standard_normal()
        r = {"step": step, "split": "train", "loss": loss, "lr": 1e-3 * min(1, step / 5), "grad_norm": grad,
             "tokens_per_s": 5000.0, "epoch": t, "nonfinite_total": 2 if anomalous and step > 40 else 0,
             "nonfinite_skipped": 0}
        if full:
            gnorm = grad
            if anomalous and step == SPIKE_STEP:
                gnorm = 100 * grad
            if anomalous and late:
                gnorm = 1e-9  # vanishing
            gss = 1.0 + 0.1 * rng.standard_normal()
            gss_max = 1.5
            if anomalous and step == SPIKE_STEP:
                gss_max = gss = 500.0
            if anomalous and 30 <= step <= 40:
                gss = 3.0
            # element-wise GSS per class at healthy levels (the embedding's max is the rare-token
            # effect); the anomalous run has an element-wise spike in the MLP
            r.update({"gss_elem/embedding/max": 800.0, "gss_elem/embedding/p999": 10.0,
                      "gss_elem/attention/max": 4.0, "gss_elem/attention/p999": 3.0,
                      "gss_elem/mlp/max": 300.0 if anomalous and step == SPIKE_STEP else 4.0,
                      "gss_elem/mlp/p999": 3.0})
            r.update({"grad_norm/global": gnorm, "gss/global": gss, "gss/max": gss_max,
                      "gss/elementwise_max": 800.0, "update_ratio/global": 1e-3, "gsnr_examples/mean": 0.1,
                      "monitor/token_entropy": 6.0 - 2 * t, "guard/spikes": 0.0})
            for i, name in enumerate(MATRICES):
                r[f"grad_norm/{name}"] = gnorm / 2
                r[f"gss/{name}"] = gss_max if anomalous else 1.0
                ratio = 1e-3
                if anomalous and i == 0:
                    ratio = 5e-2
                if anomalous and i == 1:
                    ratio = 1e-5
                r[f"update_ratio/{name}"] = ratio
                r[f"gsnr_examples/{name}"] = 0.1
                if step % 5 == 0:
                    sing = 4.0 - 0.2 * t
                    if anomalous and i == 2 and step >= 40:
                        sing = 2.0
                    r[f"singular_entropy/{name}"] = sing
                    r[f"spectral_radius/{name}"] = (1 + 199 * t) if anomalous and i == 3 else 1 + t
                    r[f"alpha/{name}"] = 8.0 if anomalous and i == 0 else 4.0 - t
                    r[f"param_std/{name}"] = 0.02
            if step % 5 == 0:
                for layer in range(2):
                    entropy = 3.0 - 1.5 * t
                    if anomalous and layer == 1:
                        entropy = 3.0
                    r[f"attn_entropy/L{layer}"] = entropy
                    for head in range(2):
                        r[f"attn_entropy/L{layer}.H{head}"] = 0.01 if anomalous and layer == 0 and head == 1 \
                            else entropy
                    r[f"act_spectrum/L{layer}/top10_mass"] = 0.5 + 0.3 * t
                    r[f"act_spectrum/L{layer}/tail_exponent"] = 1.0 + t
                r.update({"grad_spectrum/top1_mass": 0.3, "grad_spectrum/effective_rank": 5.0,
                          "grad_spectrum/sigma_max": 2.0, "codec/score": 0.001 if anomalous else 0.3,
                          "codec/loss_without": 5.0, "codec/loss_with": 4.7,
                          "zlib/ratio_mean": 0.5, "zlib/ratio_min": 0.1 if anomalous else 0.4,
                          "zlib/log_ppl_mean": 4.0, "zlib/bits_per_byte_mean": 3.0,
                          "collapse/relative": 0.2 if anomalous else 0.01, "collapse/residual": 0.05})
            if anomalous:
                r.update({"ddp/loss_std": 0.1, "ddp/grad_cosine": 0.05})
            r.update({"spam/clipped_count": 3.0, "spam/clipped_fraction": 1e-4, "spam/spike_step": 0.0,
                      "spam/zscore": 0.5, "spam/grad_norm": grad, "spam/reset": float(step == 50),
                      "spam/warmup_scale": 1.0})
        records.append(r)
        if step % 20 == 0:
            records.append({"step": step, "split": "val", "val_loss": loss + 0.1, "val_ppl": float(np.exp(loss + 0.1))})
    return records


def make_run(folder: Path, anomalous: bool, full: bool = True, spikes: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "settings.py").write_text(SETTINGS)
    (folder / "config").write_text("CONFIG_MODEL_GPT2=y\n")
    lines = [json.dumps(r) for r in synthetic_records(anomalous, full)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 61, "spl')  # a torn last line
    if spikes:
        events = []
        if anomalous:
            events = [{"step": SPIKE_STEP, "event": "spike", "action": "log", "max_gss": 500.0,
                       "param": MATRICES[0], "gss_global": 480.0, "signals": ["gss", "loss"], "loss": 9.5,
                       "loss_threshold": 4.25, "tensors": [{"param": MATRICES[0], "gss": 500.0, "grad_norm": 3.0},
                                                           {"param": MATRICES[1], "gss": 120.0, "grad_norm": 1.0}],
                       "samples": [{"doc": "hamlet_gut", "doc_index": 3, "offset": 120},
                                   {"doc": "macbeth_gut", "doc_index": 7, "offset": 0}]},
                      {"step": 45, "event": "rollback", "to_step": 40}]
        (folder / "spikes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "total_iters": STEPS, "steps": STEPS,
                                                     "val_loss": 3.1, "val_ppl": 22.2, "wall_s": 12.0,
                                                     "sample": "To be, or not"}))
    return folder


def run_report(folder: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.report", str(folder), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


SECTIONS = ["Loss and learning rate", "Gradient norm", "Gradient Spike Score", "Update-to-weight ratio",
            "Gradient signal-to-noise", "Attention-head and token entropy", "Heavy-tail alpha",
            "Singular entropy and spectral radius",
            "Activation spectra", "Per-sample gradient spectrum", "SPAM optimizer telemetry",
            "Loss-curve health", "Diagnosis"]


def referenced_pngs(report: Path) -> list[Path]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    return [report.parent / n for n in names]


def assert_valid_png(path: Path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_series_from_records():
    records = [{"step": 1, "split": "train", "loss": 3.0, "gss/a": None, "flag": True},
               {"step": 2, "split": "train", "loss": 2.0, "gss/a": 1.5},
               {"step": 2, "split": "train", "loss": 2.5},  # a step logged again: the last one wins
               {"step": 2, "split": "val", "val_loss": 2.7}]
    s = series_from_records(records)
    assert list(s) == ["loss", "gss/a", "val_loss"]  # first-seen order; bools are not series
    np.testing.assert_array_equal(s["loss"][0], [1, 2])
    np.testing.assert_array_equal(s["loss"][1], [3.0, 2.5])
    assert np.isnan(s["gss/a"][1][0]) and s["gss/a"][1][1] == 1.5


def test_diagnose_healthy_run_has_no_findings():
    series = series_from_records(synthetic_records(anomalous=False))
    results = D.diagnose(series, [])
    findings = [f for fs in results.values() if fs for f in fs]
    assert findings == []
    # single process: the DDP rules had nothing to check
    assert results["loss_dispersion"] is None and results["direction_consistency"] is None
    assert results["rollback"] == [] and results["update_ratio"] == []


def test_diagnose_planted_anomalies(tmp_path):
    run = make_run(tmp_path / "run", anomalous=True)
    events = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    results = D.diagnose(series_from_records(synthetic_records(anomalous=True)), events)
    fired = {rule for rule, fs in results.items() if fs}
    assert fired == set(D.RULES) - {"gss_layer_specific"}  # the outlier hit every layer
    messages = " ".join(f.message for fs in results.values() if fs for f in fs)
    for phrase in ("learning rate too high", "stagnating", "momentum pollution", "data outlier", "vanishing",
                   "gradient-norm spike", "not decreasing", "collapsed", "rank collapse", "silent inconsistency",
                   "contamination", "power-law trend", "rollback", "element-wise GSS in mlp"):
        assert phrase in messages, phrase


def test_report_renders_every_section(tmp_path):
    run = make_run(tmp_path / "run", anomalous=True)
    r = run_report(run)
    assert r.returncode == 0, r.stderr
    report = run / "report" / "report.md"
    assert str(report) in r.stdout
    text = report.read_text()
    for title in SECTIONS:
        assert f"## {title}" in text, title
    assert "No data" not in text  # every family was logged
    pngs = referenced_pngs(report)
    assert len(pngs) == 12
    for png in pngs:
        assert_valid_png(png)
    # header: what ran
    assert "GPT-2 tiny" in text and "AdamW-SPAM" in text and "Shakespeare" in text and "val_loss 3.1" in text
    assert "60 of 60" in text
    # spike table and diagnosis
    assert "hamlet_gut" in text and "| 45 | rollback |" in text
    assert "| gss+loss (loss 9.5 > 4.25) | 500 |" in text and "(120)" in text
    diagnosis = text[text.index("## Diagnosis"):]
    for phrase in ("learning rate too high", "momentum pollution", "data outlier", "make data-filter",
                   "vanishing", "rank collapse", "contamination"):
        assert phrase in diagnosis, phrase


def test_healthy_report_says_no_anomaly(tmp_path):
    run = make_run(tmp_path / "run", anomalous=False)
    path, findings = write_report(run, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md" and findings == 0
    text = path.read_text()
    assert "No anomaly found" in text and "**warning**" not in text
    assert "spikes.jsonl is empty" in text
    assert "Not checked (no data: metric off, or too few points yet): loss dispersion across workers" in text


def test_sections_without_data_say_so(tmp_path):
    run = make_run(tmp_path / "run", anomalous=False, full=False, spikes=False)
    assert report_main([str(run)]) == 0
    report = run / "report" / "report.md"
    text = report.read_text()
    for title, knob in (("Gradient Spike Score", "MONITOR_GSS_INTERVAL=0; MONITOR_GSS_ELEMENTWISE_INTERVAL=0"),
                        ("Heavy-tail alpha", "MONITOR_WEIGHT_SPECTRA_INTERVAL=0"),
                        ("Activation spectra", "MONITOR_ACT_SPECTRA_INTERVAL=0"),
                        ("SPAM optimizer telemetry", "optimizer is not AdamW-SPAM")):
        section = text[text.index(f"## {title}"):].split("\n## ")[0]
        assert f"*No data: metric off ({knob}).*" in section, title
        assert "![" not in section
    # the loss and gradient-norm sections still have their plots
    assert [p.name for p in referenced_pngs(report)] == ["loss.png", "grad_norm.png"]
    for png in referenced_pngs(report):
        assert_valid_png(png)
    assert "No spikes.jsonl" in text
    # a second report replaces the first, leaving no temporary folder behind
    (report.parent / "stale.png").write_bytes(b"old")
    assert report_main([str(run)]) == 0
    assert not (report.parent / "stale.png").exists() and report.is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_image_runs_name_the_model_and_skip_language_probes(tmp_path):
    run = make_run(tmp_path / "run", anomalous=False, full=False, spikes=False)
    settings = (run / "settings.py").read_text().replace(
        "MODEL_GPT2: bool = True", "MODEL_GPT2: bool = False\nMODEL_RESNET18: bool = True\nRESNET_BASE_WIDTH: int = 16")
    (run / "settings.py").write_text(settings)
    path, _ = write_report(run)
    text = path.read_text()
    assert "| Model | ResNet-18 (base width 16) |" in text
    entropy = text[text.index("## Attention-head and token entropy"):].split("\n## ")[0]
    assert "*No data: not measured: a probe of GPT-2 runs only.*" in entropy
    gss = text[text.index("## Gradient Spike Score"):].split("\n## ")[0]
    assert "*No data: metric off (MONITOR_GSS_INTERVAL=0; MONITOR_GSS_ELEMENTWISE_INTERVAL=0).*" in gss


def test_report_errors_are_one_line(tmp_path):
    # SystemExit with a message: Python prints it to stderr and exits with status 1
    with pytest.raises(SystemExit, match=f"^error: run folder {tmp_path / 'missing'} does not exist$"):
        report_main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^error: .* has no metrics.jsonl: not a run folder") as e:
        report_main([str(tmp_path / "empty")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "empty" / "report").exists()
    # a folder that is not a report is never replaced
    run = make_run(tmp_path / "run", anomalous=False, full=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not a report folder"):
        write_report(run, tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "keep me"


# ------------------------------------------------- a real tiny training run

def test_report_and_data_filter_on_a_real_tiny_run(tmp_path):
    """A few steps of the tiny GPT-2 with every monitor metric on and one injected 1000x
    gradient spike: the report renders, names the spike, and data-filter drops its documents."""
    from trainutil import make_settings, run_train

    cheap = ("GRAD_NORM", "GSS", "UPDATE_RATIO", "ATTN_ENTROPY", "TOKEN_ENTROPY")
    costly = ("WEIGHT_SPECTRA", "ACT_SPECTRA", "GRAD_SPECTRA", "CODEC", "ZLIB")
    intervals = {**{f"MONITOR_{m}_INTERVAL": "2" for m in cheap}, **{f"MONITOR_{m}_INTERVAL": "4" for m in costly}}
    settings = make_settings(tmp_path / "cfg", MONITOR="y", MAX_ITERS="8", CKPT_INTERVAL="0",
                             MONITOR_SPIKE_GUARD="y", FAULT_INJECTION="y", FAULT_SPIKE_STEPS="6", **intervals)
    run_train(settings)
    run = tmp_path / "cfg" / "run"
    report, _ = write_report(run)
    text = report.read_text()
    for title in ("Loss and learning rate", "Gradient Spike Score", "Update-to-weight ratio", "Heavy-tail alpha",
                  "Activation spectra", "Per-sample gradient spectrum", "SPAM optimizer telemetry"):
        section = text[text.index(f"## {title}"):].split("\n## ")[0]
        assert "![" in section, title
    for png in referenced_pngs(report):
        assert_valid_png(png)
    assert "Fault injection | ON" in text
    diagnosis = text[text.index("## Diagnosis"):]
    assert "(gss_transient)" in diagnosis and "step 6" in diagnosis

    spikes = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    (event,) = [e for e in spikes if e["event"] == "spike"]
    assert event["step"] == 6
    spike_docs = {s["doc"] for s in event["samples"]}
    out = tmp_path / "filtered"
    r = subprocess.run([sys.executable, "-m", "scripts.data_filter", str(run), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"removed {len(spike_docs)} document(s)" in r.stdout
    removed = json.loads((out / "removed.json").read_text())
    assert {d["doc"] for d in removed["documents"]} == spike_docs
    from data.text import open_token_dataset
    corpus = REPO / "data_cache" / "shakespeare_gpt2"
    before = json.loads((corpus / "train.ids.json").read_text())
    after = json.loads((out / "train.ids.json").read_text())
    assert after == [d for d in before if d not in spike_docs]
    filtered = open_token_dataset(out, "train", 32)
    assert filtered.num_tokens == open_token_dataset(corpus, "train", 32).num_tokens - removed["tokens_removed"]
