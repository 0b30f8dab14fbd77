"""The run folder: the .config and settings a run used, metrics.jsonl, TensorBoard events.

Everything a reader needs to know what ran and what it did lives in one
folder. Only rank 0 writes. Experiment trackers (train/trackers.py), when the
settings enable them, receive every metrics record too: keep_config starts
them, with the run's settings as their configuration.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path


class RunLog:
    def __init__(self, folder: Path, *, enabled: bool, tensorboard: bool):
        self.folder = folder
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._trackers = []
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(folder / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop metric records newer than `step` (a resumed run redoes those steps)."""
        if not self.enabled:
            return
        self._jsonl.close()
        path = self.folder / "metrics.jsonl"
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._jsonl = open(path, "a", encoding="utf-8")

    def keep_config(self, config_path: Path, settings_path: Path) -> None:
        """Copy the .config and the settings this run uses into the run folder, and start the
        experiment trackers those settings enable."""
        if not self.enabled:
            return
        for src, name in ((config_path, "config"), (settings_path, "settings.py")):
            if src.is_file():
                tmp = self.folder / (name + ".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, self.folder / name)
        if Path(settings_path).is_file() and not self._trackers:
            from scripts.kconfig.settings import load_settings
            from .trackers import build_trackers
            self.attach_trackers(build_trackers(load_settings(settings_path, check_fresh=False), self.folder))

    def attach_trackers(self, trackers) -> None:
        """Also send every metrics record to these trackers (objects with log(step, split, metrics)
        and close()); RunLog.close closes them."""
        if self.enabled:
            self._trackers.extend(trackers)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "split": split, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                                   for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        for tracker in self._trackers:
            tracker.log(step, split, clean)

    def event(self, filename: str, record: dict) -> None:
        """Append one JSON record to another log in the run folder (spikes.jsonl, ...)."""
        if not self.enabled:
            return
        with open(self.folder / filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, filename: str, obj: dict) -> None:
        if not self.enabled:
            return
        tmp = self.folder / (filename + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / filename)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()

