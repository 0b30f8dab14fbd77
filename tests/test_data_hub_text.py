import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data.hub_text as hub
from data.hub_text import FINEWEB_EDU, prepare_hub_corpus
from data.text import open_token_dataset, write_shard
from data.tokenizer import EOT_TOKEN, gpt2_encoding

WORDS = "the king queen sword crown night ünïcode café 日本 data token shard".split()


def make_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 40))) for _ in range(n)]


def write_fineweb_edu(folder, texts):
    """Two parquet files with FineWeb-Edu's real columns and types."""
    n = len(texts)
    table = pa.table({
        "text": pa.array(texts, pa.string()),
        "id": pa.array([f"<urn:uuid:{i:08d}-test>" for i in range(n)], pa.string()),
        "dump": pa.array(["CC-MAIN-2024-10"] * n, pa.string()),
        "url": pa.array([f"https://example.org/{i}" for i in range(n)], pa.string()),
        "file_path": pa.array(["s3://bucket/file.warc.gz"] * n, pa.string()),
        "language": pa.array(["en"] * n, pa.string()),
        "language_score": pa.array([0.95] * n, pa.float64()),
        "token_count": pa.array([len(t.split()) for t in texts], pa.int64()),
        "score": pa.array([3.2] * n, pa.float64()),
        "int_score": pa.array([3] * n, pa.int64()),
    })
    half = n // 2
    files = [str(folder / "part-0.parquet"), str(folder / "part-1.parquet")]
    pq.write_table(table.slice(0, half), files[0])
    pq.write_table(table.slice(half), files[1])
    return files


def write_openwebtext(folder, texts):
    path = str(folder / "owt.parquet")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)
    return [path]


def run(out_dir, files, **overrides):
    args = dict(path="parquet", name=None, split="train", text_field="text", out_dir=out_dir,
                encoding=gpt2_encoding(), shard_tokens=100, max_tokens=None,
                val_fraction=0.5, data_files=files, batch_size=7)
    args.update(overrides)
    return prepare_hub_corpus(**args)


def read_split(out_dir, split, count):
    shards = []
    for k in range(count):
        prefix = out_dir / f"{split}_{k:06d}"
        shards.append((np.fromfile(f"{prefix}.bin", dtype=np.uint16), np.load(f"{prefix}.docs.npy"),
                       json.loads(open(f"{prefix}.ids.json").read())))
    return shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fineweb")
    texts = make_texts(60)
    enc = gpt2_encoding()
    reference = [enc.encode_ordinary(t) + [EOT_TOKEN] for t in texts]
    return folder, texts, write_fineweb_edu(folder, texts), reference


def check_against_reference(out_dir, state, reference, ids):
    """Shards hold the documents in stream order, cut into shard_tokens pieces, and every
    docs.npy row points at the right piece of the right document."""
    stream = {"val": [], "train": []}
    for split in ("val", "train"):
        shards = read_split(out_dir, split, state["shards"][split])
        for k, (tokens, rows, row_ids) in enumerate(shards):
            if k < len(shards) - 1:
                assert len(tokens) == 100
            ends = list(rows[1:, 0]) + [len(tokens)]
            for (start, doc, offset), end, doc_id in zip(rows.tolist(), ends, row_ids):
                assert tokens[start:end].tolist() == reference[doc][offset:offset + end - start]
                assert doc_id == ids[doc]
            stream[split] += tokens.tolist()
        assert state["tokens"][split] == len(stream[split])
    n_val = 0
    while sum(map(len, reference[:n_val])) < 50:  # budget: val_fraction * shard_tokens
        n_val += 1
    assert stream["val"] == [t for d in reference[:n_val] for t in d]
    assert stream["train"] == [t for d in reference[n_val:] for t in d]


def test_fineweb_edu_schema_shards(tmp_path, corpus):
    _, texts, files, reference = corpus
    state = run(tmp_path, files)
    assert state["finished"] and state["documents_consumed"] == len(texts)
    assert state["tokens"]["val"] + state["tokens"]["train"] == sum(map(len, reference))
    ids = [f"<urn:uuid:{i:08d}-test>" for i in range(len(texts))]
    check_against_reference(tmp_path, state, reference, ids)
    ds = open_token_dataset(tmp_path, "train", block_size=16)
    x, y, sample_ids = ds.batch(torch.arange(0, len(ds), 37))
    for row, (doc, offset) in zip(x.tolist(), sample_ids.tolist()):
        assert row[0] == reference[doc][offset]
    assert ds.doc_id(int(sample_ids[0, 0])) == ids[int(sample_ids[0, 0])]
    assert run(tmp_path, files) == state  # finished: a second call does nothing


def test_openwebtext_schema_uses_running_numbers(tmp_path):
    texts = make_texts(15, seed=1)
    enc = gpt2_encoding()
    reference = [enc.encode_ordinary(t) + [EOT_TOKEN] for t in texts]
    state = run(tmp_path / "out", write_openwebtext(tmp_path, texts))
    check_against_reference(tmp_path / "out", state, reference, [str(i) for i in range(15)])


def test_interrupted_preparation_resumes_identically(tmp_path, corpus, monkeypatch):
    _, texts, files, reference = corpus
    whole = run(tmp_path / "whole", files)

    written = []

    def crash_after_two_train_shards(prefix, *args):
        if str(prefix).endswith("train_000002"):
            raise KeyboardInterrupt
        written.append(prefix.name)
        write_shard(prefix, *args)
    monkeypatch.setattr(hub, "write_shard", crash_after_two_train_shards)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", files)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["shards"]["train"] == 2 and not progress["finished"]
    assert progress["carry_tokens"] > 0  # the crash came while a document straddled shards

    written.clear()
    monkeypatch.setattr(hub, "write_shard", lambda prefix, *a: (written.append(prefix.name),
                                                                write_shard(prefix, *a)))
    resumed = run(tmp_path / "resumed", files)
    assert "train_000000" not in written and "train_000001" not in written
    assert written[0] == "train_000002"
    assert resumed == whole
    for path in (tmp_path / "whole").iterdir():
        if path.name != "progress.json":
            assert path.read_bytes() == (tmp_path / "resumed" / path.name).read_bytes(), path.name


def test_max_tokens_stops_after_whole_document(tmp_path, corpus):
    _, _, files, reference = corpus
    state = run(tmp_path, files, max_tokens=300, val_fraction=0.1)
    total = state["tokens"]["val"] + state["tokens"]["train"]
    consumed = state["documents_consumed"]
    assert total == sum(map(len, reference[:consumed]))
    assert total >= 300 > total - len(reference[consumed - 1])
    assert state["tokens"]["val"] >= 30  # val budget: 0.1 * max_tokens, whole documents


def test_changed_settings_are_refused(tmp_path, corpus):
    _, _, files, _ = corpus
    run(tmp_path, files, max_tokens=150)
    with pytest.raises(RuntimeError, match="other settings"):
        run(tmp_path, files, max_tokens=150, shard_tokens=64)


def test_hub_defaults_go_through_the_same_path(tmp_path, corpus, monkeypatch):
    import datasets
    _, texts, files, _ = corpus
    real_load = datasets.load_dataset
    calls = []

    def offline_hub(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real_load("parquet", data_files=files, split=kwargs["split"], streaming=True)
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    state = prepare_hub_corpus(**FINEWEB_EDU, split="train", out_dir=tmp_path,
                               encoding=gpt2_encoding(), shard_tokens=500, max_tokens=None,
                               val_fraction=0.1)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT",
                      dict(split="train", streaming=True, data_files=None))]
    assert state["finished"] and state["documents_consumed"] == len(texts)
