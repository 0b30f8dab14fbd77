"""The presets, the schema against the Kconfig files, diffconfig, listnewconfig, atomic writes."""

import math
import os
from pathlib import Path

import kconfiglib
import pytest

from scripts.kconfig import schema
from scripts.kconfig.atomic import write_atomically
from scripts.kconfig.diffconfig import diff_lines, diffconfig
from scripts.kconfig.strict import ConfigError, load, open_kconfig, read_layer

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (REPO / "defconfigs").iterdir() if p.is_file())
FRAGMENTS = sorted(p.name for p in (REPO / "defconfigs" / "fragments").glob("*.config"))


@pytest.fixture(scope="module")
def kconf():
    return open_kconfig(REPO)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_byte_for_byte(kconf, ktree, kconfig, name):
    # defconfig -> .config -> savedefconfig gives the preset back, unchanged
    kconfig("defconfig", "defconfigs/" + name, check=True)
    kconfig("savedefconfig", "roundtrip", check=True)
    assert (ktree / "roundtrip").read_bytes() == (REPO / "defconfigs" / name).read_bytes()
    # and the full .config is itself valid and stable under olddefconfig
    before = (ktree / ".config").read_bytes()
    assert "No change" in kconfig("olddefconfig", check=True).stdout
    assert (ktree / ".config").read_bytes() == before


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_every_fragment_merges_onto_an_adamwspam_preset(kconfig, fragment):
    # a fragment that chooses another optimizer merges onto the AdamW preset (as compare-spikes does)
    base = "defconfigs/gpt2-tiny-adamw" if fragment.endswith("stable-spam.config") else "defconfigs/gpt2-tiny"
    kconfig("check", base, "--fragment", fragment, check=True)


