"""
Micro-benchmarks of AdamWSpam against torch.optim.AdamW on GPT-2-shaped
parameter sets (CPU): optimizer-step time and optimizer-state memory.

    python -m optim.bench                 # GPT-2 124M
    python -m optim.bench 1M 10M 124M     # scaling
    BENCH_THREADS=2 python -m optim.bench # two intra-op threads (default one)
    BENCH_REPEATS=31 python -m optim.bench 1M  # more pairs (default 7)
"""

import os
import statistics
import sys
import time

import torch

from optim.spam import AdamWSpam

# (n_layer, n_embd, vocab_size, block_size) of GPT-2-shaped models of about the named size
GPT2_SHAPES = {
    "1M": (2, 128, 4096, 256),
    "10M": (6, 256, 16384, 1024),
    "124M": (12, 768, 50257, 1024),
}


def gpt2_param_shapes(n_layer, n_embd, vocab_size, block_size):
    """[(name, shape, sparse)] of a GPT-2 (tied head, so no separate lm_head)."""
    d = n_embd
    shapes = [("wte", (vocab_size, d), False), ("wpe", (block_size, d), False)]
    for i in range(n_layer):
        b = f"h.{i}."
        shapes += [
            (b + "ln_1.weight", (d,), False), (b + "ln_1.bias", (d,), False),
            (b + "attn.c_attn.weight", (3 * d, d), True), (b + "attn.c_attn.bias", (3 * d,), False),
            (b + "attn.c_proj.weight", (d, d), True), (b + "attn.c_proj.bias", (d,), False),
            (b + "ln_2.weight", (d,), False), (b + "ln_2.bias", (d,), False),
            (b + "mlp.c_fc.weight", (4 * d, d), True), (b + "mlp.c_fc.bias", (4 * d,), False),
            (b + "mlp.c_proj.weight", (d, 4 * d), True), (b + "mlp.c_proj.bias", (d,), False),
        ]
    return shapes + [("ln_f.weight", (d,), False), ("ln_f.bias", (d,), False)]


def _make_params(size, seed=0):
    """Parameters with random gradients, nanoGPT-style param groups over them,
    and their names (as model.named_parameters() would give them)."""
    gen = torch.Generator().manual_seed(seed)
    params, names, groups = [], {}, {"sparse": [], "decay": [], "no_decay": []}
    for name, shape, sparse in gpt2_param_shapes(*GPT2_SHAPES[size]):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
        names[name] = p
        groups["sparse" if sparse else "decay" if len(shape) >= 2 else "no_decay"].append(p)
    param_groups = [
        dict(params=groups["sparse"], weight_decay=0.1, sparse=True),
        dict(params=groups["decay"], weight_decay=0.1),
        dict(params=groups["no_decay"], weight_decay=0.0),
    ]
    return params, param_groups, names


def _spam(param_groups, density=1.0, param_names=None):
    # every feature on; no grace steps, so that every measured step runs the
    # clipping path (the worst case: grace steps and rare resets are cheaper);
    # the parameter names switch on the per-class clipping telemetry
    return AdamWSpam(param_groups, lr=1e-4, enable_clip=True, theta=50.0, spike_threshold=2.0,
                     periodic_reset=True, interval=1000, warmup=True, warmup_steps=100,
                     density=density, clip_grace_steps=0, zscore_window=100, param_names=param_names)


