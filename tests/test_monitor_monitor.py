"""Tests for monitor/monitor.py (HealthMonitor in a tiny training loop) and monitor/Kconfig."""

import math
import os
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import GPT, GPTConfig
from monitor import metrics as M
from monitor.monitor import INTERVALS, HealthMonitor
from monitor_settings import monitor_cfg
from references import gsnr_loop

VOCAB, T = 30, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(monitor=True, accum=1, **settings):
    """Complete settings from the Kconfig defaults (tests/monitor_settings.py), every interval 0
    unless named."""
    return monitor_cfg(MONITOR=monitor, GRAD_ACCUM_STEPS=accum, **settings)


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=T, vocab_size=VOCAB))


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n, 2, T + 1), generator=g)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def train_step(model, opt, mon, step, micro, loss_scale=1.0):
    """One optimizer step the way the trainer drives the monitor; returns the Decision."""
    total = 0.0
    for i, (x, y) in enumerate(micro):
        loss = model(x, y)[1] * loss_scale / len(micro)
        loss.backward()
        total += loss.detach()
        mon.on_micro_batch(step, i)
    decision = mon.before_step(step)
    if decision.action != "skip":
        opt.step()
    opt.zero_grad(set_to_none=True)
    mon.after_step(step, total)
    return decision


def test_disabled_monitor_computes_nothing():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = make_cfg(monitor=False)
    assert cfg.MONITOR_GSS_INTERVAL is None  # Kconfig hides the monitor's symbols with it
    mon = HealthMonitor(cfg, model, opt)
    for step in range(1, 3):
        assert train_step(model, opt, mon, step, batches(1, step)).action == "none"
        assert not mon.wants_probe(step)
    assert mon.metrics() == {} and mon.gss is None and mon.guard is None


def test_each_metric_appears_only_on_its_interval_steps():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = HealthMonitor(make_cfg(GRAD_NORM_INTERVAL=2, GSS_INTERVAL=3, GSS_ELEMENTWISE_INTERVAL=5), model, opt)
    seen = {}
    for step in range(1, 7):
        train_step(model, opt, mon, step, batches(1, step))
        seen[step] = {k.split("/")[0] for k in mon.metrics()}
    # the element-wise GSS (its own, longer interval) also logs the overall maximum under gss/
    assert seen == {1: set(), 2: {"grad_norm"}, 3: {"gss"}, 4: {"grad_norm"}, 5: {"gss", "gss_elem"},
                    6: {"grad_norm", "gss"}}
    assert mon.gss.steps == 6  # the GSS baseline follows every step, not only the logged ones


