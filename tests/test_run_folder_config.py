"""Safe output folders at configuration time: setconfig and settings refuse an OUT_DIR that
holds a run with other settings (one line, nothing written); the empty, root and
source-tree cases are rows of tests/test_kconfig_strict.py's BAD table."""
from __future__ import annotations

import re
import shutil

import pytest

from scripts.kconfig import schema


@pytest.fixture
def with_run(ktree, kconfig):
    """gpt2-tiny configured, and runs/gpt2-tiny holding a run of exactly those settings."""
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    kconfig("settings", check=True)
    run = ktree / "runs" / "gpt2-tiny"
    run.mkdir(parents=True)
    shutil.copyfile(ktree / "generated" / "settings.py", run / "settings.py")  # as the trainer keeps it
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 10.0}\n')
    return ktree


def test_setconfig_refuses_to_mix_a_different_run_into_its_folder(with_run, kconfig):
    before = (with_run / ".config").read_text()
    r = kconfig("setconfig", "EVAL_INTERVAL=50", "LR=2e-3")
    assert r.returncode == 1 and (with_run / ".config").read_text() == before  # nothing written
    (line,) = r.stderr.splitlines()
    assert re.fullmatch(r"<setconfig>:2: LR: OUT_DIR runs/gpt2-tiny holds a run with different settings "
                        r"\(LR=0\.\d+ there\) \(valid: a new OUT_DIR in the same command .*\)", line), line
    # settings that only change logging and checkpoints resume the same run; a new folder is a new run
    kconfig("setconfig", "EVAL_INTERVAL=50", "TENSORBOARD=n", check=True)
    # BATCH_SIZE too: with another number of processes the global batch may stay the run's
    # (only the trainer knows the processes: it checks the global batch against the checkpoint)
    kconfig("setconfig", "BATCH_SIZE=16", check=True)
    kconfig("setconfig", "LR=2e-3", "OUT_DIR=runs/lr-2e-3", check=True)


def test_settings_refuses_a_config_edited_to_differ_from_its_run(with_run, kconfig):
    config = with_run / ".config"
    text = config.read_text()
    config.write_text(text.replace("CONFIG_MAX_ITERS=600", "CONFIG_MAX_ITERS=700"))
    before = (with_run / "generated" / "settings.py").read_bytes()
    r = kconfig("settings")
    assert r.returncode == 1 and (with_run / "generated" / "settings.py").read_bytes() == before
    number = config.read_text().split("\n").index("CONFIG_MAX_ITERS=700") + 1
    assert r.stderr.startswith(f".config:{number}: MAX_ITERS: OUT_DIR runs/gpt2-tiny holds a run with different "
                               "settings (MAX_ITERS=600 there)")
    # a folder without any trace of a run (no checkpoints, no metrics) belongs to nobody yet
    (with_run / "runs" / "gpt2-tiny" / "metrics.jsonl").unlink()
    kconfig("settings", check=True)


def test_resumable_settings_match_the_trainer():
    from train.trainer import RESUMABLE_CHANGES

    assert schema.RESUMABLE_CHANGES == RESUMABLE_CHANGES  # one rule for setconfig and the trainer
    assert schema.settings_diff({"LR": 1.0, "LOG_INTERVAL": 1}, {"LR": 2.0, "LOG_INTERVAL": 5, "NEW": 1}) \
        == ["LR", "NEW"]
