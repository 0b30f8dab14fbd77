"""AdamWSpam's shard masks and shard states (optim/spam_shard.py), in process: each
rank's block is described by a Layout, as FSDP2 would place it, without a process group."""
import pytest
import torch

import optim.spam as spam_module
from optim.spam import AdamWSpam
from optim.spam_shard import Layout, decode_mask, encode_mask, local_state, local_to_global, mask_part


def row_blocks(shape, world):
    """FSDP2's Shard(0): rank r holds rows [r * ceil(n / W), (r + 1) * ceil(n / W)), cut at n."""
    rows, rest = shape[0], tuple(shape[1:])
    chunk = -(-rows // world)
    blocks = []
    for rank in range(world):
        start = min(rows, rank * chunk)
        blocks.append(Layout(tuple(shape), (min(rows, start + chunk) - start, *rest), (start,) + (0,) * len(rest)))
    return blocks


def column_blocks(shape, world):
    """Shard(1) of a matrix, the same rule on columns."""
    cols = shape[1]
    chunk = -(-cols // world)
    out = []
    for rank in range(world):
        start = min(cols, rank * chunk)
        out.append(Layout(tuple(shape), (shape[0], min(cols, start + chunk) - start), (0, start)))
    return out


def to_whole(index, layout):
    """Flat index inside a block -> flat index in the whole tensor, element by element."""
    coords, rest = [], index
    for size in reversed(layout.local_shape):
        coords.append(rest % size)
        rest //= size
    coords = [c + o for c, o in zip(reversed(coords), layout.offset)]
    flat = 0
    for c, size in zip(coords, layout.global_shape):
        flat = flat * size + c
    return flat


CASES = [((10, 7), 2, row_blocks), ((10, 7), 3, row_blocks), ((5, 3), 4, row_blocks),  # 4 ranks: one empty
         ((513, 4), 4, row_blocks), ((6, 10), 3, column_blocks), ((1000,), 3, row_blocks)]


@pytest.mark.parametrize("shape,world,blocks", CASES)
def test_shard_masks_union_to_the_single_process_mask(shape, world, blocks):
    numel = torch.Size(shape).numel()
    chosen = torch.randperm(numel, generator=torch.Generator().manual_seed(3))[: numel // 4].sort().values
    union = []
    for layout in blocks(shape, world):
        part = mask_part(chosen, layout)
        assert torch.equal(part, part.sort().values) and (part.numel() == 0 or int(part.max()) < layout.local_numel)
        whole = [to_whole(int(i), layout) for i in part]
        assert whole == [int(i) for i in local_to_global(part, layout)]
        union += whole
    assert sorted(union) == chosen.tolist() and len(set(union)) == len(union)  # disjoint, complete


@pytest.mark.parametrize("shape,world", [((10, 7), 2), ((9, 5), 4), ((64, 3), 3)])
def test_optimizer_shards_draw_the_single_process_mask(shape, world, monkeypatch):
    """Each rank's AdamWSpam, on its block, keeps exactly its part of the mask that
    one process drawing for the whole tensor keeps, at the first draw and after a reset."""
    kw = dict(lr=1e-2, density=0.25, interval=3, warmup_steps=1, clip_grace_steps=0, seed=7)

    def masks(param, opt, steps=3):
        drawn = []
        for _ in range(steps):  # step 3 resets: masks redrawn
            param.grad = torch.ones_like(param)
            opt.step()
            drawn.append(opt.moment_index(param).tolist())
        return drawn[0], drawn[-1]

    whole = torch.nn.Parameter(torch.zeros(shape))
    expected = masks(whole, AdamWSpam([dict(params=[whole], sparse=True)], **kw))
    assert expected[0] != expected[1]
    got = ([], [])
    for layout in row_blocks(shape, world):
        monkeypatch.setattr(spam_module, "layout_of", lambda p, layout=layout: layout)
        block = torch.nn.Parameter(torch.zeros(layout.local_shape))
        opt = AdamWSpam([dict(params=[block], sparse=True)], **kw)
        drawn = masks(block, opt)
        for part, into in zip(drawn, got):
            into += [to_whole(i, layout) for i in part]
        # moments for the block's part only, resized when a redrawn part has another size
        assert opt.state[block]["exp_avg"].numel() == opt.state[block]["exp_avg_sq"].numel() == len(drawn[1])
    assert got[0] == expected[0] and got[1] == expected[1]


@pytest.mark.parametrize("world", [2, 3])
def test_local_state_cuts_a_whole_state_into_blocks(world):
    shape = (9, 6)
    numel = 54
    kept = torch.tensor([0, 5, 6, 13, 20, 29, 30, 41, 47, 53])
    offsets, counts = encode_mask(kept, numel, "cpu")
    sparse = dict(step=4, mask_offsets=offsets, mask_counts=counts, exp_avg=kept.double() + 0.5,
                  exp_avg_sq=kept.double() * 2)
    dense = dict(step=4, exp_avg=torch.arange(numel, dtype=torch.float64).view(shape),
                 exp_avg_sq=-torch.arange(numel, dtype=torch.float64).view(shape))
    gathered = []
    for layout in row_blocks(shape, world):
        part = local_state(sparse, layout)
        index = decode_mask(part["mask_offsets"], part["mask_counts"])
        whole = [to_whole(int(i), layout) for i in index]
        assert part["step"] == 4 and part["mask_counts"].numel() == -(-layout.local_numel // 256)
        # each kept element keeps its own moments (the values name the element)
        assert part["exp_avg"].tolist() == [w + 0.5 for w in whole]
        assert part["exp_avg_sq"].tolist() == [w * 2.0 for w in whole]
        gathered += whole
        block = local_state(dense, layout)
        start, rows = layout.offset[0], layout.local_shape[0]
        assert block["exp_avg"].shape == layout.local_shape
        assert block["exp_avg"].flatten().tolist() == list(range(start * 6, (start + rows) * 6))
        assert torch.equal(block["exp_avg_sq"], -block["exp_avg"])
    assert gathered == kept.tolist()


def test_dtensor_parameters_match_plain_ones(tmp_path):
    """Real DTensors on a one-rank gloo mesh: the optimizer works on their local blocks,
    computes the gate's norm itself through the all-reduce, and its gathered state
    (full_state_dict) is what the same optimizer on plain tensors holds; loaded back
    (load_full_state_dict), training goes on identically."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def shard(t):
            return distribute_tensor(t.clone(), mesh, [Shard(0)])

        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(12, 5, generator=gen), torch.randn(7, generator=gen)]
        grads = [[torch.randn(w.shape, generator=gen) * (100.0 if k == 7 else 1.0) for w in weights]
                 for k in range(12)]
        kw = dict(lr=1e-2, density=0.5, interval=5, warmup_steps=2, clip_grace_steps=1, zscore_window=4,
                  gate_min_history=3, spike_threshold=1.5, seed=1)

        def build(params):
            return AdamWSpam([dict(params=[params[0]], sparse=True), dict(params=[params[1]])], **kw)

        plain = [torch.nn.Parameter(w.clone()) for w in weights]
        sharded = [torch.nn.Parameter(shard(w)) for w in weights]
        opt_plain, opt_sharded = build(plain), build(sharded)
        assert opt_sharded._shard_group is not None and opt_plain._shard_group is None

        def train(steps, opt_s, params_s):
            for g in steps:
                for p, gi in zip(plain, g):
                    p.grad = gi.clone()
                for p, gi in zip(params_s, g):
                    p.grad = shard(gi)
                opt_plain.step()
                opt_s.step()  # no grad_norm: the gate's norm is computed (and all-reduced) inside
                assert opt_plain.read_telemetry() == pytest.approx(opt_s.read_telemetry(), nan_ok=True)
                for a, b in zip(plain, params_s):
                    assert torch.allclose(a.detach(), b.detach().full_tensor(), rtol=0, atol=1e-6)

        train(grads[:8], opt_sharded, sharded)  # the reset at 5, the spike at step 8
        assert opt_plain.read_telemetry()["spike_step"] == 1.0 and opt_plain.read_telemetry()["clipped_count"] > 0
        whole, gathered = opt_plain.state_dict(), opt_sharded.full_state_dict()
        for index, state in whole["state"].items():
            assert state.keys() == gathered["state"][index].keys()
            for name, value in state.items():
                other = gathered["state"][index][name]
                assert torch.allclose(value, other, rtol=0, atol=1e-6) if name.startswith("exp") else (
                    torch.equal(value, other) if torch.is_tensor(value) else value == other)
        assert torch.equal(whole["spam"]["mask_generator_state"], gathered["spam"]["mask_generator_state"])

        resumed = [torch.nn.Parameter(shard(p.detach().full_tensor())) for p in sharded]
        opt_resumed = build(resumed)
        opt_resumed.load_full_state_dict(gathered)
        train(grads[8:], opt_resumed, resumed)  # crosses the reset at 10: masks from the restored generator
    finally:
        dist.destroy_process_group()
