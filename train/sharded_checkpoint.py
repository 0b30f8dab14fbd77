"""Sharded checkpoints of FSDP2 runs, on torch.distributed.checkpoint ("DCP").

Every rank writes its own shards of the model and the optimizer; no rank ever
gathers the whole state. One checkpoint is one folder:

    checkpoints/ckpt_NNNNNNNNN/
        __0_0.distcp ... __{W-1}_0.distcp   rank r's shards (DCP, torch.save per tensor)
        .metadata                           DCP's index: which piece of which tensor is
                                            where (written by rank 0 once all ranks wrote)
        run_state.pt                        rank 0: the plain data (step, settings, rng of
                                            every rank, scaler, clipper, skip-step and
                                            monitor state, counters, world size, global
                                            batch, the optimizer's scalars; torch.save)

The tensors are named independently of the number of ranks (train/fsdp.py), so
a checkpoint of W ranks loads into any other number of ranks (each reads its
blocks) or into one process with no process group at all (read_full).

Atomic as the single-file checkpoints (train/checkpoint.py): the folder is
written as ckpt_NNNNNNNNN.tmp/, every file fsynced; all ranks report success or
their error (a barrier); then rank 0 renames it, fsyncs the parent folder,
prunes the oldest beyond CKPT_KEEP, and a last barrier makes it visible to every
rank. A rank's write failure (ENOSPC) stops every rank; rank 0 prints the one
line, removes the temporary folder and leaves the older checkpoints intact.
Every rank must see the same folder (OUT_DIR on a filesystem all nodes share):
a write whose shards did not all land in rank 0's folder is refused.

Reading first checks a checkpoint without reading its tensors (read_run_state:
run_state.pt loads, the index unpickles through an allow-list of DCP's own
classes, every file it names is there and long enough), so that a truncated
checkpoint is reported and skipped like a corrupt file.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from . import checkpoint
from .checkpoint import (CheckpointWriteError, failure_reason, prune_checkpoints, sharded_checkpoint_path,
                         write_failure, write_state_file)

RUN_STATE = "run_state.pt"
INDEX = ".metadata"  # DCP's name


# ------------------------------------------------------------------ writing

def save_sharded_checkpoint(tensors: dict, run_state: dict, folder: Path, step: int, keep: int, info) -> Path:
    """Write this rank's `tensors` (a collective: every rank calls it) and, from rank 0,
    `run_state` as checkpoint `step` of `folder`. Raises CheckpointWriteError on every
    rank when any rank failed (the message on rank 0)."""
    final = sharded_checkpoint_path(folder, step)
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt at this step
    _barrier(info)
    writer = _Writer(tmp)
    failure = None
    try:
        with _one_process_intended():
            dcp.save(tensors, storage_writer=writer, no_dist=not info.enabled)
        if info.is_main:
            write_state_file(run_state, tmp / RUN_STATE)
            try:
                read_run_state(tmp)
            except ValueError as e:  # a rank's shards are not in this folder
                raise ValueError(f"{e}: every rank must write to the same folder (OUT_DIR on a filesystem "
                                 "that all nodes share) for sharded (FSDP) checkpoints") from None
            checkpoint._fsync_dir(tmp)
    except (OSError, RuntimeError, ValueError, CheckpointException) as e:
        # this rank's own write error first: the others only learn "rank r failed"
        failure = (0, failure_reason(writer.error)) if writer.error is not None else (1, _reason(e))
    failures = [f for f in all_ranks(failure, info) if f is not None]
    if failures:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial shards took
        raise CheckpointWriteError(write_failure(final, min(failures)[1]) if info.is_main else 1)
    if info.is_main:
        if final.exists():  # this step saved once before (not kept apart: the same training state)
            shutil.rmtree(final)
        os.replace(tmp, final)
        checkpoint._fsync_dir(folder)
        prune_checkpoints(folder, keep)
    _barrier(info)
    return final


def _reason(e: BaseException) -> str:
    if isinstance(e, CheckpointException):  # DCP's report of the ranks that failed
        rank, (cause, _) = min(e.failures.items())
        return f"rank {rank}: {failure_reason(cause)}"
    return failure_reason(e)


class _KeptStream:
    """A file DCP writes to, remembering the OSError of a failed write (torch.save inside
    DCP replaces it with an opaque RuntimeError)."""

    def __init__(self, f, owner):
        self._f, self._owner = f, owner

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self._owner.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


class _KeptFileSystem(FileSystem):
    def __init__(self, owner):
        super().__init__()
        self._owner = owner

    def create_stream(self, path, mode):
        @contextlib.contextmanager
        def stream():
            with open(path, mode) as f:
                yield _KeptStream(f, self._owner) if "w" in mode else f
        return stream()


class _Writer(FileSystemWriter):
    """DCP's file writer (one file per rank, every file fsynced), keeping write errors."""

    def __init__(self, path: Path):
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self.error = None
        self.fs = _KeptFileSystem(self)


# ------------------------------------------------------------------ reading

