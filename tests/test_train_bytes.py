"""The byte-level preset end to end (subprocesses, tiny): trains, evaluates in bits per
byte, runs the monitor's text probes, samples, resumes exactly, and `make sample` reads it."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainutil import REPO, env, make_settings, metrics, run_train

PROBES = dict(MONITOR_ZLIB_INTERVAL=2, MONITOR_CODEC_INTERVAL=2, MONITOR_TOKEN_ENTROPY_INTERVAL=2)


def test_byte_level_run_trains_samples_resumes_and_make_sample_reads_it(tmp_path):
    settings = make_settings(tmp_path, preset="gpt-bytes", tiny=True, MAX_ITERS=6, CKPT_INTERVAL=3,
                             CKPT_KEEP=5, SAMPLE_TOKENS=24, **PROBES)
    r = run_train(settings)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    # nats per byte and bits per byte side by side, in the summary, the val record and the printout
    assert summary["val_bpb"] == summary["val_loss"] / math.log(2)
    assert [rec["val_bpb"] for rec in metrics(run, "val")] == [summary["val_bpb"]]
    assert "nats/byte" in r.stdout and "bits/byte" in r.stdout
    # an untrained byte model is near uniform over 257 ids, far below GPT-2's ln 50257
    assert summary["val_loss"] < math.log(257) + 0.5
    # the corpus is the byte corpus, and the model's vocabulary is 257 (padded to 320)
    corpus = REPO / "data_cache" / "shakespeare_bytes"
    assert json.loads((corpus / "meta.json").read_text())["vocab_size"] == 257
    assert np.fromfile(corpus / "val.bin", dtype=np.uint16).max() < 257
    ckpt6 = torch.load(run / "checkpoints" / "ckpt_000000006.pt", weights_only=True)
    assert ckpt6["model"]["transformer.wte.weight"].shape[0] == 320
    # the monitor's text probes ran on byte tokens
    train = metrics(run)
    assert any("zlib/ratio_mean" in rec for rec in train) and any("codec/score" in rec for rec in train)
    assert summary["sample"].startswith("ROMEO:")

    # resume: without the last checkpoint the run restarts from step 3 and ends identical
    shutil.copy(run / "checkpoints" / "ckpt_000000006.pt", tmp_path / "first_ckpt6.pt")
    (run / "checkpoints" / "ckpt_000000006.pt").unlink()
    r = run_train(settings)
    assert "resuming" in r.stdout + r.stderr
    again = torch.load(run / "checkpoints" / "ckpt_000000006.pt", weights_only=True)
    for name, tensor in ckpt6["model"].items():
        assert torch.equal(tensor, again["model"][name]), name

    # make sample: the same seeded continuation, decoded from bytes
    sample = subprocess.run([sys.executable, "-m", "train.sample", "--settings", str(settings)], cwd=REPO,
                            env=env(), capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.rstrip("\n") == json.loads((run / "summary.json").read_text())["sample"]


def test_a_run_refuses_a_corpus_of_the_other_tokenizer(tmp_path):
    from scripts.kconfig.settings import load_settings
    from train.distributed import DistInfo
    from train.families import GPTFamily

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "meta.json").write_text(json.dumps({"encoding": "gpt2", "vocab_size": 50257}))
    settings = make_settings(tmp_path, preset="gpt-bytes", tiny=True, DATA_PREPARED_DIR=str(corpus))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(SystemExit) as err:
        GPTFamily(load_settings(settings), info)
    assert str(err.value) == (f"error: {corpus} holds tokens of the 'gpt2' tokenizer (vocabulary 50257), but "
                              "this run uses 'bytes' (vocabulary 257); choose the matching TOKENIZER_* or "
                              "another corpus")
