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
}

# String symbols holding comma-separated optimizer steps ("100,250,251"; each
# an integer >= 1; empty for none). They stay strings in the settings.
STEP_LISTS = ("FAULT_SPIKE_STEPS", "FAULT_OUTLIER_STEPS", "FAULT_NAN_STEPS")

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


def string_value(name, text):
    """The typed value of a string symbol: a float for the float symbols, the
    text itself for the others. ValueError(problem, valid) when it is invalid."""
    if name in FLOAT_RANGES:
        return parse_float(name, text)
    if name in STEP_LISTS:
        parse_step_list(name, text)
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
