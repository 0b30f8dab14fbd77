"""The output head and the cross-entropy in one pass over chunks of rows.

A language model's last matmul turns N hidden states (N, C) into N x V logits,
and the cross-entropy reduces them to one number. Done plainly, autograd keeps
the (N, V) logits, their log-softmax and, in the backward, their gradient: at
GPT-2's 50,304-wide padded vocabulary that is 200 KB per token in fp32, the
largest tensors of the whole model (2.5 GB each for 12 x 1024 tokens).

``linear_cross_entropy(h, weight, targets)`` computes the same mean
cross-entropy chunk by chunk: per chunk of rows the logits, their
log-sum-exp and the picked target logit, and -- when a gradient will be
needed -- the chunk's d loss / d logits = softmax - one_hot, from which it
accumulates d loss / d h (that chunk's rows) and d loss / d weight (a sum over
chunks) before the chunk is dropped. The backward then only scales these by
the incoming gradient. No (N, V) tensor ever exists, forward or backward.

Gradients are computed in the forward rather than by recomputing each chunk's
logits in the backward: the loss is a scalar, so its backward is one scalar
times fixed tensors, and recomputing would cost a third head matmul per step
(on gpt2-tiny the head matmul is about a quarter of the step). They are
computed only when autograd will need them (grad mode on and h or the weight
requires grad), so evaluation under no_grad costs one matmul per chunk.

Numerics match F.cross_entropy(h @ weight.T, targets, ignore_index=...) with
mean reduction: targets equal to ignore_index contribute nothing to the sum
nor to the count; the mean divides by the count of the other targets (0/0 =
nan when every target is ignored, with zero gradients, as F.cross_entropy). Under autocast (CPU or
CUDA) the matmuls run in the autocast dtype, as autocast would run the plain
F.linear, and the log-sum-exp, softmax, loss and the weight-gradient sum run
in fp32 (fp64 inputs stay fp64). The loss is returned in that accumulation
dtype; the gradients in the dtypes of h and the weight (the fp32 master
weight under autocast).

The function works under torch.func transforms (the monitor's per-sample
gradients run grad inside vmap over the model's own loss): it is written with
``setup_context`` and ``generate_vmap_rule``, and uses out-of-place
accumulation across chunks. It is differentiable once (no double backward).
"""
from __future__ import annotations

import torch

