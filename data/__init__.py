"""Data pipelines: tokenizers (GPT-2 BPE, UTF-8 bytes), Shakespeare and hub text corpora as token shards,
image datasets, and batch samplers that are pure functions of the micro-batch index."""

from .cache import DEFAULT_DATA_DIR, data_dir
from .hub_text import FINEWEB_EDU, OPENWEBTEXT, prepare_hub_corpus
from .images import (ImageBatchSampler, ImageSet, augment, channel_mean_std, load_cifar_archive,
                     load_cifar_hub, load_digits_dataset, normalize)
from .sampling import seeded_generator
from .shakespeare import load_shakespeare, prepare_shakespeare
from .text import (TextBatchSampler, TokenDataset, build_token_dataset, open_token_dataset)
from .tokenizer import EOT_TOKEN, byte_encoding, encoding_for, gpt2_encoding

__all__ = [
    "DEFAULT_DATA_DIR", "data_dir", "FINEWEB_EDU", "OPENWEBTEXT", "prepare_hub_corpus",
    "ImageBatchSampler", "ImageSet", "augment", "channel_mean_std", "load_cifar_archive",
    "load_cifar_hub", "load_digits_dataset", "normalize", "load_shakespeare", "prepare_shakespeare", "seeded_generator",
    "TextBatchSampler", "TokenDataset", "build_token_dataset", "open_token_dataset",
    "EOT_TOKEN", "byte_encoding", "encoding_for", "gpt2_encoding",
]
