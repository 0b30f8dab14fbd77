"""`make compare` (scripts/compare.py): a real CPU-sized comparison, resume, failures,
the metric arithmetic on hand-made run folders, and every defconfig's round trip."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts import compare
from scripts.compare_plots import mean_std_curve

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# A GPT-2 small enough that a run is a few seconds on one CPU thread.
TINY = ["GPT2_CUSTOM=y", "GPT2_N_LAYER=1", "GPT2_N_HEAD=2", "GPT2_N_EMBD=32", "GPT2_BLOCK_SIZE=32",
        "BATCH_SIZE=4", "EVAL_BATCHES=2", "EVAL_INTERVAL=10", "LOG_INTERVAL=5", "CKPT_INTERVAL=10",
        "LR_WARMUP_ITERS=5", "TENSORBOARD=n", "SAMPLE_TOKENS=8"]
CONFIGS = ["gpt2-tiny", "gpt2-tiny-adamw"]
STEPS = 20
SEEDS = 2


def run_compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [PY, "-m", "scripts.compare", *CONFIGS, "--seeds", str(SEEDS), "--max-iters", str(STEPS),
            "--jobs", "2", "--out", str(out), *[a for s in TINY for a in ("--set", s)], *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def parse_config(path: Path) -> dict[str, str]:
    """A .config as {SYMBOL: value}; '# CONFIG_X is not set' is 'n' (as the kernel's diffconfig reads it)."""
    values = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"CONFIG_(\w+)=(.*)$", line):
            values[m.group(1)] = m.group(2)
        elif m := re.match(r"# CONFIG_(\w+) is not set$", line):
            values[m.group(1)] = "n"
    return values


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    first = run_compare(out)
    return out, first


def test_every_run_trained_in_its_own_folder(comparison):
    out, proc = comparison
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in CONFIGS:
        for seed in range(1, SEEDS + 1):
            run = out / name / f"seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["steps"] == summary["total_iters"] == STEPS
            settings = (run / "settings.py").read_text()
            assert f"SEED: int = {seed}" in settings
            assert f"OUT_DIR: str = {str(run)!r}" in settings
            log = (run / "train.log").read_text()
            assert "step/s" in log or "s/step" in log  # the trainer's progress bar went to the log
        assert proc.stdout.count(f"] {name} seed") == 2 * SEEDS  # one started + one finished line per run
    assert proc.stdout.count(": started") == proc.stdout.count(": finished in") == len(CONFIGS) * SEEDS
    assert "s/step" not in proc.stdout + proc.stderr and "step/s" not in proc.stdout + proc.stderr


