"""Checkpoints that survive crashes: atomic writes, keep-last-K, corrupt-file fallback.

A checkpoint is written to a temporary file in the same folder, flushed and
fsynced, then renamed over its final name and the folder fsynced, so a kill
at any instant leaves either the old set of checkpoints or the new one, never
a half-written file under a checkpoint's name. Older checkpoints are deleted
only after the new one is safely on disk. A write that fails (a full disk:
ENOSPC, a quota, an I/O error) removes its temporary file and stops the run with
one line; the older checkpoints are untouched and `make train` resumes from the
newest of them. Loading uses
torch.load(weights_only=True): a checkpoint can hold tensors and plain data,
never code.
"""
from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


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
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _ErrorKeepingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)  # frees the space the partial file took
        cause = writer.error if writer is not None and writer.error is not None else e
        raise CheckpointWriteError(_write_failure(final, cause)) from None
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


class _ErrorKeepingWriter:
    """The file torch.save writes to, remembering the OSError of a failed write: torch
    replaces it by an opaque RuntimeError ("unexpected pos ..."), and the user needs
    to read "No space left on device"."""

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


def _write_failure(final: Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        why = f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    older = list_checkpoints(final.parent)
    kept = (f"the previous checkpoints are intact (latest: {older[0].name}); free space, then `make train` "
            "resumes from it") if older else "no earlier checkpoint exists; free space and `make train` again"
    return f"error: could not write checkpoint {final}: {why}; {kept}"


def load_latest_checkpoint(folder: Path, map_location="cpu", log=print) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; a corrupt one is reported and skipped."""
    for stale in folder.glob("ckpt_*.pt.tmp") if folder.is_dir() else []:
        stale.unlink(missing_ok=True)  # an interrupted save; never a valid checkpoint
    candidates = list_checkpoints(folder)
    for i, path in enumerate(candidates):
        try:
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
