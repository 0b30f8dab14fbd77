"""Checkpoints that survive crashes: atomic writes, keep-last-K, corrupt-file fallback.

What is written when (every CKPT_INTERVAL steps, at the last step, and on Ctrl-C or
SIGTERM):

- one process, or DDP: rank 0 writes one file, `checkpoints/ckpt_NNNNNNNNN.pt`
  (torch.save of the whole model, optimizer and run state; save_checkpoint);
- FSDP2: every rank writes its own shards into one folder,
  `checkpoints/ckpt_NNNNNNNNN/` (torch.distributed.checkpoint, see
  train/sharded_checkpoint.py), so no rank ever holds the whole state.

A checkpoint is written under a temporary name in the same folder
(`ckpt_NNNNNNNNN.pt.tmp`, `ckpt_NNNNNNNNN.tmp/`), flushed and fsynced, then
renamed to its final name and the folder fsynced, so a kill at any instant
leaves either the old set of checkpoints or the new one, never a half-written
checkpoint under a checkpoint's name; a temporary left by a kill is removed
when checkpoints are next loaded. Older checkpoints (of either form) are
deleted only after the new one is in place, keeping the newest CKPT_KEEP. A
write that fails (a full disk: ENOSPC, a quota, an I/O error) removes its
temporary and stops the run with one line; the older checkpoints are untouched
and `make train` resumes from the newest of them. Loading takes the newest
checkpoint that reads, reporting each corrupt or truncated one in one line and
falling back to the next older. Files are read with
torch.load(weights_only=True) (a sharded checkpoint's index with an unpickler
that accepts only its own classes): a checkpoint can hold tensors and plain
data, never code.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

# a file (written by one process) or a folder (sharded, written by all FSDP ranks)
_NAME = re.compile(r"^ckpt_(\d{9})(\.pt)?$")
# an interrupted write, or an old checkpoint being deleted
_LEFTOVER = re.compile(r"^ckpt_\d{9}(\.pt)?\.(tmp|old)$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:09d}.pt"


def sharded_checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:09d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder` (files and sharded folders), newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.name, p) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p.is_file() if m.group(2) else p.is_dir())]
    return [p for _, _, p in sorted(found, reverse=True)]


def remove_leftovers(folder: Path) -> None:
    """Remove what an interrupted save or deletion left: never a valid checkpoint. (Every
    rank may call this at once: whoever comes second finds nothing.)"""
    for path in folder.iterdir() if folder.is_dir() else []:
        if _LEFTOVER.match(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints. A folder is renamed first, so that one
    half deleted by a kill is a leftover, not a checkpoint."""
    for old in list_checkpoints(folder)[keep:]:
        if old.is_dir():
            doomed = old.with_name(old.name + ".old")
            shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier kill (os.replace needs it gone)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(SystemExit):
    """A checkpoint could not be written; the message (one line) says why and what is intact."""


def save_checkpoint(state: dict, folder: Path, step: int, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        write_state_file(state, tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)  # frees the space the partial file took
        raise CheckpointWriteError(write_failure(final, e)) from None
    os.replace(tmp, final)
    _fsync_dir(folder)
    prune_checkpoints(folder, keep)
    return final


def write_state_file(state: dict, path: Path) -> None:
    """torch.save(state) into `path`, flushed and fsynced. A failed write raises its
    OSError ("No space left on device"), not the opaque RuntimeError ("unexpected pos
    ...") torch.save turns it into."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = _ErrorKeepingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError:
        if writer is not None and writer.error is not None:
            raise writer.error from None
        raise


class _ErrorKeepingWriter:
    """The file torch.save writes to, remembering the OSError of a failed write."""

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self._f.flush()


def failure_reason(e: BaseException) -> str:
    """Why a write failed, in a few words: "No space left on device (ENOSPC)"."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def write_failure(final: Path, e: BaseException | str) -> str:
    """The one line a failed checkpoint write stops the run with (e: the error, or its reason)."""
    why = e if isinstance(e, str) else failure_reason(e)
    older = list_checkpoints(final.parent)
    kept = (f"the previous checkpoints are intact (latest: {older[0].name}); free space, then `make train` "
            "resumes from it") if older else "no earlier checkpoint exists; free space and `make train` again"
    return f"error: could not write checkpoint {final}: {why}; {kept}"


def load_latest_checkpoint(folder: Path, map_location="cpu", log=print,
                           remove_stale: bool = True) -> tuple[dict, Path] | None:
    """The newest checkpoint that reads, as (state, path); a corrupt one is reported and
    skipped. A file's state is all of it; a sharded checkpoint's (a folder) is its plain
    data (step, settings, rng, ...) after its shards were checked to be complete: its
    tensors are read by train/sharded_checkpoint.py (restore_training_state,
    restore_weights, read_full_checkpoint). remove_stale: delete the leftovers of
    interrupted saves first (only a reader that may run beside a training, make
    sample, leaves them)."""
    if remove_stale:
        remove_leftovers(folder)
    candidates = list_checkpoints(folder)
    for i, path in enumerate(candidates):
        try:
            if path.is_dir():
                from .sharded_checkpoint import read_run_state
                state = read_run_state(path)
            else:
                state = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a training checkpoint")
            return state, path
        except Exception as e:  # noqa: BLE001 - any unreadable file is treated alike
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
            log(f"error: checkpoint {path} is corrupt or truncated ({reason}); "
                + (f"falling back to {nxt}" if nxt else "no older checkpoint to fall back to"))
    if candidates:
        raise SystemExit(f"error: no readable checkpoint in {folder}; move the folder away to start afresh")
    return None


# RNG states as tensors and plain lists so weights_only loading accepts them.

def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
