"""`make data-filter RUN=<dir>`: the training corpus without the documents behind gradient spikes.

    python -m scripts.data_filter RUN_DIR [--out DIR] [--min-spikes K] [--corpus DIR]

Dataset debugging (seed 000, section 4.2): the health monitor's spike guard
logs every spiking step's batch in RUN_DIR/spikes.jsonl as the document index,
id and token offset of each sample. This tool collects those documents, keeps
the ones that appear in at least K spike batches, and writes a copy of the
prepared token corpus without them (default RUN_DIR/filtered_corpus/), in the
same format (data/text.py): every shard rewritten without the removed
documents' rows and tokens, docs.json unchanged (document indices keep their
meaning), meta.json (or progress.json for a hub corpus) with the new token
counts and a "filtered" entry, and removed.json saying which documents went
and why (spike steps and GSS). The copy is built in a temporary folder and
renamed into place, so there is never a half-written corpus.

The corpus is the one the run's settings name: DATA_PREPARED_DIR when set
(a run on an already filtered corpus), else the dataset's folder for the run's
tokenizer, DATA_DIR/<dataset>_<tokenizer> (shakespeare_gpt2, shakespeare_bytes,
fineweb-edu_gpt2, ...; DATA_DIR relative to the folder make runs in), or
--corpus DIR. Filtering works on token shards of either tokenizer: meta.json (or
progress.json) keeps the tokenizer's name and vocabulary size, so a run on the
filtered copy with the other tokenizer is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from data.cache import atomic_write_json, corpus_folder, replace_dir
from data.integrity import record_files
from data.text import write_shard

DEFAULT_OUT = "filtered_corpus"


class FilterError(Exception):
    """Something the user must fix; the message is one line."""


# ------------------------------------------------------------------ spikes


def read_spike_events(path: Path) -> list[dict]:
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise FilterError(f"{path}:{n}: not a JSON record") from None
    return events


def spike_documents(events: list[dict], min_spikes: int = 1) -> dict:
    """{document index: {"doc": id, "spikes": [{"step", "gss", ...}]}} for the documents that
    appear in at least min_spikes spike batches (a document counts once per batch)."""
    found = defaultdict(lambda: {"doc": None, "spikes": []})
    for e in events:
        if e.get("event", "spike") != "spike":
            continue
        samples = e.get("samples") or []
        if any("doc_index" not in s for s in samples):
            raise FilterError("spikes.jsonl names image samples, not documents: data-filter works on the token "
                              "corpora of GPT-2 runs")
        why = {"step": e.get("step"), "gss": e.get("max_gss", e.get("gss"))}
        if e.get("param", e.get("layer")) is not None:
            why["param"] = e.get("param", e.get("layer"))
        for index in dict.fromkeys(int(s["doc_index"]) for s in samples):
            found[index]["spikes"].append(why)
        for s in samples:
            found[int(s["doc_index"])]["doc"] = s.get("doc")
    return {i: d for i, d in sorted(found.items()) if len(d["spikes"]) >= min_spikes}


# ------------------------------------------------------------------ corpus


def run_corpus(run_dir: Path) -> Path:
    """The prepared corpus the run trained on, from its settings.py."""
    from scripts.kconfig.settings import SettingsError, load_settings

    path = run_dir / "settings.py"
    try:
        cfg = load_settings(path, check_fresh=False).as_dict()
    except SettingsError as e:
        raise FilterError(f"cannot tell which corpus the run used ({e}); name it with --corpus DIR") from None
    corpus = corpus_folder(cfg)
    if corpus is not None:
        return corpus
    raise FilterError("the run did not train on a token corpus (data-filter works on the text datasets of "
                      "GPT-2 runs)")


def shard_prefixes(corpus: Path) -> dict:
    """{split: [shard prefix, ...]} of a prepared corpus: <split>.bin, or a hub corpus's
    <split>_NNNNNN shards listed in progress.json."""
    if (corpus / "train.bin").exists():
        return {split: [corpus / split] for split in ("train", "val") if (corpus / f"{split}.bin").exists()}
    progress = corpus / "progress.json"
    if not progress.exists():
        raise FilterError(f"no prepared corpus in {corpus} (train.bin or progress.json); train once to prepare it, "
                          "or name it with --corpus DIR")
    state = json.loads(progress.read_text())
    if not state.get("finished"):
        raise FilterError(f"{corpus} is only partly prepared; finish its preparation first")
    return {split: [corpus / f"{split}_{k:06d}" for k in range(count)] for split, count in state["shards"].items()}


def _read_shard(prefix: Path):
    p = str(prefix)
    rows = np.load(p + ".docs.npy")
    ids = json.loads(Path(p + ".ids.json").read_text())
    size = Path(p + ".bin").stat().st_size
    tokens = np.memmap(p + ".bin", dtype=np.uint16, mode="r") if size else np.zeros(0, dtype=np.uint16)
    return rows, ids, tokens


def filter_shard(prefix: Path, out_prefix: Path, removed: set) -> dict:
    """Rewrite one shard without the rows (document pieces) of the removed document indices.
    Returns {"tokens_in", "tokens_out", "removed": {doc index: tokens dropped}}."""
    rows, ids, tokens = _read_shard(prefix)
    ends = np.append(rows[1:, 0], len(tokens)) if len(rows) else np.zeros(0, dtype=np.int64)
    keep = ~np.isin(rows[:, 1], list(removed)) if len(rows) else np.zeros(0, dtype=bool)
    arrays, new_rows, new_ids, dropped, position = [], [], [], defaultdict(int), 0
    for k in range(len(rows)):
        start, end = int(rows[k, 0]), int(ends[k])
        if not keep[k]:
            dropped[int(rows[k, 1])] += end - start
            continue
        arrays.append(tokens[start:end])
        new_rows.append((position, int(rows[k, 1]), int(rows[k, 2])))
        new_ids.append(ids[k])
        position += end - start
    write_shard(out_prefix, arrays, new_rows, new_ids)
    return {"tokens_in": len(tokens), "tokens_out": position, "removed": dict(dropped)}


def document_ids(prefixes: list) -> dict:
    """{document index: id} over the given shards (the ids.json rows)."""
    out = {}
    for prefix in prefixes:
        rows = np.load(str(prefix) + ".docs.npy")
        ids = json.loads(Path(str(prefix) + ".ids.json").read_text())
        out.update(zip(rows[:, 1].tolist(), ids))
    return out


def check_documents(documents: dict, known: dict, corpus: Path) -> None:
    """Every spike document must be in the corpus under the same id (else the corpus changed)."""
    for index, d in documents.items():
        if index not in known:
            raise FilterError(f"document index {index} ({d['doc']}) from spikes.jsonl is not in {corpus}: "
                              "was the corpus prepared again since the run?")
        if d["doc"] is not None and str(known[index]) != str(d["doc"]):
            raise FilterError(f"spikes.jsonl names document {d['doc']} at index {index} but {corpus} has "
                              f"{known[index]} there: the corpus changed since the run")


def write_filtered_corpus(corpus: Path, out: Path, documents: dict, run_dir: Path | None = None) -> dict:
    """Write the filtered copy of `corpus` to `out` (replacing an older one); returns removed.json's dict."""
    splits = shard_prefixes(corpus)
    check_documents(documents, document_ids([p for ps in splits.values() for p in ps]), corpus)
    removed = set(documents)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokens, dropped = {}, defaultdict(int)
        for split, prefixes in splits.items():
            tokens[split] = 0
            for prefix in prefixes:
                result = filter_shard(prefix, work / prefix.name, removed)
                tokens[split] += result["tokens_out"]
                for index, n in result["removed"].items():
                    dropped[index] += n
        report = {
            "source": str(corpus), "run": str(run_dir) if run_dir else None,
            "documents_removed": len(removed), "tokens_removed": int(sum(dropped.values())),
            "documents": [{"doc": d["doc"], "doc_index": i, "tokens": int(dropped[i]), "spikes": d["spikes"]}
                          for i, d in documents.items()],
        }
        atomic_write_json(work / "removed.json", report)
        filtered = {"source": str(corpus), "documents_removed": len(removed),
                    "tokens_removed": report["tokens_removed"]}
        if (corpus / "docs.json").exists():
            shutil.copyfile(corpus / "docs.json", work / "docs.json")
        if (corpus / "progress.json").exists():
            state = json.loads((corpus / "progress.json").read_text())
            state["tokens"] = tokens
            state["filtered"] = filtered
            state["files"] = record_files(work)  # this copy's files, not the source's
            atomic_write_json(work / "progress.json", state)
        if (corpus / "meta.json").exists():
            meta = json.loads((corpus / "meta.json").read_text())
            # the inputs hash describes the unfiltered documents: keeping it would let
            # build_token_dataset take this copy for the original corpus
            meta.pop("inputs_sha256", None)
            meta.update({f"{split}_tokens": n for split, n in tokens.items()})
            meta["filtered"] = filtered
            meta["files"] = record_files(work)  # this copy's files, not the source's
            atomic_write_json(work / "meta.json", meta)  # last, as build_token_dataset does
        os.chmod(work, 0o755)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _replace_dir(new: Path, final: Path) -> None:
    if final.exists() and not (final / "removed.json").exists():
        raise FilterError(f"{final} exists and is not a filtered corpus; choose another --out")
    replace_dir(new, final)


