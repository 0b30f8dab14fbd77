"""Experiment trackers (train/trackers.py, RunLog's hook, train/Kconfig.trackers): off by default,
a missing package names the extra to install, and a tiny real training logs its settings and every
metrics record to trackio and W&B stand-ins that the test reads back."""
from __future__ import annotations

import json
import signal
import sys
import types

import pytest

from scripts.kconfig.settings import load_settings
from tests.trainutil import kconfig, make_settings, settings_in_process
from train.runlog import RunLog
from train.trackers import TrackerUnavailable, build_trackers


class Recorder(types.ModuleType):
    """A stand-in for the trackio / wandb module: records init, log and finish calls."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, metrics, step=None):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


def test_trackers_are_off_by_default(tmp_path):
    cfg = settings_in_process("gpt2-tiny")
    assert cfg.TRACKER_TRACKIO is False and cfg.TRACKER_WANDB is False
    assert build_trackers(cfg, tmp_path / "run") == []


@pytest.mark.parametrize("symbol, package", [("TRACKER_TRACKIO", "trackio"), ("TRACKER_WANDB", "wandb")])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, symbol, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError
    cfg = settings_in_process("gpt2-tiny", **{symbol: "y"})
    with pytest.raises(TrackerUnavailable) as e:
        build_trackers(cfg, tmp_path / "run")
    assert str(e.value) == (f"error: {symbol}=y needs the {package} package, which is not installed: "
                            f"pip install -e '.[{package}]' (or set {symbol}=n)")


@pytest.mark.parametrize("assignments, symbol", [
    (["TRACKER_TRACKIO=maybe"], "TRACKER_TRACKIO"),
    (["TRACKER_PROJECT=mine"], "TRACKER_PROJECT"),  # no tracker on: it would do nothing
    (["TRACKER_WANDB=y", "TRACKER_PROJECT=team/project"], "TRACKER_PROJECT"),
    (["TRACKER_WANDB=y", "TRACKER_PROJECT="], "TRACKER_PROJECT"),
    (["TRACKER_WANDB_ONLINE=y"], "TRACKER_WANDB_ONLINE"),  # W&B off: the mode does nothing
])
def test_bad_tracker_settings_are_refused(tmp_path, assignments, symbol):
    config = tmp_path / ".config"
    kconfig("defconfig", "defconfigs/gpt2-tiny", config=config)
    r = kconfig("setconfig", *assignments, config=config, check=False)
    assert r.returncode != 0 and f": {symbol}: " in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_wandb_mode_and_project_reach_init(tmp_path, monkeypatch):
    fake = Recorder("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for mode, sets in (("offline", {}), ("online", {"TRACKER_WANDB_ONLINE": "y"})):
        cfg = settings_in_process("gpt2-tiny", TRACKER_WANDB="y", TRACKER_PROJECT="study-1", **sets)
        fake.calls.clear()
        (tracker,) = build_trackers(cfg, tmp_path / mode / "run")
        (call, kwargs), = fake.calls
        assert kwargs["mode"] == mode and kwargs["project"] == "study-1" and kwargs["name"] == "run"
        assert kwargs["dir"] == str(tmp_path / mode / "run")


def test_a_tiny_run_logs_its_settings_and_every_record(tmp_path, monkeypatch):
    trackio, wandb = Recorder("trackio"), Recorder("wandb")
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    settings = make_settings(tmp_path, "gpt2-tiny", TRACKER_TRACKIO="y", TRACKER_WANDB="y", MAX_ITERS="4",
                             EVAL_INTERVAL="2", LOG_INTERVAL="1", CKPT_INTERVAL="0", MONITOR="n", DEVICE_CPU="y")
    cfg = load_settings(settings)
    from train.trainer import train
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(cfg, settings_path=settings, config_path=tmp_path / ".config")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    # What the run wrote to metrics.jsonl, read independently: each record's numbers by step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = []
    for r in records:
        values = {f"{r['split']}/{k}": float(v) for k, v in r.items()
                  if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        expected.append(("log", values, r["step"]))
    assert [r["split"] for r in records].count("val") == 2 and len(records) == 6  # 4 train + 2 val

    for module in (trackio, wandb):
        init, *logs, finish = module.calls
        assert init[0] == "init" and finish == ("finish",)
        assert init[1]["project"] == "spamtrain" and init[1]["name"] == "run"
        config = init[1]["config"]
        assert config["LR"] == 1e-3 and config["MAX_ITERS"] == 4 and config["OPTIM_ADAMW_SPAM"] is True
        assert config == cfg.as_dict()  # every symbol with its typed value
        assert logs == expected
    assert wandb.calls[0][1]["mode"] == "offline"
    assert trackio.calls[0][1]["resume"] == "allow"


def test_runlog_sends_records_to_attached_trackers_only_when_enabled(tmp_path):
    class Sink:
        def __init__(self):
            self.seen, self.closed = [], 0

        def log(self, step, split, metrics):
            self.seen.append((step, split, metrics))

        def close(self):
            self.closed += 1

    on, off = Sink(), Sink()
    log = RunLog(tmp_path / "a", enabled=True, tensorboard=False)
    log.attach_trackers([on])
    log.log(3, "train", {"loss": 2, "lr": 0.5})
    log.close()
    assert on.seen == [(3, "train", {"loss": 2.0, "lr": 0.5})] and on.closed == 1
    quiet = RunLog(tmp_path / "b", enabled=False, tensorboard=False)  # another rank
    quiet.attach_trackers([off])
    quiet.log(3, "train", {"loss": 2})
    quiet.close()
    assert off.seen == [] and off.closed == 0
