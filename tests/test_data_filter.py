"""`make data-filter` (scripts/data_filter.py): the corpus without the documents of spike batches."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.cache import atomic_write_json
from data.text import TokenDataset, build_token_dataset, open_token_dataset, write_shard
from data.tokenizer import EOT_TOKEN, gpt2_encoding
from scripts import data_filter

REPO = Path(__file__).resolve().parents[1]

DOCUMENTS = [(f"doc{i}", f"Document number {i}. " + "Some words of text here, " * (3 + 2 * i))
             for i in range(8)]


def prepare_corpus(data_dir: Path, val_fraction: float) -> Path:
    folder = data_dir / "shakespeare_gpt2"  # where a DATA_SHAKESPEARE run finds its corpus
    build_token_dataset(DOCUMENTS, folder, gpt2_encoding(), val_fraction=val_fraction, split_seed=0)
    return folder


def make_run(folder: Path, data_dir: Path, spikes=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "settings.py").write_text(
        "__source__: str = '/nowhere/.config'\n__source_sha256__: str = '0'\n"
        "MODEL_GPT2: bool = True\nDATA_SHAKESPEARE: bool = True\nDATA_FINEWEB_EDU: bool = False\n"
        f"DATA_OPENWEBTEXT: bool = False\nDATA_DIR: str = {str(data_dir)!r}\n")
    if spikes is not None:
        (folder / "spikes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in spikes))
    return folder


def spike(step, gss, *doc_indices, corpus_ids=None):
    ids = corpus_ids or {i: f"doc{i}" for i in doc_indices}
    return {"step": step, "event": "spike", "action": "log", "max_gss": gss, "param": "transformer.h.0.mlp.c_fc.weight",
            "samples": [{"doc": ids[i], "doc_index": i, "offset": 5} for i in doc_indices]}


def filter_run(run: Path, *args, capsys=None):
    code = data_filter.main([str(run), *args])
    out = capsys.readouterr() if capsys else None
    return code, out


def plain_tokens(documents) -> np.ndarray:
    """Reference: every document's tokens plus EOT, concatenated in order (a plain loop)."""
    enc = gpt2_encoding()
    out = []
    for _, text in documents:
        out += enc.encode_ordinary(text) + [EOT_TOKEN]
    return np.array(out, dtype=np.uint16)


