"""What the Kconfig files cannot say, in one place.

Kconfig has no float type, so real-valued settings are `string` symbols. This
module names them, gives each its valid interval (the one stated in its help
text), and lists the rules that tie several symbols together. The strict
loader (strict.py) refuses any configuration that breaks them, and the
settings generator (settings.py) emits the float symbols as Python floats.
"""

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A real interval such as (0, 10] or [0, 1)."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    def __contains__(self, x):
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self):
        return "{}{}, {}{}".format("(" if self.low_open else "[", format_number(self.low),
                                   format_number(self.high), ")" if self.high_open else "]")


def format_number(x):
    # 1e6 rather than 1e+06
    return "{:g}".format(x).replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


_INTERVAL_RE = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])])\s*")


def interval(text):
    """interval("(0, 10]") -> Interval(0.0, 10.0, low_open=True, high_open=False)"""
    m = _INTERVAL_RE.fullmatch(text)
    if not m:
        raise ValueError("not an interval: {!r}".format(text))
    return Interval(float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")")


# Every float-valued string symbol and its valid values. A value outside the
# interval, one that does not parse, NaN and infinities are refused.
FLOAT_RANGES = {
    # models/Kconfig
    "GPT2_DROPOUT": interval("[0, 1)"),
    # data/Kconfig
    "DATA_VAL_FRACTION": interval("(0, 0.5]"),
    # optim/Kconfig
    "LR": interval("(0, 10]"),
    "MIN_LR": interval("[0, 10]"),  # and MIN_LR <= LR, below
    "WEIGHT_DECAY": interval("[0, 1]"),
    "BETA1": interval("[0, 1)"),
    "BETA2": interval("[0, 1)"),
    "ADAM_EPS": interval("(0, 1)"),
    "SGD_MOMENTUM": interval("[0, 1)"),
    "GRAD_CLIP": interval("[0, 1e6]"),
    # optim/Kconfig.clipping
    "ZCLIP_ALPHA": interval("(0, 1)"),
    "ZCLIP_Z_THRESHOLD": interval("(0, 1000]"),
    "ZCLIP_CLIP_FACTOR": interval("(0, 100]"),
    "ZCLIP_MAX_NORM": interval("[0, 1e6]"),
    # optim/Kconfig.rivals
    "STABLE_SPAM_GAMMA1": interval("[0, 1)"),
    "STABLE_SPAM_GAMMA2": interval("[0, 1)"),
    "STABLE_SPAM_GAMMA3": interval("[0, 1)"),
    "SKIP_STEP_SIGMA": interval("(0, 1000]"),
    # optim/Kconfig.spam
    "SPAM_THETA": interval("(0, 1e12]"),
    "SPAM_SPIKE_THRESHOLD": interval("[0, 1000]"),
    "SPAM_DENSITY": interval("(0, 1]"),
    # train/Kconfig
    "SAMPLE_TEMPERATURE": interval("(0, 10]"),
    # train/Kconfig.faults
    "FAULT_SPIKE_PROB": interval("[0, 1]"),
    "FAULT_SPIKE_FACTOR": interval("(0, 1e12]"),
    # monitor/Kconfig
    "MONITOR_GSS_EMA_BETA": interval("(0, 1)"),
    "MONITOR_SPIKE_TAU": interval("(1, 1e6]"),
    "MONITOR_LOSS_SPIKE_SIGMA": interval("(0, 1000]"),
}

# String symbols holding comma-separated optimizer steps ("100,250,251"; each
# an integer >= 1; empty for none). They stay strings in the settings.
STEP_LISTS = ("FAULT_SPIKE_STEPS", "FAULT_OUTLIER_STEPS", "FAULT_NAN_STEPS")

# String symbols holding a module path of the model's parameter names
# ("transformer.h.1.attn"): dotted identifiers, checked against the model at start.
MODULE_PATHS = ("FAULT_SPIKE_LAYER",)
_MODULE_PATH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")


