"""Strict validation: every bad assignment is refused with one line naming file, line and
symbol, from a .config, a preset, a fragment and setconfig alike, and nothing is written."""

import os
import re

import pytest

# (case id, lines for a file, setconfig arguments or None, the symbol the error must name)
BAD = [
    ("unknown-symbol", ["CONFIG_NO_SUCH_KNOB=y"], ["NO_SUCH_KNOB=y"], "NO_SUCH_KNOB"),
    ("bool-not-y-n", ["CONFIG_COMPILE=yes"], ["COMPILE=yes"], "COMPILE"),
    ("int-not-integer", ["CONFIG_BATCH_SIZE=12x"], ["BATCH_SIZE=12x"], "BATCH_SIZE"),
    ("int-out-of-range", ["CONFIG_BATCH_SIZE=0"], ["BATCH_SIZE=0"], "BATCH_SIZE"),
    ("int-above-range", ["CONFIG_SPAM_INTERVAL=10000001"], ["SPAM_INTERVAL=10000001"], "SPAM_INTERVAL"),
    ("string-unquoted", ["CONFIG_OUT_DIR=runs/x"], None, "OUT_DIR"),
    ("string-bad-quotes", ['CONFIG_OUT_DIR="runs"x"'], None, "OUT_DIR"),
    ("string-unknown-escape", [r'CONFIG_OUT_DIR="runs\qx"'], None, "OUT_DIR"),
    ("not-set-on-int", ["# CONFIG_BATCH_SIZE is not set"], None, "BATCH_SIZE"),
    ("float-not-a-number", ['CONFIG_LR="fast"'], ["LR=fast"], "LR"),
    ("float-nan", ['CONFIG_LR="nan"'], ["LR=nan"], "LR"),
    ("float-inf", ['CONFIG_BETA1="inf"'], ["BETA1=inf"], "BETA1"),
    ("float-overflows-to-inf", ['CONFIG_SPAM_THETA="1e999"'], ["SPAM_THETA=1e999"], "SPAM_THETA"),
    ("float-out-of-range", ['CONFIG_SPAM_DENSITY="1.5"'], ["SPAM_DENSITY=1.5"], "SPAM_DENSITY"),
    ("float-open-end", ['CONFIG_BETA2="1.0"'], ["BETA2=1.0"], "BETA2"),
    ("dependency-unmet", ["# CONFIG_SPAM_PERIODIC_RESET is not set", "CONFIG_SPAM_INTERVAL=300"],
     ["SPAM_PERIODIC_RESET=n", "SPAM_INTERVAL=300"], "SPAM_INTERVAL"),
    ("invisible-symbol", ["CONFIG_GPT2_N_LAYER=6"], ["GPT2_N_LAYER=6"], "GPT2_N_LAYER"),
    ("choice-loses", ["CONFIG_MODEL_GPT2=y", "CONFIG_MODEL_RESNET18=y"],
     ["MODEL_GPT2=y", "MODEL_RESNET18=y"], "MODEL_GPT2"),
    ("choice-switched-off", ["# CONFIG_MODEL_GPT2 is not set"], ["MODEL_GPT2=n"], "MODEL_GPT2"),
    ("cross-min-lr-above-lr", ['CONFIG_MIN_LR="0.5"'], ["MIN_LR=0.5"], "MIN_LR"),
    ("cross-warmup-not-below-interval", ["CONFIG_SPAM_WARMUP_STEPS=1000"], ["SPAM_WARMUP_STEPS=1000"],
     "SPAM_WARMUP_STEPS"),
    ("step-list", ["CONFIG_FAULT_INJECTION=y", 'CONFIG_FAULT_NAN_STEPS="10,x"'],
     ["FAULT_INJECTION=y", "FAULT_NAN_STEPS=10,x"], "FAULT_NAN_STEPS"),
    # distributed runs and their faults, the monitor's element-wise GSS interval
    ("dist-timeout-below-range", ["CONFIG_DIST_TIMEOUT_S=5"], ["DIST_TIMEOUT_S=5"], "DIST_TIMEOUT_S"),
    ("kill-rank-above-range", ["CONFIG_FAULT_INJECTION=y", "CONFIG_FAULT_KILL_RANK=70000"],
     ["FAULT_INJECTION=y", "FAULT_KILL_RANK=70000"], "FAULT_KILL_RANK"),
    ("kill-step-negative", ["CONFIG_FAULT_INJECTION=y", "CONFIG_FAULT_KILL_STEP=-1"],
     ["FAULT_INJECTION=y", "FAULT_KILL_STEP=-1"], "FAULT_KILL_STEP"),
    ("gss-elementwise-interval-negative", ["CONFIG_MONITOR_GSS_ELEMENTWISE_INTERVAL=-1"],
     ["MONITOR_GSS_ELEMENTWISE_INTERVAL=-1"], "MONITOR_GSS_ELEMENTWISE_INTERVAL"),
    # folders a run writes into (docs/reliability.md): not empty, not a root, not the source tree
    ("out-dir-empty", ['CONFIG_OUT_DIR=""'], ["OUT_DIR="], "OUT_DIR"),
    ("out-dir-root", ['CONFIG_OUT_DIR="/"'], ["OUT_DIR=/"], "OUT_DIR"),
    ("out-dir-source-tree", ['CONFIG_OUT_DIR="."'], ["OUT_DIR=."], "OUT_DIR"),
    ("data-dir-empty", ['CONFIG_DATA_DIR=""'], ["DATA_DIR="], "DATA_DIR"),
    ("data-dir-source-tree", ['CONFIG_DATA_DIR="runs/.."'], ["DATA_DIR=runs/.."], "DATA_DIR"),
    ("tokenizer-choice-loses", ["CONFIG_TOKENIZER_GPT2=y", "CONFIG_TOKENIZER_BYTES=y"],
     ["TOKENIZER_GPT2=y", "TOKENIZER_BYTES=y"], "TOKENIZER_GPT2"),
    ("spike-rows-out-of-range", ["CONFIG_FAULT_INJECTION=y", "CONFIG_FAULT_SPIKE_EMBED_ROWS=y",
                                 "CONFIG_FAULT_SPIKE_ROWS=0"],
     ["FAULT_INJECTION=y", "FAULT_SPIKE_EMBED_ROWS=y", "FAULT_SPIKE_ROWS=0"], "FAULT_SPIKE_ROWS"),
    ("spike-layer-not-a-path", ["CONFIG_FAULT_INJECTION=y", "CONFIG_FAULT_SPIKE_ONE_LAYER=y",
                                'CONFIG_FAULT_SPIKE_LAYER="h.1/attn"'],
     ["FAULT_INJECTION=y", "FAULT_SPIKE_ONE_LAYER=y", "FAULT_SPIKE_LAYER=h.1/attn"], "FAULT_SPIKE_LAYER"),
    ("spike-layer-empty", ["CONFIG_FAULT_INJECTION=y", "CONFIG_FAULT_SPIKE_ONE_LAYER=y",
                           'CONFIG_FAULT_SPIKE_LAYER=""'],
     ["FAULT_INJECTION=y", "FAULT_SPIKE_ONE_LAYER=y", "FAULT_SPIKE_LAYER="], "FAULT_SPIKE_LAYER"),
]
FILE_ONLY = [
    ("malformed-line", ["CONFIG_BATCH_SIZE 12"], None),
    ("twice-in-one-file", ["CONFIG_BATCH_SIZE=4", "CONFIG_BATCH_SIZE=5"], "BATCH_SIZE"),
]