def test_filtered_corpus_lacks_exactly_the_spike_documents(tmp_path, capsys):
    data_dir = tmp_path / "data"
    prepare_corpus(data_dir, val_fraction=0.0)  # every document in train
    rollback = {"step": 13, "event": "rollback", "to_step": 10}
    run = make_run(tmp_path / "run", data_dir, [spike(12, 480.0, 2, 5), rollback])
    code, out = filter_run(run, capsys=capsys)
    assert code == 0
    filtered = run / "filtered_corpus"
    kept = [d for i, d in enumerate(DOCUMENTS) if i not in (2, 5)]
    # against a corpus built from the remaining documents only
    reference = tmp_path / "reference"
    build_token_dataset(kept, reference, gpt2_encoding(), val_fraction=0.0)
    assert (filtered / "train.bin").read_bytes() == (reference / "train.bin").read_bytes()
    assert json.loads((filtered / "train.ids.json").read_text()) == [doc_id for doc_id, _ in kept]
    np.testing.assert_array_equal(np.fromfile(filtered / "train.bin", dtype=np.uint16), plain_tokens(kept))
    rows = np.load(filtered / "train.docs.npy")
    np.testing.assert_array_equal(rows[:, 0], np.load(reference / "train.docs.npy")[:, 0])  # starts recomputed
    assert rows[:, 1].tolist() == [0, 1, 3, 4, 6, 7]  # document indices keep pointing into docs.json
    assert json.loads((filtered / "docs.json").read_text()) == [d for d, _ in DOCUMENTS]
    # the filtered copy opens and names its documents
    ds = open_token_dataset(filtered, "train", block_size=8)
    assert ds.num_tokens == len(plain_tokens(kept))
    assert ds.doc_id(3) == "doc3"
    x, y, ids = ds.batch(np.array([0, 10]))
    assert x.shape == (2, 8) and ids[0, 0] == 0
    # why each document went
    removed = json.loads((filtered / "removed.json").read_text())
    removed_tokens = len(plain_tokens(DOCUMENTS)) - len(plain_tokens(kept))
    assert removed["documents_removed"] == 2 and removed["tokens_removed"] == removed_tokens
    assert [(d["doc"], d["doc_index"]) for d in removed["documents"]] == [("doc2", 2), ("doc5", 5)]
    assert removed["documents"][0]["spikes"] == [{"step": 12, "gss": 480.0, "param": "transformer.h.0.mlp.c_fc.weight"}]
    assert removed["documents"][0]["tokens"] == len(plain_tokens([DOCUMENTS[2]]))
    meta = json.loads((filtered / "meta.json").read_text())
    assert meta["train_tokens"] == ds.num_tokens and "inputs_sha256" not in meta
    assert meta["filtered"]["documents_removed"] == 2
    assert out.out.strip() == (f"data-filter: removed 2 document(s), {removed_tokens:,} tokens; filtered corpus in "
                               f"{filtered} (list in {filtered / 'removed.json'})")
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_val_split_is_copied_and_min_spikes(tmp_path, capsys):
    data_dir = tmp_path / "data"
    corpus = prepare_corpus(data_dir, val_fraction=0.3)
    train_ids = json.loads((corpus / "train.ids.json").read_text())
    train_index = [int(i) for i in np.load(corpus / "train.docs.npy")[:, 1]]
    a, b = train_index[0], train_index[2]
    # a is in two spike batches (twice in the first: counted once per batch), b in one
    run = make_run(tmp_path / "run", data_dir, [spike(5, 50.0, a, a, b), spike(9, 70.0, a)])
    out_dir = tmp_path / "out"
    code, _ = filter_run(run, "--out", str(out_dir), "--min-spikes", "2", capsys=capsys)
    assert code == 0
    removed = json.loads((out_dir / "removed.json").read_text())
    assert [d["doc_index"] for d in removed["documents"]] == [a]
    assert [s["step"] for s in removed["documents"][0]["spikes"]] == [5, 9]
    kept = [(doc_id, dict(DOCUMENTS)[doc_id]) for doc_id in train_ids if doc_id != f"doc{a}"]
    np.testing.assert_array_equal(np.fromfile(out_dir / "train.bin", dtype=np.uint16), plain_tokens(kept))
    for name in ("val.bin", "val.docs.npy", "val.ids.json", "docs.json"):
        assert (out_dir / name).read_bytes() == (corpus / name).read_bytes(), name
    val_tokens = json.loads((corpus / "meta.json").read_text())["val_tokens"]
    assert TokenDataset(out_dir / "val", block_size=4).num_tokens == val_tokens
    # with the default K = 1 both go; a second run replaces the first output
    code, _ = filter_run(run, "--out", str(out_dir), capsys=capsys)
    assert code == 0
    assert [d["doc_index"] for d in json.loads((out_dir / "removed.json").read_text())["documents"]] == sorted([a, b])
    # the source corpus is untouched
    assert json.loads((corpus / "train.ids.json").read_text()) == train_ids


def test_hub_shards_and_documents_split_across_shards(tmp_path, capsys):
    """A hub corpus (progress.json, <split>_NNNNNN shards) where document 1 continues into the next shard."""
    corpus = tmp_path / "hub"
    corpus.mkdir()
    tokens = {0: np.arange(10, 16), 1: np.arange(20, 30), 2: np.arange(30, 34)}
    # shard 0: doc 0 (6 tokens) + first 4 tokens of doc 1; shard 1: the rest of doc 1 (offset 4) + doc 2
    write_shard(corpus / "train_000000", [tokens[0], tokens[1][:4]], [(0, 0, 0), (6, 1, 0)], ["a", "b"])
    write_shard(corpus / "train_000001", [tokens[1][4:], tokens[2]], [(0, 1, 4), (6, 2, 0)], ["b", "c"])
    write_shard(corpus / "val_000000", [np.arange(40, 45)], [(0, 3, 0)], ["d"])
    atomic_write_json(corpus / "progress.json", {"settings": {}, "finished": True, "shards": {"val": 1, "train": 2},
                                                 "tokens": {"val": 5, "train": 20}})
    run = make_run(tmp_path / "run", tmp_path, [spike(3, 99.0, 1, corpus_ids={1: "b"})])
    code, out = filter_run(run, "--corpus", str(corpus), capsys=capsys)
    assert code == 0, out.err
    filtered = run / "filtered_corpus"
    np.testing.assert_array_equal(np.fromfile(filtered / "train_000000.bin", dtype=np.uint16), tokens[0])
    np.testing.assert_array_equal(np.fromfile(filtered / "train_000001.bin", dtype=np.uint16), tokens[2])
    assert np.load(filtered / "train_000001.docs.npy").tolist() == [[0, 2, 0]]
    progress = json.loads((filtered / "progress.json").read_text())
    assert progress["tokens"] == {"train": 10, "val": 5} and progress["finished"]
    assert json.loads((filtered / "removed.json").read_text())["tokens_removed"] == 10
    ds = open_token_dataset(filtered, "train", block_size=2)
    assert ds.num_tokens == 10 and ds.doc_id(2) == "c"