def test_grad_norm_gss_and_update_ratio_values():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = HealthMonitor(make_cfg(GRAD_NORM_INTERVAL=1, GSS_INTERVAL=1, GSS_ELEMENTWISE_INTERVAL=1,
                                      UPDATE_RATIO_INTERVAL=2), model, opt)
    name = "transformer.h.0.mlp.c_fc.weight"
    params = dict(model.named_parameters())
    prev_norm = None
    for step in (1, 2):
        x, y = batches(1, step)[0]
        model(x, y)[1].backward()
        norm = params[name].grad.norm().item()
        total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
        v_ref = None
        if step == 2:  # element-wise GSS reference from AdamW's state before this step
            v_ref = max(
                (p.grad.abs() / ((opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt()
                                 + 1e-8)).max().item() for p in model.parameters())
        before = params[name].detach().clone()
        mon.before_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.after_step(step, 1.0)
        got = mon.metrics()
        assert got["grad_norm/global"] == pytest.approx(total, rel=1e-5)
        assert got[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-5)
        assert got[f"gss/{name}"] == pytest.approx(1.0 if prev_norm is None else norm / prev_norm, rel=1e-5)
        prev_norm = norm
        if step == 2:
            ratio = (params[name].detach() - before).norm() / before.norm()
            assert got[f"update_ratio/{name}"] == pytest.approx(ratio.item(), rel=1e-4)
            assert got["gss/elementwise_max"] == pytest.approx(v_ref, rel=1e-4)
        else:
            assert "update_ratio/global" not in got and "gss/elementwise_max" not in got  # no state yet


def test_gsnr_is_computed_from_the_micro_batch_gradients():
    model = make_model()
    name = "transformer.h.1.attn.c_attn.weight"
    micro = batches(3, 7)
    per_micro = []  # reference: each micro-batch's own gradient, from a fresh backward
    for x, y in micro:
        model.zero_grad()
        (model(x, y)[1] / 3).backward()
        per_micro.append(dict(model.named_parameters())[name].grad.double().clone().reshape(-1))
    model.zero_grad(set_to_none=True)
    ref = gsnr_loop(torch.stack(per_micro).numpy())

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = HealthMonitor(make_cfg(accum=3, GSNR_INTERVAL=1), model, opt)
    train_step(model, opt, mon, 1, micro)
    got = mon.metrics()
    assert mon.gsnr_estimate == "micro" and not mon.wants_probe(1)
    assert got[f"gsnr_micro/{name}"] == pytest.approx(ref, rel=1e-3)
    assert "gsnr_micro/mean" in got

    # one micro-batch: no micro-batch estimate; the probe batch's examples give it instead
    mon1 = HealthMonitor(make_cfg(accum=1, GSNR_INTERVAL=1), model, opt)
    train_step(model, opt, mon1, 1, micro[:1])
    assert mon1.gsnr_estimate == "examples" and mon1.wants_probe(1) and not mon1.wants_probe(1, main=False)
    assert not any(k.startswith("gsnr") for k in mon1.metrics())


def test_gsnr_from_per_example_gradients_matches_a_per_example_backward_loop():
    model = make_model()
    model.train()
    probe = torch.randint(0, VOCAB, (5, T + 1), generator=torch.Generator().manual_seed(11))
    x, y = probe[:, :-1], probe[:, 1:]
    names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"]
    per_example = {n: [] for n in names}  # reference: one backward per example, .grad read each time
    params = dict(model.named_parameters())
    for b in range(5):
        model.zero_grad()
        model(x[b:b + 1], y[b:b + 1])[1].backward()
        for n in names:
            per_example[n].append(params[n].grad.double().reshape(-1).clone())
    model.zero_grad(set_to_none=True)

    mon = HealthMonitor(make_cfg(GSNR_INTERVAL=3), model, None)
    assert mon.wants_probe(3) and not mon.wants_probe(2)
    mon.on_probe(3, probe)
    got = mon.metrics()
    assert model.training and all(p.grad is None for p in model.parameters())
    for n in names:
        assert got[f"gsnr_examples/{n}"] == pytest.approx(gsnr_loop(torch.stack(per_example[n]).numpy()), rel=1e-3)
    matrices = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert {k for k in got if k.startswith("gsnr_examples/")} == {f"gsnr_examples/{n}" for n in matrices} | {
        "gsnr_examples/mean"}
    assert got["gsnr_examples/mean"] == pytest.approx(np.mean([got[f"gsnr_examples/{n}"] for n in matrices]))

    # matrices above the size cap (a BPE token embedding) are left out of the example estimate
    import monitor.monitor as MM
    cap = MM.GSNR_EXAMPLES_MAX_ELEMENTS
    try:
        MM.GSNR_EXAMPLES_MAX_ELEMENTS = params["transformer.wte.weight"].numel() - 1
        mon.on_probe(6, probe)
        capped = mon.metrics()
    finally:
        MM.GSNR_EXAMPLES_MAX_ELEMENTS = cap
    assert "gsnr_examples/transformer.wte.weight" not in capped
    assert capped[f"gsnr_examples/{names[1]}"] == pytest.approx(got[f"gsnr_examples/{names[1]}"])


def test_the_trainers_grad_norm_is_used_and_changes_nothing_else():
    micro = batches(1, 5)
    runs = {}
    for given in (False, True, "doubled"):
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = HealthMonitor(make_cfg(GRAD_NORM_INTERVAL=1, GSS_INTERVAL=1), model, opt)
        for step in (1, 2, 3):
            x, y = micro[0]
            model(x, y)[1].backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
            kw = {} if not given else {"grad_norm": norm * (2 if given == "doubled" else 1)}
            mon.before_step(step, **kw)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.after_step(step, 1.0)
            runs[given] = mon.metrics()
    own, trainer, doubled = runs[False], runs[True], runs["doubled"]
    assert own.keys() == trainer.keys()
    for k in own:
        assert trainer[k] == pytest.approx(own[k], rel=1e-5), k
    assert doubled["grad_norm/global"] == pytest.approx(2 * own["grad_norm/global"], rel=1e-5)  # it is read
    per_tensor = [k for k in own if k.startswith("gss/transformer")]
    assert all(doubled[k] == pytest.approx(own[k], rel=1e-5) for k in per_tensor)


def guard_cfg(action, **kw):
    return make_cfg(GSS_INTERVAL=1, MONITOR_SPIKE_GUARD=True, MONITOR_SPIKE_TAU=3.0,
                    **{f"MONITOR_SPIKE_ACTION_{action.upper()}": True},
                    MONITOR_SPIKE_CLUSTER_K=kw.get("k", 5), MONITOR_SPIKE_CLUSTER_WINDOW=kw.get("w", 100))


def test_spike_guard_clips_spiking_tensors_to_tau():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: gradient norms stay comparable
    mon = HealthMonitor(guard_cfg("clip"), model, opt)
    micro = batches(1, 3)
    for step in range(1, 4):
        assert not train_step(model, opt, mon, step, micro).spike
    ema = mon.gss.ema.clone()
    x, y = micro[0]
    (model(x, y)[1] * 100).backward()
    gss_before = M.per_tensor_grad_norms([p.grad for p in mon.params]) / ema
    decision = mon.before_step(4)
    assert decision.spike and decision.action == "clip" and not decision.rollback
    after = M.per_tensor_grad_norms([p.grad for p in mon.params]) / ema
    assert after.max().item() == pytest.approx(3.0, rel=1e-4)
    assert (after <= 3.0 + 1e-4).all()
    assert mon.metrics()["guard/spikes"] == 1.0
    spiking = max(range(len(mon.names)), key=lambda i: float(gss_before[i]))
    assert mon.last_spike["param"] == mon.names[spiking]
    assert mon.last_spike["max_gss"] == pytest.approx(float(gss_before[spiking]), rel=1e-5) and \
        mon.last_spike["max_gss"] > 50


def test_spike_guard_skip_keeps_the_baseline_and_clusters_roll_back():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = HealthMonitor(guard_cfg("skip", k=1, w=10), model, opt)
    micro = batches(1, 4)
    for step in range(1, 4):
        train_step(model, opt, mon, step, micro)
    ema = mon.gss.ema.clone()
    d = train_step(model, opt, mon, 4, micro, loss_scale=100.0)
    assert d.spike and d.action == "skip" and not d.rollback
    assert torch.equal(mon.gss.ema, ema)  # a skipped spike does not enter the baseline
    d = train_step(model, opt, mon, 5, micro, loss_scale=100.0)
    assert d.rollback  # 2 spikes > k = 1 within 10 steps
    m = mon.metrics()
    assert (m["guard/spikes"], m["guard/total_rollbacks"]) == (2.0, 1.0)

    state = mon.state_dict()
    mon.on_rollback(state)
    assert mon.guard.total_rollbacks == 1 and torch.equal(mon.gss.ema, ema)


def test_probe_metrics_at_their_interval_match_direct_calls():
    model = make_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = make_cfg(ATTN_ENTROPY_INTERVAL=5, TOKEN_ENTROPY_INTERVAL=5, ACT_SPECTRA_INTERVAL=5,
                   GRAD_SPECTRA_INTERVAL=5, CODEC_INTERVAL=5, ZLIB_INTERVAL=10)
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)
    mon = HealthMonitor(cfg, model, opt, decode=decode)
    probe = torch.randint(0, VOCAB, (4, T + 1), generator=torch.Generator().manual_seed(9))
    assert not mon.wants_probe(4) and mon.wants_probe(5)
    mon.on_probe(4, probe)
    assert mon.metrics() == {}
    mon.on_probe(5, probe)
    got = mon.metrics()
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    x = probe[:, :-1].contiguous()
    with torch.no_grad():
        heads = M.attention_entropy(model.attention_probs(x)[1])
        assert got["attn_entropy/L1.H0"] == pytest.approx(heads[0].item(), rel=1e-5)
        assert got["attn_entropy/L1"] == pytest.approx(heads.mean().item(), rel=1e-5)
        model.eval()
        logits = model(x, return_logits=True)[0][..., :VOCAB]
        assert got["token_entropy"] == pytest.approx(M.token_entropy(logits).item(), rel=1e-5)
        codec = M.codec_score(model, x[:, 4:], x.roll(1, 0)[:, :4])
        model.train()
    assert got["codec/score"] == pytest.approx(codec["score"], rel=1e-4, abs=1e-6)
    for layer in (0, 1):
        assert 0 < got[f"act_spectrum/L{layer}/top10_mass"] <= 1
        assert math.isfinite(got[f"act_spectrum/L{layer}/tail_exponent"])
    assert 1 <= got["grad_spectrum/effective_rank"] <= 4 and got["grad_spectrum/sigma_max"] > 0
    assert not any(k.startswith("zlib") for k in got)  # its interval is 10

    mon.on_probe(10, probe)
    got = mon.metrics()
    bpb = np.mean([M.zlib_entropy(decode(row.tolist()).encode()) for row in x])
    assert got["zlib/bits_per_byte_mean"] == pytest.approx(bpb)
    assert got["zlib/ratio_min"] <= got["zlib/ratio_mean"]


