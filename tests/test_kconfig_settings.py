"""generated/settings.py: typed values, injection safety, the ast-only loader, staleness."""

import ast
import os
import pickle

import pytest

from scripts.kconfig.settings import Settings, SettingsError, StaleSettingsError, load_settings, render_settings
from scripts.kconfig.strict import load, open_kconfig, read_layer

NASTY = [
    'a"b\\c\'d"); import os; os.system("touch pwned")#',
    "\\",
    '"',
    "\"\"\"; __import__('os').system('touch pwned'); \"\"\"",
    "{0} %s ${HOME} $(touch pwned) `touch pwned`",
    "ünïcödé ☃ \t tab",
]


@pytest.fixture
def settings_of(ktree, kconfig):
    """settings_of(preset, *setconfig_args) -> (Settings, text of the generated file)."""

    def make(preset, *assignments):
        kconfig("defconfig", "defconfigs/" + preset, check=True)
        if assignments:
            kconfig("setconfig", *assignments, check=True)
        kconfig("settings", check=True)
        path = ktree / "generated" / "settings.py"
        return load_settings(path), path.read_text()

    return make


def test_values_are_typed_and_unmet_dependencies_are_none(settings_of):
    cfg, _ = settings_of("gpt2-tiny")
    assert cfg.SPAM_THETA == 50.0 and type(cfg.SPAM_THETA) is float
    assert cfg.LR == 1e-3 and type(cfg.LR) is float
    assert cfg.SPAM_INTERVAL == 200 and type(cfg.SPAM_INTERVAL) is int
    assert cfg.GPT2_N_LAYER == 4 and cfg.MAX_ITERS == 600
    assert cfg.SPAM_ENABLE_CLIP is True and cfg.COMPILE is False
    assert cfg.OUT_DIR == "runs/gpt2-tiny" and cfg.SAMPLE_PROMPT == "ROMEO:"
    assert cfg.RESNET_BASE_WIDTH is None and cfg.SGD_MOMENTUM is None and cfg.DATA_DIGITS is None
    assert cfg.MODEL_RESNET18 is False

    cfg, text = settings_of("gpt2-tiny", "SPAM_PERIODIC_RESET=n")
    assert cfg.SPAM_PERIODIC_RESET is False
    assert cfg.SPAM_INTERVAL is None and cfg.SPAM_WARMUP is None and cfg.SPAM_WARMUP_STEPS is None
    assert "SPAM_INTERVAL: int | None = None\n" in text
    assert "SPAM_THETA: float = 50.0\n" in text

    cfg, _ = settings_of("resnet-tiny")
    assert cfg.RESNET_BASE_WIDTH == 16 and cfg.DATA_DIGITS is True and cfg.MODEL_GPT2 is False
    assert cfg.GPT2_N_LAYER is None and cfg.SAMPLE_PROMPT is None and cfg.DATA_VAL_FRACTION is None


def test_every_symbol_has_one_line(ktree, settings_of):
    cfg, text = settings_of("gpt2")
    kconf = open_kconfig(ktree)
    names = [sym.name for sym in kconf.unique_defined_syms]
    assert sorted(cfg.as_dict()) == sorted(names)
    body = [line for line in text.split("\n") if line and not line.startswith("#")]
    assert len(body) == len(names) + 2  # plus __source__ and __source_sha256__


@pytest.mark.parametrize("value", NASTY)
def test_strings_round_trip_as_data(ktree, settings_of, value):
    cfg, text = settings_of("gpt2-tiny", "SAMPLE_PROMPT=" + value)
    assert cfg.SAMPLE_PROMPT == value
    # The file is data only: no calls, imports or names beyond the annotations
    for node in ast.walk(ast.parse(text)):
        assert not isinstance(node, (ast.Call, ast.Import, ast.ImportFrom, ast.Attribute, ast.Expr))
    assert not (ktree / "pwned").exists()


def test_quoted_setconfig_value_is_unescaped(settings_of):
    cfg, _ = settings_of("gpt2-tiny", r'SAMPLE_PROMPT="say \"hi\" \\ bye"')
    assert cfg.SAMPLE_PROMPT == 'say "hi" \\ bye'


