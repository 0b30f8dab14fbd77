"""`make sample`: generate text from the latest checkpoint of a GPT-2 run.

Reads the same settings as `make train` (SAMPLE_PROMPT, SAMPLE_TOKENS,
SAMPLE_TEMPERATURE, SAMPLE_TOP_K, OUT_DIR) and the newest readable
checkpoint in OUT_DIR/checkpoints: a file, or a sharded folder of an FSDP run,
read whole into one process.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import load_latest_checkpoint
from .sharded_checkpoint import full_weights
from .distributed import pick_device
from .cli import settings_from_argv
from .families import generate_text


def main(argv=None) -> int:
    cfg, _ = settings_from_argv("python -m train.sample", __doc__.splitlines()[0], argv)
    if cfg is None:
        return 2
    if not cfg.MODEL_GPT2:
        print("error: make sample needs a GPT-2 configuration (CONFIG_MODEL_GPT2=y)", file=sys.stderr)
        return 2
    ckpt_dir = Path(cfg.OUT_DIR) / "checkpoints"
    # a training may be writing beside us: leave its temporary checkpoint alone
    restored = load_latest_checkpoint(ckpt_dir, log=lambda m: print(m, file=sys.stderr), remove_stale=False)
    if restored is None:
        print(f"error: no checkpoint in {ckpt_dir}; run `make train` first", file=sys.stderr)
        return 2
    state, path = restored
    from data.tokenizer import encoding_for
    from models.gpt2 import build_gpt2
    device = pick_device(cfg, 0)
    encoding = encoding_for(cfg)  # the run's tokenizer: its vocabulary sizes the model
    model = build_gpt2(cfg, vocab_size=encoding.n_vocab)
    model.load_state_dict(full_weights(state, path))  # a sharded (FSDP) checkpoint is read whole
    model.to(device)
    print(f"# {path} (step {state['step']})", file=sys.stderr)
    print(generate_text(model, encoding, cfg, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