def snapshot(folder):
    """Every file under folder with its bytes and mtime: what 'nothing was written' compares."""
    state = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return state


def assert_one_line_error(result, where, symbol, lines):
    """Exit status non-zero, and stderr is exactly `WHERE:LINE: SYMBOL: ...`, LINE pointing at SYMBOL."""
    assert result.returncode != 0
    err = result.stderr.strip("\n").split("\n")
    assert len(err) == 1, result.stderr
    assert "Traceback" not in result.stderr
    m = re.match(r"(.+?):(\d+): ([A-Z0-9_]+): .+", err[0])
    assert m, err[0]
    assert m.group(1) == where
    number = int(m.group(2))
    if symbol is not None:
        assert m.group(3) == symbol, err[0]
        assert symbol in lines[number - 1]
    return err[0]


@pytest.fixture
def configured(ktree, kconfig):
    """The copy with a .config from the gpt2-tiny preset, generated settings and a .config.old."""
    kconfig("defconfig", "defconfigs/gpt2-tiny-adamw", check=True)
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    kconfig("settings", check=True)
    return ktree


def edit_config(text, lines):
    """A .config with the given assignments replacing the symbol's own line (or appended)."""
    out = text.split("\n")
    for line in lines:
        name = re.search(r"CONFIG_([A-Z0-9_]+)", line).group(1)
        mine = [i for i, old in enumerate(out) if re.match(r"(# )?CONFIG_{}[= ]".format(name), old)]
        if mine:
            out[mine[0]] = line
        else:
            out.insert(len(out) - 1, line)
    return "\n".join(out)


CASES = [(case, lines, symbol) for case, lines, _, symbol in BAD] + FILE_ONLY


