import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from data.images import (ImageBatchSampler, augment, channel_mean_std, crop_flip,
                         load_cifar_archive, load_cifar_hub, load_digits_dataset, normalize)


def random_images(n, seed, shape=(3, 32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ---------- datasets ----------

def test_digits_split():
    from sklearn.datasets import load_digits
    train, val = load_digits_dataset()
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert len(train.images) + len(val.images) == 1797 and len(val.images) == 360
    assert train.num_classes == 10 and train.labels.dtype == torch.int64
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # stratified: every class keeps its share (within one image) in val
    totals = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(val.labels.numpy()) - totals * 0.2) <= 1)
    # 0..16 -> 0..255: every pixel value is a rounded multiple of 255/16
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(train.images).tolist()) <= allowed
    again, _ = load_digits_dataset()
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def _pickle_member(tar, name, obj):
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cifar10_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = {f"data_batch_{i}": random_images(3, i) for i in range(1, 6)}
    batches["test_batch"] = random_images(5, 9)
    labels = {k: [(i * 3 + j) % 10 for j in range(len(v))] for i, (k, v) in enumerate(batches.items())}
    with tarfile.open(path, "w:gz") as tar:
        for name, images in batches.items():
            _pickle_member(tar, f"cifar-10-batches-py/{name}",
                           {b"data": images.reshape(len(images), -1), b"labels": labels[name],
                            b"batch_label": b"x", b"filenames": [b"f.png"] * len(images)})
    train, test = load_cifar_archive(path)
    train_keys = [f"data_batch_{i}" for i in range(1, 6)]
    assert torch.equal(train.images, torch.from_numpy(np.concatenate([batches[k] for k in train_keys])))
    assert train.labels.tolist() == sum((labels[k] for k in train_keys), [])
    assert torch.equal(test.images, torch.from_numpy(batches["test_batch"]))
    assert test.labels.tolist() == labels["test_batch"] and train.num_classes == 10


def _write_cifar100(path, train_data, train_labels, test_objects=None):
    with tarfile.open(path, "w:gz") as tar:
        _pickle_member(tar, "cifar-100-python/train",
                       {b"data": train_data, b"fine_labels": train_labels,
                        b"coarse_labels": [0] * len(train_labels)})
        test = test_objects or {b"data": random_images(8, 2).reshape(8, -1),
                                b"fine_labels": list(range(90, 98)), b"coarse_labels": [1] * 8}
        _pickle_member(tar, "cifar-100-python/test", test)


def test_cifar100_archive_and_validation(tmp_path):
    images = random_images(12, 1)
    _write_cifar100(tmp_path / "ok.tar.gz", images.reshape(12, -1), list(range(0, 96, 8)))
    train, test = load_cifar_archive(tmp_path / "ok.tar.gz")
    assert torch.equal(train.images, torch.from_numpy(images))
    assert train.labels.tolist() == list(range(0, 96, 8)) and train.num_classes == 100
    assert test.labels.tolist() == list(range(90, 98))

    _write_cifar100(tmp_path / "shape.tar.gz", images.reshape(12, 3, -1), [0] * 12)
    with pytest.raises(ValueError, match="3072"):
        load_cifar_archive(tmp_path / "shape.tar.gz")
    _write_cifar100(tmp_path / "labels.tar.gz", images.reshape(12, -1), [0] * 11)
    with pytest.raises(ValueError, match="labels"):
        load_cifar_archive(tmp_path / "labels.tar.gz")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_archive_pickle_may_not_name_other_classes(tmp_path):
    _write_cifar100(tmp_path / "evil.tar.gz", random_images(2, 0).reshape(2, -1), [0, 1],
                    test_objects={b"data": _RunsCode()})
    with pytest.raises(pickle.UnpicklingError, match="getcwd"):
        load_cifar_archive(tmp_path / "evil.tar.gz")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        _pickle_member(tar, "something/else", {})
    with pytest.raises(ValueError, match="neither"):
        load_cifar_archive(tmp_path / "other.tar.gz")


