"""The byte-level tokenizer (TOKENIZER_BYTES): ids, round trips, shards, cache folders,
the tokenizer check on opening a corpus, and the choice between the two tokenizers."""
import json

import numpy as np
import pytest

from data.shakespeare import prepare_shakespeare
from data.text import build_token_dataset, open_token_dataset
from data.tokenizer import (BYTES_EOT_TOKEN, BYTES_VOCAB_SIZE, ByteEncoding, CorpusTokenizerError,
                            byte_encoding, check_corpus_encoding, encoding_for, gpt2_encoding,
                            vocab_size_for)

DOCS = [("a", "To be, or not to be.\n"), ("b", "café — 日本 😀\n"), ("c", "x" * 40), ("d", "")]


def test_hand_computed_ids():
    enc = byte_encoding()
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("bytes", 257, 256)
    assert enc.encode_ordinary("A") == [65]
    assert enc.encode_ordinary("é") == [195, 169]  # U+00E9 = 0b11000011 0b10101001 in UTF-8
    assert enc.encode_ordinary("€") == [0xE2, 0x82, 0xAC]
    assert enc.encode_ordinary("😀") == [0xF0, 0x9F, 0x98, 0x80]
    assert enc.encode_ordinary("") == []
    assert enc.encode_ordinary_batch(["hi", "é"]) == [[104, 105], [195, 169]]
    # the EOT marker written as text is ordinary bytes, never id 256
    assert BYTES_EOT_TOKEN not in enc.encode_ordinary("<|endoftext|>")


@pytest.mark.parametrize("text", ["", "plain ASCII\n", "Ünïcödé — naïve café, 日本語, 😀👍🏽\t\r\n",
                                  "\x00\x7f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff"])
def test_round_trip_of_any_utf8(text):
    enc = byte_encoding()
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert enc.decode(ids) == text


def test_decode_of_cut_characters_and_eot():
    enc = byte_encoding()
    assert enc.decode([195]) == "\ufffd"  # half of "é": replaced, never an exception
    assert enc.decode([104, 105, 256, 195, 169]) == "hi<|endoftext|>é"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        enc.decode([257])


def test_the_choice():
    assert isinstance(encoding_for({"TOKENIZER_BYTES": True}), ByteEncoding)
    assert encoding_for({"TOKENIZER_GPT2": True, "TOKENIZER_BYTES": False}) is gpt2_encoding()
    assert encoding_for({}) is gpt2_encoding()  # settings of a ResNet or from before the choice
    assert vocab_size_for({"TOKENIZER_BYTES": True}) == 257
    assert vocab_size_for({"TOKENIZER_GPT2": True}) == 50257


def test_byte_shards(tmp_path):
    enc = byte_encoding()
    meta = build_token_dataset(DOCS, tmp_path, enc, val_fraction=0.0, split_seed=0)
    assert (meta["encoding"], meta["vocab_size"]) == ("bytes", 257)
    tokens = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert tokens.max() < BYTES_VOCAB_SIZE
    # every document's bytes then EOT, in order
    expected = [b for _, text in DOCS for b in list(text.encode("utf-8")) + [256]]
    assert tokens.tolist() == expected
    ds = open_token_dataset(tmp_path, "train", block_size=8)
    x, y, _ = ds.batch(np.array([0, 5]))
    assert x.max() < 257 and (x[:, 1:] == y[:, :-1]).all()


def test_shakespeare_caches_differ_and_refuse_each_other(tmp_path, monkeypatch):
    import data.shakespeare
    monkeypatch.setattr(data.shakespeare, "load_shakespeare", lambda cache_dir: DOCS)  # no download
    cache = tmp_path / "cache"
    gpt2 = prepare_shakespeare(cache, 0.3, encoding=gpt2_encoding())
    raw = prepare_shakespeare(cache, 0.3, encoding=byte_encoding())
    assert (gpt2.name, raw.name) == ("shakespeare_gpt2", "shakespeare_bytes")
    assert json.loads((raw / "meta.json").read_text())["vocab_size"] == 257
    assert np.fromfile(raw / "val.bin", dtype=np.uint16).max() < 257
    check_corpus_encoding(raw, byte_encoding())  # matching: accepted
    with pytest.raises(CorpusTokenizerError, match="'gpt2' tokenizer .*this run uses 'bytes'"):
        check_corpus_encoding(gpt2, byte_encoding())
    with pytest.raises(CorpusTokenizerError, match="'bytes' tokenizer"):
        check_corpus_encoding(raw, gpt2_encoding())


def test_hub_corpus_records_its_tokenizer(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps(
        {"settings": {"encoding": "gpt2", "vocab_size": 50257}, "finished": True}))
    check_corpus_encoding(tmp_path, gpt2_encoding())
    with pytest.raises(CorpusTokenizerError, match=str(tmp_path)):
        check_corpus_encoding(tmp_path, byte_encoding())
