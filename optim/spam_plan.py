"""
The work lists of an AdamWSpam step: which flat chunks of which tensors go
through the clip and the fused Adam update together (buckets), and the
parameter classes its telemetry reports clipping for.

Building these lists costs Python time on every tensor; on a small model that
time is a large part of the step. A dense param group's lists are therefore
built once and reused while the same parameters have gradients at the same
storage; only the gradient slices are taken afresh each step (a trainer that
zeroes gradients with set_to_none hands new tensors every step). Sparse groups
gather their kept elements into new tensors every step and are rebuilt.
"""

import torch

from optim.spam_shard import local

# Parameter classes of the clipping telemetry, in report order.
PARAM_CLASSES = ("embedding", "attention", "mlp", "head", "other")
OTHER = PARAM_CLASSES.index("other")

# Elements per bucket of flat chunks that go through the clip and update ops
# together. On CPU a bucket of 1 MiB per operand keeps the ten or so passes
# of a step in the cache (measured: 256Ki elements beat 64Ki-4Mi on GPT-2
# 124M shapes); on accelerators launch cost dominates, so buckets are large.
BUCKET_NUMEL = {"cpu": 1 << 18}
BUCKET_NUMEL_DEFAULT = 1 << 25


def classify_name(name, dim):
    """The telemetry class of a parameter called `name` with `dim` dimensions.

    Vectors (biases, norm gains) are "other" wherever they sit. GPT-2's output
    head is tied to the token embedding and named_parameters() lists it once,
    as transformer.wte.weight, so its clipping is reported as "embedding".
    """
    if dim < 2:
        return "other"
    parts = set(name.lower().replace(".", " ").replace("_", " ").split())
    if parts & {"wte", "wpe", "embed", "embedding", "embeddings", "emb"}:
        return "embedding"
    if parts & {"attn", "attention"}:
        return "attention"
    if parts & {"mlp", "ffn"}:
        return "mlp"
    if parts & {"head"} or name.startswith("fc.") or name == "fc.weight":
        return "head"
    return "other"


def class_of_params(param_names):
    """{param: class index} from a {name: param} mapping or (name, param) pairs
    (e.g. dict(model.named_parameters())). A parameter listed under several
    names (tied weights) takes the first class of PARAM_CLASSES among them."""
    pairs = param_names.items() if hasattr(param_names, "items") else param_names
    classes = {}
    for name, p in pairs:
        index = PARAM_CLASSES.index(classify_name(name, p.dim()))
        classes[p] = min(index, classes.get(p, OTHER))
    return classes


class Bucket:
    """Flat chunks updated together: parameters (work tensors), moments, their
    states (for the bias-correction count) and the gradient chunk of each,
    given as (owner index in the group's list of parameters with grads, start, end)."""

    __slots__ = ("cls", "device", "dtype", "params", "exp_avgs", "exp_avg_sqs", "states", "slices",
                 "numel", "low_precision", "scratch", "shared_steps")

    def __init__(self, cls, device, dtype):
        self.cls, self.device, self.dtype = cls, device, dtype
        self.params, self.exp_avgs, self.exp_avg_sqs, self.states, self.slices = [], [], [], [], []
        self.numel = 0
        self.low_precision = False
        self.scratch = None       # its slices of the kept clip buffers (CPU), see reserve_scratch
        self.shared_steps = None  # [the optimizer's shared step-count tensor] * chunks


def make_buckets(items):
    """Buckets from work items (cls, param work tensor, exp_avg, exp_avg_sq, state, owner).

    Every tensor is flat. One class, device and state dtype per bucket; each
    bucket holds at most the device's BUCKET_NUMEL elements, so large tensors
    are split into chunks and small ones share a bucket.
    """
    open_buckets, done = {}, []
    for cls, p, m, v, state, owner in items:
        key = (cls, p.device, m.dtype)
        limit = BUCKET_NUMEL.get(p.device.type, BUCKET_NUMEL_DEFAULT)
        numel, start = p.numel(), 0
        while start < numel:
            bucket = open_buckets.get(key)
            if bucket is None:
                bucket = open_buckets[key] = Bucket(cls, p.device, m.dtype)
            end = min(numel, start + limit - bucket.numel)
            whole = start == 0 and end == numel
            bucket.params.append(p if whole else p[start:end])
            bucket.exp_avgs.append(m if whole else m[start:end])
            bucket.exp_avg_sqs.append(v if whole else v[start:end])
            bucket.states.append(state)
            bucket.slices.append((owner, start, end, whole))
            bucket.low_precision |= p.dtype != m.dtype
            bucket.numel += end - start
            start = end
            if bucket.numel >= limit:
                done.append(open_buckets.pop(key))
    return done + list(open_buckets.values())