def parse_module_path(name, text):
    """The module path of symbol `name`, or ValueError(problem, valid)."""
    if not _MODULE_PATH_RE.fullmatch(text):
        raise ValueError("{!r} is not a module path".format(text),
                         'a dotted parameter-name prefix such as "transformer.h.1.attn"')
    return text


# Decimal notation only: "6e-4", "0.1", "50", "1.", ".5". No "nan", "inf",
# "1_000", hex floats or surrounding blanks, which float() would accept.
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_float(name, text):
    """The float value of the float symbol `name`, or ValueError(problem, valid)."""
    valid = "a decimal number in {}".format(FLOAT_RANGES[name])
    if not _FLOAT_RE.fullmatch(text):
        lowered = text.strip().lower().lstrip("+-")
        if lowered in ("nan", "inf", "infinity"):
            raise ValueError("{!r} is not a finite number".format(text), valid)
        raise ValueError("{!r} is not a number".format(text), valid)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("{!r} is not a finite number".format(text), valid)
    if value not in FLOAT_RANGES[name]:
        raise ValueError("{} is out of range".format(text), valid)
    return value


_STEP_RE = re.compile(r"[1-9][0-9]*")


def parse_step_list(name, text):
    """The steps of the step-list symbol `name`, or ValueError(problem, valid)."""
    if not text.strip():
        return []
    steps = [part.strip() for part in text.split(",")]
    for step in steps:
        if not _STEP_RE.fullmatch(step):
            raise ValueError("{!r} is not a step number".format(step),
                             'comma-separated integers >= 1, e.g. "100,250", or "" for none')
    return [int(step) for step in steps]


# String symbols whose text must match a pattern: (regular expression, what is valid).
STRING_PATTERNS = {
    # train/Kconfig.trackers: a trackio / W&B project name
    "TRACKER_PROJECT": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"),
                        "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"),
}


def string_value(name, text):
    """The typed value of a string symbol: a float for the float symbols, the
    text itself for the others. ValueError(problem, valid) when it is invalid."""
    if name in FLOAT_RANGES:
        return parse_float(name, text)
    if name in STEP_LISTS:
        parse_step_list(name, text)
    if name in MODULE_PATHS:
        parse_module_path(name, text)
    if name in STRING_PATTERNS:
        pattern, valid = STRING_PATTERNS[name]
        if not pattern.fullmatch(text):
            raise ValueError("{!r} is not a valid name".format(text), valid)
    return text


@dataclass(frozen=True)
class CrossRule:
    """A condition on several symbols, checked when all of them have a value."""

    symbols: tuple
    holds: object  # callable taking the symbols' typed values, in order
    problem: str  # str.format template over the symbols' names
    valid: str


CROSS_RULES = (
    CrossRule(("GPT2_N_EMBD", "GPT2_N_HEAD"), lambda embd, head: embd % head == 0,
              "GPT2_N_EMBD={GPT2_N_EMBD} is not a multiple of GPT2_N_HEAD={GPT2_N_HEAD}",
              "GPT2_N_EMBD % GPT2_N_HEAD == 0"),
    CrossRule(("MIN_LR", "LR"), lambda min_lr, lr: min_lr <= lr,
              "MIN_LR={MIN_LR} is above LR={LR}", "MIN_LR <= LR"),
    CrossRule(("MAX_ITERS", "MAX_EPOCHS"), lambda iters, epochs: iters > 0 or epochs > 0,
              "MAX_ITERS and MAX_EPOCHS are both 0, so the run has no length",
              "MAX_ITERS > 0 or MAX_EPOCHS > 0"),
    CrossRule(("SPAM_WARMUP_STEPS", "SPAM_INTERVAL"), lambda warmup, interval: warmup < interval,
              "SPAM_WARMUP_STEPS={SPAM_WARMUP_STEPS} is not below SPAM_INTERVAL={SPAM_INTERVAL}",
              "SPAM_WARMUP_STEPS < SPAM_INTERVAL"),
    CrossRule(("SPAM_CLIP_GRACE_STEPS", "SPAM_INTERVAL"), lambda grace, interval: grace < interval,
              "SPAM_CLIP_GRACE_STEPS={SPAM_CLIP_GRACE_STEPS} is not below SPAM_INTERVAL={SPAM_INTERVAL}",
              "SPAM_CLIP_GRACE_STEPS < SPAM_INTERVAL"),
    CrossRule(("SPAM_GATE_MIN_HISTORY", "SPAM_ZSCORE_WINDOW"), lambda history, window: history <= window,
              "SPAM_GATE_MIN_HISTORY={SPAM_GATE_MIN_HISTORY} is above SPAM_ZSCORE_WINDOW={SPAM_ZSCORE_WINDOW}",
              "SPAM_GATE_MIN_HISTORY <= SPAM_ZSCORE_WINDOW"),
)


