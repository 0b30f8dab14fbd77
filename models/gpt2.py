"""GPT-2 (decoder-only transformer) in one file.

Architecture as in the GPT-2 paper: learned token and position embeddings,
pre-LayerNorm blocks (attention, then a 4x GELU MLP), a final LayerNorm and an
output head tied to the token embedding. Attention runs through
torch.nn.functional.scaled_dot_product_attention(is_causal=True), which picks
a fused kernel (flash / memory-efficient) and never materialises the T x T
probability matrix.

The health monitor needs what the fused path hides, so two probes exist:
``attention_probs`` recomputes attention through an explicit masked softmax
(the same arithmetic, checked against SDPA in tests) and ``residual_stream``
returns the activations after each block.

Training never materialises the logits: ``forward(idx, targets)`` computes
the output head and the cross-entropy together in chunks of rows
(models/fused_loss.py) and returns logits None; ``return_logits=True`` takes
the plain path (logits, then F.cross_entropy) for callers that need logits.

Vocabulary padding: the GPT-2 tokenizer has 50257 tokens. The embedding/head
matrices are padded up to a multiple of 64 rows (50304) because matmuls whose
dimensions are multiples of 64 map cleanly onto GPU tensor-core tiles; the
last matmul of the model is its most expensive one, and the padding costs 47
unused rows. The padded ids are never inputs and never targets, so training
pushes their probability towards zero, but they are not exactly zero:
``forward`` returns logits over the padded width (slicing would copy the
largest activation of the model every step), the loss is computed over that
width as well, and ``generate`` masks the padded ids so they can never be
sampled. Consumers that need a distribution over real tokens slice
``logits[..., :model.vocab_size]``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_loss import linear_cross_entropy

GPT2_VOCAB_SIZE = 50257  # tokens in the GPT-2 BPE (50256 merges/bytes + <|endoftext|>)

# Model sizes of the GPT-2 paper, plus a small one that trains on a CPU.
# Block size and dropout are separate settings, so they are not part of a preset.
GPT_PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "350M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens the tokenizer can emit
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    vocab_pad_multiple: int = 64  # 1 disables padding

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x):
        """(B, T, C) -> q, k, v each (B, n_head, T, head_dim)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def _merge(self, y):
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x):
        q, k, v = self._heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self._merge(y)

    def forward_explicit(self, x):
        """Same attention with the probabilities materialised: returns (output, probs).

        Meant for eval-mode probes: attention dropout is not applied here.
        Softmax runs in float32 so probes are meaningful under bf16 autocast.
        """
        q, k, v = self._heads(x)
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
        probs = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)
        y = probs.to(v.dtype) @ v
        return self._merge(y), probs


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact erf GELU; GPT-2 used the tanh approximation (differs by < 5e-4)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_explicit(self, x):
        a, probs = self.attn.forward_explicit(self.ln_1(x))
        x = x + a
        return x + self.mlp(self.ln_2(x)), probs


class GPT(nn.Module):
    # The optimizer keeps these modules' weights dense under SPAM's sparse momentum.
    dense_only_modules = ("lm_head",)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # Tying: the input embedding and the output head share one matrix, as in GPT-2.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream; scaling their init by
        # 1/sqrt(2 * n_layer) keeps the stream's variance independent of depth (GPT-2 paper).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_settings(cls, cfg, vocab_size: int = GPT2_VOCAB_SIZE) -> "GPT":
        """Build from typed Kconfig settings (CONFIG_GPT2_* symbols without the prefix)."""
        return cls(GPTConfig(
            n_layer=cfg.GPT2_N_LAYER,
            n_head=cfg.GPT2_N_HEAD,
            n_embd=cfg.GPT2_N_EMBD,
            block_size=cfg.GPT2_BLOCK_SIZE,
            dropout=cfg.GPT2_DROPOUT,
            bias=cfg.GPT2_BIAS,
            vocab_size=vocab_size,
        ))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights count once.

        non_embedding=True leaves out the position embedding only: the token
        embedding is also the output head's weight, so its FLOPs are real
        (same convention as nanoGPT and the scaling-law papers' N).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context.

        6N for the weight matmuls (2 forward + 4 backward per parameter) plus
        12 * n_layer * n_embd * block_size for the attention score and value
        matmuls, the estimate of the PaLM paper's appendix B (also nanoGPT's
        estimate_mfu). Layer norms, softmax and GELU are ignored.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def _embed(self, idx):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx, targets=None, return_logits: bool = False):
        """idx, targets: (B, T) token ids. Returns (logits, loss).

        With targets: the mean cross-entropy over the padded vocabulary width
        (targets equal to -1 are ignored) and logits None: the output head and
        the loss are computed together in chunks of rows
        (models/fused_loss.py), so the (B, T, padded_vocab) logits, the
        largest tensor of a training step, never exist. With targets and
        return_logits=True: the plain path, logits (B, T, padded_vocab) and the
        same loss from F.cross_entropy over them (for probes that need logits).
        Without targets: logits of the last position only, (B, 1,
        padded_vocab), or of every position with return_logits=True; loss None.
        """
        x = self._embed(idx)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x if return_logits else x[:, [-1], :]), None
        if not return_logits:
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        ignore_index=-1)
            return None, loss
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + max_new_tokens).

        Runs in eval mode (no dropout) and restores the previous mode.
        temperature <= 0 means greedy decoding. Padded vocabulary ids are never produced.
        """
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size:]
                logits, _ = self(context)
                logits = logits[:, -1, : self.vocab_size]  # drop the padded ids
                if temperature <= 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat((idx, next_id), dim=1)
        finally:
            self.train(was_training)
        return idx

    # ---- probes for the health monitor: no grad, eval mode, previous mode restored ----

    @torch.no_grad()
    def attention_probs(self, idx) -> list:
        """Per layer, the attention probabilities (B, n_head, T, T) of an eval-mode forward."""
        was_training = self.training
        self.eval()
        try:
            x = self._embed(idx)
            probs = []
            for block in self.transformer.h:
                x, p = block.forward_explicit(x)
                probs.append(p)
        finally:
            self.train(was_training)
        return probs

    @torch.no_grad()
    def residual_stream(self, idx) -> list:
        """Per layer, the residual stream (B, T, n_embd) after that block, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            x = self._embed(idx)
            stream = []
            for block in self.transformer.h:
                x = block(x)
                stream.append(x)
        finally:
            self.train(was_training)
        return stream


def build_gpt2(cfg, vocab_size: int = GPT2_VOCAB_SIZE) -> GPT:
    """GPT-2 from settings: reads GPT2_N_LAYER, GPT2_N_HEAD, GPT2_N_EMBD,
    GPT2_BLOCK_SIZE, GPT2_DROPOUT and GPT2_BIAS."""
    return GPT.from_settings(cfg, vocab_size)
