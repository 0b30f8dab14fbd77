"""Corpus integrity: every prepared token file's size and sha256, checked before training.

A corpus records its files in its own meta: meta.json["files"] for a corpus built
by build_token_dataset (Shakespeare, make data-filter), progress.json["files"] for
a hub corpus (one record per shard file, added as each shard is finished). Each
record is {"bytes": size, "sha256": hex digest}.

Three checks, from cheap to thorough:
  - check_sizes (every start, in open_token_dataset): each recorded file exists and
    has its recorded size; a .bin of odd length is refused even without a record.
  - check_token_range (at open for a corpus split of up to EAGER_RANGE_TOKENS, else on
    each shard's first use): no token id at or above the vocabulary size.
  - verify_corpus(folder, full=True): sizes, every sha256 and every token id. The
    trainer runs it the first time a run folder uses a corpus (verify_for_run); it
    is also `make verify-data` (python -m scripts.verify_data).

Every failure is a CorpusError: one line naming the file and the problem, and
how to re-prepare the corpus.

prepare_into(folder) is where a corpus is built: a temporary folder next to it,
renamed into place only when complete, so a preparation killed half-way (even by
SIGKILL) is never taken for a finished corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .cache import atomic_write_json, replace_dir, sha256_file

# A vocabulary size for corpora whose meta names only the encoding (hub corpora).
KNOWN_VOCAB_SIZES = {"gpt2": 50257}
# A max over the tokens costs ~1 ms per million: a split up to this size is checked
# when opened, a larger one shard by shard on first use (a hub corpus can hold 10B tokens).
EAGER_RANGE_TOKENS = 50_000_000
RUN_RECORD = "corpus.json"  # in a run folder: the corpus it verified
_SHARD_SUFFIXES = (".bin", ".docs.npy", ".ids.json")


class CorpusError(SystemExit):
    """The prepared corpus is damaged or incomplete; the message is one line."""


def _reprepare(folder) -> str:
    return (f"re-prepare it: delete {folder} and run `make train` again (`make data-filter` again for a filtered "
            "corpus); `make verify-data` checks every file")


# ---------------------------------------------------------------- records

def file_record(path) -> dict:
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def data_file_names(folder) -> list[str]:
    """The corpus files in `folder`: shard files and docs.json (not meta/progress/reports)."""
    names = [p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")
             and (p.name == "docs.json" or p.name.endswith(_SHARD_SUFFIXES))]
    return sorted(names)


def shard_file_names(prefix) -> list[str]:
    name = Path(prefix).name
    return [name + suffix for suffix in _SHARD_SUFFIXES]


def record_files(folder, names=None) -> dict:
    """{name: file_record} for `names` in `folder` (default: every corpus file there)."""
    folder = Path(folder)
    return {name: file_record(folder / name) for name in (names or data_file_names(folder))}


def read_meta(folder) -> tuple[Path, dict]:
    """The corpus's meta file (meta.json, else progress.json) and its content."""
    folder = Path(folder)
    for name in ("meta.json", "progress.json"):
        path = folder / name
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except ValueError as e:
                raise CorpusError(f"error: {path} is not valid JSON ({e}); {_reprepare(folder)}") from None
    raise CorpusError(f"error: {folder} has no meta.json or progress.json: it is not a prepared corpus, or its "
                      f"preparation did not finish; {_reprepare(folder)}")


def vocab_size(meta: dict) -> int | None:
    """Token ids must be below this (None: unknown, only the uint16 range applies)."""
    if meta.get("vocab_size"):
        return int(meta["vocab_size"])
    encoding = meta.get("encoding") or meta.get("settings", {}).get("encoding")
    return KNOWN_VOCAB_SIZES.get(encoding)


# ---------------------------------------------------------------- checks

def check_sizes(folder, meta: dict) -> None:
    """Every recorded file exists with its recorded size, and every .bin (recorded or
    not) holds whole uint16 tokens. Costs one stat per file."""
    folder = Path(folder)
    records = meta.get("files") or {}
    for name in sorted(set(records) | set(data_file_names(folder))):
        path = folder / name
        if not path.is_file():
            raise CorpusError(f"error: {path} is missing from the corpus; {_reprepare(folder)}")
        size = path.stat().st_size
        if name in records and size != records[name]["bytes"]:
            raise CorpusError(f"error: {path} has {size} bytes but the corpus recorded {records[name]['bytes']} "
                              f"(truncated or changed); {_reprepare(folder)}")
        if name.endswith(".bin") and size % 2:
            raise CorpusError(f"error: {path} has an odd size ({size} bytes), not whole uint16 tokens "
                              f"(truncated); {_reprepare(folder)}")


