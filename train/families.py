"""Model families: what differs between training a GPT-2 and a ResNet.

The training loop (train/trainer.py) is the same for every family; a family
supplies the model, the batches of micro-batch i (a pure function of i, so a
resumed or distributed run sees exactly the same data), batch -> loss, and
its evaluation metric.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .distributed import DistInfo, barrier


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    sample_ids: torch.Tensor  # (B, 2) doc index and token offset for text; (B, 1) dataset index for images

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.inputs.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     self.sample_ids)


def total_iters_for(cfg, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: MAX_ITERS, MAX_EPOCHS, or whichever ends first."""
    by_epochs = cfg.MAX_EPOCHS * steps_per_epoch if cfg.MAX_EPOCHS else None
    candidates = [n for n in (cfg.MAX_ITERS or None, by_epochs) if n]
    return max(1, min(candidates))


class GPTFamily:
    """GPT-2 on a token corpus: next-token cross-entropy; val loss and perplexity (and
    bits per byte for the byte tokenizer). The tokenizer is the settings' choice
    (data.tokenizer.encoding_for); the model's vocabulary is the tokenizer's."""

    unit = "tokens"

    def __init__(self, cfg, info: DistInfo):
        from data.text import TextBatchSampler, open_token_dataset
        from data.tokenizer import CorpusTokenizerError, check_corpus_encoding, encoding_for

        self.cfg, self.info = cfg, info
        self.encoding = encoding_for(cfg)
        corpus_dir = self._prepare_corpus()
        try:
            check_corpus_encoding(corpus_dir, self.encoding)
        except CorpusTokenizerError as e:
            raise SystemExit(f"error: {e}") from None
        self.train_data = open_token_dataset(corpus_dir, "train", cfg.GPT2_BLOCK_SIZE)
        self.val_data = open_token_dataset(corpus_dir, "val", cfg.GPT2_BLOCK_SIZE)
        self.sampler = TextBatchSampler(len(self.train_data), cfg.BATCH_SIZE, info.rank,
                                        info.world_size, cfg.SEED)
        self.val_sampler = TextBatchSampler(len(self.val_data), cfg.BATCH_SIZE, info.rank,
                                            info.world_size, cfg.SEED)

    def _prepare_corpus(self) -> Path:
        """Tokenize the configured corpus into DATA_DIR once (rank 0; the others wait)."""
        from data.cache import corpus_folder, exclusive
        cfg = self.cfg
        out = corpus_folder(cfg.as_dict())
        if out is None:
            raise SystemExit("error: GPT-2 needs a text dataset (DATA_SHAKESPEARE, DATA_FINEWEB_EDU "
                             "or DATA_OPENWEBTEXT)")
        if self.info.is_main:
            if not cfg.DATA_PREPARED_DIR:
                with exclusive(Path(cfg.DATA_DIR) / ".prepare.lock"):  # parallel runs may be preparing it too
                    self._prepare(out)
            # the full sha256 check, once per run folder (sizes are checked at every open)
            from data.integrity import verify_for_run
            verify_for_run(out, Path(cfg.OUT_DIR))
        barrier(self.info)
        return out

    def _prepare(self, out: Path) -> None:
        cfg = self.cfg
        if cfg.DATA_SHAKESPEARE:
            from data.shakespeare import prepare_shakespeare
            prepare_shakespeare(cfg.DATA_DIR, cfg.DATA_VAL_FRACTION,  # into `out`, the same folder
                                encoding=self.encoding)
        else:
            from data.hub_text import prepare_hub_corpus
            prepare_hub_corpus(cfg.DATA_HF_PATH, cfg.DATA_HF_NAME or None, "train", "text", out,
                               self.encoding, shard_tokens=cfg.DATA_SHARD_TOKENS * 1_000_000,
                               max_tokens=cfg.DATA_MAX_TOKENS * 1_000_000 or None,
                               val_fraction=cfg.DATA_VAL_FRACTION)

    def build_model(self):
        from models.gpt2 import build_gpt2
        return build_gpt2(self.cfg, vocab_size=self.encoding.n_vocab)

    def units_per_micro_batch(self) -> int:
        return self.cfg.BATCH_SIZE * self.cfg.GPT2_BLOCK_SIZE

    def steps_per_epoch(self) -> int:
        global_tokens = self.units_per_micro_batch() * self.cfg.GRAD_ACCUM_STEPS * self.info.world_size
        return max(1, self.train_data.num_tokens // global_tokens)

    def train_batch(self, micro_index: int) -> Batch:
        x, y, ids = self.train_data.batch(self.sampler.starts(micro_index))
        return Batch(x, y, ids)

    def loss(self, model, batch: Batch) -> torch.Tensor:
        _, loss = model(batch.inputs, batch.targets)
        return loss

    def eval_batches(self):
        # each rank takes its rows of every global eval batch (the sampler slices by
        # rank), so N processes evaluate exactly the windows one process would
        for i in range(self.cfg.EVAL_BATCHES):
            x, y, ids = self.val_data.batch(self.val_sampler.eval_starts(i))
            yield Batch(x, y, ids)

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        """Mean validation loss over EVAL_BATCHES fixed batches, and its perplexity."""
        total = torch.zeros(2, device=device)
        for batch in self.eval_batches():
            batch = batch.to(device)
            with autocast():
                _, loss = model(batch.inputs, batch.targets)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if self.info.enabled:
            torch.distributed.all_reduce(total)
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                **bits_per_byte(val_loss, self.encoding)}

    def probe_batch(self, device) -> Batch:
        """MONITOR_PROBE_BATCH fixed held-out sequences for the health monitor's probes."""
        from data.text import TextBatchSampler
        sampler = TextBatchSampler(len(self.val_data), self.cfg.MONITOR_PROBE_BATCH, seed=self.cfg.SEED)
        x, y, ids = self.val_data.batch(sampler.eval_starts(10_000))  # an eval batch no evaluation uses
        return Batch(x, y, ids).to(device)

    def data_fingerprint(self) -> dict:
        """What every rank must agree on about the corpus (multi-node runs)."""
        return {"train_tokens": self.train_data.num_tokens, "val_tokens": self.val_data.num_tokens}

    def describe_sample(self, sample_ids: torch.Tensor) -> list[dict]:
        """Sample identities for spikes.jsonl: document id and token offset."""
        return [{"doc": self.train_data.doc_id(int(d)), "doc_index": int(d), "offset": int(o)}
                for d, o in sample_ids.tolist()]

    def sample_text(self, model, device) -> str:
        return generate_text(model, self.encoding, self.cfg, device)


