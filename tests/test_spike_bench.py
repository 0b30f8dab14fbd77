"""The spike benchmark (make compare-spikes): its grid, its scenario fragments, and the
figures it derives from finished runs (checked on hand-made run folders)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from scripts import spike_bench as sb
from scripts.runs import parse_entry

REPO = Path(__file__).resolve().parents[1]


def test_grid_covers_every_method_scenario_and_lr(monkeypatch):
    specs = sb.plan(sb.METHODS, list(sb.SCENARIOS), seeds=3, lr_sweep=True)
    main = [s for s in specs if s[3]["lr"] == sb.BASE_LR]
    assert len(main) == len(sb.METHODS) * len(sb.SCENARIOS) * 3 == 120
    lr = [s for s in specs if s[3]["lr"] != sb.BASE_LR]
    assert len(lr) == len(sb.METHODS) * (len(sb.LRS) - 1) and all(s[2] == 1 for s in lr)
    assert float(sb.LRS[-1]) / float(sb.LRS[0]) >= 30  # Wortsman et al.: at least 30x
    # MIN_LR follows the LR down (MIN_LR <= LR is a rule of the configuration)
    assert all(f"MIN_LR={float(s[3]['lr']) / 10:g}" in s[1] for s in lr)
    gates = sb.plan(sb.GATE_METHODS, list(sb.SCENARIOS), seeds=3, lr_sweep=True)
    assert len(gates) == 2 * len(sb.GATE_SCENARIOS) * 3  # no LR sweep, only where the gate matters
    extra = sb.plan(sb.EXTRA_METHODS, list(sb.SCENARIOS), seeds=1, lr_sweep=False)
    monkeypatch.chdir(REPO)
    for name, _, _, _ in specs + gates + extra:  # every configuration names real presets and fragments
        parse_entry(name.split("/")[0])


def test_the_grid_moves_to_the_bpe_model_and_to_another_lr(monkeypatch):
    specs = sb.plan(sb.METHODS, ["none", "data outliers"], seeds=2, lr_sweep=True, preset="gpt2-tiny", lr="3e-3")
    assert len(specs) == len(sb.METHODS) * 2 * 2  # no sweep away from the presets' LR
    assert {name.split("+")[0] for name, *_ in specs} == {"gpt2-tiny", "gpt2-tiny-adamw"}
    assert all("LR=3e-3" in sets and "MIN_LR=0.0003" in sets and what["lr"] == "3e-3"
               for _, sets, _, what in specs)
    monkeypatch.chdir(REPO)
    for name, *_ in specs:
        parse_entry(name)
    assert sb.main(["--preset", "gpt2-tiny", "--only", "nonsense"]) == 2


def test_damage_at_another_lr_is_against_the_clean_run_at_that_lr(tmp_path):
    methods = {"AdamW": sb.METHODS["AdamW"]}
    specs = sb.plan(methods, ["none", "data outliers"], seeds=1, lr_sweep=True, preset="gpt2-tiny", lr="3e-3")
    for name, _, seed, what in specs:
        final = 5.0 if what["scenario"] == "none" else 5.25
        _run(tmp_path / name / f"seed{seed}", final, {600: final}, [{"clip/clipped_total": 0.0}])
    result = sb.summarise(specs, tmp_path, sb.PRESETS["gpt2-tiny"]["init_loss"])
    assert result["table"]["AdamW | data outliers"]["damage"][0] == pytest.approx(0.25)
    assert result["lr"] == {}
    text = sb.markdown(result, list(methods), ["none", "data outliers"], 1, 60.0, "gpt2-tiny", "3e-3")
    assert "peak LR 3e-3" in text and "nats per token" in text
    # --report-only renders the same tables from the finished runs, training nothing
    assert sb.main(["--report-only", "--only", "AdamW", "--preset", "gpt2-tiny", "--lr", "3e-3", "--seeds", "1",
                    "--scenarios", "data outliers", "--out", str(tmp_path)]) == 0
    written = (tmp_path / "spike-benchmark.md").read_text()
    assert "| AdamW | +0.250 |" in written and "min)" not in written


def test_spikes_land_inside_the_run_after_the_grace_period_and_inside_one_gate_window():
    for fragment in ("spikes", "spikes-rows", "spikes-layer", "outliers"):
        text = (REPO / "defconfigs" / "fragments" / f"{fragment}.config").read_text()
        steps = [int(s) for s in re.search(r'_STEPS="([^"]*)"', text).group(1).split(",")]
        assert all(20 < s <= sb.STEPS for s in steps)
        # two spikes closer than the z-gate's window (SPAM_ZSCORE_WINDOW = 100): the blind-gate case
        assert any(0 < b - a < 100 for a, b in zip(steps, steps[1:]))


def _run(folder: Path, final: float, curve: dict, train: list[dict], spikes: int | None = None):
    folder.mkdir(parents=True)
    summary = {"val_loss": final, "steps": sb.STEPS, "wall_s": 1.0}
    if spikes is not None:
        summary["spikes"] = spikes
    (folder / "summary.json").write_text(json.dumps(summary))
    records = [{"split": "val", "step": s, "val_loss": v} for s, v in curve.items()]
    records += [{"split": "train", "step": i + 1, **r} for i, r in enumerate(train)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_damage_counts_and_lr_sensitivity_from_hand_made_runs(tmp_path):
    methods = {"AdamW + clip 1.0": sb.METHODS["AdamW + clip 1.0"], "SPAM (seed)": sb.METHODS["SPAM (seed)"]}
    specs = sb.plan(methods, ["none", "uniform x1000"], seeds=2, lr_sweep=True)
    clip = [{"clip/clipped_total": 0.0}, {"clip/clipped_total": 3.0}]
    spam = [{"spam/clipped_count": 0.0, "spam/clipped_fraction/embedding": 0.2},
            {"spam/clipped_count": 5.0, "spam/clipped_fraction/embedding": 0.4},
            {"spam/clipped_count": 2.0, "spam/clipped_fraction/embedding": 0.0}]
    finals = {("AdamW + clip 1.0", "none", 1): 1.0, ("AdamW + clip 1.0", "none", 2): 1.2,
              ("AdamW + clip 1.0", "uniform x1000", 1): 1.5, ("AdamW + clip 1.0", "uniform x1000", 2): 1.3,
              ("SPAM (seed)", "none", 1): 2.0, ("SPAM (seed)", "none", 2): 2.0,
              ("SPAM (seed)", "uniform x1000", 1): 2.5, ("SPAM (seed)", "uniform x1000", 2): 2.5}
    lr_losses = {"3e-4": 1.4, "3e-3": 0.9, "5e-3": 1.1, "1e-2": 99.0}  # the last one diverged
    for name, _, seed, what in specs:
        train = clip if what["method"].startswith("AdamW") else spam
        if what["lr"] == sb.BASE_LR:
            final = finals[(what["method"], what["scenario"], seed)]
        else:
            final = lr_losses[what["lr"]]
        _run(tmp_path / name / f"seed{seed}", final, {50: final + 1, 600: final}, train, spikes=seed)
    result = sb.summarise(specs, tmp_path)
    t = result["table"]
    mean, std, n = t["AdamW + clip 1.0 | uniform x1000"]["damage"]
    assert n == 2 and mean == pytest.approx(0.3) and std == pytest.approx(math.sqrt(0.08))  # +0.5, +0.1
    assert t["SPAM (seed) | uniform x1000"]["damage"][:2] == pytest.approx((0.5, 0.0))
    assert t["AdamW + clip 1.0 | none"]["acted"][0] == 3.0  # the last clipped_total
    assert t["SPAM (seed) | none"]["acted"][0] == 2  # steps with a clipped element
    assert t["SPAM (seed) | none"]["clipped_by_class"]["embedding"] == pytest.approx(0.2)
    assert t["SPAM (seed) | none"]["spikes"][0] == 1.5  # seeds 1 and 2 saw 1 and 2
    # LR sensitivity of clip: losses at 3e-4, 1e-3 (seed 1: 1.0), 3e-3, 5e-3, 1e-2 (capped at ln 257)
    capped = [1.4, 1.0, 0.9, 1.1, math.log(257)]
    assert result["sensitivity"]["AdamW + clip 1.0"] == pytest.approx(sum(capped) / 5 - 0.9)
    text = sb.markdown(result, list(methods), ["none", "uniform x1000"], 2, 60.0)
    assert "| AdamW + clip 1.0 | +0.300 ± 0.283 |" in text
    assert len(sb.plots(result, list(methods), ["none", "uniform x1000"], tmp_path)) == 3


def test_unknown_method_is_one_line(capsys):
    assert sb.main(["--only", "Adam"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method or scenario 'Adam'") and err.count("\n") == 1