def test_line_breaks_round_trip_through_the_settings_file(ktree, kconfig, tmp_path):
    # .config cannot store a line break (setconfig refuses one), but the
    # settings writer must still keep such a value on one line, as data.
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    kconf = open_kconfig(ktree)
    load(kconf, [read_layer(kconf, str(ktree / ".config"))])
    value = 'line one\nline two"); import os\n#'
    kconf.syms["SAMPLE_PROMPT"].set_value(value)
    out = tmp_path / "settings.py"
    out.write_text(render_settings(kconf, str(ktree / ".config")))
    assert load_settings(out).SAMPLE_PROMPT == value


BAD_LINES = [
    'LR: float = __import__("os").system("touch pwned")',
    "import os",
    'print("hello")',
    "LR = 0.1",
    "LR: float = 1e-3 + 1",
    "LR: float = SOMETHING",
    "LR: float = [0.1]",
    'LR: float = "0.1"',
    "BATCH_SIZE: int = True",
    "COMPILE: bool = 1",
    "BATCH_SIZE: int = None",
    "BATCH_SIZE: list = 1",
    "lower_case: int = 1",
    "def LR(): pass",
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_hand_edited_settings_are_refused(ktree, settings_of, line):
    settings_of("gpt2-tiny")
    path = ktree / "generated" / "settings.py"
    stat = os.stat(path)
    path.write_text(path.read_text() + line + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert not isinstance(info.value, StaleSettingsError)
    assert str(info.value).startswith("{}:".format(path)) and "\n" not in str(info.value)
    assert not (ktree / "pwned").exists()


def test_duplicates_and_missing_source_are_refused(ktree, settings_of):
    settings_of("gpt2-tiny")
    path = ktree / "generated" / "settings.py"
    text = path.read_text()
    path.write_text(text + "LR: float = 0.5\n")
    with pytest.raises(SettingsError, match="LR is assigned twice"):
        load_settings(path, check_fresh=False)
    path.write_text("\n".join(line for line in text.split("\n") if not line.startswith("__source__")))
    with pytest.raises(SettingsError, match="__source__ is missing"):
        load_settings(path, check_fresh=False)


def test_stale_settings_are_refused(ktree, kconfig, settings_of):
    settings_of("gpt2-tiny")
    config, path = ktree / ".config", ktree / "generated" / "settings.py"
    load_settings(path)
    # .config newer than the settings (what `touch .config` does, made certain
    # by moving the settings one second into the past)
    settings_mtime = os.stat(path).st_mtime_ns
    os.utime(path, ns=(settings_mtime - 10**9, settings_mtime - 10**9))
    with pytest.raises(StaleSettingsError, match=r"run `make settings`"):
        load_settings(path)
    assert load_settings(path, check_fresh=False).SPAM_INTERVAL == 200
    kconfig("settings", check=True)
    load_settings(path)
    # Same mtime order, different contents
    config.write_text(config.read_text().replace("CONFIG_SPAM_INTERVAL=200", "CONFIG_SPAM_INTERVAL=300"))
    os.utime(config, ns=(settings_mtime, settings_mtime))
    with pytest.raises(StaleSettingsError, match="does not match"):
        load_settings(path)
    config.unlink()
    with pytest.raises(StaleSettingsError, match="no longer exists"):
        load_settings(path)


def test_missing_settings_file(tmp_path):
    with pytest.raises(SettingsError, match="not found; run `make settings`"):
        load_settings(tmp_path / "settings.py")


def test_settings_object_is_read_only_and_explains_unknown_names():
    cfg = Settings({"LR": 0.1, "SPAM_INTERVAL": None}, "/x/.config", "00")
    assert cfg.LR == 0.1 and cfg.SPAM_INTERVAL is None
    assert cfg.as_dict() == {"LR": 0.1, "SPAM_INTERVAL": None}
    cfg.as_dict()["LR"] = 5
    assert cfg.LR == 0.1
    with pytest.raises(AttributeError, match="no setting LEARNING_RATE: not a Kconfig symbol"):
        cfg.LEARNING_RATE
    with pytest.raises(AttributeError):
        cfg.LR = 0.2
    with pytest.raises(AttributeError):
        del cfg.LR
    assert cfg.source == "/x/.config"
    copy = pickle.loads(pickle.dumps(cfg))
    assert copy.as_dict() == cfg.as_dict() and copy.source == cfg.source
    assert getattr(cfg, "MISSING", "default") == "default"
