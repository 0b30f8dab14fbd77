"""Tests for the benchmark harness (scripts/benchlib.py) and the pure helpers of
scripts/bench.py. Nothing here is timed: clocks are fakes driven by the calls."""

import json

import pytest
import torch

from scripts import bench, benchlib
from scripts.benchlib import Pending, Section, Skipped, row, time_interleaved


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class FakeClock:
    """A clock that only moves when a fake workload says how long it took."""

    def __init__(self):
        self.now = 0.0
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.now

    def workload(self, durations, log=None, name=None):
        durations = iter(durations)

        def run():
            if log is not None:
                log.append(name)
            self.now += next(durations)
        return run


# ------------------------------------------------------------- interleaving

def test_interleaving_alternates_which_side_goes_first():
    log = []
    clock = FakeClock()
    fa = clock.workload([1.0] * 10, log, "a")
    fb = clock.workload([1.0] * 10, log, "b")
    time_interleaved(fa, fb, repeats=4, warmup=1, timer=clock)
    assert log == ["a", "b",  # warm-up pair, not timed
                   "a", "b", "b", "a", "a", "b", "b", "a"]


def test_medians_and_ratio_from_fake_timer():
    clock = FakeClock()
    # warm-up costs are distinct so that a warm-up sample leaking in would show
    fa = clock.workload([100.0, 1.0, 2.0, 3.0])
    fb = clock.workload([100.0, 2.0, 6.0, 3.0])
    t = time_interleaved(fa, fb, repeats=3, warmup=1, timer=clock)
    assert t.a == [1.0, 2.0, 3.0]
    assert t.b == [2.0, 6.0, 3.0]
    assert t.a_median == 2.0 and t.b_median == 3.0
    # paired ratios 2/1, 6/2, 3/3 -> median 2; medians' ratio 3/2
    assert t.ratio == pytest.approx(2.0)
    assert t.ratio_of_medians == pytest.approx(1.5)
    # sorted ratios 1, 2, 3: inclusive quartiles halfway between neighbours
    assert t.ratio_quartiles == pytest.approx((1.5, 2.5))
    d = t.as_dict()
    assert d["ratio"] == pytest.approx(2.0) and d["a_s"] == [1.0, 2.0, 3.0]


def test_number_averages_back_to_back_calls():
    clock = FakeClock()
    fa = clock.workload([1.0, 3.0, 5.0, 7.0])
    fb = clock.workload([2.0, 2.0, 4.0, 4.0])
    t = time_interleaved(fa, fb, repeats=2, warmup=0, number=2, timer=clock)
    assert t.a == [2.0, 6.0]  # (1+3)/2, (5+7)/2
    assert t.b == [2.0, 4.0]


def test_sync_runs_before_every_clock_read():
    clock = FakeClock()
    events = []
    fa = clock.workload([1.0] * 3)
    fb = clock.workload([1.0] * 3)

    def timer():
        events.append("read")
        return clock()

    time_interleaved(fa, fb, repeats=3, warmup=0, timer=timer, sync=lambda: events.append("sync"))
    assert events == ["sync", "read"] * 12  # start and stop of 6 samples


def test_odd_repetition_pairs_are_still_paired_by_index():
    # on B-first repetitions the pair is (a[i], b[i]) all the same
    clock = FakeClock()
    fa = clock.workload([1.0, 1.0])
    fb = clock.workload([3.0, 5.0])
    t = time_interleaved(fa, fb, repeats=2, warmup=0, timer=clock)
    assert t.b == [3.0, 5.0] and t.ratio == pytest.approx(4.0)


@pytest.mark.parametrize("kw", [dict(repeats=0), dict(repeats=1, number=0), dict(repeats=1, warmup=-1)])
def test_interleaving_rejects_bad_counts(kw):
    with pytest.raises(ValueError):
        time_interleaved(lambda: None, lambda: None, **kw)


