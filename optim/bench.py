"""
Micro-benchmarks of AdamWSpam against torch.optim.AdamW on GPT-2-shaped
parameter sets (CPU): optimizer-step time and optimizer-state memory.

    python -m optim.bench                 # GPT-2 124M
    python -m optim.bench 1M 10M 124M     # scaling
    BENCH_THREADS=2 python -m optim.bench # two intra-op threads (default one)
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
    """Parameters with random gradients, and nanoGPT-style param groups over them."""
    gen = torch.Generator().manual_seed(seed)
    params, groups = [], {"sparse": [], "decay": [], "no_decay": []}
    for _, shape, sparse in gpt2_param_shapes(*GPT2_SHAPES[size]):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
        groups["sparse" if sparse else "decay" if len(shape) >= 2 else "no_decay"].append(p)
    param_groups = [
        dict(params=groups["sparse"], weight_decay=0.1, sparse=True),
        dict(params=groups["decay"], weight_decay=0.1),
        dict(params=groups["no_decay"], weight_decay=0.0),
    ]
    return params, param_groups


def _spam(param_groups, density=1.0):
    # every feature on; no grace steps, so that every measured step runs the
    # clipping path (the worst case: grace steps and rare resets are cheaper)
    return AdamWSpam(param_groups, lr=1e-4, enable_clip=True, theta=50.0, spike_threshold=2.0,
                     periodic_reset=True, interval=1000, warmup=True, warmup_steps=100,
                     density=density, clip_grace_steps=0, zscore_window=100)


def _timed_step(opt):
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def bench_optimizer_step(repeats=7, sizes=("124M",), warmup=2, threads=1):
    """Median step time of AdamWSpam (clip, z-gate, reset, warmup on; density 1)
    and of torch.optim.AdamW(foreach=True) on GPT-2-shaped parameters.

    The two optimizers own separate state but step the same parameters, in
    turns (A, B, A, B, ...), so that drifting machine load hits both alike.
    threads: torch intra-op threads during the measurement (None: leave as
    is). One by default: on a shared small machine, multi-threaded ops stall
    at their barriers whenever another process holds a core, which swamps
    the difference being measured.
    Returns {"spam_step_s", "adamw_step_s", "ratio", "params"} for the last of
    `sizes`, and under "by_size" the same for every size.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        by_size = {}
        for size in sizes:
            params, param_groups = _make_params(size)
            spam = _spam(param_groups)
            adamw_groups = [{k: v for k, v in g.items() if k != "sparse"} for g in param_groups]
            adamw = torch.optim.AdamW(adamw_groups, lr=1e-4, foreach=True)
            times = {"spam": [], "adamw": []}
            for i in range(warmup + repeats):
                for name, opt in (("spam", spam), ("adamw", adamw)):
                    elapsed = _timed_step(opt)
                    if i >= warmup:  # the first steps allocate the state
                        times[name].append(elapsed)
            spam_s, adamw_s = statistics.median(times["spam"]), statistics.median(times["adamw"])
            by_size[size] = dict(spam_step_s=spam_s, adamw_step_s=adamw_s, ratio=spam_s / adamw_s,
                                 params=sum(p.numel() for p in params))
            del params, param_groups, spam, adamw
    finally:
        torch.set_num_threads(previous_threads)
    return dict(by_size[sizes[-1]], by_size=by_size)


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
        _, param_groups = _make_params(size)
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
    step = bench_optimizer_step(sizes=sizes, threads=threads)
    print(f"optimizer step, {threads} thread(s), median of 7 interleaved steps")
    for size, r in step["by_size"].items():
        print(f"{size:>5} ({r['params'] / 1e6:.1f}M params): AdamWSpam {r['spam_step_s'] * 1e3:.1f} ms, "
              f"AdamW(foreach) {r['adamw_step_s'] * 1e3:.1f} ms, ratio {r['ratio']:.3f}")
    mem = bench_state_memory(sizes[-1])
    print(f"state at density {mem['density']}: {mem['sparse_state_bytes'] / 2**20:.1f} MiB vs dense "
          f"{mem['dense_state_bytes'] / 2**20:.1f} MiB, ratio {mem['ratio']:.3f} "
          f"(sparse-flagged weights alone: {mem['sparse_params_ratio']:.3f})")
