"""The Kconfig symbols of the rival spike methods (ZClip, Stable-SPAM, skip-step): typed,
defaults as the authors', bad values refused with one line naming the symbol."""

import re

import pytest

# (setconfig arguments, the symbol the error must name)
BAD = [
    (["CLIP_ZCLIP=y", "ZCLIP_ALPHA=1.0"], "ZCLIP_ALPHA"),
    (["CLIP_ZCLIP=y", "ZCLIP_ALPHA=0"], "ZCLIP_ALPHA"),
    (["CLIP_ZCLIP=y", "ZCLIP_Z_THRESHOLD=0.0"], "ZCLIP_Z_THRESHOLD"),
    (["CLIP_ZCLIP=y", "ZCLIP_WARMUP_STEPS=1"], "ZCLIP_WARMUP_STEPS"),
    (["CLIP_ZCLIP=y", "ZCLIP_CLIP_FACTOR=0"], "ZCLIP_CLIP_FACTOR"),
    (["CLIP_ZCLIP=y", "ZCLIP_MAX_NORM=-1"], "ZCLIP_MAX_NORM"),
    (["CLIP_ZCLIP=y", "ZCLIP_MAX_NORM=nan"], "ZCLIP_MAX_NORM"),
    (["CLIP_ZCLIP=y", "ZCLIP_FREEZE_ON_SPIKE=yes"], "ZCLIP_FREEZE_ON_SPIKE"),
    (["CLIP_ZCLIP=y", "GRAD_CLIP=1.0"], "GRAD_CLIP"),  # GRAD_CLIP is the fixed mode's bound only
    (["ZCLIP_ALPHA=0.9"], "ZCLIP_ALPHA"),  # ZClip not selected: it would do nothing
    (["OPTIM_STABLE_SPAM=y", "STABLE_SPAM_GAMMA1=1.0"], "STABLE_SPAM_GAMMA1"),
    (["OPTIM_STABLE_SPAM=y", "STABLE_SPAM_GAMMA2=-0.1"], "STABLE_SPAM_GAMMA2"),
    (["OPTIM_STABLE_SPAM=y", "STABLE_SPAM_GAMMA3=1"], "STABLE_SPAM_GAMMA3"),
    (["OPTIM_STABLE_SPAM=y", "STABLE_SPAM_INTERVAL=0"], "STABLE_SPAM_INTERVAL"),
    (["STABLE_SPAM_INTERVAL=500"], "STABLE_SPAM_INTERVAL"),  # AdamWSpam selected
    (["OPTIM_STABLE_SPAM=y", "SPAM_THETA=5000.0"], "SPAM_THETA"),
    (["SKIP_STEP=maybe"], "SKIP_STEP"),
    (["SKIP_STEP=y", "SKIP_STEP_WINDOW=3"], "SKIP_STEP_WINDOW"),
    (["SKIP_STEP=y", "SKIP_STEP_SIGMA=0"], "SKIP_STEP_SIGMA"),
    (["SKIP_STEP=y", "SKIP_STEP_SIGMA=1e999"], "SKIP_STEP_SIGMA"),
    (["SKIP_STEP_WINDOW=64"], "SKIP_STEP_WINDOW"),  # skip-step off
]


@pytest.fixture
def configured(kconfig):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    kconfig("settings", check=True)


@pytest.mark.parametrize("args,symbol", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_refused_with_one_line(configured, ktree, kconfig, args, symbol):
    before = (ktree / ".config").read_bytes()
    result = kconfig("setconfig", *args)
    assert result.returncode != 0
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in result.stderr
    m = re.match(r"<setconfig>:(\d+): ([A-Z0-9_]+): .+", lines[0])
    assert m and m.group(2) == symbol, lines[0]
    assert symbol in args[int(m.group(1)) - 1]
    assert (ktree / ".config").read_bytes() == before


def settings_text(ktree, kconfig, *args):
    if args:
        kconfig("setconfig", *args, check=True)
    kconfig("settings", check=True)
    return (ktree / "generated" / "settings.py").read_text()


def test_defaults_are_the_authors_and_typed(configured, ktree, kconfig):
    text = settings_text(ktree, kconfig, "CLIP_ZCLIP=y", "SKIP_STEP=y")
    for line in ("CLIP_ZCLIP: bool = True", "CLIP_NORM: bool = False", "GRAD_CLIP: float | None = None",
                 "ZCLIP_ALPHA: float = 0.97", "ZCLIP_Z_THRESHOLD: float = 2.5", "ZCLIP_WARMUP_STEPS: int = 25",
                 "ZCLIP_CLIP_FACTOR: float = 1.0", "ZCLIP_MAX_NORM: float = 1.0",
                 "ZCLIP_FREEZE_ON_SPIKE: bool = False", "SKIP_STEP: bool = True",
                 "SKIP_STEP_WINDOW: int = 128", "SKIP_STEP_SIGMA: float = 6.0"):
        assert line in text.split("\n"), line
    text = settings_text(ktree, kconfig, "OPTIM_STABLE_SPAM=y", "STABLE_SPAM_GAMMA2=0.99999")
    for line in ("OPTIM_STABLE_SPAM: bool = True", "OPTIM_ADAMW_SPAM: bool = False",
                 "STABLE_SPAM_GAMMA1: float = 0.7", "STABLE_SPAM_GAMMA2: float = 0.99999",
                 "STABLE_SPAM_GAMMA3: float = 0.999", "STABLE_SPAM_INTERVAL: int = 1000",
                 "BETA1: float = 0.9", "SPAM_THETA: float | None = None"):
        assert line in text.split("\n"), line


def test_fixed_clip_stays_the_default_mode(configured, ktree, kconfig):
    kconfig("defconfig", "defconfigs/gpt2-tiny-adamw", "--fragment", "clip1", check=True)
    text = settings_text(ktree, kconfig)
    assert "CLIP_NORM: bool = True" in text and "GRAD_CLIP: float = 1.0" in text
    assert "ZCLIP_ALPHA: float | None = None" in text and "SKIP_STEP: bool = False" in text