def grad_chunks(bucket, flat_grads):
    """This step's gradient chunks of a bucket, from the flat gradient of each owner."""
    return [flat_grads[owner] if whole else flat_grads[owner][start:end]
            for owner, start, end, whole in bucket.slices]


class Scratch:
    """Reused flat work buffers of the clip, per device and dtype.

    On CPU a fresh multi-megabyte tensor costs page faults on every step, so
    the buffers are kept (a few MiB: buckets are small there). Elsewhere the
    caching allocator makes fresh buffers cheap and keeping bucket-sized ones
    would hold memory for nothing, so they are allocated per call.
    """

    def __init__(self):
        self._kept = {}

    def get(self, device, dtype, numel):
        """(bound, lower, clipped, gathered grad) buffers of at least numel elements."""
        if device.type != "cpu":
            return self._allocate(device, dtype, numel)
        key = (device, dtype)
        buffers = self._kept.get(key)
        if buffers is None or buffers[0].numel() < numel:
            buffers = self._kept[key] = self._allocate(device, dtype, numel)
        return buffers

    @staticmethod
    def _allocate(device, dtype, numel):
        return tuple(torch.empty(numel, dtype=dtype, device=device) for _ in range(4))

    def persistent(self, device):
        return device.type == "cpu"


def reserve_scratch(scratch, buckets):
    """Sizes the kept scratch buffers for these buckets and caches each
    bucket's slices of them, so that a step slices nothing."""
    largest = {}
    for b in buckets:
        largest[(b.device, b.dtype)] = max(largest.get((b.device, b.dtype), 0), b.numel)
    for b in buckets:
        if scratch.persistent(b.device):
            b.scratch = _slices(scratch.get(b.device, b.dtype, largest[(b.device, b.dtype)]), b)


def bucket_scratch(scratch, bucket):
    """((bound, lower, clipped, gathered grad) flat buffers of the bucket's
    size, (bound, lower, clipped) split into one view per chunk)."""
    if bucket.scratch is not None:
        return bucket.scratch
    return _slices(scratch.get(bucket.device, bucket.dtype, bucket.numel), bucket)


def _slices(buffers, bucket):
    flat = tuple(buf[:bucket.numel] for buf in buffers)
    sizes = [p.numel() for p in bucket.params]
    return flat, tuple(list(buf.split(sizes)) for buf in flat[:3])


class GroupPlan:
    """One param group's work for a step: its parameters with gradients
    (owners), their states, the buckets, the elements eligible for clipping
    per class, and what must be written back into the parameters after."""

    def __init__(self, opt, group):
        self.group = group
        self.sparse = sparse = opt._is_sparse(group)
        self.owners, self.states, self.indices, self._write_back = [], [], [], []
        self.eligible = {}
        self.volatile = sparse
        items = []
        wd, lr = group["weight_decay"], group["lr"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWSpam does not support sparse gradients")
            state = opt.state[p] if opt.state.get(p) else opt._init_state(p, sparse)
            w = local(p)  # a sharded parameter is worked on in its local block
            if sparse and wd != 0:
                w.mul_(1.0 - lr * wd)  # the whole tensor decays, kept elements or not
            # flat views share memory with w; a non-contiguous w (channels_last)
            # is updated through a flat copy that is written back at the end
            copy_back = not w.is_contiguous()
            self.volatile |= copy_back
            p_flat = w.reshape(-1) if copy_back else w.view(-1)
            index = opt._mask_index(state) if sparse else None
            if index is not None:
                p_work = p_flat.index_select(0, index)
                self._write_back.append((w, p_flat, index, p_work, copy_back))
            else:
                p_work = p_flat
                if copy_back:
                    self._write_back.append((w, p_flat, None, None, True))
            cls = opt._classes.get(p, OTHER)
            # elements of the whole tensor (over every rank): the clipped counts are summed too
            self.eligible[cls] = self.eligible.get(cls, 0) + (opt._kept(p.numel()) if index is not None
                                                               else p.numel())
            items.append((cls, p_work, state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), state,
                          len(self.owners)))
            self.owners.append(p)
            self.states.append(state)
            self.indices.append(index)
        self.buckets = make_buckets(items)
        reserve_scratch(opt._scratch, self.buckets)

    def flat_grads(self):
        """This step's gradient of each owner, flat (and gathered for sparse moments)."""
        flat = []
        for p, index in zip(self.owners, self.indices):
            g = local(p.grad).reshape(-1)
            flat.append(g if index is None else g.index_select(0, index))
        return flat

    def write_back(self):
        for p, p_flat, index, p_work, copy_back in self._write_back:
            if index is not None:
                p_flat.index_copy_(0, index, p_work)
            if copy_back:
                p.copy_(p_flat.view(p.shape))
