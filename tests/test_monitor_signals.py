"""The spike guard's signals (GSS, loss mean + k sigma), what spikes.jsonl learns about a spike,
the per-class element-wise GSS, and the monitor's strict settings."""

import ast
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models import GPT, GPTConfig
from monitor import metrics as M
from monitor.loss_spike import LossSpikeWindow
from monitor.monitor import HealthMonitor
from monitor.param_classes import parameter_classes
from monitor_settings import REPO, monitor_cfg, settings_from
from scripts.kconfig.settings import Settings
from scripts.kconfig.strict import ConfigError

VOCAB, T = 30, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=T, vocab_size=VOCAB))


def batch(seed):
    data = torch.randint(0, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


# ------------------------------------------------------------ loss window


def loss_rule_reference(history, loss, window, sigma):
    """Plain rule: spike when the last `window` finite losses exist and loss > mean + sigma * stdev."""
    finite = [v for v in history if math.isfinite(v)]
    if len(finite) < window or not math.isfinite(loss):
        return False
    recent = finite[-window:]
    return loss > statistics.fmean(recent) + sigma * statistics.stdev(recent)


def test_loss_window_matches_a_plain_reference_and_keeps_non_finite_losses_out():
    window, sigma = 5, 2.0
    seq = [2.0, 2.1, 1.9, float("nan"), 2.05, 1.95, 2.02, float("inf"), 9.0, 2.0, 2.01, float("-inf"), 1.99, 2.6]
    w = LossSpikeWindow(window, sigma)
    recorded = []
    for loss in seq:
        spike, threshold = w.check(torch.tensor(loss))
        assert bool(spike) == loss_rule_reference(recorded, loss, window, sigma), (loss, recorded)
        if bool(spike):
            continue  # the monitor keeps a loss spike out of the window that judges it
        w.record(torch.tensor(loss))
        recorded.append(loss)
    kept = [v for v in recorded if math.isfinite(v)][-window:]
    assert sorted(w.values.tolist()) == pytest.approx(sorted(kept))  # no NaN/inf ever entered
    assert int(w.count) == len([v for v in recorded if math.isfinite(v)])
    # hand-computed: window [1.95, 2.02, 2.0, 2.01, 1.99] -> mean 1.994, stdev 0.02702; 2.6 > 2.048
    assert bool(w.check(torch.tensor(2.6))[0])
    assert float(w.check(torch.tensor(2.0))[1]) == pytest.approx(1.994 + 2 * 0.0270185, rel=1e-4)


def test_loss_window_is_blind_until_full_and_refuses_bad_parameters():
    w = LossSpikeWindow(3, 1.0)
    for loss in (1.0, 1.0):
        w.record(torch.tensor(loss))
    assert not bool(w.check(torch.tensor(100.0))[0])
    w.record(torch.tensor(1.5))
    assert bool(w.check(torch.tensor(100.0))[0])
    with pytest.raises(ValueError, match="window"):
        LossSpikeWindow(1, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        LossSpikeWindow(4, 0.0)


def test_gss_baseline_never_takes_a_non_finite_norm():
    s = M.GradSpikeScore(beta=0.5)
    s.update(torch.tensor([float("nan"), 2.0]), torch.tensor(float("inf")))
    assert s.seen.tolist() == [False, True] and not bool(s.seen_global)
    gss, glob = s.update(torch.tensor([4.0, 4.0]), torch.tensor(10.0))
    assert gss.tolist() == [1.0, 2.0] and glob.item() == 1.0  # unseeded entries score 1, then seed
    s.update(torch.tensor([float("inf"), float("nan")]), torch.tensor(float("nan")))
    assert s.ema.tolist() == [4.0, 3.0] and s.ema_global.item() == 10.0  # unchanged by the bad step


# ------------------------------------------------------- guard in the monitor


def drive(mon, model, opt, step, scale=1.0, loss=None):
    x, y = batch(3)
    out = model(x, y)[1] * scale
    out.backward()
    decision = mon.before_step(step, loss=out.detach() if loss is None else loss)
    if decision.action != "skip":
        opt.step()
    opt.zero_grad(set_to_none=True)
    return decision


def test_loss_signal_fires_on_a_loss_spike_and_the_record_names_signal_and_tensors():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = monitor_cfg(MONITOR_SPIKE_GUARD=True, MONITOR_GUARD_SIGNAL_BOTH=True, MONITOR_LOSS_SPIKE_WINDOW=4,
                      MONITOR_LOSS_SPIKE_SIGMA="3.0", MONITOR_SPIKE_TAU="5.0")
    mon = HealthMonitor(cfg, model, opt)
    base = [3.40, 3.41, 3.39, 3.405]
    for step, value in enumerate(base, 1):
        assert not drive(mon, model, opt, step, loss=torch.tensor(value)).spike
    d = drive(mon, model, opt, 5, loss=torch.tensor(float("nan")))  # a NaN loss is no spike...
    assert not d.spike
    d = drive(mon, model, opt, 6, loss=torch.tensor(3.5))  # ...and did not enter the window
    assert d.spike and d.signals == ("loss",)
    assert mon.last_spike["signals"] == ["loss"] and mon.last_spike["loss"] == pytest.approx(3.5)
    mean, std = statistics.fmean(base), statistics.stdev(base)
    assert mon.last_spike["loss_threshold"] == pytest.approx(mean + 3 * std, rel=1e-5)

    # a localized gradient spike with an ordinary loss: two tensors carry it, 50x and 20x
    x, y = batch(3)
    model(x, y)[1].backward()
    params = dict(model.named_parameters())
    params["transformer.h.1.mlp.c_fc.weight"].grad.mul_(50.0)
    params["transformer.h.0.attn.c_proj.weight"].grad.mul_(20.0)
    d = mon.before_step(7, loss=torch.tensor(3.4))
    assert d.signals == ("gss",)
    tensors = mon.last_spike["tensors"]
    assert [t["param"] for t in tensors[:2]] == ["transformer.h.1.mlp.c_fc.weight",
                                                 "transformer.h.0.attn.c_proj.weight"]
    assert [t["gss"] for t in tensors[:2]] == pytest.approx([50.0, 20.0], rel=1e-3)  # same batch: EMA = norm
    assert tensors[2]["gss"] == pytest.approx(1.0, rel=1e-3) and len(tensors) == 3
    assert tensors[0]["grad_norm"] == pytest.approx(params["transformer.h.1.mlp.c_fc.weight"].grad.norm().item())


def test_gss_only_guard_ignores_the_loss_and_loss_only_guard_needs_it():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gss_only = HealthMonitor(monitor_cfg(MONITOR_SPIKE_GUARD=True), model, opt)
    assert gss_only.loss_window is None and gss_only.guard.signals == ("gss",)
    loss_only = HealthMonitor(monitor_cfg(MONITOR_SPIKE_GUARD=True, MONITOR_GUARD_SIGNAL_LOSS=True), model, opt)
    assert loss_only.guard.signals == ("loss",) and loss_only.loss_window.window == 128
    x, y = batch(1)
    model(x, y)[1].backward()
    with pytest.raises(ValueError, match="loss=step_loss"):
        loss_only.before_step(1)


# ----------------------------------------------------- element-wise GSS


def test_parameter_classes_of_gpt2_with_its_tied_head_and_of_a_classifier():
    classes = parameter_classes(make_model())
    assert classes["transformer.wte.weight"] == "embedding"  # also lm_head.weight (tied)
    assert "lm_head.weight" not in classes
    assert classes["transformer.wpe.weight"] == "embedding"
    assert classes["transformer.h.0.attn.c_attn.weight"] == "attention"
    assert classes["transformer.h.1.mlp.c_fc.bias"] == "mlp"
    assert classes["transformer.ln_f.weight"] == "other"
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 2, 3))
    net.add_module("fc", nn.Linear(2, 3))
    assert parameter_classes(net) == {"conv.weight": "other", "conv.bias": "other", "fc.weight": "head",
                                      "fc.bias": "head"}


