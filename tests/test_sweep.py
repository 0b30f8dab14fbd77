"""`make sweep` (scripts/sweep.py): parsing of lists and ranges (hand-computed), validation
before any training, and one tiny real sweep that writes its report and plots."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import compare, sweep
from scripts.kconfig.strict import ConfigError, open_kconfig

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def kconf():
    return open_kconfig(str(REPO))


def values(kconf, spec: str) -> list[str]:
    (axis,) = sweep.parse_axes([spec], kconf)
    return list(axis.values)


def test_lists_keep_their_spelling_and_drop_repeats(kconf):
    assert values(kconf, "LR=3e-4,1e-3,3e-3") == ["3e-4", "1e-3", "3e-3"]
    assert values(kconf, "SPAM_ENABLE_CLIP=y,n,y") == ["y", "n"]
    axes = sweep.parse_axes(["LR=3e-4,1e-3 SPAM_THETA=50,5000"], kconf)  # one argument, two symbols
    assert [a.symbol for a in axes] == ["LR", "SPAM_THETA"]


def test_float_range_spanning_decades_is_log_spaced(kconf):
    # 10^-4, 10^-3.5, 10^-3, 10^-2.5, 10^-2 ; 10^-3.5 = 0.000316227766...
    assert values(kconf, "LR=1e-4:1e-2:5") == ["0.0001", "0.000316228", "0.001", "0.00316228", "0.01"]
    # 50 .. 5000 in 3: 50, 500, 5000 (two decades)
    assert values(kconf, "SPAM_THETA=50:5000:3") == ["50", "500", "5000"]


def test_float_range_within_a_decade_is_linear(kconf):
    # 0.9 + k * 0.03
    assert values(kconf, "BETA2=0.9:0.99:4") == ["0.9", "0.93", "0.96", "0.99"]
    # 1e-3 .. 5e-3 spans less than a decade: 1, 2, 3, 4, 5 (x 1e-3)
    assert values(kconf, "LR=1e-3:5e-3:5") == ["0.001", "0.002", "0.003", "0.004", "0.005"]
    assert values(kconf, "LR=1e-3:1e-3:1") == ["0.001"]


def test_int_range_is_linear_rounded_and_deduplicated(kconf):
    assert values(kconf, "SPAM_INTERVAL=100:400:4") == ["100", "200", "300", "400"]
    # 1, 1.5, 2, 2.5, 3 -> rounded half up 1, 2, 2, 3, 3 -> 1, 2, 3
    assert values(kconf, "SPAM_INTERVAL=1:3:5") == ["1", "2", "3"]
    # an int range is linear even across decades: 10, 505, 1000
    assert values(kconf, "SPAM_INTERVAL=10:1000:3") == ["10", "505", "1000"]


def test_cartesian_product_first_axis_slowest(kconf):
    axes = sweep.parse_axes(["LR=1e-3,2e-3", "SPAM_THETA=50,5000"], kconf)
    assert sweep.combinations(axes) == [("LR=1e-3", "SPAM_THETA=50"), ("LR=1e-3", "SPAM_THETA=5000"),
                                        ("LR=2e-3", "SPAM_THETA=50"), ("LR=2e-3", "SPAM_THETA=5000")]
    assert sweep.label_of(("LR=1e-3", "SPAM_THETA=50")) == "LR=1e-3,SPAM_THETA=50"


@pytest.mark.parametrize("spec, message", [
    ("LR=3e-4,30", "SWEEP: LR: 30 is out of range (valid: a decimal number in (0, 10])"),
    ("LRR=1e-3", "SWEEP: LRR: unknown symbol"),
    ("SPAM_INTERVAL=10:20:0", "SWEEP: SPAM_INTERVAL: '0' is not a count"),
    ("LR=1e-4:x:3", "SWEEP: LR: 'x' is not a number"),
    ("LR=1e-3,,2e-3", "SWEEP: LR: '1e-3,,2e-3' has an empty value"),
    ("MIN_LR=1e-3", "SWEEP: MIN_LR: MIN_LR=0.001 is above LR=0.0001 (with MIN_LR=1e-3)"),
])
def test_bad_values_are_refused_with_one_line(kconf, spec, message):
    sets = ["LR=1e-4"] if spec.startswith("MIN_LR") else []
    with pytest.raises(ConfigError) as e:
        sweep.validate(kconf, "gpt2-tiny", sweep.parse_axes([spec], kconf), sets)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_a_typo_stops_the_sweep_before_anything_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(compare, "TRAIN_COMMAND", [PY, "-c", "raise SystemExit('must not run')"])
    out = tmp_path / "s"
    assert sweep.main(["gpt2-tiny", "LR=3e-4,1e-3", "SPAM_THETA=50,5e13", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: SWEEP: SPAM_THETA: 5e13 is out of range (valid: a decimal number in (0, 1e12])"
    assert not out.exists()  # nothing configured, nothing trained
    assert sweep.main(["no-such-preset", "LR=1e-3", "--out", str(out)]) == 2
    assert "no defconfig" in capsys.readouterr().err


# TINY_GPT-sized (tests/trainutil.py), fewer layers: a run is a few seconds on one thread
TINY = ["GPT2_CUSTOM=y", "GPT2_N_LAYER=1", "GPT2_N_HEAD=2", "GPT2_N_EMBD=32", "GPT2_BLOCK_SIZE=32",
        "BATCH_SIZE=4", "EVAL_BATCHES=2", "EVAL_INTERVAL=1000", "LOG_INTERVAL=2", "CKPT_INTERVAL=0",
        "LR_WARMUP_ITERS=1", "TENSORBOARD=n", "SAMPLE_TOKENS=4", "DEVICE_CPU=y"]


def test_tiny_real_sweep_writes_report_plots_and_best(tmp_path):
    out = tmp_path / "sweep"
    argv = [PY, "-m", "scripts.sweep", "gpt2-tiny-adamw", "LR=1e-4:1e-2:2", "--max-iters", "4",
            "--jobs", "2", "--out", str(out), *[a for s in TINY for a in ("--set", s)]]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = ["LR=0.0001", "LR=0.01"]  # 1e-4:1e-2:2 spans two decades: log-spaced ends
    for label in labels:
        summary = json.loads((out / "gpt2-tiny-adamw" / label / "seed1" / "summary.json").read_text())
        assert summary["steps"] == 4
        assert f"LR: float = {float(label[3:])!r}" in (out / "gpt2-tiny-adamw" / label / "seed1"
                                                          / "settings.py").read_text()
    result = json.loads((out / "sweep.json").read_text())
    losses = {r["values"]["LR"]: r["final_val_loss"]["mean"] for r in result["rows"]}
    assert set(losses) == {"0.0001", "0.01"} and all(math.isfinite(v) for v in losses.values())
    best = min(losses, key=losses.get)
    assert result["best"]["assignments"] == [f"LR={best}"]
    md = (out / "sweep.md").read_text()
    assert f"**Best setting: `LR={best}`**" in md and "![sweep_LR](sweep_LR.png)" in md
    assert (out / "sweep_LR.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison.md").is_file()
    assert f"best setting: LR={best}" in proc.stdout