def test_time_repeated_returns_one_sample_per_repetition():
    clock = FakeClock()
    f = clock.workload([9.0, 1.0, 2.0, 4.0])
    assert benchlib.time_repeated(f, repeats=3, warmup=1, timer=clock) == [1.0, 2.0, 4.0]


# ----------------------------------------------------------------- rows/table

def test_row_checks_target():
    r = row("step ratio", 1.05, "×", ("<=", 1.10), "x")
    assert r == {"figure": "step ratio", "value": 1.05, "unit": "×", "target": "≤ 1.1×", "ok": True,
                 "detail": "x"}
    assert row("f", 1.2, "×", ("<=", 1.10))["ok"] is False
    assert row("f", 2.0, "s", ("<", 2.0))["ok"] is False
    assert row("f", 2.0, "s", ("<", 2.0))["target"] == "< 2 s"
    assert row("f", 0.5, "", (">=", 0.5))["ok"] is True
    assert row("f", None, "×", ("<=", 1.1))["ok"] is None
    assert row("f", float("nan"), "×", ("<=", 1.1))["ok"] is None
    assert row("f", 3.0)["ok"] is None and row("f", 3.0)["target"] == ""


@pytest.mark.parametrize("value, unit, text", [
    (1.0432, "×", "1.043×"), (1.0004, "×", "1.000×"), (1.04, "%", "1.04%"), (123.4, "ms", "123 ms"), (12.5, "%", "12.5%"), (123456.7, "tokens/s", "123,457 tokens/s"),
    (0.0123, "s", "0.0123 s"), (None, "×", "—"), (7, "", "7"), (float("nan"), "", "nan"),
])
def test_format_value(value, unit, text):
    assert benchlib.format_value(value, unit) == text


def test_format_table():
    rows = [row("a|b", 1.01, "×", ("<=", 1.1), "fine"),
            row("c", 1.5, "×", ("<=", 1.1), "slow"),
            row("gpu", None, detail="skipped: no CUDA device")]
    lines = benchlib.format_table(rows).splitlines()
    assert lines[0] == "| Figure | Value | Target | OK | Detail |"
    assert lines[1].startswith("|---")
    assert lines[2] == "| a\\|b | 1.010× | ≤ 1.1× | yes | fine |"
    assert lines[3] == "| c | 1.500× | ≤ 1.1× | **no** | slow |"
    assert lines[4] == "| gpu | — |  |  | skipped: no CUDA device |"
    assert len(lines) == 5


# ----------------------------------------------------------------- sections

def _registry(calls):
    def make(name, rows=None, exc=None):
        def fn(ctx):
            calls.append((name, ctx.quick, ctx.repeats))
            if exc is not None:
                raise exc
            return rows if rows is not None else [row(name, 1.0, "×", ("<=", 2.0))]
        return fn
    return {
        "alpha": Section("alpha", "Alpha", make("alpha")),
        "beta": Section("beta", "Beta", make("beta")),
        "gpu": Section("gpu", "GPU thing", make("gpu"), needs_cuda=True),
        "waits": Section("waits", "Needs optim", make("waits", exc=Pending("optim not there"))),
        "breaks": Section("breaks", "Broken", make("breaks", exc=RuntimeError("boom"))),
    }


def test_select_sections():
    reg = _registry([])
    assert [s.name for s in benchlib.select_sections(None, reg)] == list(reg)
    assert [s.name for s in benchlib.select_sections([], reg)] == list(reg)
    # registration order, whatever the order asked for; commas and repeats both work
    assert [s.name for s in benchlib.select_sections(["beta,alpha"], reg)] == ["alpha", "beta"]
    assert [s.name for s in benchlib.select_sections(["gpu", "alpha"], reg)] == ["alpha", "gpu"]
    with pytest.raises(ValueError, match="unknown benchmark section nope; known: alpha, beta"):
        benchlib.select_sections(["alpha,nope"], reg)


