"""menuconfig driven as a person would, through tmux; and the check of what the editors save."""

import io
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (.ci/run installs it with apt-get)")


class Pane:
    """A detached tmux session on a private server, read with capture-pane."""

    def __init__(self, command, cwd, width=120, height=40):
        self.socket = "menuconfig-test-{}".format(os.getpid())
        self.tmux = ["tmux", "-L", self.socket, "-f", "/dev/null"]
        subprocess.run(self.tmux + ["new-session", "-d", "-s", "main", "-x", str(width), "-y", str(height),
                                    "-c", str(cwd), command], check=True)

    def text(self):
        return subprocess.run(self.tmux + ["capture-pane", "-p", "-t", "main"], capture_output=True, text=True,
                              check=True).stdout

    def keys(self, *keys):
        subprocess.run(self.tmux + ["send-keys", "-t", "main", *keys], check=True)

    def type(self, text):
        subprocess.run(self.tmux + ["send-keys", "-t", "main", "-l", text], check=True)

    def wait_for(self, pattern, gone=False, timeout=30):
        """Poll the screen until the regex appears (or, with gone=True, disappears)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if bool(re.search(pattern, screen, re.M)) != gone:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError("waited for {!r}{}; the screen shows:\n{}".format(
                    pattern, " to go" if gone else "", screen))
            time.sleep(0.05)

    def select(self, entry):
        """Move down from the first entry of the current menu to `entry` (a regex) and press Enter."""
        rows = self.text().split("\n")
        # Row 0 is the menu path, row 1 the title; entries follow
        target = next(i for i, row in enumerate(rows) if re.search(entry, row))
        for _ in range(target - 2):
            self.keys("Down")
        self.keys("Enter")

    def close(self):
        subprocess.run(self.tmux + ["kill-server"], capture_output=True)


@needs_tmux
def test_change_spam_interval_in_menuconfig(tree, make, venv):
    make("defconfig-gpt2-tiny", check=True)
    original = (tree / ".config").read_text()
    assert "CONFIG_SPAM_INTERVAL=200\n" in original
    command = ("env TERM=xterm-256color make --no-print-directory VENV={0} -o {0}/.deps-stamp menuconfig; "
               "echo __EXIT__=$?; sleep 60").format(venv)
    pane = Pane(command, tree)
    try:
        pane.wait_for(r"^ +Optimizer  --->")
        pane.select(r"^ +Optimizer  --->")
        pane.wait_for(r"^\(Top\) \S+ Optimizer$")  # the arrow is the terminal's ACS_RARROW
        pane.wait_for(r"^ +SPAM \(spike-aware")
        pane.select(r"^ +SPAM \(spike-aware")
        pane.wait_for(r"^\(Top\) \S+ Optimizer \S+ SPAM \(spike-aware")
        pane.wait_for(r"^\(200\) +Reset interval")
        pane.select(r"^\(200\) +Reset interval")
        pane.wait_for(r"Range: 1-10000000")
        pane.keys("C-e", "C-u")  # clear the field, as in a shell
        pane.type("500")
        pane.keys("Enter")
        pane.wait_for(r"^\(500\) +Reset interval")
        pane.keys("S")
        pane.wait_for(r"Filename to save configuration to")
        pane.keys("Enter")
        pane.wait_for(r"Success")
        pane.keys("Enter")
        pane.wait_for(r"Success", gone=True)
        pane.keys("Q")
        screen = pane.wait_for(r"__EXIT__=\d+")
        assert "__EXIT__=0" in screen, screen
    finally:
        pane.close()
    config = (tree / ".config").read_text()
    assert "CONFIG_SPAM_INTERVAL=500\n" in config
    assert config.replace("CONFIG_SPAM_INTERVAL=500", "CONFIG_SPAM_INTERVAL=200") == original
    assert (tree / ".config.old").read_text() == original


def _fake_editor(monkeypatch, module_name, function, edit):
    """Replace a kconfiglib editor by `edit(kconf, path)`, which saves what a person might."""
    module = pytest.importorskip(module_name)

    def editor(kconf, *args):
        edit(kconf, os.environ["KCONFIG_CONFIG"])

    monkeypatch.setattr(module, function, editor)


def test_menuconfig_result_is_checked_before_it_replaces_config(ktree, kconfig, monkeypatch):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    before = (ktree / ".config").read_bytes()

    def save_bad_value(kconf, path):
        kconf.syms["LR"].set_value("fast")  # menuconfig accepts any text for a string symbol
        kconf.write_config(path)

    _fake_editor(monkeypatch, "menuconfig", "menuconfig", save_bad_value)
    result = kconfig("menuconfig")
    assert result.returncode == 1
    assert re.fullmatch(r"\.config \(as saved by menuconfig\):\d+: LR: 'fast' is not a number "
                        r"\(valid: a decimal number in \(0, 10\]\)\n", result.stderr), result.stderr
    assert (ktree / ".config").read_bytes() == before and not (ktree / ".config.old").exists()

    def save_good_value(kconf, path):
        kconf.syms["LR"].set_value("2e-3")
        kconf.write_config(path)

    _fake_editor(monkeypatch, "menuconfig", "menuconfig", save_good_value)
    kconfig("menuconfig", check=True)
    assert 'CONFIG_LR="2e-3"\n' in (ktree / ".config").read_text()
    assert (ktree / ".config.old").read_bytes() == before


def test_menuconfig_refuses_to_start_on_a_broken_config(ktree, kconfig, monkeypatch):
    (ktree / ".config").write_text("CONFIG_BATCH_SIZE=0\n")
    _fake_editor(monkeypatch, "menuconfig", "menuconfig", lambda kconf, path: pytest.fail("editor started"))
    result = kconfig("menuconfig")
    assert result.returncode == 1 and result.stderr.startswith(".config:1: BATCH_SIZE: 0 is out of range")


def test_oldconfig_asks_for_new_symbols(ktree, kconfig, monkeypatch):
    kconfig("defconfig", "defconfigs/gpt2-tiny", check=True)
    config = ktree / ".config"
    config.write_text(config.read_text().replace("CONFIG_SEED=1337\n", ""))
    monkeypatch.setattr(sys, "stdin", io.StringIO("42\n"))
    result = kconfig("oldconfig", check=True)
    assert "SEED" in result.stdout
    assert "CONFIG_SEED=42\n" in config.read_text()

    config.write_text(config.read_text().replace("CONFIG_SEED=42\n", ""))
    before = config.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = kconfig("oldconfig")
    assert result.returncode == 1 and result.stderr.startswith("oldconfig: standard input ended")
    assert config.read_bytes() == before