_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    """DCP pickles its index: unpickle DCP's own classes (and dtypes) only, never code."""

    def find_class(self, module, name):
        if (module, name) in _INDEX_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def read_index(path: Path) -> Metadata:
    with open(path / INDEX, "rb") as f:
        metadata = _IndexUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{INDEX} is not a checkpoint index")
    return metadata


class _Reader(FileSystemReader):
    """DCP's file reader, with the index read by read_index (tensors are read with
    torch.load(weights_only=True) by DCP itself)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_run_state(path: Path) -> dict:
    """The plain data of sharded checkpoint `path`, after checking that the files its index
    names are all there and long enough. Raises on anything missing, short or foreign."""
    if not (path / RUN_STATE).is_file():
        raise ValueError(f"{RUN_STATE} is missing")
    if not (path / INDEX).is_file():
        raise ValueError(f"{INDEX} is missing")
    state = torch.load(path / RUN_STATE, map_location="cpu", weights_only=True)
    needed: dict[str, int] = {}
    for where in read_index(path).storage_data.values():
        needed[where.relative_path] = max(needed.get(where.relative_path, 0), where.offset + where.length)
    for name, size in sorted(needed.items()):
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing")
        if (have := (path / name).stat().st_size) < size:
            raise ValueError(f"{name} is truncated ({have} of {size} bytes)")
    return state


def _saved_dtypes(path: Path) -> dict:
    return {k: m.properties.dtype for k, m in read_index(path).state_dict_metadata.items()
            if hasattr(m, "properties")}


def read_full(path: Path, run_state: dict, weights_only: bool = False) -> dict:
    """Sharded checkpoint `path` as one process holding the whole model has it, read
    without a process group: {"model": state dict of whole tensors, "optimizer": what
    optimizer.state_dict() of one process holds} (the optimizer left out when
    weights_only), on the CPU."""
    from .fsdp import full_optimizer_state
    index = read_index(path)
    wanted = {k: m for k, m in index.state_dict_metadata.items()
              if hasattr(m, "size") and (k.startswith("model.") or not weights_only)}
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in wanted.items()}
    with _one_process_intended():
        dcp.load(tensors, storage_reader=_Reader(path), no_dist=True)
    full = {"model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}}
    if not weights_only:
        optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        full["optimizer"] = full_optimizer_state(optim, run_state["optimizer"])
    return full


def read_full_checkpoint(path: Path) -> dict:
    """A sharded checkpoint as the single-file form holds it (what torch.load of a
    ckpt_NNNNNNNNN.pt gives): for tools, tests and conversions."""
    run_state = read_run_state(path)
    return {**{k: v for k, v in run_state.items() if k != "optimizer"}, **read_full(path, run_state)}


def _load_into_shards(path: Path, model, optimizer, run_state: dict, weights_only: bool) -> None:
    """Every rank reads its blocks of the sharded checkpoint into the sharded model (and
    optimizer). A collective."""
    from .fsdp import empty_sharded_state, load_sharded_state
    blind = [r for r, sees in enumerate(all_ranks(path.is_dir(), None)) if not sees]
    if blind:
        raise SystemExit(f"error: rank(s) {', '.join(map(str, blind))} cannot see {path}: sharded (FSDP) "
                         "checkpoints need OUT_DIR on a filesystem that all nodes share")
    tensors = empty_sharded_state(model, optimizer, run_state["optimizer"], _saved_dtypes(path), weights_only)
    dcp.load(tensors, storage_reader=_Reader(path))
    load_sharded_state(model, optimizer, tensors, run_state["optimizer"], weights_only)


# ------------------------------------------------ restoring a run, either form

def restore_training_state(model, optimizer, fsdp: bool, state: dict, path: Path) -> None:
    """The model and optimizer of checkpoint (state, path), as load_latest_checkpoint
    found it (a file or a sharded folder), into a sharded (fsdp) or whole model."""
    if path.is_dir() and fsdp:
        _load_into_shards(path, model, optimizer, state, weights_only=False)
        return
    if path.is_dir():
        state = {**state, **read_full(path, state)}
    if fsdp:
        from .fsdp import load_full_state
        load_full_state(model, optimizer, state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def restore_weights(model, fsdp: bool, state: dict, path: Path) -> None:
    """Only the model's weights of checkpoint (state, path) (the spike guard's rollback)."""
    if path.is_dir() and fsdp:
        _load_into_shards(path, model, None, state, weights_only=True)
    elif fsdp:
        from .fsdp import load_full_weights
        load_full_weights(model, state["model"])
    else:
        model.load_state_dict(full_weights(state, path))


def full_weights(state: dict, path: Path) -> dict:
    """The whole-tensor model state dict of checkpoint (state, path), either form (make sample)."""
    return read_full(path, state, weights_only=True)["model"] if path.is_dir() else state["model"]


def all_ranks(obj, info) -> list:
    """Every rank's obj, in rank order ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or (info is not None and not info.enabled):
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


@contextlib.contextmanager
def _one_process_intended():
    """DCP warns on every save or load without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _barrier(info) -> None:
    if info.enabled:
        dist.barrier()
