"""In-memory image datasets (uint8 (N, C, H, W) images, int64 labels), torch-only
augmentation and an epoch-wise sampler that is a pure function of the micro-batch index.
"""

import codecs
import io
import pickle
import tarfile
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import check_ranks, rank_rows, seeded_generator

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct


class ImageSet(NamedTuple):
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int


def load_digits_dataset(val_fraction=0.2, seed=0):
    """scikit-learn's 8x8 digits (shipped inside the package, so always offline):
    1x8x8 images scaled from 0..16 to 0..255, stratified (train, val) split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    x_tr, x_va, y_tr, y_va = train_test_split(images, digits.target, test_size=val_fraction,
                                              random_state=seed, stratify=digits.target)
    return (ImageSet(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), 10),
            ImageSet(torch.from_numpy(x_va), torch.from_numpy(y_va).long(), 10))


def load_cifar_hub(path, name=None, **load_kwargs):
    """(train, test) of CIFAR-10 ("uoft-cs/cifar10": img, label) or CIFAR-100
    ("uoft-cs/cifar100": img, fine_label, coarse_label; we use fine_label) through
    datasets.load_dataset; `path` may also be "parquet" with data_files=..."""
    import datasets

    splits = datasets.load_dataset(path, name, **load_kwargs)
    return tuple(_hub_split(splits[s], datasets) for s in ("train", "test"))


def _hub_split(ds, datasets):
    image_col = next(k for k, f in ds.features.items() if isinstance(f, datasets.Image))
    label_col = "fine_label" if "fine_label" in ds.features else "label"
    ds = ds.cast_column(image_col, datasets.Image(mode="RGB")).with_format("numpy")
    rows = ds[:]
    images = torch.from_numpy(np.ascontiguousarray(rows[image_col].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(rows[label_col]).long()
    feature = ds.features[label_col]
    classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(labels.max()) + 1
    return ImageSet(images, labels, classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Pickle runs arbitrary code from the file, so only load archives you trust. As a
    safeguard we refuse every class except what a numpy array needs; CIFAR batches
    are plain dicts of bytes, lists and one uint8 array."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("_codecs", "encode"): codecs.encode}  # how protocol 2 stores bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR archive")
        return self.ALLOWED[module, name]


CIFAR_ARCHIVES = {  # layout of the official python-pickle tarballs
    "cifar-10-batches-py/test_batch": dict(
        train=[f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        test=["cifar-10-batches-py/test_batch"], label_key=b"labels", num_classes=10),
    "cifar-100-python/test": dict(
        train=["cifar-100-python/train"], test=["cifar-100-python/test"],
        label_key=b"fine_labels", num_classes=100),
}


def load_cifar_archive(tar_path):
    """(train, test) from cifar-10-python.tar.gz or cifar-100-python.tar.gz, told apart
    by their member names. Read in memory; nothing is extracted to disk."""
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        layout = next((v for k, v in CIFAR_ARCHIVES.items() if k in names), None)
        if layout is None:
            raise ValueError(f"{tar_path} is neither cifar-10-python nor cifar-100-python")

        def read(members):
            parts = [_read_batch(tar, m, layout) for m in members]
            images = torch.cat([p[0] for p in parts])
            return ImageSet(images, torch.cat([p[1] for p in parts]), layout["num_classes"])

        return read(layout["train"]), read(layout["test"])


def _read_batch(tar, member, layout):
    raw = tar.extractfile(member).read()
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[layout["label_key"]])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{member}: expected uint8 data of shape (N, 3072), got "
                         f"{data.dtype} {data.shape}")
    if labels.shape != (len(data),) or labels.min() < 0 or labels.max() >= layout["num_classes"]:
        raise ValueError(f"{member}: labels do not match the {len(data)} images")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels).long()


def channel_mean_std(images):
    """Per-channel mean and std of uint8 images in [0, 1] units, exact via histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].flatten(), minlength=256).double()
        m = (counts * values).sum() / counts.sum()
        mean.append(m.item())
        std.append(((counts * (values - m) ** 2).sum() / counts.sum()).sqrt().item())
    return tuple(mean), tuple(std)


def normalize(batch_uint8, mean, std):
    """float32 (x / 255 - mean) / std per channel; mean and std in [0, 1] units."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (batch_uint8.float() / 255 - mean) / std


def crop_flip(batch, top, left, flip, crop_padding):
    """Per sample n: the HxW window at (top[n], left[n]) of the zero-padded image,
    mirrored left-right where flip[n]; one gather for the whole batch."""
    N, C, H, W = batch.shape
    padded = F.pad(batch, (crop_padding,) * 4)
    rows = top[:, None] + torch.arange(H)
    cols = torch.arange(W).expand(N, W)
    cols = torch.where(flip[:, None], W - 1 - cols, cols) + left[:, None]
    n = torch.arange(N).view(N, 1, 1, 1)
    c = torch.arange(C).view(1, C, 1, 1)
    return padded[n, c, rows[:, None, :, None], cols[:, None, None, :]]


def augment(batch_uint8, generator, crop_padding=4, flip=True, rank=0, world_size=1):
    """Random crop (zero padding) and horizontal flip, drawn per sample.

    The draws are made for the global batch (len(batch) * world_size samples) and rank r
    uses rows [r*N, (r+1)*N), so with the same generator seed DDP ranks together
    augment exactly like one process with the whole batch."""
    N = len(batch_uint8)
    G = N * world_size
    top = torch.randint(0, 2 * crop_padding + 1, (G,), generator=generator)
    left = torch.randint(0, 2 * crop_padding + 1, (G,), generator=generator)
    flips = torch.rand(G, generator=generator) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    return crop_flip(batch_uint8, rank_rows(top, rank, N), rank_rows(left, rank, N),
                     rank_rows(flips, rank, N), crop_padding)


class ImageBatchSampler:
    """Dataset indices per micro-batch, a pure function of the micro-batch index.

    Epoch e shuffles all n indices with a generator seeded by (seed, e); micro-batch i
    takes the next global batch (local_batch * world_size indices) of that permutation
    and rank r keeps rows [r*local_batch, (r+1)*local_batch). The last n mod global
    batch indices of each permutation are dropped, so every index appears at most
    once per epoch (exactly once when the global batch divides n)."""

    def __init__(self, n, local_batch, rank=0, world_size=1, seed=0):
        check_ranks(local_batch, rank, world_size)
        self.global_batch = local_batch * world_size
        if n < self.global_batch:
            raise ValueError(f"{n} images cannot fill a global batch of {self.global_batch}")
        self.n, self.local_batch, self.seed = n, local_batch, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // self.global_batch
        self._perm = (None, None)  # (epoch, permutation): a cache, not state

    def epoch_of(self, micro_index):
        return micro_index // self.steps_per_epoch

    def augment_generator(self, micro_index):
        """Generator for this micro-batch's augmentation draws (pass it to augment() with
        this rank and world size): also a pure function of (seed, micro_index)."""
        return seeded_generator(self.seed, 1, micro_index)

    def indices(self, micro_index):
        epoch, step = divmod(micro_index, self.steps_per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)))
        perm = self._perm[1]
        global_batch = perm[step * self.global_batch:(step + 1) * self.global_batch]
        return rank_rows(global_batch, self.rank, self.local_batch)
