"""Token shards on disk, a memory-mapped window reader and a stateless batch sampler.

On-disk layout of one shard with prefix P (e.g. out_dir/train):
  P.bin       uint16 token ids, each document followed by the tokenizer's EOT id
              (50256 for GPT-2 BPE, 256 for bytes)
  P.docs.npy  int64 rows (start in P.bin, document index, token offset within the
              document at that start); the offset is 0 except for a document that
              continues from the previous shard (see hub_text.py)
  P.ids.json  the document id of each row of P.docs.npy
build_token_dataset also writes docs.json (all doc ids; a document index points into
it) and meta.json, which records the hash of the inputs and each file's size and
sha256 (data/integrity.py checks them). It builds in a temporary folder renamed into
place when complete.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from . import integrity
from .cache import atomic_path, atomic_save_npy, atomic_write_json
from .sampling import check_ranks, rank_rows, seeded_generator

EVAL_SEED = 20240611  # eval windows never depend on the training seed


def _inputs_sha(documents, encoding, val_fraction, split_seed):
    h = hashlib.sha256()
    h.update(json.dumps([encoding.name, encoding.n_vocab, val_fraction, split_seed]).encode())
    for doc_id, text in documents:
        for part in (doc_id, text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: unambiguous
    return h.hexdigest()


def choose_val_documents(token_counts, val_fraction, split_seed):
    """Indices of val documents: a seeded random order of documents, taken until the val
    share of tokens reaches val_fraction. Splitting by document keeps train and val
    text disjoint; at least one document always stays in train."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(split_seed).permutation(len(token_counts))
    target, taken, val = val_fraction * sum(token_counts), 0, []
    for i in order[:-1]:
        if taken >= target:
            break
        val.append(int(i))
        taken += token_counts[i]
    return sorted(val)


def write_shard(prefix, token_arrays, rows, ids):
    """Write one shard (see module docstring) atomically; the .bin goes last."""
    prefix = str(prefix)
    atomic_save_npy(prefix + ".docs.npy", np.asarray(rows, dtype=np.int64).reshape(-1, 3))
    atomic_write_json(prefix + ".ids.json", list(ids))
    with atomic_path(prefix + ".bin") as tmp:
        with open(tmp, "wb") as f:
            for arr in token_arrays:
                f.write(np.asarray(arr, dtype=np.uint16).tobytes())


def build_token_dataset(documents, out_dir, encoding, val_fraction=0.1, split_seed=0):
    """Tokenize [(doc_id, text)] into out_dir/{train,val}.* and return meta.json's dict.

    Rebuilds only when the inputs (texts, ids, encoding, split settings) changed."""
    out_dir = Path(out_dir)
    if encoding.n_vocab > 2**16:
        raise ValueError(f"vocab of {encoding.n_vocab} tokens does not fit uint16 shards")
    sha = _inputs_sha(documents, encoding, val_fraction, split_seed)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs_sha256") == sha and "files" in meta:  # (no "files": an older format)
            return meta

    ids = [doc_id for doc_id, _ in documents]
    tokens = encoding.encode_ordinary_batch([text for _, text in documents])
    for t in tokens:
        t.append(encoding.eot_token)  # EOT after every document marks where it ends
    val = set(choose_val_documents([len(t) for t in tokens], val_fraction, split_seed))
    counts = {}
    # built aside and renamed into place: a preparation killed half-way leaves out_dir
    # as it was (absent, or the previous complete corpus)
    with integrity.prepare_into(out_dir) as work:
        for split in ("train", "val"):
            members = [i for i in range(len(documents)) if (i in val) == (split == "val")]
            starts = np.cumsum([0] + [len(tokens[i]) for i in members])
            rows = [(int(starts[k]), i, 0) for k, i in enumerate(members)]
            write_shard(work / split, [tokens[i] for i in members], rows, [ids[i] for i in members])
            counts[split] = int(starts[-1])
        atomic_write_json(work / "docs.json", ids)
        meta = {"encoding": encoding.name, "vocab_size": encoding.n_vocab,
                "num_documents": len(documents), "val_documents": len(val),
                "train_tokens": counts["train"], "val_tokens": counts["val"],
                "val_fraction": val_fraction, "split_seed": split_seed, "inputs_sha256": sha,
                "files": integrity.record_files(work)}
        atomic_write_json(work / "meta.json", meta)
    return meta