def test_upper_quantile_is_the_ceil_n_over_1000_th_largest():
    values = torch.arange(2500, dtype=torch.float32)[torch.randperm(2500, generator=torch.Generator().manual_seed(0))]
    assert M.upper_quantile(values).item() == 2497.0  # 3 values (ceil(2.5)) are >= it
    assert M.upper_quantile(torch.tensor([4.0, 1.0])).item() == 4.0  # n < 1000: the maximum
    parts = [values[:7].reshape(7, 1), values[7:1500], values[1500:]]  # one part smaller than m = 3
    assert M.upper_quantile_of_parts(parts).item() == 2497.0


def test_elementwise_gss_per_class_matches_a_plain_loop():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = HealthMonitor(monitor_cfg(GSS_ELEMENTWISE_INTERVAL=2), model, opt)
    classes = parameter_classes(model)
    for step in (1, 2):
        x, y = batch(step)
        model(x, y)[1].backward()
        if step == 2:  # reference from AdamW's state before this step: a loop over elements
            ratios = {}
            for name, p in model.named_parameters():
                st = opt.state[p]
                bc = 1 - 0.999 ** float(st["step"])
                for g, v in zip(p.grad.reshape(-1).tolist(), st["exp_avg_sq"].reshape(-1).tolist()):
                    ratios.setdefault(classes[name], []).append(abs(g) / (math.sqrt(v / bc) + 1e-8))
        mon.before_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    got = mon.metrics()
    assert set(ratios) == {"embedding", "attention", "mlp", "other"}
    for cls, values in ratios.items():
        ordered = sorted(values, reverse=True)
        assert got[f"gss_elem/{cls}/max"] == pytest.approx(ordered[0], rel=1e-4)
        assert got[f"gss_elem/{cls}/p999"] == pytest.approx(ordered[math.ceil(len(values) / 1000) - 1], rel=1e-4)
    assert got["gss/elementwise_max"] == pytest.approx(max(max(v) for v in ratios.values()), rel=1e-4)


