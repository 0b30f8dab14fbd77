"""Corpus integrity (data/integrity.py) on real files: recorded sizes and hashes, truncated and
odd-length token files, out-of-range token ids, the run-folder hash check, make verify-data,
and a preparation killed by SIGKILL."""
from __future__ import annotations

import json
import re
import os
from pathlib import Path

import numpy as np
import pytest

from data import integrity
from data.integrity import CorpusError, verify_corpus, verify_for_run
from data.text import build_token_dataset, open_token_dataset, write_shard
from data.tokenizer import gpt2_encoding
from trainutil import sigkill_at_marker

REPO = Path(__file__).resolve().parents[1]
DOCS = [(f"doc{i}", f"Line {i} of a small fixture corpus. " * (5 + 3 * i)) for i in range(6)]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    build_token_dataset(DOCS, folder, gpt2_encoding(), val_fraction=0.2, split_seed=0)
    return folder


def test_meta_records_every_file_size_and_sha256(corpus):
    import hashlib

    meta = json.loads((corpus / "meta.json").read_text())
    names = {"train.bin", "train.docs.npy", "train.ids.json", "val.bin", "val.docs.npy", "val.ids.json",
             "docs.json"}
    assert set(meta["files"]) == names
    for name in names:
        data = (corpus / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["files"]["train.bin"]["bytes"] == 2 * meta["train_tokens"]


def test_truncated_token_file_is_refused_naming_file_and_both_sizes(corpus):
    path = corpus / "train.bin"
    size = path.stat().st_size
    os.truncate(path, size - 40)  # even: still whole tokens, just fewer of them
    with pytest.raises(CorpusError) as e:
        open_token_dataset(corpus, "train", 8)
    msg = str(e.value)
    assert f"{path} has {size - 40} bytes but the corpus recorded {size}" in msg
    assert "delete" in msg and "make train" in msg and "\n" not in msg


def test_odd_length_token_file_is_a_clear_error_not_a_numpy_traceback(corpus):
    path = corpus / "val.bin"
    meta = json.loads((corpus / "meta.json").read_text())
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CorpusError, match="has an odd size|has .* bytes but the corpus recorded"):
        open_token_dataset(corpus, "val", 8)
    # also without a size record (a corpus from an older version): the odd size alone is refused
    meta.pop("files")
    (corpus / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match=r"val\.bin has an odd size \(\d+ bytes\)"):
        open_token_dataset(corpus, "val", 8)


def test_missing_meta_means_an_unfinished_corpus(corpus):
    (corpus / "meta.json").unlink()
    with pytest.raises(CorpusError, match="no meta.json or progress.json"):
        open_token_dataset(corpus, "train", 8)


def test_token_id_beyond_the_vocabulary_is_refused_at_open(corpus):
    path = corpus / "train.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[17] = 50257  # the first id past GPT-2's 50257 tokens: an embedding lookup would be out of range
    tokens.tofile(path)  # same size: only the hash (full check) or the range check can see it
    with pytest.raises(CorpusError) as e:
        open_token_dataset(corpus, "train", 8)
    assert f"{path} holds token id 50257 (first bad id at token 17)" in str(e.value)
    assert "vocabulary size 50257" in str(e.value)
    with pytest.raises(CorpusError, match="sha256"):  # make verify-data sees the changed bytes first
        verify_corpus(corpus, full=True)


def test_large_shards_are_range_checked_on_first_use(tmp_path, monkeypatch):
    from data.text import TokenDataset
    import torch

    monkeypatch.setattr(integrity, "EAGER_RANGE_TOKENS", 30)  # these two 20-token shards count as large
    write_shard(tmp_path / "a", [np.arange(20)], [(0, 0, 0)], ["a"])
    write_shard(tmp_path / "b", [np.full(20, 60000)], [(0, 1, 0)], ["b"])
    ds = TokenDataset([str(tmp_path / "a"), str(tmp_path / "b")], block_size=4, vocab_size=50257)
    ds.batch(torch.tensor([0, 3]))  # shard a only: fine
    with pytest.raises(CorpusError, match=r"b\.bin holds token id 60000"):
        ds.batch(torch.tensor([20]))  # the first window of shard b


def test_changed_bytes_of_the_same_size_fail_the_full_check_only(corpus):
    assert verify_corpus(corpus, full=True)["files"] == 7
    path = corpus / "train.ids.json"
    data = bytearray(path.read_bytes())
    data[2] = ord("X") if data[2] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))
    verify_corpus(corpus, full=False)  # sizes agree
    with pytest.raises(CorpusError, match=r"train\.ids\.json has sha256 .* but the corpus recorded"):
        verify_corpus(corpus, full=True)