def check_token_range(path, tokens: np.ndarray, vocab: int | None) -> None:
    """No token id >= vocab: such an id would index past the embedding table."""
    if vocab is None or len(tokens) == 0:
        return
    top = int(tokens.max())
    if top >= vocab:
        where = int(np.flatnonzero(tokens >= vocab)[0])
        raise CorpusError(f"error: {path} holds token id {top} (first bad id at token {where}), not below the "
                          f"vocabulary size {vocab}: the file is corrupt or was made with another tokenizer; "
                          f"{_reprepare(Path(path).parent)}")


def corpus_digest(meta: dict) -> str | None:
    """One hash for the corpus's content, from its file records (no file is read)."""
    records = meta.get("files")
    if not records:
        return None
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def verify_corpus(folder, full: bool = True) -> dict:
    """Check the corpus in `folder`; returns {"corpus", "digest", "files", "full"}.

    full=False: sizes only (what every start does). full=True: also every file's
    sha256 against its record and every token id against the vocabulary size."""
    folder = Path(folder)
    meta_path, meta = read_meta(folder)
    if meta_path.name == "progress.json" and not meta.get("finished"):
        raise CorpusError(f"error: {folder} is only partly prepared; run `make train` again to finish it")
    records = meta.get("files")
    if not records:
        raise CorpusError(f"error: {meta_path} records no file sizes or hashes (prepared by an older version); "
                          f"{_reprepare(folder)}")
    check_sizes(folder, meta)
    if full:
        vocab = vocab_size(meta)
        for name, record in sorted(records.items()):
            path = folder / name
            actual = sha256_file(path)
            if actual != record["sha256"]:
                raise CorpusError(f"error: {path} has sha256 {actual[:16]}... but the corpus recorded "
                                  f"{record['sha256'][:16]}... (the file changed); {_reprepare(folder)}")
            if name.endswith(".bin") and record["bytes"]:
                check_token_range(path, np.memmap(path, dtype=np.uint16, mode="r"), vocab)
    return {"corpus": str(folder.resolve()), "digest": corpus_digest(meta), "files": len(records), "full": full}


def verify_for_run(folder, run_dir, log=print) -> bool:
    """Fully verify the corpus the first time run folder `run_dir` uses it (or uses a changed
    one), then remember it in run_dir/corpus.json. Returns True when it hashed the files.

    Later starts of the same run only pay for the size checks done at open. A corpus
    prepared before files were recorded cannot be verified: a note says so."""
    folder, run_dir = Path(folder), Path(run_dir)
    meta_path, meta = read_meta(folder)
    if not meta.get("files"):
        log(f"note: {meta_path} records no file hashes (prepared by an older version); only its token "
            f"ids are checked. Delete {folder} to prepare it again with hashes")
        return False
    record_path = run_dir / RUN_RECORD
    try:
        known = json.loads(record_path.read_text())
    except (OSError, ValueError):
        known = None
    digest = corpus_digest(meta)
    if known and digest and known.get("digest") == digest and known.get("corpus") == str(folder.resolve()):
        return False
    result = verify_corpus(folder, full=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {**result, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return True


# ---------------------------------------------------------------- preparation

@contextmanager
def prepare_into(final):
    """Yield an empty temporary folder next to `final`; on success it replaces `final`
    in one rename, on any error (or a kill) `final` is untouched. Temporary folders
    left by killed preparations (their pid is gone) are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.partial-"
    for stale in final.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    try:
        yield work
        os.chmod(work, 0o755)  # mkdtemp makes it private; the corpus is an ordinary folder
        replace_dir(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- make verify-data

def main(argv=None) -> int:
    """`make verify-data`: fully verify the corpus the settings name (or --corpus FOLDER)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.verify_data",
                                     description="Check every file of a prepared token corpus: size, sha256, "
                                                 "token ids.")
    parser.add_argument("--settings", type=Path, default=Path("generated/settings.py"))
    parser.add_argument("--corpus", type=Path, help="the corpus folder (default: from the settings)")
    args = parser.parse_args(argv)
    folder = args.corpus
    if folder is None:
        from scripts.kconfig.settings import SettingsError, load_settings

        from .cache import corpus_folder
        try:
            cfg = load_settings(args.settings)
        except SettingsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        folder = corpus_folder(cfg.as_dict())
        if folder is None:
            print("verify-data: the configuration trains on images (no token corpus); nothing to verify")
            return 0
    if not folder.is_dir():
        print(f"error: {folder} does not exist yet; `make train` prepares it", file=sys.stderr)
        return 1
    try:
        result = verify_corpus(folder, full=True)
    except CorpusError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{folder}: OK ({result['files']} files: sizes, sha256 and token ids checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
