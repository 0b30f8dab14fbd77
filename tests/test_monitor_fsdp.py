"""The health monitor under FSDP2: reductions over the ranks' blocks (monitor/sharded.py), and a
2-process sharded run whose monitor logs and decides what a 1-process run does."""
from __future__ import annotations

import json
import math

import pytest
import torch

from monitor import metrics as M
from monitor import sharded as SH
from train.sharded_checkpoint import read_full_checkpoint
from trainutil import make_settings, metrics, run_train


def test_per_tensor_norms_are_exact_when_tiny_elements_meet_a_large_one():
    # hand-computed: 10^2 + 10^6 * (1e-3)^2 = 101. A float32 running sum of the squares loses
    # the tiny ones against the 100 (torch's CPU norm gives 10.0436, 6e-4 off): the embedding
    # gradient's shape (a few large rows, a million tiny elements). optim.norms sums float32
    # chunks in float64: within a few float32 roundings of the exact value
    flat = torch.full((1_000_000,), 1e-3)
    flat[0] = 10.0
    matrix = flat.reshape(1000, 1000)
    norms = M.per_tensor_grad_norms([flat, None, matrix])
    assert norms.dtype == torch.float32
    assert norms.tolist() == pytest.approx([math.sqrt(101.0), 0.0, math.sqrt(101.0)], rel=5e-7)


def _split_rows(t, sizes):
    """A tensor cut into blocks of rows, as FSDP's Shard(0) places it on the ranks."""
    return list(torch.split(t, sizes))


def test_sharded_max_and_p999_are_exact_over_uneven_blocks():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed ratios; the values of each class as three ranks hold them (one holds an
    # empty block, as a rank past the end of a short tensor does); "mlp" covers fewer elements
    # than its parameters hold (sparse moments), so its count is below its bound
    attn = [torch.randn(96, 40, generator=g).abs() ** 3, torch.rand(64, generator=g) * 50]
    mlp = [torch.randn(2500, generator=g).abs() * 7, torch.randn(30, 11, generator=g).abs()]
    blocks = {"attention": [_split_rows(attn[0], [50, 46, 0]), _split_rows(attn[1], [22, 21, 21])],
              "mlp": [_split_rows(mlp[0], [1000, 700, 800]), _split_rows(mlp[1], [10, 10, 10])]}
    bounds = {"attention": 96 * 40 + 64, "mlp": 4 * 2500 + 330}
    rows, widths = [], None
    for rank in range(3):
        mine = {cls: [parts[rank] for parts in per_param] for cls, per_param in blocks.items()}
        row, widths = SH.quantile_candidates(mine, bounds, per=1000)
        rows.append(row)
    got = SH.quantiles_from_candidates(torch.stack(rows), widths, per=1000)
    for cls, whole in (("attention", attn), ("mlp", mlp)):
        values = sorted((float(v) for t in whole for v in t.reshape(-1)), reverse=True)
        m = math.ceil(len(values) / 1000)  # attention: 3904 values -> the 4th largest; mlp: 2830 -> the 3rd
        top, quantile = got[cls]
        assert top.item() == pytest.approx(values[0], rel=1e-7)
        assert quantile.item() == pytest.approx(values[m - 1], rel=1e-7)
        # and what the single-process path computes from the whole tensors
        assert quantile.item() == M.upper_quantile_of_parts(whole).item()


def test_unsharded_replica_holds_the_weights_keeps_the_tie_and_draws_no_random_numbers():
    from models.gpt2 import GPT, GPTConfig

    def build():
        return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40, dropout=0.0))

    torch.manual_seed(0)
    model = build()
    state = torch.get_rng_state()
    replica = SH.unsharded_replica(model, build)
    assert torch.equal(torch.get_rng_state(), state)  # built on the meta device: no init drawn
    assert replica.lm_head.weight is replica.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in replica.named_parameters()] == names
    for (_, p), (_, q) in zip(model.named_parameters(), replica.named_parameters()):
        assert torch.equal(p, q) and p is not q
    x = torch.randint(0, 40, (2, 8))
    assert torch.equal(model(x)[0], replica(x)[0])


# ---------------------------------------------------------------- 1 process vs FSDP2

# Every metric group at least twice in 11 steps. The element-wise GSS starts at step 4: at
# step 2 the second moment holds one step's g^2, and the largest |g2| / |g1| is decided by
# elements whose g1 is a near-total cancellation, which the two layouts' reductions round
# differently (not comparable to 1e-5 by anyone); from a few steps on v averages them.
INTERVALS = {f"MONITOR_{m}_INTERVAL": n for m, n in (
    ("GRAD_NORM", 2), ("GSS", 2), ("GSS_ELEMENTWISE", 4), ("UPDATE_RATIO", 2), ("GSNR", 4),
    ("WEIGHT_SPECTRA", 4), ("COLLAPSE_RESIDUAL", 1), ("ATTN_ENTROPY", 4), ("TOKEN_ENTROPY", 4),
    ("ACT_SPECTRA", 4), ("GRAD_SPECTRA", 4), ("CODEC", 4), ("ZLIB", 4))}