def test_run_folder_verifies_its_corpus_once_and_again_when_it_changes(corpus, tmp_path):
    run = tmp_path / "run"
    assert verify_for_run(corpus, run) is True  # first use: hashes checked, remembered
    record = json.loads((run / "corpus.json").read_text())
    assert record["corpus"] == str(corpus.resolve()) and record["full"] is True
    assert verify_for_run(corpus, run) is False  # same corpus: sizes only (at open)
    build_token_dataset(DOCS[:-1], corpus, gpt2_encoding(), val_fraction=0.2, split_seed=0)  # re-prepared
    assert verify_for_run(corpus, run) is True


def test_verify_data_entry_point(corpus, tmp_path, capsys):
    assert integrity.main(["--corpus", str(corpus)]) == 0
    assert "OK (7 files" in capsys.readouterr().out
    os.truncate(corpus / "train.bin", 10)
    assert integrity.main(["--corpus", str(corpus)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.bin has 10 bytes" in err
    # from the settings, as `make verify-data` runs it
    settings = tmp_path / "settings.py"
    settings.write_text(f"__source__: str = 'x'\n__source_sha256__: str = 'x'\nDATA_DIR: str = {str(tmp_path)!r}\n"
                        f"DATA_PREPARED_DIR: str = {str(corpus)!r}\nDATA_SHAKESPEARE: bool = True\n")
    from scripts.kconfig import settings as settings_mod
    real = settings_mod.load_settings
    with pytest.MonkeyPatch.context() as m:
        m.setattr(settings_mod, "load_settings", lambda path: real(path, check_fresh=False))
        assert integrity.main(["--settings", str(settings)]) == 1
    assert "train.bin has 10 bytes" in capsys.readouterr().err


def test_hub_corpus_records_each_shard(tmp_path):
    from data.hub_text import _ShardedStream

    state = dict(settings={}, documents_consumed=0, carry_tokens=0, val_done=True, shards={"val": 0, "train": 0},
                 tokens={"val": 0, "train": 0}, finished=False, vocab_size=50257, files={})
    stream = _ShardedStream(tmp_path, shard_tokens=8, val_budget=0, state=state)
    stream.add_document(0, "d0", np.arange(1, 13, dtype=np.uint16), 0)
    stream.flush("train", 1, 0, finished=True)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert sorted(progress["files"]) == sorted(f"train_00000{k}{s}" for k in (0, 1)
                                               for s in (".bin", ".docs.npy", ".ids.json"))
    assert progress["files"]["train_000001.bin"]["bytes"] == 8  # the last 4 tokens
    assert open_token_dataset(tmp_path, "train", 2).num_tokens == 12
    os.truncate(tmp_path / "train_000001.bin", 6)
    with pytest.raises(CorpusError, match=r"train_000001\.bin has 6 bytes but the corpus recorded 8"):
        open_token_dataset(tmp_path, "train", 2)


# A child that prepares the fixture corpus and stops for good after writing its first shard.
PREPARE = """
import sys, time
from pathlib import Path
import data.text as text
from data.tokenizer import gpt2_encoding
real = text.write_shard
def slow(prefix, *args):
    real(prefix, *args)
    Path(sys.argv[2]).write_text("one shard written")
    time.sleep(120)
text.write_shard = slow
docs = [(f"doc{i}", f"Line {i} of a small fixture corpus. " * (5 + 3 * i)) for i in range(6)]
text.build_token_dataset(docs, Path(sys.argv[1]), gpt2_encoding(), 0.2, 0)
"""


def test_preparation_killed_half_way_is_never_taken_as_complete(tmp_path):
    folder, marker = tmp_path / "corpus", tmp_path / "marker"
    sigkill_at_marker(PREPARE, [str(folder), str(marker)], marker)
    partial = list(tmp_path.glob(".corpus.partial-*"))
    assert partial and (partial[0] / "train.bin").exists()  # the half-written work is there ...
    assert not folder.exists()  # ... but never under the corpus's name
    with pytest.raises(FileNotFoundError):
        open_token_dataset(folder, "train", 8)
    meta = build_token_dataset(DOCS, folder, gpt2_encoding(), 0.2, 0)  # the next preparation starts over
    assert not list(tmp_path.glob(".corpus.partial-*"))  # and cleared the dead one's leftovers
    assert open_token_dataset(folder, "train", 8).num_tokens == meta["train_tokens"]
    verify_corpus(folder, full=True)


def test_make_verify_data(tree, make):
    """The target reads the settings (the OK and damaged cases: test_verify_data_entry_point)."""
    r = make("verify-data")  # the default preset's corpus, not prepared in this fresh copy
    assert r.returncode != 0 and "data_cache/shakespeare_bytes does not exist yet; `make train` prepares it" in r.stderr
    assert re.search(r"^  verify-data +\S", make("help").stdout, re.M)