def test_run_without_spikes_writes_nothing(tmp_path, capsys):
    data_dir = tmp_path / "data"
    prepare_corpus(data_dir, val_fraction=0.0)
    run = make_run(tmp_path / "run", data_dir, spikes=None)
    code, out = filter_run(run, capsys=capsys)
    assert code == 0 and "no spikes.jsonl" in out.out and "nothing written" in out.out
    assert sorted(p.name for p in run.iterdir()) == ["settings.py"]
    # spikes.jsonl with rollbacks only: nothing to remove either
    (run / "spikes.jsonl").write_text(json.dumps({"step": 4, "event": "rollback", "to_step": 0}) + "\n")
    code, out = filter_run(run, capsys=capsys)
    assert code == 0 and "nothing written" in out.out and not (run / "filtered_corpus").exists()


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    data_dir = tmp_path / "data"
    prepare_corpus(data_dir, val_fraction=0.0)
    # the corpus was rebuilt since the run: index 2 is another document now
    run = make_run(tmp_path / "run", data_dir, [spike(3, 20.0, 2, corpus_ids={2: "hamlet"})])
    code, out = filter_run(run, capsys=capsys)
    assert code == 1 and "corpus changed" in out.err and len(out.err.strip().splitlines()) == 1
    assert not (run / "filtered_corpus").exists() and [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    # an index the corpus does not have
    (run / "spikes.jsonl").write_text(json.dumps(spike(3, 20.0, 99, corpus_ids={99: "x"})) + "\n")
    code, out = filter_run(run, capsys=capsys)
    assert code == 1 and "not in" in out.err
    # image runs
    (run / "spikes.jsonl").write_text(json.dumps({"step": 3, "event": "spike", "samples": [{"index": 4}]}) + "\n")
    code, out = filter_run(run, capsys=capsys)
    assert code == 1 and "image samples" in out.err
    # an --out folder that is not a filtered corpus is never replaced
    (run / "spikes.jsonl").write_text(json.dumps(spike(3, 20.0, 2)) + "\n")
    (tmp_path / "precious").mkdir()
    code, out = filter_run(run, "--out", str(tmp_path / "precious"), capsys=capsys)
    assert code == 1 and "not a filtered corpus" in out.err
    assert list((tmp_path / "precious").iterdir()) == []
    # no prepared corpus where the settings point
    other = make_run(tmp_path / "run2", tmp_path / "nodata", [spike(3, 20.0, 2)])
    code, out = filter_run(other, capsys=capsys)
    assert code == 1 and "no prepared corpus" in out.err
    assert filter_run(tmp_path / "missing", capsys=capsys)[0] == 1


def test_command_line_entry(tmp_path):
    data_dir = tmp_path / "data"
    prepare_corpus(data_dir, val_fraction=0.0)
    run = make_run(tmp_path / "run", data_dir, [spike(3, 20.0, 1)])
    r = subprocess.run([sys.executable, "-m", "scripts.data_filter", str(run), "--out", str(tmp_path / "f")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("data-filter: removed 1 document(s)")
    assert "doc1" not in json.loads((tmp_path / "f" / "train.ids.json").read_text())


@pytest.mark.parametrize("events, expected", [
    ([], {}),
    ([{"step": 1, "event": "spike", "samples": [{"doc": "x", "doc_index": 4, "offset": 0}] * 3}], {4: 1}),
    ([{"step": 1, "event": "spike", "samples": [{"doc": "x", "doc_index": 4, "offset": 0}]},
      {"step": 2, "event": "rollback", "to_step": 0},
      {"step": 3, "event": "spike", "samples": [{"doc": "x", "doc_index": 4, "offset": 9},
                                                {"doc": "y", "doc_index": 5, "offset": 0}]}], {4: 2, 5: 1}),
])
def test_spike_documents_counts_batches(events, expected):
    found = data_filter.spike_documents(events)
    assert {i: len(d["spikes"]) for i, d in found.items()} == expected
    assert {i: len(d["spikes"]) for i, d in data_filter.spike_documents(events, min_spikes=2).items()} == \
        {i: n for i, n in expected.items() if n >= 2}