def bits_per_byte(loss_nats: float, encoding) -> dict:
    """{"val_bpb": loss / ln 2} when a token is a byte (the byte tokenizer): the figure
    character-level results (nanoGPT's shakespeare_char) are given in. {} otherwise:
    for BPE the bytes per token vary with the text, so nats per token do not convert."""
    if encoding.name != "bytes":
        return {}
    return {"val_bpb": loss_nats / math.log(2)}


def generate_text(model, encoding, cfg, device) -> str:
    """Continue SAMPLE_PROMPT for SAMPLE_TOKENS tokens (seeded, so reruns agree); an empty
    prompt starts from the tokenizer's end-of-document id, as a new document."""
    prompt = encoding.encode_ordinary(cfg.SAMPLE_PROMPT) if cfg.SAMPLE_PROMPT else [encoding.eot_token]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(cfg.SEED)
    was_training = model.training
    model.eval()
    out = model.generate(idx, cfg.SAMPLE_TOKENS, temperature=cfg.SAMPLE_TEMPERATURE,
                         top_k=cfg.SAMPLE_TOP_K or None, generator=g)
    model.train(was_training)
    return encoding.decode(out[0].tolist())


class ImageFamily:
    """ResNet on an image set: cross-entropy; top-1 accuracy on the validation set."""

    unit = "images"

    def __init__(self, cfg, info: DistInfo):
        from data.images import ImageBatchSampler, channel_mean_std

        self.cfg, self.info = cfg, info
        self.train_set, self.val_set = self._load()
        self.mean, self.std = channel_mean_std(self.train_set.images)
        self.sampler = ImageBatchSampler(len(self.train_set.labels), cfg.BATCH_SIZE, info.rank,
                                         info.world_size, cfg.SEED)
        height = self.train_set.images.shape[-1]
        # 4 pixels of padding for 32x32 CIFAR; scaled down for smaller images (1 for 8x8 digits)
        self.crop_padding = max(1, height // 8)

    def _load(self):
        cfg = self.cfg
        from data import images
        if cfg.DATA_DIGITS:
            return images.load_digits_dataset()
        if cfg.DATA_CIFAR10 or cfg.DATA_CIFAR100:
            if cfg.DATA_CIFAR_ARCHIVE:
                return images.load_cifar_archive(cfg.DATA_CIFAR_ARCHIVE)
            return images.load_cifar_hub(cfg.DATA_HF_PATH, cache_dir=str(Path(cfg.DATA_DIR) / "hf"))
        raise SystemExit("error: a ResNet needs an image dataset (DATA_DIGITS, DATA_CIFAR10 or DATA_CIFAR100)")

    def build_model(self):
        from models.resnet import build_resnet
        _, channels, height, _ = self.train_set.images.shape
        return build_resnet(self.cfg, self.train_set.num_classes, in_channels=channels, input_size=height)

    def units_per_micro_batch(self) -> int:
        return self.cfg.BATCH_SIZE

    def steps_per_epoch(self) -> int:
        return max(1, self.sampler.steps_per_epoch // self.cfg.GRAD_ACCUM_STEPS)

    def train_batch(self, micro_index: int) -> Batch:
        from data.images import augment, normalize
        idx = self.sampler.indices(micro_index)
        images = self.train_set.images[idx]
        if self.cfg.DATA_AUGMENT_CROP or self.cfg.DATA_AUGMENT_FLIP:
            g = self.sampler.augment_generator(micro_index)
            padding = self.crop_padding if self.cfg.DATA_AUGMENT_CROP else 0
            images = augment(images, g, crop_padding=padding, flip=bool(self.cfg.DATA_AUGMENT_FLIP),
                             rank=self.info.rank, world_size=self.info.world_size)
        return Batch(normalize(images, self.mean, self.std), self.train_set.labels[idx], idx[:, None])

    def loss(self, model, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.inputs).float(), batch.targets)

    def _val_batches(self):
        from data.images import normalize
        n = len(self.val_set.labels)
        size = self.cfg.BATCH_SIZE
        batches = range(self.info.rank, math.ceil(n / size), self.info.world_size)
        for b in list(batches)[:self.cfg.EVAL_BATCHES]:
            sl = slice(b * size, min(n, (b + 1) * size))
            yield Batch(normalize(self.val_set.images[sl], self.mean, self.std), self.val_set.labels[sl],
                        torch.arange(sl.start, sl.stop)[:, None])

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        """Top-1 accuracy and mean loss over the validation set (at most EVAL_BATCHES batches)."""
        total = torch.zeros(3, device=device, dtype=torch.float64)
        for batch in self._val_batches():
            batch = batch.to(device)
            with autocast():
                logits = model(batch.inputs)
            loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
            correct = (logits.argmax(dim=-1) == batch.targets).sum()
            total += torch.stack([loss.double(), correct.double(),
                                  torch.tensor(float(len(batch.targets)), device=device, dtype=torch.float64)])
        if self.info.enabled:
            torch.distributed.all_reduce(total)
        return {"val_loss": (total[0] / total[2]).item(), "val_accuracy": (total[1] / total[2]).item()}

    def probe_batch(self, device) -> Batch:
        return next(iter(self._val_batches())).to(device)

    def data_fingerprint(self) -> dict:
        """What every rank must agree on about the image set (multi-node runs)."""
        return {"train_images": len(self.train_set.labels), "val_images": len(self.val_set.labels)}

    def describe_sample(self, sample_ids: torch.Tensor) -> list[dict]:
        return [{"index": int(i)} for i in sample_ids.flatten().tolist()]