def _read_tokens(path):
    if Path(path).stat().st_size == 0:  # an empty split (val_fraction=0) cannot be mapped
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenDataset:
    """Training windows over one or more shards; a window never crosses a shard boundary.

    Window w (0 <= w < len(self)) is the global index of a start position: shard k
    owns the range of len(shard) - block_size windows after those of shards < k.
    """

    def __init__(self, prefixes, block_size, vocab_size=None):
        if isinstance(prefixes, (str, Path)):
            prefixes = [prefixes]
        self.prefixes = [str(p) for p in prefixes]
        self.block_size = block_size
        self.tokens = [_read_tokens(p + ".bin") for p in self.prefixes]
        # token ids >= vocab_size must never reach the embedding: checked now for a
        # small corpus, on each shard's first use for a large one
        self.vocab_size = vocab_size
        self._range_checked = [False] * len(self.tokens)
        if sum(len(t) for t in self.tokens) <= integrity.EAGER_RANGE_TOKENS:
            for k in range(len(self.tokens)):
                self._check_range(k)
        self.docs = [np.load(p + ".docs.npy") for p in self.prefixes]
        self.num_tokens = sum(len(t) for t in self.tokens)
        windows = [max(0, len(t) - block_size) for t in self.tokens]
        self.first_window = np.cumsum([0] + windows)  # shard k owns [first[k], first[k+1])
        self._ids = None

    def __len__(self):
        return int(self.first_window[-1])

    def locate(self, window):
        """(shard, start position within that shard) of a global window index."""
        if not 0 <= window < len(self):
            raise IndexError(f"window {window} outside [0, {len(self)})")
        shard = int(np.searchsorted(self.first_window, window, side="right") - 1)
        return shard, int(window - self.first_window[shard])

    def batch(self, starts):
        """x, y (next-token targets) as LongTensor[B, T] and sample_ids LongTensor[B, 2]:
        (document index, token offset within that document of the window start)."""
        T = self.block_size
        x = np.empty((len(starts), T), dtype=np.int64)
        y = np.empty((len(starts), T), dtype=np.int64)
        ids = np.empty((len(starts), 2), dtype=np.int64)
        for b, w in enumerate(starts.tolist()):
            shard, pos = self.locate(w)
            if not self._range_checked[shard]:
                self._check_range(shard)
            chunk = self.tokens[shard][pos:pos + T + 1]
            x[b], y[b] = chunk[:-1], chunk[1:]
            docs = self.docs[shard]
            row = int(np.searchsorted(docs[:, 0], pos, side="right") - 1)
            ids[b] = docs[row, 1], pos - docs[row, 0] + docs[row, 2]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids)

    def _check_range(self, shard):
        integrity.check_token_range(self.prefixes[shard] + ".bin", self.tokens[shard], self.vocab_size)
        self._range_checked[shard] = True

    def doc_id(self, doc_index):
        """The stored id (file stem, hub id or running number) of a document index."""
        if self._ids is None:
            self._ids = {}
            for p, docs in zip(self.prefixes, self.docs):
                ids = json.loads(Path(p + ".ids.json").read_text())
                self._ids.update(zip(docs[:, 1].tolist(), ids))
        return self._ids[int(doc_index)]


class TextBatchSampler:
    """Random window starts as a pure function of (seed, micro-batch index).

    Each micro-batch draws the global batch (local_batch * world_size windows) and
    rank r keeps rows [r*local_batch, (r+1)*local_batch): 2 ranks of 4 see exactly
    the windows of 1 rank of 8, and resuming needs only the micro-batch counter.
    """

    def __init__(self, num_windows, local_batch, rank=0, world_size=1, seed=0):
        check_ranks(local_batch, rank, world_size)
        if num_windows < 1:
            raise ValueError("the token dataset has no complete window; use a smaller block_size")
        self.num_windows, self.local_batch = num_windows, local_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def _draw(self, seed, domain, micro_index):
        g = seeded_generator(seed, domain, micro_index)
        global_batch = torch.randint(self.num_windows, (self.local_batch * self.world_size,),
                                     generator=g)
        return rank_rows(global_batch, self.rank, self.local_batch)

    def starts(self, micro_index):
        return self._draw(self.seed, 0, micro_index)

    def eval_starts(self, i):
        """Eval batch i: the same windows for every training seed and resume point."""
        return self._draw(EVAL_SEED, 1, i)


def open_token_dataset(out_dir, split, block_size):
    """TokenDataset for out_dir/<split>.bin or, for a hub corpus, its <split>_NNNNNN shards.

    Checks every file's recorded size first (data/integrity.py): a truncated or
    half-prepared corpus is a one-line CorpusError, never a short or broken dataset."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no {split} tokens in {out_dir}; prepare the dataset first")
    meta_path, meta = integrity.read_meta(out_dir)
    integrity.check_sizes(out_dir, meta)
    vocab = integrity.vocab_size(meta)
    if meta_path.name == "meta.json":
        return TokenDataset(out_dir / split, block_size, vocab)
    if not meta["finished"]:
        raise RuntimeError(f"{out_dir} is only partly prepared; run the preparation again "
                           f"to resume it")
    count = meta["shards"][split]
    if count == 0:
        raise FileNotFoundError(f"{out_dir} has no {split} shards")
    return TokenDataset([str(out_dir / f"{split}_{k:06d}") for k in range(count)], block_size, vocab)
