"""Tests for the code paths of issue 10's benchmark sections (scripts/bench_kernels.py)
and the training step they share (scripts/bench_workloads.py). Nothing is timed:
time_interleaved is replaced by fixed timings where a section's arithmetic is checked."""
from types import SimpleNamespace

import pytest
import torch

from models import GPT, GPTConfig
from scripts import bench, bench_kernels as K, benchlib
from scripts.bench_workloads import TrainStep
from scripts.benchlib import Context, Skipped, Timing

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_settings():
    return bench.preset_settings("gpt2-tiny", BATCH_SIZE=2, GRAD_CLIP=1.0)


def _small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=30))


def test_new_sections_are_registered_and_bf16_loss_is_optional():
    names = list(benchlib.SECTIONS)
    assert names[names.index("scaling") + 1:] == ["fused_loss", "bf16", "cpu_throughput", "grad_norm",
                                                  "bf16_loss", "gpu_mfu"]
    assert [s.name for s in benchlib.SECTIONS.values() if s.optional] == ["bf16_loss"]
    assert "bf16_loss" not in [s.name for s in benchlib.select_sections(None)]
    assert [s.name for s in benchlib.select_sections(["bf16_loss"])] == ["bf16_loss"]


def test_train_step_counts_norms_and_passes_the_norm_to_optimizers_that_take_it(tiny_settings, monkeypatch):
    step = TrainStep(tiny_settings, model=_small_gpt(), norms=3)
    calls = []
    real = step.grad_norm
    monkeypatch.setattr(step, "grad_norm", lambda: calls.append(1) or real())
    taken = {}
    original = step.optimizer.step

    def spy(*args, **kw):
        taken.update(kw)
        return original(*args, **kw)

    step.optimizer.step = spy
    step()
    assert len(calls) == 3
    want = {"grad_norm"} if getattr(step.optimizer, "accepts_grad_norm", False) else set()
    assert set(taken) == want
    with pytest.raises(ValueError, match="norms >= 1"):
        TrainStep(tiny_settings, model=_small_gpt(), norms=0)


def test_train_step_plain_and_fused_losses_agree_and_clip_with_the_one_norm(tiny_settings):
    plain = TrainStep(tiny_settings, model=_small_gpt(), plain_loss=True)
    fused = TrainStep(tiny_settings, model=_small_gpt())
    assert plain.forward_kwargs == {"return_logits": True} and fused.forward_kwargs == {}
    for s in (plain, fused):
        s.forward_backward()
    assert torch.allclose(plain.last_loss, fused.last_loss, atol=1e-6)
    norm = fused.grad_norm()
    fused.finish_step()  # clip to GRAD_CLIP with that norm, then step: grads are gone
    assert all(p.grad is None for p in fused.params)
    assert plain.tokens == 2 * 8  # the model's block size, not the preset's


def test_train_step_runs_the_forward_in_its_autocast(tiny_settings):
    entered = []

    class Marker:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    step = TrainStep(tiny_settings, model=_small_gpt(), autocast=Marker)
    step()
    assert entered == [True]


def test_cases():
    quick, full = Context(quick=True), Context()
    assert K.gpt2_124m_case(quick) == K.gpt2_tiny_case(quick)  # quick: tiny stands in for 124M
    big = K.gpt2_124m_case(full)
    assert big.spec == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024) and dict(big.overrides) == {"BATCH_SIZE": 1}
    byte = K.byte_tiny_case(full)
    assert byte.spec["vocab_size"] == 257 and byte.cfg.BATCH_SIZE == K.BYTE_BATCH
    assert K.byte_tiny_case(quick).cfg.BATCH_SIZE == K.QUICK_BATCH
    from scripts.kconfig.settings import load_settings
    assert load_settings(byte.settings_path).BATCH_SIZE == K.BYTE_BATCH  # what the memory child reloads