def _timed(fn):
    """(wall seconds, CPU seconds of this thread) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def bench_optimizer_step(repeats=7, sizes=("124M",), warmup=2, threads=1):
    """AdamWSpam (clip, z-gate, reset, warmup on; density 1) against
    torch.optim.AdamW(foreach=True) on GPT-2-shaped parameters.

    The two optimizers own separate state but step the same parameters in
    pairs whose order alternates (A B, B A, ...), so that drifting machine
    load hits both alike; the figure is the median of the per-pair ratios.
    AdamWSpam gets the global gradient norm as the trainer hands it over
    (step(grad_norm=...)): the trainer computes that norm once per step for
    every optimizer, so it is not AdamWSpam's cost.
    threads: torch intra-op threads during the measurement (None: leave as
    is). One by default: on a shared small machine, multi-threaded ops stall
    at their barriers whenever another process holds a core, which swamps
    the difference being measured. With one thread the CPU time of the
    calling thread is the work done, whatever the scheduler did meanwhile:
    "cpu_ratio" (the median per-pair ratio of thread CPU times) is the
    steadier figure on a busy machine.
    Returns {"spam_step_s", "adamw_step_s", "ratio", "ratio_quartiles",
    "cpu_ratio", "cpu_ratio_quartiles", "pairs", "params"} for the last of
    `sizes`, and under "by_size" the same for every size.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        by_size = {}
        for size in sizes:
            params, param_groups, names = _make_params(size)
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
            spam = _spam(param_groups, param_names=names)
            adamw_groups = [{k: v for k, v in g.items() if k != "sparse"} for g in param_groups]
            adamw = torch.optim.AdamW(adamw_groups, lr=1e-4, foreach=True)
            sides = (lambda: spam.step(grad_norm=grad_norm), adamw.step)
            walls, cpus = ([], []), ([], [])
            for i in range(warmup + repeats):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for side in order:
                    wall, cpu = _timed(sides[side])
                    if i >= warmup:  # the first steps allocate the state
                        walls[side].append(wall)
                        cpus[side].append(cpu)
            by_size[size] = dict(
                spam_step_s=statistics.median(walls[0]), adamw_step_s=statistics.median(walls[1]),
                **_ratios("ratio", walls), **_ratios("cpu_ratio", cpus),
                pairs=repeats, params=sum(p.numel() for p in params))
            del params, param_groups, spam, adamw, sides
    finally:
        torch.set_num_threads(previous_threads)
    return dict(by_size[sizes[-1]], by_size=by_size)


def _ratios(name, times):
    """Median and quartiles of the per-pair ratios times[0][i] / times[1][i]."""
    ratios = [a / b for a, b in zip(*times)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {name: statistics.median(ratios), f"{name}_quartiles": (quartiles[0], quartiles[2])}


def state_bytes(states):
    return sum(t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t))


def bench_state_memory(size="124M", density=0.25):
    """Optimizer-state bytes of AdamWSpam at `density` (sparse on the block
    Linear weights) and dense, for a GPT-2-shaped parameter set.

    "ratio" is over the whole model, whose embeddings, norms and biases stay
    dense; "sparse_params_ratio" over the sparse-flagged weights alone.
    """
    result = {"density": density}
    for name, d in (("sparse", density), ("dense", 1.0)):
        _, param_groups, _ = _make_params(size)
        opt = _spam(param_groups, density=d)
        opt.step()
        result[f"{name}_state_bytes"] = state_bytes(opt.state.values())
        result[f"{name}_flagged_bytes"] = state_bytes(opt.state[p] for p in param_groups[0]["params"])
        del opt, param_groups
    result["ratio"] = result["sparse_state_bytes"] / result["dense_state_bytes"]
    result["sparse_params_ratio"] = result["sparse_flagged_bytes"] / result["dense_flagged_bytes"]
    return result


if __name__ == "__main__":
    sizes = tuple(sys.argv[1:]) or ("124M",)
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    repeats = int(os.environ.get("BENCH_REPEATS", "7"))
    step = bench_optimizer_step(sizes=sizes, threads=threads, repeats=repeats)
    print(f"optimizer step, {threads} thread(s), medians of {repeats} interleaved pairs")
    for size, r in step["by_size"].items():
        (q1, q3), (c1, c3) = r["ratio_quartiles"], r["cpu_ratio_quartiles"]
        print(f"{size:>5} ({r['params'] / 1e6:.1f}M params): AdamWSpam {r['spam_step_s'] * 1e3:.1f} ms, "
              f"AdamW(foreach) {r['adamw_step_s'] * 1e3:.1f} ms, ratio {r['ratio']:.3f} "
              f"(quartiles {q1:.3f}-{q3:.3f}), CPU-time ratio {r['cpu_ratio']:.3f} ({c1:.3f}-{c3:.3f})")
    mem = bench_state_memory(sizes[-1])
    print(f"state at density {mem['density']}: {mem['sparse_state_bytes'] / 2**20:.1f} MiB vs dense "
          f"{mem['dense_state_bytes'] / 2**20:.1f} MiB, ratio {mem['ratio']:.3f} "
          f"(sparse-flagged weights alone: {mem['sparse_params_ratio']:.3f})")
