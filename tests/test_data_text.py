import json

import numpy as np
import pytest
import torch

import data.text as text_mod
from data.cache import atomic_path
from data.text import (TextBatchSampler, TokenDataset, build_token_dataset, choose_val_documents,
                       open_token_dataset, write_shard)
from data.tokenizer import EOT_TOKEN, gpt2_encoding

DOCS = [(f"doc{i}", f"Document {i}: " + " ".join(["word"] * (3 + 7 * i)) + " — ünïcode.")
        for i in range(8)]


def reference_tokens(documents):
    enc = gpt2_encoding()
    return [enc.encode_ordinary(t) + [EOT_TOKEN] for _, t in documents]


def test_choose_val_documents_hand_cases():
    assert choose_val_documents([10, 10, 10, 10], 0.0, 0) == []
    assert len(choose_val_documents([10, 10, 10, 10], 0.25, 0)) == 1
    assert len(choose_val_documents([10, 10, 10, 10], 0.26, 0)) == 2
    assert len(choose_val_documents([10, 10, 10, 10], 0.99, 0)) == 3  # one stays in train
    assert choose_val_documents([5] * 20, 0.3, 7) == choose_val_documents([5] * 20, 0.3, 7)
    with pytest.raises(ValueError):
        choose_val_documents([1, 2], 1.0, 0)


def test_build_writes_documents_with_eot_split_by_document(tmp_path):
    meta = build_token_dataset(DOCS, tmp_path, gpt2_encoding(), val_fraction=0.3, split_seed=3)
    ref = reference_tokens(DOCS)
    assert json.loads((tmp_path / "docs.json").read_text()) == [d for d, _ in DOCS]
    seen = []
    for split in ("train", "val"):
        tokens = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        rows = np.load(tmp_path / f"{split}.docs.npy")
        members = rows[:, 1].tolist()
        seen += members
        expected = [t for i in members for t in ref[i]]
        assert tokens.tolist() == expected
        starts = np.cumsum([0] + [len(ref[i]) for i in members])[:-1]
        assert rows[:, 0].tolist() == starts.tolist() and rows[:, 2].tolist() == [0] * len(members)
        assert meta[f"{split}_tokens"] == len(expected)
        ids = json.loads((tmp_path / f"{split}.ids.json").read_text())
        assert ids == [DOCS[i][0] for i in members]
    assert sorted(seen) == list(range(len(DOCS)))  # disjoint, and together all documents
    val_tokens = meta["val_tokens"]
    assert val_tokens >= 0.3 * (val_tokens + meta["train_tokens"])
    assert meta["num_documents"] == 8 and meta["vocab_size"] == 50257


def test_rebuild_only_when_inputs_change(tmp_path):
    enc = gpt2_encoding()
    build_token_dataset(DOCS, tmp_path, enc, 0.2, 0)
    stamp = (tmp_path / "train.bin").stat().st_mtime_ns
    build_token_dataset(DOCS, tmp_path, enc, 0.2, 0)
    assert (tmp_path / "train.bin").stat().st_mtime_ns == stamp
    changed = DOCS[:-1] + [("doc7", "a different last document")]
    meta = build_token_dataset(changed, tmp_path, enc, 0.2, 0)
    total = sum(len(t) for t in reference_tokens(changed))
    assert meta["train_tokens"] + meta["val_tokens"] == total