def test_run_section_statuses():
    calls = []
    reg = _registry(calls)
    ctx = benchlib.Context()
    gpu = benchlib.run_section(reg["gpu"], ctx, has_cuda=False)
    assert gpu["status"] == "skipped" and gpu["rows"][0]["detail"] == "skipped: no CUDA device"
    assert ("gpu", False, 7) not in calls  # a CUDA section is not even called on CPU
    assert benchlib.run_section(reg["gpu"], ctx, has_cuda=True)["status"] == "ok"
    waits = benchlib.run_section(reg["waits"], ctx, has_cuda=False)
    assert waits["status"] == "pending" and waits["rows"][0]["detail"] == "pending: optim not there"
    broken = benchlib.run_section(reg["breaks"], ctx, has_cuda=False)
    assert broken["status"] == "error" and broken["rows"][0]["detail"] == "error: RuntimeError: boom"
    skipped_inside = Section("s", "S", lambda ctx: (_ for _ in ()).throw(Skipped("`make` is not installed")))
    assert benchlib.run_section(skipped_inside, ctx)["rows"][0]["detail"] == "skipped: `make` is not installed"


def test_optional_sections_run_only_when_named(tmp_path):
    calls, printed = [], []
    reg = _registry(calls)
    reg["long"] = Section("long", "Long one", lambda ctx: calls.append("long") or [row("long", 1.0)], optional=True)
    assert "long" not in [s.name for s in benchlib.select_sections(None, reg)]
    assert [s.name for s in benchlib.select_sections(["long,alpha"], reg)] == ["alpha", "long"]
    assert benchlib.main(["--only", "long", "--out", str(tmp_path)], registry=reg, out=printed.append) == 0
    assert calls == ["long"]
    printed.clear()
    benchlib.main(["--list"], registry=reg, out=printed.append)
    assert [line for line in printed if "optional" in line] == [
        "long           Long one  (optional: --only long)"]


def test_section_decorator_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(benchlib, "SECTIONS", {})
    benchlib.section("x", "X")(lambda ctx: [])
    benchlib.section("y", "Y", optional=True)(lambda ctx: [])
    assert list(benchlib.SECTIONS) == ["x", "y"] and benchlib.SECTIONS["y"].optional
    with pytest.raises(ValueError, match="registered twice"):
        benchlib.section("x", "again")(lambda ctx: [])


def test_main_writes_results_and_prints_table(tmp_path):
    calls, printed = [], []
    reg = _registry(calls)
    code = benchlib.main(["--only", "alpha,gpu", "--quick", "--threads", "1", "--out", str(tmp_path)],
                         registry=reg, out=printed.append, has_cuda=False)
    assert code == 0
    assert calls == [("alpha", True, 3)]  # quick: 3 repeats; gpu skipped without a call
    assert torch.get_num_threads() == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    stamped = [n for n in names if n.startswith("bench-")]
    assert "latest.json" in names and "latest.md" in names and len(stamped) == 2
    data = json.loads((tmp_path / "latest.json").read_text())
    assert [s["name"] for s in data["sections"]] == ["alpha", "gpu"]
    assert [s["status"] for s in data["sections"]] == ["ok", "skipped"]
    assert data["threads"] == 1 and data["quick"] is True and data["repeats"] == 3
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch", "torch_threads"):
        assert key in data["machine"]
    assert data["machine"]["torch_threads"] == 1
    md = (tmp_path / "latest.md").read_text()
    assert "1 torch threads" in md and "| Alpha |" not in md and "| alpha | 1.000× | ≤ 2× | yes |" in md
    assert "skipped: no CUDA device" in md
    assert md == (tmp_path / stamped[1]).read_text() or md == (tmp_path / stamped[0]).read_text()
    assert printed[0] == md


