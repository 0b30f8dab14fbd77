"""The spike-gate Kconfig symbols: bad values refused with one line naming the
symbol, and each choice reaching the optimizer and changing what it does."""

import re

import pytest

from optim import build_optimizer
from tests.test_optim_build import TinyGPT, settings
from tests.test_spam_gate import noisy_norms, run_gate


@pytest.fixture
def configured(ktree, kconfig):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    return ktree


@pytest.mark.parametrize("args, symbol, problem", [
    (["SPAM_GATE_MIN_HISTORY=1"], "SPAM_GATE_MIN_HISTORY", "out of range"),
    (["SPAM_GATE_MIN_HISTORY=x"], "SPAM_GATE_MIN_HISTORY", ""),
    (["SPAM_ZSCORE_WINDOW=20", "SPAM_GATE_MIN_HISTORY=21"], "SPAM_GATE_MIN_HISTORY",
     "SPAM_GATE_MIN_HISTORY=21 is above SPAM_ZSCORE_WINDOW=20"),
    (["SPAM_ENABLE_CLIP=n", "SPAM_GATE_MIN_HISTORY=5"], "SPAM_GATE_MIN_HISTORY", "depends on SPAM_ENABLE_CLIP"),
    (["SPAM_ENABLE_CLIP=n", "SPAM_GATE_MAD=y"], "SPAM_GATE_MAD", ""),
    (["SPAM_GATE_MAD=y", "SPAM_GATE_WINDOW=y"], "SPAM_GATE_MAD", ""),
    (["SPAM_GATE_EXCLUDE=n"], "SPAM_GATE_EXCLUDE", "choice"),
])
def test_bad_gate_settings_are_refused(configured, kconfig, args, symbol, problem):
    before = (configured / ".config").read_text()
    result = kconfig("setconfig", *args)
    assert result.returncode != 0
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    m = re.match(r"<setconfig>:(\d+): ([A-Z0-9_]+): (.+)", lines[0])
    assert m and m.group(2) == symbol, lines[0]
    assert problem in m.group(3)
    assert (configured / ".config").read_text() == before  # nothing written


def test_gate_defaults_in_settings(configured, kconfig):
    kconfig("settings", check=True)
    text = (configured / ".config").read_text()
    assert "CONFIG_SPAM_GATE_EXCLUDE=y" in text and "CONFIG_SPAM_GATE_MIN_HISTORY=10" in text


@pytest.mark.parametrize("choice, statistic", [("SPAM_GATE_WINDOW", "window"), ("SPAM_GATE_EXCLUDE", "exclude"),
                                               ("SPAM_GATE_MAD", "mad")])
def test_choice_and_min_history_reach_the_optimizer(choice, statistic):
    flags = dict(SPAM_GATE_WINDOW=False, SPAM_GATE_EXCLUDE=False, SPAM_GATE_MAD=False)
    opt = build_optimizer(settings(**{**flags, choice: True}, SPAM_GATE_MIN_HISTORY=7), TinyGPT())
    assert (opt.gate_statistic, opt.gate_min_history) == (statistic, 7)
    assert (opt._gate.statistic, opt._gate.min_history) == (statistic, 7)
    # clipping off: the gate symbols are unset (None) and nothing reads them
    opt = build_optimizer(settings(SPAM_ENABLE_CLIP=False, SPAM_GATE_WINDOW=None, SPAM_GATE_EXCLUDE=None,
                                   SPAM_GATE_MAD=None, SPAM_GATE_MIN_HISTORY=None), TinyGPT())
    assert opt._gate is None


def test_the_choice_and_min_history_change_the_decisions():
    norms = noisy_norms(60, seed=1, spikes={30: 1000.0, 40: 20.0})
    decisions = {s: [spike for _, spike in run_gate(norms, s, 2.0, 100, 10)] for s in ("window", "exclude")}
    assert decisions["window"][40] is False and decisions["exclude"][40] is True
    norms = noisy_norms(20, seed=2, spikes={5: 800.0})
    armed_early = [spike for _, spike in run_gate(norms, "exclude", 2.0, 100, 3)]
    armed_late = [spike for _, spike in run_gate(norms, "exclude", 2.0, 100, 10)]
    assert armed_early[5] is True and armed_late[5] is False  # 5 norms before it: enough for 3, not for 10