def test_crash_leaves_no_valid_looking_output(tmp_path, monkeypatch):
    calls = []

    def crash_on_val(prefix, *args):
        calls.append(prefix)
        if str(prefix).endswith("val"):
            raise KeyboardInterrupt
        write_shard(prefix, *args)
    monkeypatch.setattr(text_mod, "write_shard", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        build_token_dataset(DOCS, tmp_path, gpt2_encoding(), 0.2, 0)
    assert not (tmp_path / "meta.json").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def _shard(prefix, tokens, rows, ids):
    write_shard(prefix, [np.array(tokens)], rows, ids)


def test_batch_windows_and_sample_ids_against_loop(tmp_path):
    # two documents, the second continuing from an earlier shard at token offset 5
    tokens = list(range(1, 21))
    rows = [(0, 4, 0), (12, 9, 5)]
    _shard(tmp_path / "s", tokens, rows, ["a", "b"])
    ds = TokenDataset(str(tmp_path / "s"), block_size=4)
    assert len(ds) == 16 and ds.num_tokens == 20
    x, y, ids = ds.batch(torch.arange(16))
    for w in range(16):
        assert x[w].tolist() == tokens[w:w + 4] and y[w].tolist() == tokens[w + 1:w + 5]
        expected = (4, w) if w < 12 else (9, w - 12 + 5)
        assert tuple(ids[w].tolist()) == expected
    assert x.dtype == y.dtype == ids.dtype == torch.int64
    assert ds.doc_id(9) == "b"
    with pytest.raises(IndexError):
        ds.batch(torch.tensor([16]))


def test_windows_never_cross_shards(tmp_path):
    _shard(tmp_path / "a", list(range(0, 10)), [(0, 0, 0)], ["x"])
    _shard(tmp_path / "b", list(range(100, 107)), [(0, 0, 10)], ["x"])
    _shard(tmp_path / "c", [200, 201], [(0, 1, 0)], ["y"])  # shorter than a window: no windows
    ds = TokenDataset([str(tmp_path / p) for p in "abc"], block_size=3)
    assert len(ds) == (10 - 3) + (7 - 3) + 0
    x, y, ids = ds.batch(torch.arange(len(ds)))
    rows = torch.cat([x, y[:, -1:]], dim=1)
    for r in rows.tolist():  # each window's tokens come from one shard, consecutive
        assert r == list(range(r[0], r[0] + 4)) and (r[-1] < 10 or r[0] >= 100)
    assert ids[7].tolist() == [0, 10]  # first window of shard b: doc 0 continued at offset 10


def test_sampler_is_pure_and_ranks_split_the_global_batch():
    one = TextBatchSampler(1000, local_batch=8, rank=0, world_size=1, seed=5)
    ranks = [TextBatchSampler(1000, 4, r, 2, seed=5) for r in range(2)]
    for i in (0, 1, 17, 10**6):
        assert torch.equal(torch.cat([s.starts(i) for s in ranks]), one.starts(i))
        again = TextBatchSampler(1000, 8, seed=5)
        assert torch.equal(again.starts(i), one.starts(i))  # no hidden state: resume = counter
        assert one.starts(i).dtype == torch.int64 and len(ranks[0].starts(i)) == 4
    assert not torch.equal(one.starts(0), one.starts(1))
    assert not torch.equal(one.starts(0), TextBatchSampler(1000, 8, seed=6).starts(0))
    draws = torch.cat([one.starts(i) for i in range(300)])
    assert draws.min() == 0 and draws.max() == 999  # uniform over every valid window


def test_eval_starts_ignore_training_seed():
    a, b = TextBatchSampler(500, 8, seed=1), TextBatchSampler(500, 8, seed=2)
    assert torch.equal(a.eval_starts(3), b.eval_starts(3))
    assert not torch.equal(a.eval_starts(3), a.starts(3))
    halves = [TextBatchSampler(500, 4, r, 2, seed=9).eval_starts(3) for r in range(2)]
    assert torch.equal(torch.cat(halves), a.eval_starts(3))


def test_open_built_dataset(tmp_path):
    build_token_dataset(DOCS, tmp_path, gpt2_encoding(), 0.2, 0)
    train = open_token_dataset(tmp_path, "train", block_size=8)
    ref = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert len(train) == len(ref) - 8
    x, y, ids = train.batch(torch.tensor([0, len(train) - 1]))
    assert x[1].tolist() == ref[-9:-1].tolist() and y[1].tolist() == ref[-8:].tolist()
    assert train.doc_id(int(ids[0, 0])) == DOCS[int(ids[0, 0])][0]
    empty = tmp_path / "empty"
    build_token_dataset(DOCS, empty, gpt2_encoding(), 0.0, 0)
    assert len(open_token_dataset(empty, "val", 8)) == 0


def test_exclusive_makes_preparing_processes_take_turns(tmp_path):
    """Parallel runs (make compare JOBS=2) on a fresh DATA_DIR must not prepare the corpus at once."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from data.cache import exclusive

    lock, marker = tmp_path / ".prepare.lock", tmp_path / "child-ran"
    child = ("import sys; from pathlib import Path; from data.cache import exclusive\n"
             f"with exclusive({str(lock)!r}): Path({str(marker)!r}).write_text('x')\n")
    with exclusive(lock):
        proc = subprocess.Popen([sys.executable, "-c", child], cwd=Path(__file__).resolve().parents[1])
        time.sleep(0.5)
        assert proc.poll() is None and not marker.exists()  # blocked while we hold the lock
    assert proc.wait(timeout=30) == 0 and marker.exists()


def test_corpus_folder_names_the_corpus_a_run_reads():
    from pathlib import Path

    from data.cache import corpus_folder
    base = {"DATA_DIR": "cache", "DATA_PREPARED_DIR": "", "DATA_SHAKESPEARE": False,
            "DATA_FINEWEB_EDU": False, "DATA_OPENWEBTEXT": False}
    assert corpus_folder({**base, "DATA_SHAKESPEARE": True}) == Path("cache/shakespeare_gpt2")
    assert corpus_folder({**base, "DATA_FINEWEB_EDU": True}) == Path("cache/fineweb-edu_gpt2")
    assert corpus_folder({**base, "DATA_OPENWEBTEXT": True}) == Path("cache/openwebtext_gpt2")
    # each tokenizer has its own folder, so the two corpora can never mix
    byte_level = {**base, "TOKENIZER_GPT2": False, "TOKENIZER_BYTES": True}
    assert corpus_folder({**byte_level, "DATA_SHAKESPEARE": True}) == Path("cache/shakespeare_bytes")
    assert corpus_folder({**byte_level, "DATA_FINEWEB_EDU": True}) == Path("cache/fineweb-edu_bytes")
    assert corpus_folder({**byte_level, "DATA_OPENWEBTEXT": True}) == Path("cache/openwebtext_bytes")
    # a run on a filtered corpus (make data-filter) reads that folder, whatever the dataset
    assert corpus_folder({**base, "DATA_SHAKESPEARE": True, "DATA_PREPARED_DIR": "runs/a/filtered_corpus"}) \
        == Path("runs/a/filtered_corpus")
    assert corpus_folder({**base, "DATA_DIGITS": True, "DATA_PREPARED_DIR": None}) is None
