"""`make check-presets` (scripts/check_presets.py): the one-sided comparison by hand, and a
real gate on a tiny GPT-2 baseline that passes on this code and fails when the preset is
made worse on purpose (LR x 10000), naming the baseline, the step and both values."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


from scripts import check_presets as gate

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_verdict_is_one_sided_with_a_relative_tolerance():
    # baseline 10.0, tolerance 2%: worse above 10.2, better below 9.8
    assert gate.verdict(10.0, 10.19, 0.02) == "ok"
    assert gate.verdict(10.0, 10.21, 0.02) == "worse"
    assert gate.verdict(10.0, 9.81, 0.02) == "ok"
    assert gate.verdict(10.0, 9.79, 0.02) == "better"
    assert gate.verdict(10.0, float("nan"), 0.02) == "worse"
    assert gate.verdict(10.0, None, 0.02) == "missing"
    assert gate.verdict(2.0, 2.0, 0.0) == "ok"


def test_compare_run_checks_every_logged_step_and_the_final_val_loss(tmp_path):
    b = gate.Baseline("x", tmp_path / "x.json", "gpt2-tiny", [], 1, 0.02, {2: 10.0, 4: 9.0}, 8.0)
    findings = gate.compare_run(b, {2: 10.0, 4: 9.5}, 7.0)
    assert [(f.what, f.verdict) for f in findings] == [
        ("step 2 training loss", "ok"), ("step 4 training loss", "worse"), ("final val loss", "better")]
    assert findings[1].line(0.02) == "x: step 4 training loss: 9.5000 vs baseline 9.0000 (+5.56%, tolerance 2%, worse)"
    missing = gate.compare_run(b, {2: 10.0}, None)
    assert [f.verdict for f in missing] == ["ok", "missing", "missing"]


def test_malformed_and_missing_baselines_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert gate.main(["--baselines", str(tmp_path), "bad"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'bad.json'}: not JSON")
    assert gate.main(["--baselines", str(tmp_path), "nothing-here"]) == 2
    assert "no such baseline" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"overrides": []}')
    assert gate.main(["--baselines", str(tmp_path), "bad"]) == 2
    assert "malformed baseline" in capsys.readouterr().err


TINY = ["GPT2_CUSTOM=y", "GPT2_N_LAYER=1", "GPT2_N_HEAD=2", "GPT2_N_EMBD=32", "GPT2_BLOCK_SIZE=32",
        "BATCH_SIZE=4", "EVAL_BATCHES=2", "LR_WARMUP_ITERS=1", "SAMPLE_TOKENS=1", "MAX_ITERS=6",
        "EVAL_INTERVAL=6"]


def run_gate(*args: str, summary: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if summary is not None:
        import os
        env = dict(os.environ, GITHUB_STEP_SUMMARY=str(summary))
    return subprocess.run([PY, "-m", "scripts.check_presets", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_gate_passes_on_this_code_and_fails_a_preset_made_worse(tmp_path):
    baselines, out = tmp_path / "baselines", tmp_path / "runs"
    proc = run_gate("--update", "gpt2-tiny", "--baselines", str(baselines), "--out", str(out),
                    *[a for s in TINY for a in ("--set", s)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recorded = json.loads((baselines / "gpt2-tiny.json").read_text())
    assert recorded["preset"] == "gpt2-tiny" and recorded["seed"] == 1
    assert "MAX_ITERS=6" in recorded["overrides"] and "DEVICE_CPU=y" in recorded["overrides"]
    assert sorted(map(int, recorded["loss"])) == [2, 4, 6]  # LOG_INTERVAL=2 of the default short run

    # The same preset with LR x 10000 (gpt2-tiny has LR=1e-3): a second baseline holding the
    # good numbers, whose run is made worse on purpose. (x 100 is not worse in 6 steps of a
    # model this small: it learns faster before it diverges, and the gate says "better".)
    worse = dict(recorded, overrides=[*recorded["overrides"], "LR=10"])
    (baselines / "gpt2-tiny-lr-x10000.json").write_text(json.dumps(worse))
    summary = tmp_path / "summary.md"
    proc = run_gate("--baselines", str(baselines), "--out", str(out), "--jobs", "2", summary=summary)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "check-presets: gpt2-tiny: passed" in proc.stdout
    failures = [line for line in proc.stderr.splitlines() if line.startswith("check-presets: FAILED")]
    assert failures and all("gpt2-tiny-lr-x10000: " in line for line in failures)
    m = re.search(r"gpt2-tiny-lr-x10000: step (\d+) training loss: ([\d.]+) vs baseline ([\d.]+) \(\+[\d.]+%, "
                  r"tolerance 2%, worse\)", proc.stderr)
    assert m, proc.stderr
    assert float(m.group(2)) > float(m.group(3)) * 1.02
    assert abs(float(m.group(3)) - recorded["loss"][m.group(1)]) < 1e-4
    table = summary.read_text()
    assert "| `gpt2-tiny` | `gpt2-tiny` | passed |" in table
    assert "| `gpt2-tiny-lr-x10000` | `gpt2-tiny` | **worse**" in table


def test_the_repository_baselines_load_and_name_real_presets():
    paths = sorted((REPO / "baselines").glob("*.json"))
    assert paths, "no baselines in baselines/"
    for path in paths:
        b = gate.load_baseline(path)
        assert (REPO / "defconfigs" / b.preset.split("+")[0]).is_file()
        assert b.loss and b.final_val_loss is not None and b.name == b.preset
        assert any(s.startswith("MAX_ITERS=") for s in b.overrides) and "DEVICE_CPU=y" in b.overrides
