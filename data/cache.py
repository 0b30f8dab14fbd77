"""Cache directory and crash-safe file writing shared by the data pipelines.

Every file a pipeline produces is written to a temporary name in the same folder
and then renamed over the target: a rename within one filesystem is atomic, so a
reader (or a resumed preparation) never sees a half-written file.
"""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "data_cache"


def data_dir(path=None):
    """The cache folder (cfg.DATA_DIR, default "data_cache"), created if missing."""
    d = Path(path if path else DEFAULT_DATA_DIR)
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are ordinary readable files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops np.save from appending ".npy"
            np.save(f, array)


def replace_dir(new, final):
    """Put the finished folder `new` at `final` (same filesystem), replacing an older one:
    readers see the old folder or the new one, never a mixture."""
    import shutil

    new, final = Path(new), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive(lock_path):
    """Hold an exclusive lock on `lock_path` (created if missing) for the block: processes
    preparing the same data (parallel runs of make compare, say) take turns, and the
    later ones find the work done."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Where each text dataset's token shards are prepared, inside DATA_DIR: the dataset's
# folder name, then "_" and the tokenizer's name (data.tokenizer.tokenizer_name), so
# corpora of different tokenizers never share a folder.
CORPUS_FOLDERS = {"DATA_SHAKESPEARE": "shakespeare", "DATA_FINEWEB_EDU": "fineweb-edu",
                  "DATA_OPENWEBTEXT": "openwebtext"}


def dataset_folder(data_dir, symbol: str, tokenizer: str) -> Path:
    """DATA_DIR/<dataset>_<tokenizer>, e.g. data_cache/shakespeare_bytes."""
    return Path(data_dir or DEFAULT_DATA_DIR) / f"{CORPUS_FOLDERS[symbol]}_{tokenizer}"


def corpus_folder(settings: dict):
    """The token corpus a GPT-2 run reads: DATA_PREPARED_DIR when set, else the chosen
    dataset's folder for the chosen tokenizer in DATA_DIR (e.g. shakespeare_bytes);
    None for settings without a text dataset."""
    from .tokenizer import tokenizer_name

    if settings.get("DATA_PREPARED_DIR"):
        return Path(settings["DATA_PREPARED_DIR"])
    for symbol in CORPUS_FOLDERS:
        if settings.get(symbol):
            return dataset_folder(settings["DATA_DIR"], symbol, tokenizer_name(settings))
    return None