# --------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.data_filter",
                                     description="Write the run's corpus without the documents of its spike batches.")
    parser.add_argument("run_dir", help="the run folder (with spikes.jsonl)")
    parser.add_argument("--out", help=f"filtered corpus folder (default RUN_DIR/{DEFAULT_OUT})")
    parser.add_argument("--min-spikes", type=int, default=1, metavar="K",
                        help="remove a document only if it is in at least K spike batches (default 1)")
    parser.add_argument("--corpus", help="the prepared corpus folder (default: from the run's settings)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if args.min_spikes < 1:
            raise FilterError(f"--min-spikes must be at least 1, got {args.min_spikes}")
        if not run_dir.is_dir():
            raise FilterError(f"run folder {run_dir} does not exist")
        spikes = run_dir / "spikes.jsonl"
        if not spikes.is_file():
            print(f"data-filter: {run_dir} has no spikes.jsonl (no gradient spikes were logged; the spike guard "
                  "is MONITOR_SPIKE_GUARD); nothing to filter, nothing written")
            return 0
        documents = spike_documents(read_spike_events(spikes), args.min_spikes)
        if not documents:
            print(f"data-filter: no document is in {args.min_spikes} or more spike batches of {spikes}; "
                  "nothing written")
            return 0
        corpus = Path(args.corpus) if args.corpus else run_corpus(run_dir)
        out = Path(args.out) if args.out else run_dir / DEFAULT_OUT
        report = write_filtered_corpus(corpus, out, documents, run_dir)
    except FilterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"data-filter: removed {report['documents_removed']} document(s), {report['tokens_removed']:,} tokens; "
          f"filtered corpus in {out} (list in {out / 'removed.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