def test_image_models_get_the_metrics_that_apply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = make_cfg(WEIGHT_SPECTRA_INTERVAL=1, ATTN_ENTROPY_INTERVAL=1, TOKEN_ENTROPY_INTERVAL=1,
                   GRAD_SPECTRA_INTERVAL=1, CODEC_INTERVAL=1)
    mon = HealthMonitor(cfg, model, opt)
    assert mon.grad_spectra_param == "2.weight"
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    mon.after_step(1, 0.5)
    mon.on_probe(1, (x, y))
    keys = set(mon.metrics())
    assert {"alpha/0.weight", "singular_entropy/2.weight", "param_std/0.bias", "grad_spectrum/sigma_max"} <= keys
    assert not any(k.startswith(("attn_entropy", "token_entropy", "codec")) for k in keys)


def test_collapse_residual_and_resume_from_state_dict():
    model = make_model()
    mon = HealthMonitor(make_cfg(COLLAPSE_RESIDUAL_INTERVAL=20), model, None)
    law = lambda t: 3.0 * t ** -0.5 + 1.5
    for step in range(1, 41):  # tensors and floats both accepted
        mon.after_step(step, torch.tensor(law(step)) if step % 2 else law(step))
        got = mon.metrics()
        assert ("collapse/residual" in got) == (step % 20 == 0)
    assert got["collapse/residual"] == pytest.approx(0.0, abs=1e-5)
    assert got["collapse/b"] == pytest.approx(0.5, rel=1e-3)

    resumed = HealthMonitor(make_cfg(COLLAPSE_RESIDUAL_INTERVAL=20), model, None)
    resumed.load_state_dict(mon.state_dict())
    for step in range(41, 61):
        bump = 0.5  # the losses since the last fit jump above the trend
        mon.after_step(step, law(step) + bump)
        resumed.after_step(step, law(step) + bump)
    a, b = mon.metrics(), resumed.metrics()
    assert a == b and a["collapse/residual"] > 0.1