# ------------------------------------------------------- strict settings


def test_a_missing_monitor_symbol_fails_loudly():
    full = monitor_cfg(GSNR_INTERVAL=1).as_dict()
    for missing in ("MONITOR_GSNR_INTERVAL", "GRAD_ACCUM_STEPS", "MONITOR_GSS_EMA_BETA", "MONITOR_SPIKE_GUARD"):
        cfg = Settings({k: v for k, v in full.items() if k != missing})
        with pytest.raises(AttributeError, match=missing):
            HealthMonitor(cfg, make_model(), None)


def test_the_monitor_has_no_silent_setting_defaults():
    """No getattr(cfg, NAME, default) and no helper with a default anywhere in the monitor."""
    files = sorted((REPO / "monitor").glob("*.py")) + [REPO / "train" / "monitor_hooks.py"]
    found = []
    for path in files:
        text = path.read_text()
        assert "_setting(" not in text, path
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "cfg"
                    and len(node.args) > 2):
                found.append(f"{Path(path).name}:{node.lineno}")
    assert not found, found


@pytest.mark.parametrize("assignment, problem", [
    ({"MONITOR_LOSS_SPIKE_WINDOW": 1}, "out of range"),
    ({"MONITOR_LOSS_SPIKE_WINDOW": 100001}, "out of range"),
    ({"MONITOR_LOSS_SPIKE_SIGMA": "0"}, "out of range"),
    ({"MONITOR_LOSS_SPIKE_SIGMA": "1001"}, "out of range"),
    ({"MONITOR_LOSS_SPIKE_SIGMA": "nan"}, "not a finite number"),
])
def test_bad_loss_spike_settings_are_refused(assignment, problem):
    symbol = next(iter(assignment))
    with pytest.raises(ConfigError, match=f"{symbol}: .*{problem}"):
        settings_from(MONITOR_SPIKE_GUARD=True, MONITOR_GUARD_SIGNAL_LOSS=True, **assignment)
    with pytest.raises(ConfigError, match="depends on"):  # the GSS signal has no loss window
        settings_from(MONITOR_SPIKE_GUARD=True, MONITOR_LOSS_SPIKE_WINDOW=64)


def test_the_example_gsnr_refuses_a_one_sequence_probe():
    with pytest.raises(ValueError, match="MONITOR_PROBE_BATCH >= 2"):
        HealthMonitor(monitor_cfg(GSNR_INTERVAL=100, MONITOR_PROBE_BATCH=1), make_model(), None)
    HealthMonitor(monitor_cfg(GSNR_INTERVAL=100, MONITOR_PROBE_BATCH=1, GRAD_ACCUM_STEPS=2), make_model(), None)