def test_presets_hold_what_they_promise(kconf):
    def values(name, *fragments):
        layers = [read_layer(kconf, str(REPO / "defconfigs" / name))]
        layers += [read_layer(kconf, str(REPO / "defconfigs" / "fragments" / f)) for f in fragments]
        load(kconf, layers)
        return {s.name: s.str_value for s in kconf.unique_defined_syms if s.config_string}

    v = values("gpt2")
    assert (v["GPT2_124M"], v["DATA_FINEWEB_EDU"], v["OPTIM_ADAMW_SPAM"], v["DTYPE_BF16"], v["COMPILE"]) == ("y",) * 5
    assert (v["BATCH_SIZE"], v["GRAD_ACCUM_STEPS"], v["MAX_ITERS"], v["LR_WARMUP_ITERS"]) == ("16", "32", "19073", "715")
    assert (v["LR"], v["MIN_LR"], v["WEIGHT_DECAY"], v["OUT_DIR"]) == ("6e-4", "6e-5", "0.1", "runs/gpt2")
    assert v["GRAD_CLIP"] == "1.0"  # nanoGPT's GPT-2 124M clips at 1.0 too
    assert (v["EVAL_INTERVAL"], v["EVAL_BATCHES"], v["CKPT_INTERVAL"]) == ("250", "20", "1000")
    # the seed's recommended SPAM settings
    assert (v["SPAM_ENABLE_CLIP"], v["SPAM_PERIODIC_RESET"], v["SPAM_WARMUP"]) == ("y", "y", "y")
    assert (v["SPAM_SPIKE_THRESHOLD"], v["SPAM_THETA"], v["SPAM_INTERVAL"], v["SPAM_WARMUP_STEPS"]) == \
        ("2.0", "50.0", "1000", "100")

    v = values("gpt2-tiny")
    assert (v["GPT2_TINY"], v["DATA_SHAKESPEARE"], v["OPTIM_ADAMW_SPAM"]) == ("y", "y", "y")
    assert (v["BATCH_SIZE"], v["LR"], v["MIN_LR"], v["LR_WARMUP_ITERS"], v["BETA2"]) == ("12", "1e-3", "1e-4", "50", "0.99")
    assert (v["EVAL_INTERVAL"], v["EVAL_BATCHES"], v["CKPT_INTERVAL"]) == ("100", "10", "100")
    assert (v["SPAM_INTERVAL"], v["SPAM_WARMUP_STEPS"], v["OUT_DIR"]) == ("200", "20", "runs/gpt2-tiny")
    # global-norm clipping at 1.0 in front of the optimizer: best or tied-best in every
    # scenario of the spike benchmark (docs/spike-experiment.md)
    assert (v["CLIP_NORM"], v["GRAD_CLIP"]) == ("y", "1.0")
    tiny = v

    v = values("gpt2-tiny-adamw")
    assert v["OPTIM_ADAMW"] == "y" and v["OUT_DIR"] == "runs/gpt2-tiny-adamw" and "SPAM_THETA" not in v
    assert all(v[k] == tiny[k] for k in ("MAX_ITERS", "LR", "MIN_LR", "BETA2", "BATCH_SIZE", "EVAL_INTERVAL",
                                         "GRAD_CLIP"))

    # the default run: a byte-level GPT at nanoGPT's shakespeare_char CPU shape, sized for 5 minutes
    v = values("gpt-bytes")
    assert (v["GPT2_CUSTOM"], v["TOKENIZER_BYTES"], v["DATA_SHAKESPEARE"], v["OPTIM_ADAMW_SPAM"]) == ("y",) * 4
    assert (v["GPT2_N_LAYER"], v["GPT2_N_HEAD"], v["GPT2_N_EMBD"], v["GPT2_BLOCK_SIZE"]) == ("4", "4", "128", "128")
    assert (v["BATCH_SIZE"], v["LR"], v["MIN_LR"], v["BETA2"], v["GPT2_DROPOUT"]) == ("16", "1e-3", "1e-4", "0.99", "0.0")
    assert (v["MAX_ITERS"], v["OUT_DIR"], v["TOKENIZER_GPT2"], v["DTYPE_FP32"]) == ("3000", "runs/gpt-bytes", "n", "y")
    assert v["GRAD_CLIP"] == "1.0"
    byte_spam = v
    v = values("gpt-bytes-adamw")
    assert v["OPTIM_ADAMW"] == "y" and v["OUT_DIR"] == "runs/gpt-bytes-adamw" and "SPAM_THETA" not in v
    # the twin differs in the optimizer (and its own settings) and the output folder only
    spam_only = {"OPTIM_ADAMW_SPAM", "OPTIM_ADAMW", "OUT_DIR"} | {k for k in byte_spam if k.startswith("SPAM_")}
    assert {k: x for k, x in v.items() if k not in spam_only} == \
        {k: x for k, x in byte_spam.items() if k not in spam_only}

    for name, model, data in (("resnet18", "MODEL_RESNET18", "DATA_CIFAR10"),
                              ("resnet50", "MODEL_RESNET50", "DATA_CIFAR100")):
        v = values(name)
        assert (v[model], v[data], v["OPTIM_ADAMW_SPAM"], v["DTYPE_BF16"]) == ("y",) * 4
        assert (v["BATCH_SIZE"], v["MAX_ITERS"], v["MAX_EPOCHS"], v["LR_WARMUP_ITERS"]) == ("128", "0", "30", "400")
        assert (v["LR"], v["MIN_LR"], v["WEIGHT_DECAY"]) == ("2e-3", "2e-5", "0.05")
        assert (v["EVAL_INTERVAL"], v["CKPT_INTERVAL"], v["OUT_DIR"]) == ("390", "1000", "runs/" + name)

    v = values("resnet-tiny")
    assert (v["MODEL_RESNET18"], v["DATA_DIGITS"], v["RESNET_BASE_WIDTH"], v["BATCH_SIZE"]) == ("y", "y", "16", "64")
    assert (v["MAX_ITERS"], v["MAX_EPOCHS"], v["LR"], v["MIN_LR"], v["WEIGHT_DECAY"]) == ("0", "8", "2e-3", "2e-5", "0.05")
    assert (v["LR_WARMUP_ITERS"], v["EVAL_INTERVAL"], v["CKPT_INTERVAL"]) == ("20", "50", "50")
    assert (v["SPAM_INTERVAL"], v["SPAM_WARMUP_STEPS"], v["OUT_DIR"]) == ("100", "10", "runs/resnet-tiny")

    v = values("gpt2", "spam-paper.config")
    assert (v["SPAM_THETA"], v["SPAM_INTERVAL"], v["SPAM_WARMUP_STEPS"], v["SPAM_SPIKE_THRESHOLD"]) == \
        ("5000.0", "500", "150", "0.0")


def test_kconfig_files_parse_without_warnings():
    kconf = open_kconfig(REPO)
    assert kconf.warnings == []


def test_schema_matches_the_kconfig_files(kconf):
    strings = {s.name for s in kconf.unique_defined_syms if s.orig_type is kconfiglib.STRING}
    for name in (*schema.FLOAT_RANGES, *schema.STEP_LISTS):
        assert name in strings, "{} is in schema.py but is not a string symbol in Kconfig".format(name)
    for rule in schema.CROSS_RULES:
        for name in rule.symbols:
            assert name in kconf.syms and kconf.syms[name].nodes, name
    # A string symbol with a numeric default is a float symbol: it must have a range
    for sym in kconf.unique_defined_syms:
        if sym.orig_type is kconfiglib.STRING:
            for default, _ in sym.defaults:
                try:
                    float(default.str_value)
                except ValueError:
                    continue
                assert sym.name in schema.FLOAT_RANGES, "{} looks like a float symbol".format(sym.name)
    # Every float default is valid
    for name, interval in schema.FLOAT_RANGES.items():
        for default, _ in kconf.syms[name].defaults:
            assert schema.parse_float(name, default.str_value) in interval


