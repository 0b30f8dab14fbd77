"""Tests for models/: GPT-2 and the CIFAR-style ResNets.

Parameter counts are checked against formulas written here from the
architecture descriptions; the GPT forward is checked against a plain
re-implementation that only reads the model's weights.
"""

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import GPT, GPTConfig, build_gpt2, build_resnet, resnet18, resnet50


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    kw = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0, bias=True,
              vocab_pad_multiple=64)
    kw.update(overrides)
    return GPTConfig(**kw)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def random_tokens(B, T, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# ---------------------------------------------------------------- GPT: forward


def test_forward_shapes_and_loss_is_cross_entropy():
    model = tiny_gpt()
    idx, targets = random_tokens(3, 10, 50, seed=1), random_tokens(3, 10, 50, seed=2)
    logits, loss = model(idx, targets, return_logits=True)
    assert model.config.padded_vocab_size == 64
    assert logits.shape == (3, 10, 64)
    ref = F.cross_entropy(logits.reshape(30, 64), targets.reshape(30))
    assert torch.allclose(loss, ref, rtol=0, atol=1e-6)
    # Near log(V) at init: the output distribution starts almost uniform.
    assert abs(loss.item() - math.log(64)) < 0.2

    last, no_loss = model(idx)
    assert no_loss is None
    assert last.shape == (3, 1, 64)
    assert torch.allclose(last, logits[:, -1:, :], atol=1e-6)


def test_loss_ignores_minus_one_targets():
    model = tiny_gpt()
    idx, targets = random_tokens(2, 8, 50, seed=1), random_tokens(2, 8, 50, seed=2)
    targets[0, :3] = -1
    logits, loss = model(idx, targets, return_logits=True)
    keep = targets.reshape(-1) != -1
    ref = F.cross_entropy(logits.reshape(-1, 64)[keep], targets.reshape(-1)[keep])
    assert torch.allclose(loss, ref, atol=1e-6)


def reference_forward(model, idx):
    """Plain GPT-2 forward from the model's weights: per-position, per-head loops."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    H, C = c.n_head, c.n_embd
    D = C // H
    B, T = idx.shape

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def linear(x, prefix):
        return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        qkv = linear(layer_norm(x, p + ".ln_1"), p + ".attn.c_attn")
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        y = torch.zeros_like(q)
        for b in range(B):
            for h in range(H):
                s = slice(h * D, (h + 1) * D)
                for t in range(T):
                    # position t sees positions 0..t only
                    scores = torch.stack([q[b, t, s] @ k[b, u, s] / math.sqrt(D) for u in range(t + 1)])
                    w = torch.exp(scores - scores.max())
                    w = w / w.sum()
                    y[b, t, s] = sum(w[u] * v[b, u, s] for u in range(t + 1))
        x = x + linear(y, p + ".attn.c_proj")
        hdn = linear(layer_norm(x, p + ".ln_2"), p + ".mlp.c_fc")
        hdn = 0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2)))
        x = x + linear(hdn, p + ".mlp.c_proj")
    x = layer_norm(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"].T


def test_forward_matches_plain_reference():
    model = tiny_gpt()
    idx = random_tokens(2, 7, 50)
    logits, _ = model(idx, return_logits=True)
    ref = reference_forward(model, idx)
    assert torch.allclose(logits.double(), ref, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_gpt()
    idx = random_tokens(1, 12, 50)
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 50
    a, _ = model(idx, return_logits=True)
    b, _ = model(changed, return_logits=True)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(1, 17, 50))


def test_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


# ---------------------------------------------------------------- GPT: parameters


def test_weight_tying_shares_one_tensor():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.lm_head.weight[3, 0] = 123.0
    assert model.transformer.wte.weight[3, 0].item() == 123.0
    # counted once
    assert sum(1 for _ in model.parameters()) == len({id(p) for p in model.parameters()})


def gpt2_param_formula(V, T, C, L):
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * block + 2 * C


# padded vocab by hand: 50257 rounded up to a multiple of 64 is 786 * 64 = 50304
@pytest.mark.parametrize("L,H,C", [(12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)])
def test_gpt2_param_counts_match_formula(L, H, C):
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=1024))
    total = gpt2_param_formula(50304, 1024, C, L)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 1024 * C
    assert model.flops_per_token() == 6 * (total - 1024 * C) + 12 * L * C * 1024


def test_unpadded_124m_is_the_published_size():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_pad_multiple=1))
    assert model.config.padded_vocab_size == 50257
    assert model.num_params(non_embedding=False) == gpt2_param_formula(50257, 1024, 768, 12) == 124_439_808


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    L = 8
    model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    params = dict(model.named_parameters())
    residual = torch.cat([p.flatten() for n, p in params.items() if n.endswith("c_proj.weight")])
    assert residual.numel() == L * (256 * 256 + 1024 * 256)
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)
    others = torch.cat([p.flatten() for n, p in params.items()
                        if n.endswith(("c_attn.weight", "c_fc.weight"))])
    assert others.std().item() == pytest.approx(0.02, rel=0.02)
    assert params["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if n.endswith(".bias") and "ln" not in n)


def test_no_bias_option_removes_biases():
    model = tiny_gpt(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_dense_only_modules_name_real_modules():
    model = tiny_gpt()
    names = dict(model.named_modules())
    assert GPT.dense_only_modules == ("lm_head",)
    assert all(isinstance(names[n], nn.Linear) for n in GPT.dense_only_modules)


def test_build_from_settings_reads_gpt2_symbols():
    cfg = types.SimpleNamespace(GPT2_N_LAYER=3, GPT2_N_HEAD=2, GPT2_N_EMBD=24, GPT2_BLOCK_SIZE=32,
                                GPT2_DROPOUT=0.1, GPT2_BIAS=False)
    model = build_gpt2(cfg, vocab_size=100)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout, c.bias, c.vocab_size) == \
        (3, 2, 24, 32, 0.1, False, 100)
    assert len(model.transformer.h) == 3
    assert model.transformer.wte.weight.shape == (128, 24)
    assert GPT.from_settings(cfg, 100).config == c


# ---------------------------------------------------------------- GPT: probes


def test_attention_probs_are_causal_distributions_equal_to_sdpa():
    model = tiny_gpt()
    model.train()  # probes must switch to eval and restore the mode
    idx = random_tokens(2, 9, 50)
    probs = model.attention_probs(idx)
    assert model.training
    assert len(probs) == model.config.n_layer
    T = idx.size(1)
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    model.eval()
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))
    for block, p in zip(model.transformer.h, probs):
        assert p.shape == (2, 2, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(2, 2, T), atol=1e-6)
        assert torch.all(p[..., above] == 0)
        # the probabilities, applied to this layer's values, give the SDPA path's output
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = attn.c_attn(h).split(32, dim=2)
        v = v.view(2, T, 2, 16).transpose(1, 2)
        y = (p @ v).transpose(1, 2).reshape(2, T, 32)
        with torch.no_grad():
            assert torch.allclose(attn.c_proj(y), attn(h), atol=1e-5)
            x = block(x)


def test_attention_probs_match_a_hand_computed_softmax():
    model = tiny_gpt()
    idx = random_tokens(1, 5, 50)
    p0 = model.attention_probs(idx)[0]
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(5))
        q, k, _ = model.transformer.h[0].attn.c_attn(model.transformer.h[0].ln_1(x)).split(32, dim=2)
    head = 1
    qh, kh = q[0, :, 16:32], k[0, :, 16:32]
    for t in range(5):
        s = torch.tensor([float(qh[t] @ kh[u]) / 4.0 for u in range(t + 1)])  # sqrt(16) = 4
        expected = torch.exp(s) / torch.exp(s).sum()
        assert torch.allclose(p0[0, head, t, : t + 1], expected, atol=1e-6)


def test_residual_stream_ends_where_forward_logits_come_from():
    model = tiny_gpt(n_layer=3)
    idx = random_tokens(2, 6, 50)
    stream = model.residual_stream(idx)
    assert len(stream) == 3
    assert all(s.shape == (2, 6, 32) for s in stream)
    with torch.no_grad():
        from_stream = model.lm_head(model.transformer.ln_f(stream[-1]))
        logits, _ = model(idx, return_logits=True)
        first = model.transformer.h[0](model.transformer.wte(idx) + model.transformer.wpe(torch.arange(6)))
    assert torch.allclose(from_stream, logits, atol=1e-6)
    assert torch.allclose(stream[0], first, atol=1e-6)


# ---------------------------------------------------------------- GPT: generation


def test_generate_length_determinism_and_context_crop():
    model = tiny_gpt()
    prompt = random_tokens(2, 3, 50)
    out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert out.shape == (2, 23)
    assert torch.equal(out[:, :3], prompt)  # runs past block_size 16: the context is cropped
    again = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    other = model.generate(prompt, 20, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out, other)


def test_generate_greedy_and_top_k():
    model = tiny_gpt()
    prompt = random_tokens(1, 4, 50)
    out = model.generate(prompt, 5, temperature=0)
    seq = prompt
    for _ in range(5):  # reference: argmax over the real vocabulary, one token at a time
        logits, _ = model(seq, return_logits=True)
        seq = torch.cat([seq, logits[:, -1, :50].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    # top_k=1 sampling is greedy too
    assert torch.equal(model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0)), seq)


def test_generate_never_samples_padded_ids():
    model = tiny_gpt(vocab_size=10)  # 10 real ids, 54 padded
    with torch.no_grad():
        # ln_f now outputs all ones, so each logit is its row sum: make the padded rows win
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[10:] = 1.0
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long))
    assert logits[0, -1].argmax() >= 10  # without masking, padded ids would dominate
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 30, generator=torch.Generator().manual_seed(0))
    assert out.max() < 10


def test_gpt_overfits_a_fixed_batch():
    model = tiny_gpt()
    model.train()
    idx, targets = random_tokens(2, 16, 50, seed=3), random_tokens(2, 16, 50, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- ResNet


def conv(k, cin, cout):
    return k * k * cin * cout


def bn(c):
    return 2 * c


def resnet_param_formula(bottleneck, layers, num_classes, in_channels=3, width=64):
    total = conv(3, in_channels, width) + bn(width)  # stem
    cin = width
    for stage, n_blocks in enumerate(layers):
        p = width * 2 ** stage
        for j in range(n_blocks):
            stride = 2 if stage > 0 and j == 0 else 1
            if bottleneck:
                out = 4 * p
                total += conv(1, cin, p) + bn(p) + conv(3, p, p) + bn(p) + conv(1, p, out) + bn(out)
            else:
                out = p
                total += conv(3, cin, p) + bn(p) + conv(3, p, p) + bn(p)
            if stride != 1 or cin != out:
                total += conv(1, cin, out) + bn(out)  # projection shortcut
            cin = out
    return total + cin * num_classes + num_classes  # fc


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet_param_counts_match_formula():
    with torch.device("meta"):
        r18, r50 = resnet18(10), resnet50(10)
        r18_small, r50_small = resnet18(7, in_channels=1, base_width=16), resnet50(7, in_channels=1, base_width=16)
    assert resnet_param_formula(False, [2, 2, 2, 2], 10) == 11_173_962  # the usual CIFAR ResNet-18 figure
    assert count(r18) == resnet_param_formula(False, [2, 2, 2, 2], 10)
    assert count(r50) == resnet_param_formula(True, [3, 4, 6, 3], 10)
    assert count(r18_small) == resnet_param_formula(False, [2, 2, 2, 2], 7, in_channels=1, width=16)
    assert count(r50_small) == resnet_param_formula(True, [3, 4, 6, 3], 7, in_channels=1, width=16)


def test_resnet_output_shapes_and_small_image_adapter():
    torch.manual_seed(0)
    for make in (resnet18, resnet50):
        model = make(10, base_width=8).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        digits = make(10, in_channels=1, input_size=8, base_width=8).eval()
        assert digits.stem[0].in_channels == 1
        assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="8x8"):
        digits(torch.randn(2, 1, 32, 32))


def test_adapter_is_bilinear_resize_to_32():
    torch.manual_seed(0)
    small = resnet18(10, in_channels=1, input_size=8, base_width=8).eval()
    full = resnet18(10, in_channels=1, input_size=32, base_width=8).eval()
    full.load_state_dict(small.state_dict())
    x = torch.randn(2, 1, 8, 8)
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(small(x), full(up), atol=1e-6)


def test_resnet_blocks_start_as_identity():
    torch.manual_seed(0)
    for make in (resnet18, resnet50):
        model = make(10, base_width=8).eval()
        for b in model.blocks:
            assert torch.count_nonzero(b.last_bn.weight) == 0
        # a block with an identity shortcut maps a (post-ReLU, non-negative) input to itself
        block = model.blocks[1]
        assert isinstance(block.shortcut, nn.Identity)
        ch = block.conv1.in_channels
        x = torch.rand(2, ch, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), x)


def test_resnet_head_is_global_average_pool_then_fc():
    torch.manual_seed(0)
    model = resnet18(10, base_width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.blocks(model.stem(x))
        assert features.shape == (2, 64, 4, 4)  # four stages: 32 -> 32, 16, 8, 4 pixels
        pooled = torch.stack([features[:, :, i, j] for i in range(4) for j in range(4)]).sum(0) / 16
        assert torch.allclose(model(x), model.fc(pooled), atol=1e-6)


def test_resnet_dense_only_modules_name_the_classifier():
    model = resnet18(10, base_width=8)
    assert model.dense_only_modules == ("fc",)
    assert isinstance(dict(model.named_modules())["fc"], nn.Linear)


def test_resnet_overfits_a_fixed_batch_with_sgd():
    torch.manual_seed(0)
    model = resnet18(10, base_width=8).train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_build_resnet_reads_settings():
    base = dict(MODEL_RESNET18=False, MODEL_RESNET50=False, RESNET_BASE_WIDTH=16)
    with torch.device("meta"):
        r18 = build_resnet(types.SimpleNamespace(**{**base, "MODEL_RESNET18": True}), 10, 1, 8)
        r50 = build_resnet(types.SimpleNamespace(**{**base, "MODEL_RESNET50": True}), 10)
    assert count(r18) == resnet_param_formula(False, [2, 2, 2, 2], 10, in_channels=1, width=16)
    assert r18.input_size == 8
    assert count(r50) == resnet_param_formula(True, [3, 4, 6, 3], 10, width=16)
    with pytest.raises(ValueError, match="no ResNet"):
        build_resnet(types.SimpleNamespace(**base), 10)