def _hub_parquet(folder, split, images, columns, features):
    import datasets
    from PIL import Image
    pil = [Image.fromarray(img.transpose(1, 2, 0)) for img in images]
    ds = datasets.Dataset.from_dict({"img": pil, **columns},
                                    features=datasets.Features({"img": datasets.Image(), **features}))
    path = str(folder / f"{split}.parquet")
    ds.to_parquet(path)
    return path


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_hub_schema(tmp_path, variant):
    import datasets
    import pyarrow.parquet as pq
    data, files = {}, {}
    for split, n, seed in (("train", 6, 0), ("test", 4, 1)):
        images = random_images(n, seed)
        if variant == "cifar10":
            columns = {"label": [i % 10 for i in range(n)]}
            features = {"label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
        else:
            columns = {"fine_label": [99 - i for i in range(n)], "coarse_label": [i for i in range(n)]}
            features = {"fine_label": datasets.ClassLabel(names=[f"f{i}" for i in range(100)]),
                        "coarse_label": datasets.ClassLabel(names=[f"c{i}" for i in range(20)])}
        files[split] = _hub_parquet(tmp_path, split, images, columns, features)
        data[split] = (images, next(iter(columns.values())))
    stored = pq.read_table(files["train"]).column("img")[0].as_py()["bytes"]
    assert stored.startswith(b"\x89PNG")  # real PNG bytes, as on the hub
    train, test = load_cifar_hub("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    for got, (images, labels) in ((train, data["train"]), (test, data["test"])):
        assert got.images.dtype == torch.uint8 and torch.equal(got.images, torch.from_numpy(images))
        assert got.labels.tolist() == labels
        assert got.num_classes == (10 if variant == "cifar10" else 100)


# ---------- augmentation ----------

def loop_crop_flip(img, top, left, flip, pad):
    C, H, W = img.shape
    padded = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + H, pad:pad + W] = img
    out = torch.empty_like(img)
    for i in range(H):
        for j in range(W):
            src = W - 1 - j if flip else j
            out[:, i, j] = padded[:, top + i, left + src]
    return out


def test_crop_flip_matches_loop():
    batch = torch.from_numpy(random_images(6, 3, (2, 5, 7)))
    top = torch.tensor([0, 4, 2, 8, 1, 3])
    left = torch.tensor([8, 0, 4, 2, 6, 3])
    flip = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(batch, top, left, flip, 4)
    for n in range(6):
        assert torch.equal(out[n], loop_crop_flip(batch[n], int(top[n]), int(left[n]), bool(flip[n]), 4))


def test_crop_flip_hand_case():
    img = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # rows 1 2 3 / 4 5 6 / 7 8 9
    out = crop_flip(img, torch.tensor([0]), torch.tensor([2]), torch.tensor([True]), 1)
    # window shifted up-right by one (zero fill), then mirrored
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 3, 2], [0, 6, 5]]


def test_augment_outputs_are_padded_windows_or_their_mirror():
    batch = torch.from_numpy(random_images(32, 4, (3, 6, 6)))
    out = augment(batch, torch.Generator().manual_seed(0), crop_padding=2)
    used = set()
    for n in range(32):
        matches = {(t, l, f) for t in range(5) for l in range(5) for f in (False, True)
                   if torch.equal(out[n], loop_crop_flip(batch[n], t, l, f, 2))}
        assert matches
        used |= matches
    assert {f for _, _, f in used} == {False, True} and len({(t, l) for t, l, _ in used}) > 5
    plain = augment(batch, torch.Generator().manual_seed(0), crop_padding=0, flip=False)
    assert torch.equal(plain, batch)


def test_augment_ranks_equal_one_process():
    batch = torch.from_numpy(random_images(8, 5, (3, 8, 8)))
    whole = augment(batch, torch.Generator().manual_seed(7))
    parts = [augment(batch[r * 4:(r + 1) * 4], torch.Generator().manual_seed(7), rank=r, world_size=2)
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_normalize_and_channel_stats():
    images = torch.from_numpy(random_images(10, 6, (3, 4, 4)))
    mean, std = channel_mean_std(images)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).numpy())
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32
    by_hand = (images[3, 1, 2, 0].item() / 255 - mean[1]) / std[1]
    assert abs(out[3, 1, 2, 0].item() - by_hand) < 1e-5
    assert torch.allclose(out.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                          atol=1e-5)


# ---------- sampler ----------

def test_sampler_epochs_ranks_and_resume():
    one = ImageBatchSampler(24, local_batch=6, rank=0, world_size=1, seed=3)
    ranks = [ImageBatchSampler(24, 3, r, 2, seed=3) for r in range(2)]
    assert one.steps_per_epoch == 4
    for epoch in range(3):
        steps = range(epoch * 4, epoch * 4 + 4)
        assert all(one.epoch_of(i) == epoch for i in steps)
        seen = torch.cat([one.indices(i) for i in steps])
        assert sorted(seen.tolist()) == list(range(24))  # each index once per epoch
        for i in steps:
            a, b = ranks[0].indices(i), ranks[1].indices(i)
            assert torch.equal(torch.cat([a, b]), one.indices(i))
            assert not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(torch.cat([one.indices(i) for i in range(4)]),
                           torch.cat([one.indices(i) for i in range(4, 8)]))  # reshuffled
    fresh = ImageBatchSampler(24, 6, seed=3)
    assert torch.equal(fresh.indices(9), one.indices(9))  # resume = same indices
    assert not torch.equal(ImageBatchSampler(24, 6, seed=4).indices(0), one.indices(0))


def test_sampler_augmentation_generator_splits_across_ranks():
    images = torch.from_numpy(random_images(24, 8, (3, 8, 8)))
    one = ImageBatchSampler(24, 6, seed=3)
    ranks = [ImageBatchSampler(24, 3, r, 2, seed=3) for r in range(2)]
    for i in (0, 5):
        whole = augment(images[one.indices(i)], one.augment_generator(i))
        parts = [augment(images[s.indices(i)], s.augment_generator(i), rank=s.rank, world_size=2)
                 for s in ranks]
        assert torch.equal(torch.cat(parts), whole)


def test_sampler_drops_the_incomplete_tail():
    s = ImageBatchSampler(10, 4, seed=0)
    assert s.steps_per_epoch == 2
    seen = torch.cat([s.indices(0), s.indices(1)]).tolist()
    assert len(set(seen)) == 8 and all(0 <= i < 10 for i in seen)
    with pytest.raises(ValueError):
        ImageBatchSampler(3, 2, 0, 2)