def test_matmul_probe_multiplies_in_its_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        mm, flops = K.matmul_probe(dtype, n=4)
        out = mm()
        assert out.dtype == dtype and out.shape == (4, 4) and flops == 2 * 4**3
    mm, _ = K.matmul_probe(torch.float32, n=3)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=gen), torch.randn(3, 3, generator=gen)
    want = [[sum(float(a[i, k]) * float(b[k, j]) for k in range(3)) for j in range(3)] for i in range(3)]
    assert torch.allclose(mm(), torch.tensor(want), atol=1e-6)


def test_throughput_rows_arithmetic(monkeypatch):
    # matmul samples 0.5 s and 1.0 s of 1e9 FLOPs (peaks 2 and 1 GFLOP/s); steps 2 s and 4 s
    monkeypatch.setattr(K, "time_interleaved", lambda *a, **k: Timing(a=[0.5, 1.0], b=[2.0, 4.0]))
    model = SimpleNamespace(flops_per_token=lambda: 1_000_000)
    step = SimpleNamespace(model=model, tokens=1000)
    rows = K.throughput_rows("m", "bf16", step, None, 10**9, Context())
    assert rows[0]["value"] == pytest.approx(1000 / 3.0)  # tokens / median step time
    # per pair: 1e9 FLOPs per step / 2 s / 2e9 = 25%, and / 4 s / 1e9 = 25%
    assert rows[1]["value"] == pytest.approx(25.0) and rows[1]["unit"] == "%"
    assert "bf16 matmul peak" in rows[1]["figure"]


def test_fused_loss_rows_arithmetic(monkeypatch):
    monkeypatch.setattr(K, "time_interleaved", lambda *a, **k: Timing(a=[2.0, 2.0, 2.0], b=[1.0, 1.5, 2.0]))
    monkeypatch.setattr(K, "case_step", lambda case, **kw: SimpleNamespace(last_loss=torch.tensor(1.0)))
    children = []

    def memory(spec, threads):
        children.append(spec)
        return {"peak_rss_mb": 600.0, "before_steps_mb": 500.0} if spec["plain"] else \
            {"peak_rss_mb": 450.0, "before_steps_mb": 400.0}

    monkeypatch.setattr(K, "_step_memory", memory)
    case = K.Case("c", (("BATCH_SIZE", 3),), {"n_layer": 1})
    monkeypatch.setattr(K.Case, "settings_path", property(lambda self: "/s.py"))
    time_row, mem_row = K.fused_loss_rows(case, Context(), repeats=3, warmup=0)
    assert time_row["value"] == pytest.approx(0.75) and time_row["ok"] is True  # median of 0.5, 0.75, 1
    assert mem_row["value"] == pytest.approx(0.75)
    assert "growth during the steps 50 vs 100 MiB" in mem_row["detail"]
    assert [c["plain"] for c in children] == [True, False]
    assert all(c["settings"] == "/s.py" and c["model"] == {"n_layer": 1} for c in children)


def test_bf16_factory_skips_without_bf16_instructions(monkeypatch):
    from train import precision
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(Skipped, match="no bf16 matmul instructions"):
        K.bf16_factory()
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    with K.bf16_factory()():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_byte_batches_are_shifted_windows_and_repeatable():
    data = torch.arange(100)
    batches = list(K.byte_batches(data, batch=3, block=5, steps=4, seed=7))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == y.shape == (3, 5)
        assert torch.equal(y, x + 1)  # the next id of an arange
    again = list(K.byte_batches(data, batch=3, block=5, steps=4, seed=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_train_bytes_runs_and_reports_losses(tiny_settings, monkeypatch):
    monkeypatch.setattr(K, "BYTE_MODEL", dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=257))
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 257, (400,), generator=gen)
    out = K.train_bytes(tiny_settings, None, data[:300], data[300:], steps=21, batch=2)
    assert set(out) == {"train", "val"}
    assert 4.0 < out["val"] < 7.0  # near log(320) = 5.77 for random bytes after a few steps