def test_table_has_every_metric_column(comparison):
    out, _ = comparison
    md = (out / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| config"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    # a GPT-2-only comparison has no accuracy columns; throughput is named by its unit
    expected = ["config", "runs"] + [h if key != "throughput" else "tokens/s"
                                     for key, h, _ in compare.COLUMNS if "accuracy" not in key]
    assert cells == expected
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == [f"`{c}`" for c in CONFIGS]
    adamw = [c.strip() for c in rows[1].strip("|").split("|")]
    spam = [c.strip() for c in rows[0].strip("|").split("|")]
    clipped = expected.index("clipped elements")
    assert adamw[clipped] == "n/a" and spam[clipped] != "n/a"
    assert adamw[expected.index("resets")] == "n/a" and spam[expected.index("resets")] == "0"  # 20 < 200
    assert " ± " in spam[expected.index("final val loss")]


def test_json_has_every_field(comparison):
    out, _ = comparison
    result = json.loads((out / "comparison.json").read_text())
    assert result["metrics"] == list(compare.METRICS)
    assert [c["name"] for c in result["configs"]] == CONFIGS
    for c in result["configs"]:
        assert set(c["metrics"]) == set(compare.METRICS)
        assert c["runs_ok"] == SEEDS and c["runs_failed"] == 0
        for key in ("final_val_loss", "best_val_loss", "skipped_steps", "throughput", "peak_rss_mb", "wall_s"):
            assert c["metrics"][key]["n"] == SEEDS, key
        assert c["metrics"]["final_val_accuracy"] is None
        # the aggregate is the mean and sample std of the runs' own summary.json values
        finals = [json.loads((Path(r["run_dir"]) / "summary.json").read_text())["val_loss"] for r in c["runs"]]
        assert c["metrics"]["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert c["metrics"]["final_val_loss"]["std"] == pytest.approx(statistics.stdev(finals))
        assert c["metrics"]["best_val_loss"]["mean"] <= c["metrics"]["final_val_loss"]["mean"] + 1e-12
    spam, adamw = result["configs"]
    assert adamw["metrics"]["clipped_fraction"] is None and adamw["metrics"]["resets"] is None
    assert 0 <= spam["metrics"]["clipped_fraction"]["mean"] <= 1
    assert spam["metrics"]["resets"]["mean"] == 0


def test_plots_are_png(comparison):
    out, _ = comparison
    result = json.loads((out / "comparison.json").read_text())
    names = {Path(p).name for p in result["plots"]}
    assert {"val_loss.png", "train_loss.png", "grad_norm.png"} <= names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diffconfig_names_exactly_the_symbols_that_differ(comparison):
    out, _ = comparison
    # the configs the runs actually used (the trainer's copies), minus what every run sets for itself
    a = parse_config(out / CONFIGS[0] / "seed1" / "config")
    b = parse_config(out / CONFIGS[1] / "seed1" / "config")
    expected = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"OUT_DIR"}
    assert "OPTIM_ADAMW" in expected and "SPAM_THETA" in expected
    result = json.loads((out / "comparison.json").read_text())
    (diff,) = result["diffconfig"]
    assert (diff["base"], diff["config"]) == tuple(CONFIGS)
    named = {re.match(r"^[-+ ](\w+)", line).group(1) for line in diff["diff"].splitlines()}
    assert named == expected
    assert diff["diff"] in (out / "comparison.md").read_text()


def test_rerun_redoes_nothing_and_resumes_what_was_interrupted(comparison):
    """Runs last among the tests of `comparison`: it changes the folder."""
    out, _ = comparison
    runs = [out / n / f"seed{s}" for n in CONFIGS for s in range(1, SEEDS + 1)]
    before = {p: p.stat().st_mtime_ns for r in runs for p in (r / "summary.json", r / "metrics.jsonl")}
    proc = run_compare(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skipped (done)") == len(runs)
    assert ": started" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # Make one run look interrupted after its step-10 checkpoint: only it trains, from step 10.
    run = out / CONFIGS[1] / "seed2"
    (run / "summary.json").unlink()
    (run / "checkpoints" / f"ckpt_{STEPS:09d}.pt").unlink()
    proc = run_compare(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("skipped (done)") == len(runs) - 1
    assert f"{CONFIGS[1]} seed2: started (resuming from checkpoint)" in proc.stdout
    assert "resuming" in (run / "train.log").read_text()
    steps = [r["step"] for r in compare.read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert steps == [10, 20], "the resumed run's metrics.jsonl lost or repeated records"

    # Other settings over the same folders: the trainer refuses the old checkpoint; the
    # comparison reports it with the trainer's own last line, and still writes.
    proc = subprocess.run([PY, "-m", "scripts.compare", CONFIGS[1], "--max-iters", str(STEPS + 10), "--out",
                           str(out), *[a for s in TINY for a in ("--set", s)]], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    result = json.loads((out / "comparison.json").read_text())
    (failed,) = result["configs"][0]["runs"]
    assert failed["status"] == "failed" and "different settings" in failed["error"]
    assert "OUT=<another folder>" in failed["error"]
    assert "different settings" in (out / "comparison.md").read_text()


def test_failed_run_is_reported_and_the_comparison_still_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    stand_in = "import sys; sys.stderr.write('working\\nerror: disk on fire\\n'); sys.exit(3)"
    monkeypatch.setattr(compare, "TRAIN_COMMAND", [PY, "-c", stand_in])
    out = tmp_path / "c"
    rc = compare.main(["gpt2-tiny-adamw", "--out", str(out), "--max-iters", "5", *[a for s in TINY
                                                                                  for a in ("--set", s)]])
    assert rc == 1
    assert "FAILED after" in capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    (run,) = result["configs"][0]["runs"]
    assert (run["status"], run["error"]) == ("failed", "error: disk on fire")
    md = (out / "comparison.md").read_text()
    assert "error: disk on fire" in md and "0/1 (1 failed)" in md
    assert "working" in (out / "gpt2-tiny-adamw" / "seed1" / "train.log").read_text()


def test_bad_names_and_settings_stop_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(compare, "TRAIN_COMMAND", [PY, "-c", "raise SystemExit('must not run')"])
    for argv, message in ((["no-such-preset"], "no defconfig"),
                          (["gpt2-tiny+no-such-fragment"], "no fragment"),
                          (["gpt2-tiny", "gpt2-tiny"], "listed twice"),
                          (["gpt2-tiny", "--set", "NO_SUCH_SYMBOL=1"], "NO_SUCH_SYMBOL")):
        assert compare.main([*argv, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not list((tmp_path).glob("c/*/seed*"))


# ----------------------------------------------------------------------------- metrics on hand-made runs

def write_run(folder: Path, summary: dict, records: list[dict], spikes: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if spikes is not None:
        (folder / "spikes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spikes))
    return folder


def spam_cfg(**kw):
    base = dict(MODEL_GPT2=True, OPTIM_ADAMW_SPAM=True, SPAM_PERIODIC_RESET=True, SPAM_INTERVAL=7)
    return SimpleNamespace(**{**base, **kw})


def test_run_metrics_by_hand(tmp_path):
    records = [
        {"step": 10, "split": "train", "loss": 3.0, "tokens_per_s": 100.0, "spam/clipped_fraction": 0.1},
        {"step": 10, "split": "val", "val_loss": 2.5},
        {"step": 20, "split": "train", "loss": 2.0, "tokens_per_s": 300.0, "spam/clipped_fraction": 0.0},
        {"step": 20, "split": "val", "val_loss": 2.0},
        {"step": 23, "split": "train", "loss": None, "tokens_per_s": 200.0, "spam/clipped_fraction": 0.5},
        {"step": 23, "split": "val", "val_loss": 2.25},
    ]
    summary = {"steps": 23, "total_iters": 23, "val_loss": 2.25, "nonfinite_total": 1, "wall_s": 9.5,
               "peak_rss_mb": 512.0, "spikes": 4}
    m = compare.run_metrics(write_run(tmp_path / "a", summary, records), spam_cfg())
    assert m["final_val_loss"] == 2.25 and m["best_val_loss"] == 2.0
    assert m["final_val_accuracy"] is None and m["best_val_accuracy"] is None
    assert m["clipped_fraction"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert m["resets"] == 3  # steps 7, 14, 21 of 23
    assert m["throughput"] == 200.0  # median of 100, 300, 200
    assert (m["spikes"], m["skipped_steps"], m["wall_s"], m["peak_rss_mb"]) == (4, 1, 9.5, 512.0)

    # AdamW: SPAM columns do not apply; spikes counted from spikes.jsonl (rollbacks are not spikes)
    summary.pop("spikes")
    spikes = [{"step": 5, "event": "spike"}, {"step": 6, "event": "spike"}, {"step": 6, "event": "rollback"}]
    m = compare.run_metrics(write_run(tmp_path / "b", summary, records, spikes),
                            SimpleNamespace(MODEL_GPT2=True, OPTIM_ADAMW_SPAM=False))
    assert (m["clipped_fraction"], m["resets"], m["spikes"]) == (None, None, 2)
    # no monitor output at all: spikes unknown, not zero
    m = compare.run_metrics(write_run(tmp_path / "c", summary, records), spam_cfg(SPAM_PERIODIC_RESET=False))
    assert (m["spikes"], m["resets"]) == (None, 0)


def test_run_metrics_resnet_accuracy(tmp_path):
    records = [{"step": 5, "split": "train", "loss": 1.0, "images_per_s": 50.0},
               {"step": 5, "split": "val", "val_loss": 1.2, "val_accuracy": 0.6},
               {"step": 10, "split": "val", "val_loss": 1.1, "val_accuracy": 0.55}]
    summary = {"steps": 10, "total_iters": 10, "val_loss": 1.1, "val_accuracy": 0.55, "nonfinite_total": 0}
    m = compare.run_metrics(write_run(tmp_path / "r", summary, records),
                            SimpleNamespace(MODEL_GPT2=False, OPTIM_ADAMW_SPAM=False))
    assert (m["final_val_accuracy"], m["best_val_accuracy"]) == (0.55, 0.6)
    assert (m["throughput"], m["throughput_unit"]) == (50.0, "images/s")


def test_aggregate_is_mean_and_sample_std():
    agg = compare.aggregate([1.0, 2.0, None, 4.0])  # a seed without the metric is left out
    mean = (1 + 2 + 4) / 3
    std = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    assert (agg["mean"], agg["n"]) == (pytest.approx(mean), 3) and agg["std"] == pytest.approx(std)
    assert compare.aggregate([3.0])["std"] == 0.0
    assert compare.aggregate([None, float("nan")]) is None
    assert compare.format_cell(compare.aggregate([1.0, 3.0]), "{:.4f}") == "2.0000 ± 1.4142"
    assert compare.format_cell(compare.aggregate([2, 2]), "{:.1f}") == "2"
    assert compare.format_cell(None, "{:.4f}") == "n/a"


def test_curve_band_uses_steps_every_seed_logged():
    runs = [{10: 1.0, 20: 3.0, 30: 5.0}, {10: 3.0, 20: 5.0}]  # the second seed stopped early
    steps, mean, std = mean_std_curve(runs)
    assert steps.tolist() == [10, 20]
    assert mean.tolist() == [2.0, 4.0]
    assert std == pytest.approx([math.sqrt(2), math.sqrt(2)])
    steps, mean, std = mean_std_curve([{1: 2.0, 2: None}])
    assert steps.tolist() == [1, 2] and mean[0] == 2.0 and math.isnan(mean[1]) and std.tolist() == [0, 0]


def test_entry_names_and_error_lines(monkeypatch):
    assert compare.last_error_line("step 3\rerror: boom\n 40%|####  | 4/10 [00:01<00:02,  3.1step/s]\n") \
        == "error: boom"
    assert compare.overrides(50, ["A=1"]) == ["MAX_ITERS=50", "MAX_EPOCHS=0", "A=1"]
    assert compare.overrides(None, []) == []
    monkeypatch.chdir(REPO)
    e = compare.parse_entry("gpt2-tiny+spam-paper+spikes")
    assert e.defconfig == Path("defconfigs/gpt2-tiny")
    assert e.fragments == (Path("defconfigs/fragments/spam-paper.config"), Path("defconfigs/fragments/spikes.config"))
    with pytest.raises(compare.CompareError):
        compare.parse_entry("../etc/passwd")


# ----------------------------------------------------------------------------- every preset round-trips

def kconfig(*args: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "scripts.kconfig", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, KCONFIG_CONFIG=str(config)), timeout=120)


DEFCONFIGS = sorted(p.name for p in (REPO / "defconfigs").iterdir() if p.is_file())
FRAGMENTS = sorted(p.name for p in (REPO / "defconfigs" / "fragments").glob("*.config"))


def test_there_are_presets_and_fragments():
    assert {"gpt2", "gpt2-tiny", "gpt2-tiny-adamw", "resnet18", "resnet50", "resnet-tiny"} <= set(DEFCONFIGS)
    assert {"clip1.config", "spikes.config", "spam-paper.config"} <= set(FRAGMENTS)


@pytest.mark.parametrize("name", DEFCONFIGS)
def test_defconfig_loads_validates_and_round_trips(name, tmp_path):
    src = REPO / "defconfigs" / name
    config = tmp_path / ".config"
    proc = kconfig("defconfig", str(src), config=config)
    assert proc.returncode == 0, proc.stderr
    proc = kconfig("check", str(config), config=config)
    assert proc.returncode == 0, proc.stderr
    proc = kconfig("savedefconfig", str(tmp_path / "min"), config=config)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "min").read_bytes() == src.read_bytes()


# Fragments that choose another optimizer merge onto the AdamW preset (as the spike benchmark does)
ONTO_ADAMW = {"stable-spam.config"}


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_fragment_merges_onto_gpt2_tiny(fragment, tmp_path):
    config = tmp_path / ".config"
    frag = REPO / "defconfigs" / "fragments" / fragment
    base = "gpt2-tiny-adamw" if fragment in ONTO_ADAMW else "gpt2-tiny"
    proc = kconfig("defconfig", str(REPO / "defconfigs" / base), "--fragment", str(frag), config=config)
    assert proc.returncode == 0, proc.stderr
    merged = parse_config(config)
    for key, value in parse_config(frag).items():
        assert merged.get(key) == value, key