@pytest.mark.parametrize("case,lines,symbol", CASES, ids=[c[0] for c in CASES])
def test_bad_dotconfig_is_refused(configured, kconfig, case, lines, symbol):
    path = configured / ".config"
    if case == "twice-in-one-file":
        text = path.read_text() + "\n".join(lines) + "\n"
    else:
        text = edit_config(path.read_text(), lines)
    path.write_text(text)
    before = snapshot(configured)
    for command in ("settings", "olddefconfig", "savedefconfig"):
        result = kconfig(command)
        if symbol is None:
            assert result.returncode != 0 and re.match(r"\.config:\d+: malformed line", result.stderr)
        else:
            assert_one_line_error(result, ".config", symbol, text.split("\n"))
        assert snapshot(configured) == before, command


@pytest.mark.parametrize("case,lines,symbol", CASES, ids=[c[0] for c in CASES])
def test_bad_preset_is_refused(configured, kconfig, case, lines, symbol):
    preset = configured / "defconfigs" / "broken"
    preset.write_text("\n".join(lines) + "\n")
    before = snapshot(configured)
    result = kconfig("defconfig", "defconfigs/broken")
    if symbol is None:
        assert result.returncode != 0 and result.stderr.startswith("defconfigs/broken:1: malformed line")
    else:
        assert_one_line_error(result, "defconfigs/broken", symbol, lines)
    assert snapshot(configured) == before


@pytest.mark.parametrize("case,lines,symbol", CASES, ids=[c[0] for c in CASES])
def test_bad_fragment_is_refused(configured, kconfig, case, lines, symbol):
    fragment = configured / "defconfigs" / "fragments" / "broken.config"
    fragment.write_text("# a fragment that must be refused\n" + "\n".join(lines) + "\n")
    before = snapshot(configured)
    result = kconfig("defconfig", "defconfigs/gpt2-tiny", "--fragment", "broken")
    where = "defconfigs/fragments/broken.config"
    if symbol is None:
        assert result.returncode != 0 and result.stderr.startswith(where + ":2: malformed line")
    else:
        assert_one_line_error(result, where, symbol, ["#"] + lines)
    assert snapshot(configured) == before


SETCONFIG_CASES = [(case, args, symbol) for case, _, args, symbol in BAD if args is not None] + [
    ("not-an-assignment", ["BATCH_SIZE"], None),
    ("string-line-break", ["SAMPLE_PROMPT=two\nlines"], "SAMPLE_PROMPT"),
    ("given-twice", ["BATCH_SIZE=4", "BATCH_SIZE=5"], "BATCH_SIZE"),
]


@pytest.mark.parametrize("case,args,symbol", SETCONFIG_CASES, ids=[c[0] for c in SETCONFIG_CASES])
def test_bad_setconfig_is_refused(configured, kconfig, case, args, symbol):
    before = snapshot(configured)
    result = kconfig("setconfig", *args)
    if symbol is None:
        assert result.returncode != 0 and result.stderr.startswith("<setconfig>:1: ")
        assert len(result.stderr.strip().split("\n")) == 1
    else:
        assert_one_line_error(result, "<setconfig>", symbol, args)
    assert snapshot(configured) == before


def test_error_messages_say_what_is_valid(configured, kconfig):
    err = kconfig("setconfig", "BATCH_SIZE=0").stderr
    assert err == "<setconfig>:1: BATCH_SIZE: 0 is out of range (valid: an integer in [1, 65536])\n"
    err = kconfig("setconfig", "SPAM_DENSITY=1.5").stderr
    assert err == "<setconfig>:1: SPAM_DENSITY: 1.5 is out of range (valid: a decimal number in (0, 1])\n"
    err = kconfig("setconfig", "MAX_ITER=5").stderr
    assert "did you mean MAX_ITERS?" in err
    err = kconfig("setconfig", "SPAM_PERIODIC_RESET=n", "SPAM_INTERVAL=300").stderr
    assert err.startswith("<setconfig>:2: SPAM_INTERVAL: has no effect: it depends on SPAM_PERIODIC_RESET")


def test_cross_rule_names_the_line_of_the_offending_symbol(ktree, kconfig):
    preset = ktree / "defconfigs" / "custom"
    preset.write_text("# custom GPT-2\nCONFIG_GPT2_CUSTOM=y\nCONFIG_GPT2_N_EMBD=100\nCONFIG_GPT2_N_HEAD=8\n")
    result = kconfig("defconfig", "defconfigs/custom")
    assert result.stderr == ("defconfigs/custom:4: GPT2_N_HEAD: GPT2_N_EMBD=100 is not a multiple of "
                             "GPT2_N_HEAD=8 (valid: GPT2_N_EMBD % GPT2_N_HEAD == 0)\n")
    assert not (ktree / ".config").exists()
    preset.write_text("CONFIG_MAX_ITERS=0\n")
    result = kconfig("defconfig", "defconfigs/custom")
    assert result.stderr.startswith("defconfigs/custom:1: MAX_ITERS: MAX_ITERS and MAX_EPOCHS are both 0")