GSNR_PARAM = "transformer.h.0.mlp.c_proj.weight"


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}

    # 1. one shared probe batch, GRAD_ACCUM_STEPS=1: identical replicas, then one rank perturbed
    model = make_model(seed=0)
    mon = HealthMonitor(make_cfg(accum=1, DDP_CONSISTENCY_INTERVAL=2), model, None, is_distributed=True)
    probe = torch.randint(0, VOCAB, (4, T + 1), generator=torch.Generator().manual_seed(5))  # same on all ranks
    main = rank == 0
    out["wants"] = [mon.wants_probe(s, main=main) for s in (1, 2)]
    mon.on_probe(2, probe, main=main)
    out["same"] = mon.metrics()
    if rank == 1:
        with torch.no_grad():
            wte = dict(model.named_parameters())["transformer.wte.weight"]  # also the output head
            wte.add_(0.02 * torch.randn(wte.shape, generator=torch.Generator().manual_seed(1)))
    mon.on_probe(4, probe, main=main)
    out["diverged"] = mon.metrics()

    # 2. the micro-batch GSNR under DDP leaves out the last (averaged) micro-batch
    model = make_model(seed=0)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = HealthMonitor(make_cfg(accum=3, GSNR_INTERVAL=1), model, opt, is_distributed=True)
    snaps = []
    for i, (x, y) in enumerate(batches(3, 100 + rank)):  # each rank its own data
        if i == 2:
            (ddp(x, y)[1] / 3).backward()
        else:
            with ddp.no_sync():
                (ddp(x, y)[1] / 3).backward()
            snaps.append(dict(model.named_parameters())[GSNR_PARAM].grad.clone())
        mon.on_micro_batch(1, i)
    mon.before_step(1)
    out["gsnr"], out["snaps"] = mon.metrics(), snaps

    # 3. the gather helper on its own
    torch.manual_seed(100 + rank)
    out["sketches"] = M.gather_gradient_sketches([torch.randn(20, 10), None, torch.randn(30)], dim=64, seed=3)
    torch.save(out, f"{result_file}.{rank}")
    # both ranks leave their last collective before either tears gloo down (a rank that
    # destroyed the group under the other's feet once aborted in gloo's threads)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_consistency_and_loss_dispersion_on_one_shared_probe_batch():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init, result = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        # spawn, not fork: a forked child can hang in OpenMP state inherited from this process
        workers = mp.spawn(_ddp_worker, args=(2, init, result), nprocs=2, join=False)
        deadline = time.monotonic() + 300  # a hang guard, not a speed requirement
        while not workers.join(timeout=2):
            if time.monotonic() > deadline:
                for proc in workers.processes:
                    proc.kill()
                pytest.fail("the two DDP test workers did not finish (a collective hung)")
        got = [torch.load(f"{result}.{rank}") for rank in range(2)]
    # the check is due on every rank at its interval (a collective), whichever rank logs
    assert got[0]["wants"] == got[1]["wants"] == [False, True]
    same, diverged = got[0]["same"], got[0]["diverged"]
    assert same["ddp/loss_std"] == 0.0  # identical replicas: exactly no spread
    assert same["ddp/grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert diverged["ddp/loss_std"] > 1e-3
    assert diverged["ddp/grad_cosine"] < 1 - 1e-3
    assert set(got[1]["same"]) == {"ddp/loss_std", "ddp/grad_cosine"}  # rank 1 ran only the collective
    for rank in range(2):  # each row is that rank's own sketch, made with the shared projection
        torch.manual_seed(100 + rank)
        own = M.gradient_sketch([torch.randn(20, 10), None, torch.randn(30)], 64, 3)
        assert torch.allclose(got[0]["sketches"][rank], own)
    # GSNR from rank 0's micro-batches 0 and 1; the last one (averaged across ranks) is left out
    g0, g1 = got[0]["snaps"][0], got[0]["snaps"][1] - got[0]["snaps"][0]
    ref = gsnr_loop(torch.stack([g0.reshape(-1), g1.reshape(-1)]).numpy())
    assert got[0]["gsnr"][f"gsnr_micro/{GSNR_PARAM}"] == pytest.approx(ref, rel=1e-3)


# ------------------------------------------------------------------ Kconfig


def load_kconfig():
    kconfiglib = pytest.importorskip("kconfiglib")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        top = os.path.join(tmp, "Kconfig")
        with open(top, "w") as f:
            f.write('mainmenu "test"\nconfig MODEL_GPT2\n\tbool "gpt2"\n\tdefault y\n'
                    f'source "{os.path.join(here, "monitor", "Kconfig")}"\n')
        return kconfiglib.Kconfig(top, warn_to_stderr=False)


def test_kconfig_declares_every_setting_the_monitor_reads():
    import kconfiglib
    kconf = load_kconfig()
    assert not kconf.warnings, kconf.warnings
    syms = {name: s for name, s in kconf.syms.items() if name.startswith("MONITOR")}
    for sym in INTERVALS.values():
        s = syms[sym]
        assert s.type == kconfiglib.INT
        low, high = (int(v.str_value) for v in s.ranges[0][:2])
        assert (low, high) == (0, 1000000)
    assert syms["MONITOR"].str_value == "y" and syms["MONITOR_GRAD_NORM_INTERVAL"].str_value == "10"
    for s in syms.values():
        assert all(node.help and len(node.help) > 40 for node in s.nodes), f"{s.name} needs a help text"

    syms["MONITOR_SPIKE_GUARD"].set_value("y")
    assert float(syms["MONITOR_SPIKE_TAU"].str_value) == 10.0
    assert 0 < float(syms["MONITOR_GSS_EMA_BETA"].str_value) < 1
    assert syms["MONITOR_SPIKE_ACTION_LOG"].str_value == "y"
    assert syms["MONITOR_SPIKE_ACTION_CLIP"].str_value == "n"
    assert (syms["MONITOR_SPIKE_CLUSTER_K"].str_value, syms["MONITOR_SPIKE_CLUSTER_WINDOW"].str_value,
            syms["MONITOR_ROLLBACK_WARMUP"].str_value) == ("5", "100", "20")


def test_elementwise_gss_reads_adamwspam_sparse_moments():
    spam = pytest.importorskip("optim.spam")
    torch.manual_seed(0)
    model = nn.Linear(16, 16, bias=False)
    opt = spam.AdamWSpam([{"params": list(model.parameters()), "sparse": True}], lr=1e-3, density=0.25,
                         enable_clip=False, periodic_reset=False)
    mon = HealthMonitor(make_cfg(GSS_INTERVAL=1, GSS_ELEMENTWISE_INTERVAL=1), model, opt)
    x = torch.randn(4, 16)
    for step in (1, 2):
        model(x).pow(2).mean().backward()
        if step == 2:
            w = model.weight
            index = opt.moment_index(w)
            v = opt.state[w]["exp_avg_sq"].reshape(-1)
            assert 0 < index.numel() == v.numel() < w.numel()  # compact moments
            beta2, count = opt.param_groups[0]["betas"][1], float(opt.state[w]["step"])
            g = w.grad.reshape(-1)[index]
            ref = max(abs(float(gi)) / (math.sqrt(float(vi) / (1 - beta2 ** count)) + 1e-8) for gi, vi in zip(g, v))
        mon.before_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.after_step(step, 0.0)
        got = mon.metrics()
    assert got["gss/elementwise_max"] == pytest.approx(ref, rel=1e-4)