# Two spikes the guard clips (on each rank's blocks), sparse momentum so that the element-wise
# GSS reads compact moments, one micro-batch so that GSNR runs over the probe's examples. No
# global clip (GRAD_CLIP=0): it scales by 1/norm, and the trainers' norms differ (TRAINER_NORM).
MONITORED = dict(MAX_ITERS=11, CKPT_INTERVAL=0, MONITOR="y", GRAD_ACCUM_STEPS=1, MONITOR_PROBE_BATCH=4, GRAD_CLIP="0.0",
                 SPAM_DENSITY="0.25", FAULT_INJECTION="y", FAULT_SPIKE_STEPS="7,10", MONITOR_SPIKE_GUARD="y",
                 MONITOR_SPIKE_ACTION_CLIP="y", MONITOR_SPIKE_CLUSTER_K=10, **INTERVALS)
# Differences of two losses of about 10 (equal between the layouts to float32 rounding, 1e-6):
# near 0 by construction, compared absolutely.
NEAR_ZERO = {"codec/score", "collapse/residual", "collapse/relative"}
# The trainer's global gradient norm (and the GSS of it): the one-process trainer sums it in
# float32, off the exact norm by up to 4e-4 relative on a CPU; the sharded trainer sums in
# float64 (train/step.py). The monitor's own norms are float64 in both layouts.
TRAINER_NORM = {"grad_norm/global", "gss/global"}


@pytest.fixture(scope="module")
def one_and_sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor_fsdp")
    one = make_settings(root / "one", **MONITORED, BATCH_SIZE=8)
    sharded = make_settings(root / "fsdp", **MONITORED, BATCH_SIZE=4, FSDP="y")
    run_train(one)
    run_train(sharded, nproc=2)
    return root / "one" / "run", root / "fsdp" / "run"


def _monitor_keys(record):
    return {k for k in record if "/" in k and not k.startswith("spam/")}  # spam/: the optimizer's


def test_fsdp_monitor_metrics_match_one_process(one_and_sharded):
    a, b = (metrics(run) for run in one_and_sharded)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 12))
    logged = {}
    for ra, rb in zip(a, b):
        assert _monitor_keys(ra) == _monitor_keys(rb), ra["step"]
        for key in _monitor_keys(ra):
            logged[key] = logged.get(key, 0) + 1
            x, y = ra[key], rb[key]
            if key in NEAR_ZERO:
                assert abs(x - y) <= 1e-5, (ra["step"], key, x, y)
            elif key in TRAINER_NORM:
                assert y == pytest.approx(x, rel=1e-3), (ra["step"], key)
            else:
                assert y == pytest.approx(x, rel=1e-5, nan_ok=True), (ra["step"], key, x, y)
    groups = ("grad_norm/", "gss/", "gss_elem/", "update_ratio/", "gsnr_examples/", "singular_entropy/",
              "spectral_radius/", "alpha/", "param_std/", "collapse/", "attn_entropy/", "monitor/token_entropy",
              "act_spectrum/", "grad_spectrum/", "codec/", "zlib/", "guard/")
    assert all(any(k.startswith(g) for k in logged) for g in groups)
    assert min(logged.values()) >= 2, [k for k, n in logged.items() if n < 2]
    assert not any(k.startswith(("ddp/", "gsnr_micro/")) for k in logged)  # no replicas; no micro-batches


def test_fsdp_spike_guard_decides_what_one_process_does(one_and_sharded):
    a, b = ([json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
            for run in one_and_sharded)
    assert [(e["step"], e["event"], e["action"], e["signals"], e["param"]) for e in a] == \
        [(e["step"], e["event"], e["action"], e["signals"], e["param"]) for e in b] == \
        [(7, "spike", "clip", ["gss"], "transformer.ln_f.weight"), (10, "spike", "clip", ["gss"], "transformer.ln_f.weight")]
    for ea, eb in zip(a, b):
        assert eb["max_gss"] == pytest.approx(ea["max_gss"], rel=1e-5)
        assert eb["samples"] == ea["samples"]  # the ranks' rows, gathered: the one process's batch
        assert [t["param"] for t in eb["tensors"]] == [t["param"] for t in ea["tensors"]]
        for ta, tb in zip(ea["tensors"], eb["tensors"]):
            assert (tb["gss"], tb["grad_norm"]) == pytest.approx((ta["gss"], ta["grad_norm"]), rel=1e-5)
    summaries = [json.loads((run / "summary.json").read_text()) for run in one_and_sharded]
    assert summaries[0]["spikes"] == summaries[1]["spikes"] == 2


def test_fsdp_rollback_restores_the_checkpoint_weights_exactly(tmp_path):
    # spikes at 7 and 8 make a cluster (more than MONITOR_SPIKE_CLUSTER_K=1): at step 8 every
    # rank reads its shards of the checkpoint of step 5 back; the run ends there, so its
    # final checkpoint holds the weights the rollback restored
    settings = make_settings(tmp_path, MAX_ITERS=8, CKPT_INTERVAL=5, CKPT_KEEP=3, BATCH_SIZE=4, FSDP="y",
                             MONITOR="y", GRAD_CLIP="0.0", FAULT_INJECTION="y", FAULT_SPIKE_STEPS="7,8",
                             MONITOR_SPIKE_GUARD="y", MONITOR_SPIKE_CLUSTER_K=1)
    run_train(settings, nproc=2)
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    assert [(e["step"], e["to_step"]) for e in events if e["event"] == "rollback"] == [(8, 5)], events
    saved, final = (read_full_checkpoint(run / "checkpoints" / f"ckpt_{step:09d}") for step in (5, 8))
    assert final["step"] == 8
    assert saved["model"].keys() == final["model"].keys()
    for name, weight in saved["model"].items():
        assert torch.equal(final["model"][name], weight), name