def test_setconfig_applies_checked_values_and_keeps_the_old_config(configured, kconfig):
    old = (configured / ".config").read_text()
    result = kconfig("setconfig", "SPAM_INTERVAL=500", "CONFIG_LR=2e-3", 'OUT_DIR="runs/my run"', "COMPILE=y",
                     check=True)
    assert result.stderr == ""
    text = (configured / ".config").read_text()
    for line in ("CONFIG_SPAM_INTERVAL=500", 'CONFIG_LR="2e-3"', 'CONFIG_OUT_DIR="runs/my run"', "CONFIG_COMPILE=y"):
        assert line in text.split("\n")
    assert (configured / ".config.old").read_text() == old
    # Switching a feature off drops its dependent symbols, as olddefconfig would
    kconfig("setconfig", "SPAM_PERIODIC_RESET=n", check=True)
    text = (configured / ".config").read_text()
    assert "# CONFIG_SPAM_PERIODIC_RESET is not set" in text and "CONFIG_SPAM_INTERVAL" not in text
    # A size preset recomputes the symbols it fixes
    kconfig("setconfig", "GPT2_124M=y", check=True)
    assert "CONFIG_GPT2_N_LAYER=12" in (configured / ".config").read_text()


def test_later_fragments_win_and_may_pick_another_choice_member(ktree, kconfig):
    fragments = ktree / "defconfigs" / "fragments"
    (fragments / "a.config").write_text("CONFIG_SPAM_INTERVAL=700\nCONFIG_GPT2_124M=y\n")
    (fragments / "b.config").write_text("CONFIG_SPAM_INTERVAL=800\nCONFIG_GPT2_350M=y\n")
    kconfig("defconfig", "defconfigs/gpt2-tiny", "--fragment", "a", "--fragment", "b", check=True)
    text = (ktree / ".config").read_text().split("\n")
    assert "CONFIG_SPAM_INTERVAL=800" in text and "CONFIG_GPT2_350M=y" in text and "CONFIG_GPT2_N_LAYER=24" in text
    assert "CONFIG_MAX_ITERS=600" in text  # the preset's own settings stay


def test_fragment_for_another_optimizer_is_refused(ktree, kconfig):
    result = kconfig("defconfig", "defconfigs/gpt2-tiny-adamw", "--fragment", "spam-paper")
    assert result.returncode == 1
    assert result.stderr.startswith("defconfigs/fragments/spam-paper.config:")
    assert "SPAM_THETA: has no effect: it depends on OPTIM_ADAMW_SPAM" in result.stderr
    assert not (ktree / ".config").exists()


def test_missing_files_are_one_line_errors(ktree, kconfig):
    assert kconfig("settings").stderr == ".config: no such file; create it with `make defconfig` or " \
                                         "`make defconfig-<preset>`\n"
    err = kconfig("defconfig", "nonexistent").stderr
    assert err.startswith("nonexistent: no such preset (valid: ") and "gpt2-tiny" in err
    err = kconfig("defconfig", "gpt2", "--fragment", "nonexistent").stderr
    assert err.startswith("nonexistent: no such fragment (valid: ") and "spam-paper" in err
    assert kconfig("diffconfig", "only-one").returncode == 1


def test_kconfig_config_names_the_config_file(ktree, kconfig):
    env = {"KCONFIG_CONFIG": "other.config"}
    kconfig("defconfig", "defconfigs/resnet-tiny", check=True, env=env)
    assert not (ktree / ".config").exists()
    assert "CONFIG_MODEL_RESNET18=y" in (ktree / "other.config").read_text()
    kconfig("setconfig", "BATCH_SIZE=32", check=True, env=env)
    assert (ktree / "other.config.old").exists()


def test_the_command_line_tool_exits_non_zero_with_one_line(ktree, kconfig_process):
    kconfig_process("defconfig", "defconfigs/gpt2-tiny", check=True)
    before = snapshot(ktree)
    result = kconfig_process("setconfig", "SPAM_INTERVAL=0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "<setconfig>:1: SPAM_INTERVAL: 0 is out of range (valid: an integer in [1, 10000000])\n"
    assert snapshot(ktree) == before
    result = kconfig_process("no-such-command")
    assert result.returncode == 2 and len(result.stderr.strip().split("\n")) == 1
