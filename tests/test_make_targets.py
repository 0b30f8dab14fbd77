"""The Makefile, run in a copy of the project with VENV= the test venv (nothing is installed)."""

import os
import re

from scripts.kconfig.settings import StaleSettingsError, load_settings


def test_help_lists_every_target_and_a_line_per_preset(tree, make):
    out = make("help", check=True).stdout
    for target in ("menuconfig", "defconfig", "olddefconfig", "oldconfig", "savedefconfig", "listnewconfig",
                   "list-defconfigs", "diffconfig", "setconfig", "settings", "train", "sample", "test", "bench",
                   "report", "clean", "mrproper", "distclean", "deps"):
        assert re.search(r"^  {} +\S".format(re.escape(target)), out, re.M), target
    presets = sorted(p.name for p in (tree / "defconfigs").iterdir() if p.is_file())
    assert presets
    for name in presets:
        assert len(re.findall(r"^  defconfig-{} +\S".format(re.escape(name)), out, re.M)) == 1, name
    assert "defconfig-fragments" not in out
    # The list comes from the folder: a new preset appears without touching the Makefile
    (tree / "defconfigs" / "my-preset").write_text("CONFIG_SEED=1\n")
    out = make("help", check=True).stdout
    assert re.search(r"^  defconfig-my-preset +\S", out, re.M)
    make("defconfig-my-preset", check=True)
    assert "CONFIG_SEED=1\n" in (tree / ".config").read_text()


def test_settings_from_a_preset_are_typed(tree, make):
    make("defconfig-gpt2", check=True)
    make("settings", check=True)
    cfg = load_settings(tree / "generated" / "settings.py")
    assert cfg.SPAM_THETA == 50.0 and isinstance(cfg.SPAM_THETA, float)
    assert cfg.SPAM_INTERVAL == 1000 and type(cfg.SPAM_INTERVAL) is int
    assert cfg.SPAM_ENABLE_CLIP is True
    assert cfg.GPT2_N_LAYER == 12 and cfg.OUT_DIR == "runs/gpt2"


def test_missing_config_comes_from_the_default_preset(tree, make):
    result = make("settings", check=True)
    assert "no .config yet" in result.stdout and "defconfigs/gpt-bytes" in result.stdout
    assert "CONFIG_OUT_DIR=\"runs/gpt-bytes\"" in (tree / ".config").read_text()
    cfg = load_settings(tree / "generated" / "settings.py")
    assert cfg.OUT_DIR == "runs/gpt-bytes" and cfg.TOKENIZER_BYTES is True


def test_settings_is_a_real_file_target(tree, make):
    make("defconfig-gpt2-tiny", check=True)
    settings = tree / "generated" / "settings.py"
    make("settings", check=True)
    mtime = os.stat(settings).st_mtime_ns
    assert make("-q", "generated/settings.py").returncode == 0  # up to date
    make("settings", check=True)
    assert os.stat(settings).st_mtime_ns == mtime  # the second run did nothing

    # .config changes after the settings: make sees it, load_settings refuses
    os.utime(settings, ns=(mtime - 10**9, mtime - 10**9))
    assert make("-q", "generated/settings.py").returncode == 1
    try:
        load_settings(settings)
        raise AssertionError("stale settings were accepted")
    except StaleSettingsError:
        pass
    make("settings", check=True)
    load_settings(settings)

    # so does a change to any Kconfig file
    kconfig = tree / "optim" / "Kconfig.spam"
    later = os.stat(settings).st_mtime_ns + 10**9
    os.utime(kconfig, ns=(later, later))
    assert make("-q", "generated/settings.py").returncode == 1


def test_fragments_are_merged_in_order(tree, make):
    make("defconfig-gpt2-tiny", "FRAGMENT=spam-paper", check=True)
    text = (tree / ".config").read_text().split("\n")
    for line in ('CONFIG_SPAM_THETA="5000.0"', "CONFIG_SPAM_INTERVAL=500", "CONFIG_SPAM_WARMUP_STEPS=150",
                 'CONFIG_SPAM_SPIKE_THRESHOLD="0.0"', "CONFIG_MAX_ITERS=600", 'CONFIG_OUT_DIR="runs/gpt2-tiny"'):
        assert line in text, line
    (tree / "defconfigs" / "fragments" / "later.config").write_text("CONFIG_SPAM_INTERVAL=700\n")
    make("defconfig-gpt2-tiny", "FRAGMENT=spam-paper clip1 later", check=True)
    text = (tree / ".config").read_text().split("\n")
    assert "CONFIG_SPAM_INTERVAL=700" in text and 'CONFIG_GRAD_CLIP="1.0"' in text
    assert 'CONFIG_SPAM_THETA="5000.0"' in text


def test_tool_errors_stop_make_with_one_line(tree, make):
    make("defconfig", check=True)
    before = (tree / ".config").read_bytes()
    result = make("setconfig", "SET=BATCH_SIZE=0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.split("\n")[0] == \
        "<setconfig>:1: BATCH_SIZE: 0 is out of range (valid: an integer in [1, 65536])"
    assert (tree / ".config").read_bytes() == before
    result = make("defconfig-gpt2-tiny-adamw", "FRAGMENT=spam-paper")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("defconfigs/fragments/spam-paper.config:")


def test_setconfig_diffconfig_and_savedefconfig(tree, make):
    make("defconfig-gpt2-tiny", check=True)
    make("setconfig", "SET=SPAM_INTERVAL=300 OUT_DIR=\"runs/my run\"", check=True)
    assert make("diffconfig", check=True).stdout == \
        ' OUT_DIR "runs/gpt2-tiny" -> "runs/my run"\n SPAM_INTERVAL 200 -> 300\n'
    out = make("diffconfig", "A=defconfigs/gpt2-tiny", "B=defconfigs/gpt2-tiny-adamw", check=True).stdout
    assert "+OPTIM_ADAMW y" in out
    make("defconfig-resnet-tiny", check=True)
    make("savedefconfig", check=True)
    assert (tree / "defconfig").read_bytes() == (tree / "defconfigs" / "resnet-tiny").read_bytes()


def test_report_needs_a_run_folder(make):
    result = make("report")
    assert result.returncode != 0 and "make report RUN=runs/" in result.stderr


def test_clean_and_mrproper(tree, make):
    make("settings", check=True)
    make("clean", check=True)
    assert not (tree / "generated").exists() and (tree / ".config").exists()
    make("mrproper", check=True)
    assert not (tree / ".config").exists()


def test_tool_targets_run_the_documented_commands(tree, make, venv):
    make("defconfig", check=True)
    make("settings", check=True)
    py = "{}/bin/python".format(venv)

    def dry(*args):
        return make("-n", *args, check=True).stdout.strip().split("\n")[-1]

    assert dry("train") == py + " -m train"
    assert dry("train", "NPROC=1") == py + " -m train"
    assert dry("train", "NPROC=4") == py + " -m torch.distributed.run --standalone --nproc_per_node=4 -m train"
    assert dry("sample").endswith(py + " -m train.sample")
    assert dry("test") == py + " -m pytest -q -n 2 tests"
    assert dry("test", "TEST_JOBS=0") == py + " -m pytest -q -n 0 tests"
    assert dry("bench").endswith(py + " -m scripts.bench")
    assert dry("report", "RUN=runs/x").endswith(py + " -m monitor.report runs/x")