def test_intervals_and_float_parsing():
    assert str(schema.interval("(0, 1e12]")) == "(0, 1e12]"
    lr, beta = schema.FLOAT_RANGES["LR"], schema.FLOAT_RANGES["BETA1"]
    assert 0.0 not in lr and 10.0 in lr and 1e-12 in lr and 10.0000001 not in lr
    assert 0.0 in beta and 1.0 not in beta and 0.999999 in beta
    for text, value in (("6e-4", 6e-4), ("0.5", 0.5), (".5", 0.5), ("1.", 1.0), ("+1E-3", 1e-3), ("10", 10.0)):
        assert schema.parse_float("LR", text) == value
    for text in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1_0", " 1", "1 ", "0x1p-3", "", "1e", "e5", "0"):
        with pytest.raises(ValueError):
            schema.parse_float("LR", text)
    assert schema.parse_step_list("FAULT_NAN_STEPS", "1, 20,300") == [1, 20, 300]
    assert schema.parse_step_list("FAULT_NAN_STEPS", "") == []
    for text in ("0", "1,,2", "a", "-3", "1.5"):
        with pytest.raises(ValueError):
            schema.parse_step_list("FAULT_NAN_STEPS", text)
    assert not math.isnan(schema.parse_float("GRAD_CLIP", "0.0"))


def test_diffconfig_matches_the_kernel_format(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.write_text("#\n# header\n#\n"
                 "CONFIG_MODEL_GPT2=y\n"
                 "# CONFIG_MODEL_RESNET18 is not set\n"
                 "CONFIG_GPT2_N_LAYER=4\n"
                 'CONFIG_OUT_DIR="runs/a"\n'
                 "CONFIG_SPAM_INTERVAL=1000\n"
                 "CONFIG_ZZZ_GONE=y\n"
                 "CONFIG_COMPILE=y\n")
    b.write_text("CONFIG_MODEL_GPT2=y\n"
                 "CONFIG_MODEL_RESNET18=y\n"
                 "CONFIG_GPT2_N_LAYER=12\n"
                 'CONFIG_OUT_DIR="runs/b c"\n'
                 "# CONFIG_COMPILE is not set\n"
                 "CONFIG_AAA_NEW=5\n"
                 'CONFIG_SAMPLE_PROMPT="x"\n')
    assert diffconfig(str(a), str(b)) == [
        "-SPAM_INTERVAL 1000",
        "-ZZZ_GONE y",
        " COMPILE y -> n",
        " GPT2_N_LAYER 4 -> 12",
        " MODEL_RESNET18 n -> y",
        ' OUT_DIR "runs/a" -> "runs/b c"',
        "+AAA_NEW 5",
        '+SAMPLE_PROMPT "x"',
    ]
    assert diff_lines({"A": "y"}, {"A": "y"}) == []


def test_diffconfig_command_defaults_to_the_previous_config(kconfig):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    kconfig("setconfig", "SPAM_INTERVAL=500", "SEED=7", check=True)
    assert kconfig("diffconfig", check=True).stdout == " SEED 1337 -> 7\n SPAM_INTERVAL 200 -> 500\n"
    out = kconfig("diffconfig", "defconfigs/gpt2-tiny", "defconfigs/gpt2-tiny-adamw", check=True).stdout
    assert out.split("\n")[:2] == ["-SPAM_INTERVAL 200", "-SPAM_WARMUP_STEPS 20"]
    assert ' OUT_DIR "runs/gpt2-tiny" -> "runs/gpt2-tiny-adamw"' in out and "+OPTIM_ADAMW y" in out


def test_listnewconfig_lists_symbols_missing_from_the_config(ktree, kconfig):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    assert kconfig("listnewconfig", check=True).stdout == ""
    config = ktree / ".config"
    config.write_text("\n".join(line for line in config.read_text().split("\n")
                                if "CONFIG_SEED=" not in line and "CONFIG_TENSORBOARD" not in line))
    assert kconfig("listnewconfig", check=True).stdout == "CONFIG_SEED=1337\nCONFIG_TENSORBOARD=y\n"
    kconfig("olddefconfig", check=True)
    assert kconfig("listnewconfig", check=True).stdout == ""


def test_list_defconfigs_names_every_preset_and_fragment(kconfig):
    out = kconfig("list-defconfigs", check=True).stdout
    for name in PRESETS + [f[:-len(".config")] for f in FRAGMENTS]:
        assert "\n  {} ".format(name) in out


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")

    def broken(path):
        with open(path, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(str(target), broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_kconfig_parse_errors_are_one_line(tmp_path):
    (tmp_path / "Kconfig").write_text('config FOO\n\tbool "foo"\n\tdefault y\nsource "missing/Kconfig"\n')
    with pytest.raises(ConfigError) as info:
        open_kconfig(tmp_path)
    assert "\n" not in str(info.value) and "missing/Kconfig" in str(info.value)