# --------------------------------------------------------------------------
# Folders a run writes into

# The run folder and the data cache: a run writes (and may replace) files there,
# so neither may be empty (the current folder), a filesystem root, or a source
# tree (the folder holding the Kconfig files, or any folder holding a Kconfig).
SAFE_FOLDERS = ("OUT_DIR", "DATA_DIR")
_SAFE_FOLDER_VALID = 'a folder of its own, e.g. "runs/my-run" or "data_cache" (not "", "/", "." or the source tree)'


def check_safe_folder(name, text, srctree):
    """ValueError(problem, valid) when folder symbol `name` = `text` is unsafe to write into.
    Relative paths are taken from the current folder, as the tools run them."""
    import os

    if not text.strip():
        raise ValueError("is empty: the run would write into the current folder", _SAFE_FOLDER_VALID)
    path = os.path.realpath(os.path.expanduser(text))
    if os.path.dirname(path) == path:
        raise ValueError("{!r} is a filesystem root".format(text), _SAFE_FOLDER_VALID)
    if path == os.path.realpath(srctree) or os.path.isfile(os.path.join(path, "Kconfig")):
        raise ValueError("{!r} is a source tree (it holds the Kconfig files)".format(text), _SAFE_FOLDER_VALID)


# Settings that may differ when a run is resumed: they change what is logged or
# kept, not what is computed. Anything else must match the run folder's run (the
# trainer checks the checkpoint; setconfig and settings check the folder's settings.py).
RESUMABLE_CHANGES = frozenset({
    "EVAL_INTERVAL", "EVAL_BATCHES", "LOG_INTERVAL", "CKPT_INTERVAL", "CKPT_KEEP", "TENSORBOARD",
    "SAMPLE_TOKENS", "SAMPLE_TEMPERATURE", "SAMPLE_TOP_K", "SAMPLE_PROMPT", "MAX_NONFINITE_STEPS",
    "DATA_DIR", "COMPILE",
    # only rank 0 writes the run folder, and a moved folder is the same run
    "OUT_DIR",
    # how long ranks wait for each other, and a crash on purpose: nothing computed changes
    "DIST_TIMEOUT_S", "FAULT_KILL_STEP", "FAULT_KILL_RANK"})


# may change on resume with the number of processes, as long as the global batch
# (BATCH_SIZE x processes x GRAD_ACCUM_STEPS) stays the same: only the trainer knows
# the number of processes, so it checks that against the checkpoint
GLOBAL_BATCH_FACTORS = frozenset({"BATCH_SIZE", "GRAD_ACCUM_STEPS"})


def settings_diff(saved, current, ignore=frozenset()):
    """Names of the settings that make `current` a different run from `saved` (both dicts),
    leaving out the names in `ignore`."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in RESUMABLE_CHANGES and k not in ignore and saved.get(k) != current.get(k)]