def test_main_exit_codes(tmp_path, capsys):
    reg = _registry([])
    out = lambda *_: None  # noqa: E731
    assert benchlib.main(["--only", "breaks", "--out", str(tmp_path)], registry=reg, out=out) == 1
    assert benchlib.main(["--only", "waits", "--out", str(tmp_path)], registry=reg, out=out) == 0
    assert benchlib.main(["--only", "nope", "--out", str(tmp_path)], registry=reg, out=out) == 2
    assert "error: unknown benchmark section nope" in capsys.readouterr().err


def test_main_list_runs_nothing(tmp_path):
    calls, printed = [], []
    assert benchlib.main(["--list", "--out", str(tmp_path)], registry=_registry(calls), out=printed.append) == 0
    assert calls == [] and not any(tmp_path.iterdir())
    assert any(line.startswith("gpu") and "CUDA only" in line for line in printed)


# ---------------------------------------------------------- bench.py helpers

def test_suite_registers_every_figure():
    assert list(benchlib.SECTIONS) == ["optimizer", "e2e", "monitor", "throughput", "memory", "config",
                                       "scaling", "fused_loss", "bf16", "cpu_throughput", "grad_norm",
                                       "bf16_loss", "gpu_mfu"]
    assert [s.name for s in benchlib.SECTIONS.values() if s.needs_cuda] == ["gpu_mfu"]


def test_monitor_cycle_is_the_lcm_of_enabled_intervals():
    assert bench._monitor_cycle({"a": 10, "b": 0, "c": 50, "d": 250, "e": 500}) == 500
    assert bench._monitor_cycle({"a": 3, "b": 4}) == 12
    assert bench._monitor_cycle({"a": 0}) == 1
    assert bench._monitor_cycle({"a": 999, "b": 1000}) == 1000  # capped


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("Tesla T4", None),
])
def test_gpu_peak_table(name, peak):
    assert bench.gpu_peak_bf16(name) == peak


def test_monitor_hooks_follow_the_trainer_order():
    log = []

    class FakeMonitor:
        def on_micro_batch(self, step, micro):
            log.append(("micro", step, micro))

        def before_step(self, step, loss=None, grad_norm=None):
            assert grad_norm is not None  # the trainer's norm is handed over, as train/step.py does
            log.append(("before", step))

        def after_step(self, step, loss):
            log.append(("after", step, loss))

        def wants_probe(self, step):
            return step % 3 == 0

        def on_probe(self, step, batch):
            log.append(("probe", step, batch))

        def metrics(self):
            log.append(("metrics",))

    hooks = bench.MonitorHooks(FakeMonitor(), log_interval=2, loss="L", probe_batch="P", grad_accum=2, grad_norm=1.0)
    hooks.run(3)
    assert log == [("micro", 1, 0), ("micro", 1, 1), ("before", 1), ("after", 1, "L"),
                   ("micro", 2, 0), ("micro", 2, 1), ("before", 2), ("after", 2, "L"), ("metrics",),
                   ("micro", 3, 0), ("micro", 3, 1), ("before", 3), ("after", 3, "L"), ("probe", 3, "P")]
    assert hooks.step == 3


def test_scaling_rows_per_million_params():
    by_size = {"1M": {"t": 0.002, "params": 1_000_000}, "10M": {"t": 0.015, "params": 10_000_000},
               "124M": {"t": 0.31, "params": 124_000_000}}
    rows = bench._scaling_rows("Opt", by_size, "t", "note")
    assert [r["value"] for r in rows[:3]] == pytest.approx([2.0, 1.5, 2.5])  # ms per M params
    assert rows[3]["value"] == pytest.approx(1.25) and rows[3]["ok"] is True
    assert rows[3]["figure"] == "Opt time per param, 124M / 1M"


def test_missing_dependency_is_pending_not_an_error():
    with pytest.raises(Pending, match="the optimizer benchmark .no_such_module_for_bench. is not available yet"):
        bench._require("no_such_module_for_bench", "the optimizer benchmark")
