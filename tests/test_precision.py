"""Tests for train/precision.py: bf16 autocast on CPUs that multiply bf16 in hardware."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from models import GPT, GPTConfig
from optim.spam import AdamWSpam
from train import precision

pytestmark = pytest.mark.usefixtures("one_thread")

needs_bf16_cpu = pytest.mark.skipif(not precision.cpu_supports_bf16(),
                                    reason="this CPU has no bf16 matmul instructions")


def settings(dtype):
    return SimpleNamespace(DTYPE_FP32=dtype == "fp32", DTYPE_BF16=dtype == "bf16", DTYPE_FP16=dtype == "fp16")


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
bogomips\t: 4800.00
"""
ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_flags_from_cpuinfo():
    assert precision.flags_from_cpuinfo(X86_CPUINFO) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16",
                                                         "amx_tile", "amx_bf16"}
    assert "bf16" in precision.flags_from_cpuinfo(ARM_CPUINFO)
    assert precision.flags_from_cpuinfo("model name\t: Some CPU with flags: bf16\n") == set()


@pytest.mark.parametrize("flags, supported", [
    ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True), ({"asimd", "bf16"}, True),
    ({"avx512f", "avx2", "amx_tile"}, False), (set(), False),
])
def test_cpu_supports_bf16_reads_the_hardware_flags(monkeypatch, flags, supported):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert precision.cpu_supports_bf16() is supported


def test_fp32_is_no_autocast():
    said = []
    factory = precision.autocast_factory(settings("fp32"), torch.device("cpu"), said.append)
    assert isinstance(factory(), contextlib.nullcontext) and said == []


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_autocast_as_asked():
    for dtype, want in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ctx = precision.autocast_factory(settings(dtype), torch.device("cuda"), print)()
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == want


def test_cpu_without_bf16_says_so_and_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    said = []
    factory = precision.autocast_factory(settings("bf16"), torch.device("cpu"), said.append)
    assert len(said) == 1 and "no bf16 matmul instructions" in said[0] and "training in fp32" in said[0]
    with factory():
        assert not torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_on_cpu_says_so_and_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    said = []
    factory = precision.autocast_factory(settings("fp16"), torch.device("cpu"), said.append)
    assert said == ["note: DTYPE_FP16 applies on CUDA only; training in fp32 on the CPU"]
    assert isinstance(factory(), contextlib.nullcontext)


def _tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (4, 16), generator=g), torch.randint(0, 50, (4, 16), generator=g)


@needs_bf16_cpu
def test_bf16_on_this_cpu_matmuls_in_bf16_weights_grads_state_and_loss_in_fp32():
    said = []
    factory = precision.autocast_factory(settings("bf16"), torch.device("cpu"), said.append)
    assert said == []
    model = _tiny_gpt()
    optimizer = AdamWSpam(model.parameters(), lr=1e-3)
    seen = []
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x, y = _batch()
    with factory():
        assert torch.is_autocast_enabled("cpu")
        _, loss = model(x, y)
    hook.remove()
    assert seen == [torch.bfloat16]  # the Linear ran in bf16
    assert loss.dtype == torch.float32
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    assert states and all(t.dtype == torch.float32 for t in states)


def _train(factory, steps):
    model = _tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = _batch()
    losses = []
    for _ in range(steps):
        with factory():
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@needs_bf16_cpu
def test_bf16_training_follows_fp32():
    bf16 = _train(precision.autocast_factory(settings("bf16"), torch.device("cpu"), print), 30)
    fp32 = _train(precision.autocast_factory(settings("fp32"), torch.device("cpu"), print), 30)
    assert bf16[0] == pytest.approx(fp32[0], abs=0.02)  # same start, bf16 rounding only
    assert fp32[-1] < 0.6 * fp32[0]  # both memorise the fixed batch...
    assert abs(bf16[-1] - fp32[-1]) < 0.05  # ...and agree within 0.05 nats (measured: 0.012)
    assert bf16 != fp32  # and bf16 really computed something different
