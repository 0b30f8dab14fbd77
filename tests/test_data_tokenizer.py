import shutil

import pytest

import data.tokenizer as tok
from data.tokenizer import EOT_TOKEN, gpt2_encoding


def test_known_gpt2_ids():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN == 50256
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("!") == [0]
    assert enc.encode("\n") == [198]
    assert enc.encode("The") == [464]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    # as ordinary text the marker is several normal tokens, never the EOT id
    ordinary = enc.encode_ordinary("<|endoftext|>")
    assert len(ordinary) > 1 and EOT_TOKEN not in ordinary


def test_unicode_round_trip():
    enc = gpt2_encoding()
    text = "Ünïcödé — naïve café, 日本語のテキスト, emoji 😀👍🏽, tabs\tand\r\nnewlines  "
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < EOT_TOKEN for i in ids)
    assert enc.decode(ids) == text


def test_encoding_is_cached():
    assert gpt2_encoding() is gpt2_encoding()


def test_tampered_file_is_refused(tmp_path, monkeypatch):
    vocab, encoder = tok.gpt2_files()
    bad_vocab = tmp_path / "vocab.bpe"
    shutil.copy(vocab, bad_vocab)
    with open(bad_vocab, "a") as f:
        f.write("x y\n")
    monkeypatch.setattr(tok, "gpt2_files", lambda: (str(bad_vocab), encoder))
    tok.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(tok.TokenizerFileError) as err:
            tok.gpt2_encoding()
        message = str(err.value)
        assert str(bad_vocab) in message
        assert tok.GPT2_FILE_SHA256["vocab.bpe"] in message
        assert tok.sha256_file(bad_vocab) in message
    finally:
        tok.gpt2_encoding.cache_clear()