# Chunk sizing. A chunk cannot stay in cache at GPT-2's vocabulary (a 2 MB L2
# holds ~10 rows of 50,304 fp32 logits), and every chunk re-reads the whole
# (V, C) weight in each of its matmuls, so the size is set by two bounds:
# - MIN_CHUNK_ROWS: a matmul over r rows does 2r flops per weight element it
#   loads; r >= 256 keeps the head matmuls compute-bound on CPUs (balance
#   ~10-20 flops/byte) and close to it on GPUs (~300 for bf16 on an H100),
#   so chunking costs little time;
# - LOGIT_CHUNK_BYTES: with a small vocabulary (bytes: 320 padded ids) rows are
#   cheap, and a chunk grows up to 16 MiB of fp32 logits (13,107 rows), small
#   next to the rest of a step, in few enough chunks that the Python loop
#   costs nothing.
# At GPT-2's vocabulary a chunk is then 256 rows, 51 MB of fp32 logits, against
# 2.5 GB for the 12 x 1024 tokens of a GPT-2 124M micro-batch.
LOGIT_CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 256


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: LOGIT_CHUNK_BYTES of fp32 logits, at least MIN_CHUNK_ROWS,
    at most n_rows (then one chunk)."""
    by_bytes = LOGIT_CHUNK_BYTES // (4 * vocab)
    return max(1, min(n_rows, max(by_bytes, MIN_CHUNK_ROWS)))


def _compute_dtypes(h: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype) for this call, following autocast."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and h.dtype in (torch.float32, torch.bfloat16, torch.float16):
        matmul = torch.get_autocast_dtype(device_type)
    else:
        matmul = h.dtype
    return matmul, (torch.float64 if matmul == torch.float64 else torch.float32)


def _chunked(h, weight, targets, ignore_index: int, rows: int, matmul_dtype, acc_dtype,
             want_grad_h: bool, want_grad_w: bool):
    """Loss sum and valid-target count over chunks of rows, and optionally the
    un-normalised gradients sum_rows d(-log p_target)/d h and /d weight."""
    w = weight.to(matmul_dtype)
    loss_sum = torch.zeros((), dtype=acc_dtype, device=h.device)
    count = torch.zeros((), dtype=acc_dtype, device=h.device)
    grad_h_chunks = []
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=h.device) if want_grad_w else None
    for start in range(0, h.size(0), rows):
        h_c = h[start:start + rows].to(matmul_dtype)
        t_c = targets[start:start + rows]
        valid = t_c != ignore_index
        safe_t = torch.where(valid, t_c, torch.zeros_like(t_c)).unsqueeze(1)
        logits = (h_c @ w.t()).to(acc_dtype)  # (rows, V): the only chunk-sized tensor
        lse = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, safe_t).squeeze(1)
        valid_f = valid.to(acc_dtype)
        loss_sum = loss_sum + ((lse - picked) * valid_f).sum()
        count = count + valid_f.sum()
        if want_grad_h or want_grad_w:
            # softmax - one_hot(target), zero on ignored rows, built in the logits' storage
            d = logits.sub_(lse.unsqueeze(1)).exp_()
            d.scatter_add_(1, safe_t, -valid_f.unsqueeze(1))
            d.mul_(valid_f.unsqueeze(1))
            d = d.to(matmul_dtype)
            if want_grad_h:
                grad_h_chunks.append(d @ w)
            if want_grad_w and matmul_dtype == acc_dtype:
                grad_w = torch.addmm(grad_w, d.t(), h_c)  # out of place: vmap cannot write into grad_w
            elif want_grad_w:
                grad_w = grad_w + (d.t() @ h_c).to(acc_dtype)
        del logits
    grad_h = torch.cat(grad_h_chunks) if want_grad_h else None
    return loss_sum, count, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ weight.T; the gradients come from the forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, weight, targets, ignore_index, rows, matmul_dtype, acc_dtype, want_h, want_w):
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly
            loss_sum, count, grad_h, grad_w = _chunked(h, weight, targets, ignore_index, rows,
                                                       matmul_dtype, acc_dtype, want_h, want_w)
        loss = loss_sum / count
        # F.cross_entropy gives zero gradients when every target is ignored (loss nan): the
        # numerators are zero then, and dividing by at least 1 keeps them zero
        count = count.clamp(min=1)
        grad_h = (grad_h / count).to(h.dtype) if want_h else torch.zeros((), dtype=h.dtype, device=h.device)
        grad_w = ((grad_w / count).to(weight.dtype) if want_w
                  else torch.zeros((), dtype=weight.dtype, device=weight.device))
        return loss, grad_h, grad_w

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_h, grad_w = output
        ctx.want_h, ctx.want_w = inputs[7], inputs[8]
        ctx.mark_non_differentiable(grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)

    @staticmethod
    def backward(ctx, grad_loss, _grad_h_out, _grad_w_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if ctx.want_h else None
        dw = grad_w * grad_loss.to(grad_w.dtype) if ctx.want_w else None
        return dh, dw, None, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets, without
    materialising them: h (N, C), weight (V, C), targets (N,) int64.

    Equal to F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index)
    and its gradients; see the module docstring for dtypes. rows: rows per
    chunk (default chunk_rows(N, V)).
    """
    if h.dim() != 2 or weight.dim() != 2 or targets.shape != h.shape[:1] or h.size(1) != weight.size(1):
        raise ValueError(f"linear_cross_entropy needs h (N, C), weight (V, C), targets (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    rows = rows or chunk_rows(h.size(0), weight.size(0))
    matmul_dtype, acc_dtype = _compute_dtypes(h)
    grad_on = torch.is_grad_enabled()
    want_h, want_w = grad_on and h.requires_grad, grad_on and weight.requires_grad
    if not (want_h or want_w):  # evaluation: the loss alone, one matmul per chunk
        with torch.autocast(h.device.type, enabled=False):
            loss_sum, count, _, _ = _chunked(h, weight, targets, ignore_index, rows, matmul_dtype, acc_dtype,
                                             False, False)
        return loss_sum / count
    loss, _, _ = _LinearCrossEntropy.apply(h, weight, targets, ignore_index, rows, matmul_dtype, acc_dtype,
                                           want_h, want_w)
    return loss
