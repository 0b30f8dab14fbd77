"""`python -m train` (what `make train` runs): train what the generated settings describe.

The settings file is the only input; its path is the only argument, so that
comparisons can train several configurations side by side.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import settings_from_argv
from .trainer import TrainingStopped, train


def main(argv=None) -> int:
    cfg, settings_path = settings_from_argv("python -m train", __doc__.splitlines()[0], argv)
    if cfg is None:
        return 2
    try:
        summary = train(cfg, settings_path=settings_path, config_path=Path(cfg.source))
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return 1
    if summary is not None:  # rank 0 of a distributed run, or the only process
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    lines = ["", f"run folder: {summary['run_dir']}  ({summary['steps']} steps)"]
    if "val_bpb" in summary:  # byte tokenizer: the loss is nats per byte
        lines.append(f"val loss:   {summary['val_loss']:.4f} nats/byte   ({summary['val_bpb']:.4f} bits/byte)")
    elif "val_ppl" in summary:
        lines.append(f"val loss:   {summary['val_loss']:.4f}   (perplexity {summary['val_ppl']:.1f})")
    elif "val_loss" in summary:
        lines.append(f"val loss:   {summary['val_loss']:.4f}")
    if "val_accuracy" in summary:
        lines.append(f"val top-1 accuracy: {100 * summary['val_accuracy']:.2f}%")
    if summary.get("nonfinite_total"):
        lines.append(f"non-finite steps skipped: {summary['nonfinite_total']}")
    if "sample" in summary:
        lines += ["sample:", "-" * 60, summary["sample"], "-" * 60]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
