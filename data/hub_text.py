"""Large text corpora (FineWeb-Edu, OpenWebText) streamed from the Hugging Face hub into
uint16 token shards, resumable after an interruption.

The stream is read in order; every document becomes its tokens plus EOT, appended to
one running token stream per split that is cut into shards of exactly shard_tokens
tokens (a document may continue into the next shard; its rows in <shard>.docs.npy
carry the token offset within the document). Split rule: the FIRST documents of the
stream form val, until val holds val_fraction * max_tokens tokens (one shard's worth
when max_tokens is None); every later document is train. Both splits are whole
documents, so they never share text.

progress.json is rewritten (atomically) after each completed shard (whose files' sizes
and sha256 it records, see integrity.py) with the number of
documents fully stored and how many tokens of the next one already are, so a restart
skips exactly those documents and never rewrites a finished shard. The document index
is the running number of the document in the stream; its id is the `id` column when
the corpus has one (FineWeb-Edu) and that running number otherwise (OpenWebText).
"""

import json
from pathlib import Path

import numpy as np

from .cache import atomic_write_json
from .integrity import record_files, shard_file_names
from .text import write_shard

FINEWEB_EDU = dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", text_field="text")
OPENWEBTEXT = dict(path="Skylion007/openwebtext", name=None, text_field="text")


class _ShardedStream:
    """Cuts the documents of the current split into shards and commits progress."""

    def __init__(self, out_dir, shard_tokens, val_budget, state):
        self.out_dir, self.shard_tokens, self.val_budget = out_dir, shard_tokens, val_budget
        self.state = state
        self.arrays, self.rows, self.ids, self.size = [], [], [], 0

    @property
    def split(self):
        return "train" if self.state["val_done"] else "val"

    def total_tokens(self):
        return self.state["tokens"]["val"] + self.state["tokens"]["train"] + self.size

    def add_document(self, doc_index, doc_id, tokens, offset):
        """Append a document's tokens from `offset` on (offset > 0 only when resuming)."""
        split, pos = self.split, 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, self.shard_tokens - self.size)
            self.rows.append((self.size, doc_index, offset + pos))
            self.ids.append(doc_id)
            self.arrays.append(tokens[pos:pos + take])
            self.size += take
            pos += take
            if self.size == self.shard_tokens:
                done = pos == len(tokens)
                self.flush(split, doc_index + done, 0 if done else offset + pos)
        if split == "val" and self.state["tokens"]["val"] + self.size >= self.val_budget:
            self.flush(split, doc_index + 1, 0)  # val is complete; the next document is train

    def flush(self, split, next_document, carry_tokens, finished=False):
        state = self.state
        if self.size:
            prefix = self.out_dir / f"{split}_{state['shards'][split]:06d}"
            write_shard(prefix, self.arrays, self.rows, self.ids)
            # size and sha256 of the shard's files, checked when the corpus is opened
            state.setdefault("files", {}).update(record_files(self.out_dir, shard_file_names(prefix)))
            state["shards"][split] += 1
            state["tokens"][split] += self.size
            self.arrays, self.rows, self.ids, self.size = [], [], [], 0
        state["documents_consumed"], state["carry_tokens"] = next_document, carry_tokens
        # the val/train switch happens only between documents (carry 0)
        state["val_done"] = split == "train" or (
            carry_tokens == 0 and state["tokens"]["val"] >= self.val_budget)
        state["finished"] = finished
        atomic_write_json(self.out_dir / "progress.json", state)


def prepare_hub_corpus(path, name, split, text_field, out_dir, encoding, shard_tokens,
                       max_tokens=None, val_fraction=0.0, data_files=None, id_field="id",
                       batch_size=256, **load_kwargs):
    """Stream `datasets.load_dataset(path, name, split=split, streaming=True)` into token
    shards in out_dir and return progress.json's dict. `path` is a hub id or a packaged
    loader such as "parquet" with data_files; the code after load_dataset is the same."""
    import datasets

    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1 or shard_tokens < 1:
        raise ValueError("need 0 <= val_fraction < 1 and shard_tokens >= 1")
    settings = dict(path=path, name=name, split=split, text_field=text_field,
                    data_files=json.loads(json.dumps(data_files, default=str)),
                    encoding=encoding.name, vocab_size=encoding.n_vocab, shard_tokens=shard_tokens,
                    max_tokens=max_tokens,
                    val_fraction=val_fraction, id_field=id_field)
    val_budget = val_fraction * (max_tokens if max_tokens else shard_tokens)
    state = dict(settings=settings, documents_consumed=0, carry_tokens=0, val_done=val_budget == 0,
                 shards={"val": 0, "train": 0}, tokens={"val": 0, "train": 0}, finished=False,
                 vocab_size=encoding.n_vocab, files={})
    progress = out_dir / "progress.json"
    if progress.exists():
        saved = json.loads(progress.read_text())
        if saved["settings"] != settings:
            raise RuntimeError(f"{out_dir} was prepared with other settings "
                               f"({saved['settings']}); use another folder or delete it")
        state = saved
    if state["finished"]:
        return state
    out_dir.mkdir(parents=True, exist_ok=True)

    stream = datasets.load_dataset(path, name, split=split, streaming=True,
                                   data_files=data_files, **load_kwargs)
    writer = _ShardedStream(out_dir, shard_tokens, val_budget, state)
    first, carry = state["documents_consumed"], state["carry_tokens"]
    consumed = first
    documents = _tokenized(stream.skip(first), first, text_field, id_field, encoding, batch_size)
    for doc_index, doc_id, tokens in documents:
        offset = carry if doc_index == first else 0
        writer.add_document(doc_index, doc_id, np.asarray(tokens[offset:], np.uint16), offset)
        consumed = doc_index + 1
        if max_tokens and writer.total_tokens() >= max_tokens:
            break
    writer.flush(writer.split, consumed, 0, finished=True)
    return state


def _tokenized(stream, first_index, text_field, id_field, encoding, batch_size):
    """(document index, id, tokens + EOT) for each document of the stream, in order."""
    doc_index = first_index
    for batch in stream.iter(batch_size=batch_size):
        ids = batch.get(id_field)
        texts = [t or "" for t in batch[text_field]]
        for j, tokens in enumerate(encoding.encode_ordinary_batch(texts)):
            tokens.append(encoding.eot_token)
            yield doc_index, str(ids[j]) if ids is not None else str(doc_index), tokens
            doc_index += 1
